"""Trellis: recipes that take a language model through the whole Hugging Face training pipeline."""

from trellis.core.console import hide_known_library_noise

__version__ = "0.1.0"

hide_known_library_noise()  # before any command or script imports transformers, TRL or PEFT
