"""Trellis: recipes that take a language model through the whole Hugging Face training pipeline."""

__version__ = "0.1.0"
