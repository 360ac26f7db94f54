"""Quantization: quantized variants of a model, measured against the original."""
