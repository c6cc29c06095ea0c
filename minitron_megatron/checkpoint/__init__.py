"""Run directories and Megatron dist checkpoints (atomic, reshardable across TP/PP)."""
