"""Data: sources and formats, the data stage (clean, filter, deduplicate, decontaminate, tokenizer, pack),
chat templates, and the generated tiny world."""
