"""Training: models, the shared run of a training stage, pretraining, alignment, and their measurements."""
