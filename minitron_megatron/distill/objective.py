"""The KD objective: per-token loss components and the Megatron-LM 3-tuple loss function.

The distillation model's last pipeline stage returns per-token components
`[b, s, 4]` = (kd, lm, is, router) instead of a loss, because the paper's dynamic weight
`alpha = L_logits / L_is` is a ratio of *masked means*, which needs the loss mask
that only the loss function sees. `DistillLoss` then builds, per microbatch,

    total = sum(kd) + ce_weight * sum(lm) + alpha * sum(is) + router_weight * sum(router),
    alpha = (sum(kd) / sum(is)).detach()

over unmasked tokens (alpha is the same whether taken from sums or means) and
returns `(total, num_tokens, reported)` so that Megatron's schedule divides by
tokens and microbatches exactly as for the plain LM loss.
"""

from typing import Optional

import torch

from minitron_megatron.config.distill import DistillConfig
from minitron_megatron.distill.fused_linear import fused_linear_kd_loss
from minitron_megatron.distill.losses import kd_logit_loss, vocab_parallel_ce_loss

COMPONENTS = ("kd", "lm", "is", "router")
"""Order of the last dim of the last stage's output."""


def per_token_components(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                         settings: DistillConfig, *, tp_group, true_vocab_size: int,
                         state_loss: Optional[torch.Tensor] = None, impl: Optional[str] = None,
                         router_loss: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[b, s, 4] float32 per-token (kd, lm, is, router) losses from vocab-parallel logits.

    student_logits: [b, s, v_s/tp] (requires grad); teacher_logits: [b, s, v_t/tp];
    labels: [b, s]; state_loss / router_loss: [b, s] intermediate-state / router-logit loss or
    None (zeros);
    impl: the `kd_logit_loss` impl (default `settings.kd_impl`).
    The LM cross-entropy is chunked like the KD loss (no float32 copy of the shard)
    and keeps its graph only when `ce_weight > 0`: otherwise it is only reported.
    """
    kd = kd_logit_loss(
        student_logits, teacher_logits, tp_group=tp_group, true_vocab_size=true_vocab_size,
        kind=settings.logit_loss, temperature=settings.temperature,
        chunk_tokens=settings.kd_chunk_tokens, impl=impl or settings.kd_impl,
    )  # [b, s]
    with torch.set_grad_enabled(torch.is_grad_enabled() and settings.ce_weight > 0):
        lm = vocab_parallel_ce_loss(student_logits, labels, tp_group=tp_group,
                                    chunk_tokens=settings.kd_chunk_tokens)  # [b, s]
    return _stack(kd, lm, state_loss, router_loss)


def fused_per_token_components(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                               teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, labels: torch.Tensor,
                               settings: DistillConfig, *, tp_group, true_vocab_size: int,
                               state_loss: Optional[torch.Tensor] = None,
                               teacher_weight_cache: Optional[dict] = None,
                               loss_mask: Optional[torch.Tensor] = None,
                               router_loss: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[b, s, 4] float32 per-token (kd, lm, is, router) losses from final hidden states and output weights.

    *_hidden: [s, b, h] (Megatron's layout, after the final norm, replicated over TP);
    *_weight: [v_padded/tp, h] output-layer shards; labels: [b, s]. KD and the student
    CE come out of one fused pass (`fused_linear.py`); no logits tensor exists whole.
    loss_mask: [b, s], optional: the mask the loss function will apply (tokens it masks
    then cost no gradient work; the results are the same without it).
    """
    kd, lm = fused_linear_kd_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels.t(), tp_group=tp_group,
        true_vocab_size=true_vocab_size, kind=settings.logit_loss, temperature=settings.temperature,
        chunk_tokens=settings.kd_chunk_tokens, ce_weight=settings.ce_weight,
        teacher_weight_cache=teacher_weight_cache, token_weights=None if loss_mask is None else loss_mask.t(),
    )  # [s, b] each
    if settings.ce_weight <= 0:
        lm = lm.detach()  # reported only: its backward gets no work
    return _stack(kd.t(), lm.t(), state_loss, router_loss)


def _stack(kd: torch.Tensor, lm: torch.Tensor, state_loss: Optional[torch.Tensor],
           router_loss: Optional[torch.Tensor]) -> torch.Tensor:
    zeros = torch.zeros_like(kd)
    parts = [kd, lm.float(), zeros if state_loss is None else state_loss.float(),
             zeros if router_loss is None else router_loss.float()]
    return torch.stack(parts, dim=-1)  # [b, s, 4]


class DistillLoss:
    """`loss_func(loss_mask, output)` in Megatron-LM's 3-tuple form for the KD components.

    Reported (each a [sum, count] pair that the caller sums over microbatches and DP):
    "loss" (the optimised total), "kd loss", "lm loss" (the student's own CE, the
    number comparable with `train`/`evaluate`), and with an intermediate loss
    "is loss" and "alpha" (count = microbatches), with a router-logit loss "router loss"
    (unweighted; the total adds it times `distill.router_loss_weight`).
    """

    def __init__(self, settings: DistillConfig, has_state_loss: bool):
        self.ce_weight = float(settings.ce_weight)
        self.has_state_loss = has_state_loss
        self.router_weight = float(settings.router_loss_weight)

    def __call__(self, loss_mask: torch.Tensor, output: torch.Tensor):
        mask = loss_mask.float().reshape(-1)  # [b*s]
        sums = (output.float().reshape(-1, len(COMPONENTS)) * mask[:, None]).sum(dim=0)  # [3]
        kd, lm, state, router = sums[0], sums[1], sums[2], sums[3]
        # Never a view (of `sums`): Megatron-LM's schedules free the last stage's loss
        # with deallocate_pipeline_outputs=True, which asserts on views.
        total = kd + self.ce_weight * lm if self.ce_weight > 0 else kd.clone()
        num_tokens = mask.sum().to(torch.int)
        count = num_tokens.float()
        extra = {}
        if self.has_state_loss:
            # 0/0 (a student identical to its teacher) gives alpha = 0, not NaN.
            alpha = (kd / state.clamp_min(1e-12)).detach()
            total = total + alpha * state
            extra = {"is loss": torch.stack([state.detach(), count]),
                     "alpha": torch.stack([alpha, torch.ones_like(alpha)])}
        if self.router_weight > 0:
            total = total + self.router_weight * router
            extra["router loss"] = torch.stack([router.detach(), count])
        report = {
            "loss": torch.stack([total.detach(), count]),
            "kd loss": torch.stack([kd.detach(), count]),
            "lm loss": torch.stack([lm.detach(), count]),
            **extra,
        }
        return total, num_tokens, report

    @property
    def reported_keys(self):
        return (("loss", "kd loss", "lm loss") + (("is loss", "alpha") if self.has_state_loss else ())
                + (("router loss",) if self.router_weight > 0 else ()))
