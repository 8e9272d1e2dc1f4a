"""Trainers: `sft` (supervised fine-tuning) and `grpo`, with shared helpers.

- `optim`: `build_optimizer(config.train, total_steps)` -> (AdamW + warmup/decay + clipping, lr schedule)
- `checkpointing`: `CheckpointManager` (orbax: async, keep-last-K, atomic, resharding restore), `PreemptionGuard`
- `metrics`: `MetricsLogger` (tqdm bar, metrics JSONL, optional TensorBoard), `read_metrics`
- `sft`: `train_sft(config, examples_or_path, workdir, resume)` and the `stat-jax sft` command
"""
