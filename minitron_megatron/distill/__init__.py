"""Knowledge distillation: vocab-parallel KD logit losses (PyTorch and fused Triton, and
fused with the output layers: from hidden states and output weights),
intermediate-state losses, the co-located teacher+student model and its drop-in API.

    python -m minitron_megatron.distill teacher.load=DIR student.load=DIR data=stdlib save=DIR

`distill.loop` (the command) and `distill.api` (for Megatron-LM recipes) are
imported on use: they pull in Megatron-core.
"""

from minitron_megatron.distill.fused_linear import fused_linear_kd_loss
from minitron_megatron.distill.losses import (
    IMPLS,
    KINDS,
    LOGIT_IMPLS,
    VocabLayout,
    kd_logit_loss,
    resolve_layout,
    vocab_parallel_ce_loss,
)
from minitron_megatron.distill.model import DistillationModel
from minitron_megatron.distill.objective import DistillLoss

__all__ = [
    "IMPLS",
    "KINDS",
    "LOGIT_IMPLS",
    "DistillLoss",
    "DistillationModel",
    "VocabLayout",
    "fused_linear_kd_loss",
    "kd_logit_loss",
    "resolve_layout",
    "vocab_parallel_ce_loss",
]
