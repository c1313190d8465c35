"""Training: DeepSpeed config, the per-worker loop, evaluation, and the Ray Train launcher."""
