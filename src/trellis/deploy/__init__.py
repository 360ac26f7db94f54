"""Deployment: export to GGUF for llama.cpp (with the logits checked against the original), and the serving
check that vLLM's OpenAI-compatible server answers as transformers does."""
