"""The per-worker side of training: model, DeepSpeed engine, the loop, evaluation, checkpoints, export."""
