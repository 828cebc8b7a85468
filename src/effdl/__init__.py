"""effdl: five published efficient-deep-learning systems as one PyTorch library."""

__version__ = "0.1.0"
