"""moestack: train, checkpoint, place and serve Mixture-of-Experts models on PyTorch."""

__version__ = "0.1.0"
