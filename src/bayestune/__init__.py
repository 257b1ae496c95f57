"""BayesTune: pick the scalars of a pretrained model worth fine-tuning, then tune only those."""

__version__ = "0.1.0"
