"""Knowledge distillation: vocab-parallel KD logit losses (PyTorch and fused Triton)."""

from minitron_megatron.distill.losses import (
    IMPLS,
    KINDS,
    VocabLayout,
    kd_logit_loss,
    resolve_layout,
    vocab_parallel_ce_loss,
)

__all__ = ["IMPLS", "KINDS", "VocabLayout", "kd_logit_loss", "resolve_layout", "vocab_parallel_ce_loss"]
