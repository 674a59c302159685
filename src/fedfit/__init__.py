"""fedfit: federated fine-tuning of language models on resource-constrained devices."""

__version__ = "0.1.0"
