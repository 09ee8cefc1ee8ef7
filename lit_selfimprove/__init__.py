"""lit-selfimprove: PyTorch Lightning modules for self-improving language models."""

__version__ = "0.1.0"
