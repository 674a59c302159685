"""Zero-order (ZO) federated methods: gradients from pairs of forward passes (docs/methods.md).

- core.py: seeded in-place perturbation restored bit for bit, the projected gradient, replay.
- mezo.py: FedMeZO (``fedmezo``) and the plumbing every ZO method shares.
- kseed.py: FedKSeed and FedKSeed-Pro (``fedkseed``, ``fedkseed-pro``).
- decomfl.py: DeComFL (``decomfl``).
- spzo.py: FedSPZO (``fedspzo``).

Importing this package registers them all.
"""

from fedfit.algorithms.zeroorder import decomfl, kseed, mezo, spzo  # noqa: F401  (registration)
