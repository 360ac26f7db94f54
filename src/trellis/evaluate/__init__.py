"""Evaluation: lm-eval benchmarks, perplexity, comparisons across checkpoints, and gates."""
