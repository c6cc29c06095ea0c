"""Memory planning: per-rank bytes of a distillation run from shapes alone (meta-device builds)."""
