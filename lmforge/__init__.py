"""lmforge: train, fine-tune, compress, evaluate and serve Transformer language models."""

__version__ = "0.1.0"
