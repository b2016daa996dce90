"""rora-fast: RoRA (Regularized Low-Rank Adaptation) as fast drop-in PyTorch modules."""
__version__ = "0.1.0"
