"""CoCoFL on transformer blocks (Pfeiffer et al., "CoCoFL: Communication- and computation-aware
federated learning via partial NN freezing and quantization", TMLR 2023), docs/methods.md.

CoCoFL lets a constrained device train part of the network and *freeze* the rest, and runs
the frozen layers quantised: a frozen layer needs no gradient and no saved activations, and
in low precision its weights and its forward pass cost less, so the device can afford more
trained layers within the same memory. fedfit carries this over to transformers as layer fine-
tuning (algorithms/layers.py: the top ``n`` blocks and the head trained, layer-wise averaging)
whose frozen prefix (the embeddings and every block below the trained ones) the device holds
in ``frozen_dtype`` (bfloat16, models/precision.py); the trained blocks, their gradients and
optimiser state stay float32, and the prefix's output is cast to float32 where it enters the
first trained block. The planner picks each device's depth with the frozen prefix's weights
at 2 bytes per element (costs/predict.py; measured within 3% on tiny-bert and minilm-l6).

What does not carry over, and how it is handled:

- CoCoFL freezes layers anywhere in a CNN and picks, per device, among configurations
  profiled on the device. Here the frozen layers are the bottom ones, as in layer fine-
  tuning: a frozen block above a trained one would still need its backward pass (activation
  gradients) in the low precision. Depth per device is the planner's choice.
- CoCoFL quantises frozen layers to 8-bit integers with its own fused kernels. fedfit uses
  bfloat16: PyTorch's CPU int8 modules (torch.ao dynamic quantisation) hold weights outside
  ``parameters()`` and are inference-only, so neither the cost meter nor the simulation
  (one model shared by every client, restored bit for bit) could treat them as the device
  would. The memory saving is therefore 2x on the frozen weights, not 4x.
- Uploads are the trained tensors in float32 (``[compress]`` quantises them if set).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedfit.algorithms.layers import LayerFineTuning, LayersOptions
from fedfit.algorithms.registry import register
from fedfit.config import ConfigError
from fedfit.errors import check_choice
from fedfit.models.precision import FROZEN_DTYPES


@dataclass(frozen=True)
class CocoflOptions(LayersOptions):
    frozen_dtype: str = field(
        default="bfloat16",
        metadata={"help": "precision of the frozen prefix on the device: bfloat16 | float32"},
    )
    prefix_cache: bool = field(
        default=False,
        metadata={"help": "simulation only; not with a bfloat16 prefix (its outputs differ)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.frozen_dtype, "method.frozen_dtype", FROZEN_DTYPES)
        if self.prefix_cache and self.frozen_dtype != "float32":
            raise ConfigError(
                "method.prefix_cache: the cache replays float32 outputs of the frozen prefix, "
                "which a bfloat16 prefix does not compute; set prefix_cache = false"
            )


class CoCoFL(LayerFineTuning):
    """Layer fine-tuning with the frozen prefix held in ``frozen_dtype`` on the device."""

    name = "cocofl"
    options: CocoflOptions

    @property
    def frozen_dtype(self) -> str:
        """``method.frozen_dtype``: what the planner prices the prefix at and the client
        holds it in (layers' plan and client_update read it)."""
        return self.options.frozen_dtype


register(
    "cocofl",
    CocoflOptions,
    "CoCoFL on transformers: layer fine-tuning with the frozen prefix held in bfloat16",
)(CoCoFL)
