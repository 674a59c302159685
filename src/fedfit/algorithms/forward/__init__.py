"""Gradients without backprop: forward gradients (Spry, FedFGD, FwdLLM) and finite
differences (Baffle).

Forward gradient (Baydin et al. 2022). For a loss f(w) and a tangent v ~ N(0, I),
``torch.func.jvp`` runs ONE forward pass on dual numbers and returns (f(w), grad f . v);
``(grad f . v) v`` is an unbiased estimate of grad f, since E[v v^T] = I. Averaging K tangents
divides its variance by K. No graph is built and no activation is kept for a backward pass:
only the current layer's primal and tangent values are live, which is where the memory
saving over backprop comes from. The jvp runs over ``functional_call`` on the trained tensors
only, so tangents (and their cost) cover exactly those.

All four methods keep the backbone frozen and train PEFT tensors (``peft``: lora, bitfit, ia3
or head), and run the model in eval mode: dropout off, so that the function a tangent (or a
+/- perturbation pair) probes is one deterministic function of the weights; dropout's noise
would only add variance to estimates that already have plenty.

- ``fedfgd``: FedAvg whose local steps use the forward gradient on every trainable tensor.
- ``spry`` (Panchal et al., NeurIPS 2024): the round's trainable tensors are split among its
  clients (:func:`assign_groups`); each client trains only its share (plus the head when
  ``share_head``), with forward gradients and the client optimiser; the server averages each
  tensor over the clients that trained it and applies the server optimiser, FedYogi in the
  paper (``[server] optimizer = "fedyogi"``, ``lr = 0.01``; examples/spry.toml).
  ``communication = "iteration"``: each round is ONE minibatch per client, and the client
  uploads only its K jvp values (scalars); the server regenerates the client's tangents from
  the client's seed, rebuilds ``mean_k jvp_k v_k`` and steps with ``-train.lr`` times that
  through the server optimiser. This is our reading of the paper's per-iteration variant.
- ``fwdllm`` (Xu et al. 2023): forward gradients with K tangents (default 20) chosen by
  FwdLLM's discriminative sampling: ``candidates`` random tangents are scored by |cosine|
  with the previous round's global update (sent with the download, and counted in it), and
  the K best are used; in round 1 there is no previous update, so the first K are used.
  Implemented with exact jvp, so FwdLLM's perturbation scale (1e-2, for its numerical
  directional derivatives) has no role. Its variance-controlled pacing (more tangents when
  the clients' estimates disagree) is NOT implemented: K is fixed.
- ``baffle`` (Feng et al. 2023): central finite differences with K perturbations,
  ``g = mean_k (f(w + s v_k) - f(w - s v_k)) / (2 s) v_k`` with s = ``sigma`` (1e-4); both
  signs of a pair use the same batch and the same (dropout-free) function, and the trained
  tensors are restored from a copy (PEFT tensors: small) so that no rounding drifts the
  weights. The estimate drives FedAvg's local steps, as for fedfgd.
"""

from fedfit.algorithms.forward.baffle import Baffle, BaffleOptions
from fedfit.algorithms.forward.core import (
    cosine,
    draw_tangents,
    finite_difference_gradient,
    forward_gradient,
    frozen_linears_as_constants,
    loss_and_jvp,
    select_tangents,
)
from fedfit.algorithms.forward.fedfgd import FedFGD, ForwardOptions
from fedfit.algorithms.forward.fwdllm import FwdLLM, FwdLLMOptions
from fedfit.algorithms.forward.spry import Spry, SpryOptions, assign_groups, tensor_groups

__all__ = [
    "Baffle",
    "BaffleOptions",
    "FedFGD",
    "ForwardOptions",
    "FwdLLM",
    "FwdLLMOptions",
    "Spry",
    "SpryOptions",
    "assign_groups",
    "cosine",
    "draw_tangents",
    "finite_difference_gradient",
    "forward_gradient",
    "frozen_linears_as_constants",
    "loss_and_jvp",
    "select_tangents",
    "tensor_groups",
]
