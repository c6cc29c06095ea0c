"""`distill` settings: knowledge distillation of a pruned student from its teacher."""

from dataclasses import dataclass
from typing import List, Optional

from minitron_megatron.config.train import TrainConfig


@dataclass
class ModelSource:
    load: Optional[str] = None
    """A run directory (model.yaml + checkpoint/)."""
    params_dtype: Optional[str] = None
    """Override the run's dtype (e.g. bfloat16 for a frozen teacher on GPU); None keeps it."""
    precision: Optional[str] = None
    """Teacher only: fp8 (bf16 with FP8 GEMMs in its transformer linears: weights e4m3 per
    output channel, activations per token; half the bf16 weight memory), bf16 or fp32,
    applied after loading; None runs the teacher in its run's (or params_dtype's) dtype."""


@dataclass
class DistillConfig(TrainConfig):
    """The loop keys are `train`'s (`distill.steps`, `distill.micro_batch_size`,
    `distill.optim.lr`, `distill.eval_interval`, ...), then the distillation ones."""

    logit_loss: str = "forward_kl"
    """forward_kl (KL(teacher||student), the paper's choice) or reverse_kl."""
    temperature: float = 1.0
    ce_weight: float = 0.0
    """Weight of the student's own LM cross-entropy added to the KD loss (paper: 0)."""
    kd_chunk_tokens: Optional[int] = None
    """Tokens per chunk of the KD loss (None: sized so one float32 chunk is ~64 MiB)."""
    kd_impl: str = "fused_linear"
    """fused_linear (default: the loss from final hidden states and output weights, chunked
    over tokens, so no logits tensor exists whole; falls back to torch, with a warning,
    where the output layer needs the logits path, e.g. sequence parallelism or MTP; its
    default chunk holds ~128 MiB per float32 [chunk, V/tp] buffer),
    torch (chunked loss on materialised logits) or triton (fused kernels on logits;
    GPU, or TRITON_INTERPRET=1 on CPU)."""
    intermediate_loss: Optional[str] = None
    """None, cosine (paper's best) or mse, between post-norm hidden states of mapped layers."""
    layer_map: Optional[List[List[int]]] = None
    """[[student_layer, teacher_layer], ...] (0-based); None maps the student's layers
    evenly onto the teacher's last layers, as the paper does after depth pruning."""
    embedding_loss: bool = False
    router_loss_weight: float = 0.0
    """MoE student and teacher: weight of the router-logit loss (KL between the teachers' and the
    students' routing distributions over the student's experts, summed over paired MoE layers;
    distill/router_kd.py), logged as router_loss; 0 turns it off. PP=1, no sequence parallelism."""
    """Also match the embedding outputs (with a projection when hidden sizes differ)."""
    memory_check: bool = True
    """On CUDA, refuse (before loading the teacher) a run whose memory plan (plan/guard.py, as
    `python -m minitron_megatron.plan` computes it) exceeds the device's memory."""
    projection: bool = True
    """Learn a shared linear map student hidden -> teacher hidden for the intermediate losses
    when the hidden sizes differ (saved with the student); false requires equal hidden sizes."""
