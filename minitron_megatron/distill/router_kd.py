"""Router-logit distillation: a MoE student's routers learn the teacher's routing.

An intermediate loss next to the hidden-state ones (`intermediate.py`): per token and per
paired MoE layer, KL(p_teacher || p_student) between the routers' softmax distributions over
the student's experts. A pruned student keeps a subset of the teacher's experts (its
`trim_plan.json`: kept layers, and per kept layer the kept experts in order), so the teacher's
distribution is taken over those experts' logits only: new expert k of student layer j is
teacher expert `experts[j][k]` of teacher layer `layers[j]`. Without a trim plan the student
must have the teacher's depth and experts (identity pairing).

Logits are Megatron's own: each router's `routing(logits)` call is wrapped on the instance for
one forward (`capture_router_logits`), so the loss sees exactly what routed the tokens, with
the student's graph into its router weights and hidden states. Routers are replicated over TP
and EP (every rank routes the same [s, b] tokens without sequence parallelism), so each rank
computes the same loss, as for the hidden-state losses.
"""

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from minitron_megatron.model import modules

RouterPair = Tuple[int, int, List[int]]
"""(student layer, teacher layer, the teacher's expert index of each student expert)."""


def router_pairs(student_cfg, teacher_cfg, plan) -> Tuple[List[RouterPair], List[str]]:
    """(pairs, problems) for a student / teacher ModelConfig pair; `plan`: the student's TrimPlan
    (None when the student run dir was not pruned)."""
    if not student_cfg.is_moe or not teacher_cfg.is_moe:
        side = "student" if not student_cfg.is_moe else "teacher"
        return [], [f"distill.router_loss_weight > 0 needs a MoE student and teacher (the {side} has no "
                    "num_moe_experts)"]
    if plan is not None and plan.experts is not None:
        if plan.source.get("num_layers") != teacher_cfg.num_layers or \
                plan.source.get("num_moe_experts", teacher_cfg.num_moe_experts) != teacher_cfg.num_moe_experts:
            return [], [f"distill.router_loss_weight > 0: the student's trim_plan.json was made from a model with "
                        f"{plan.source.get('num_layers')} layers, not from this teacher "
                        f"({teacher_cfg.num_layers} layers, {teacher_cfg.num_moe_experts} experts)"]
        return [(j, layer, list(plan.experts[j])) for j, layer in enumerate(plan.layers)], []
    if (student_cfg.num_layers, student_cfg.num_moe_experts) != (teacher_cfg.num_layers, teacher_cfg.num_moe_experts):
        return [], [f"distill.router_loss_weight > 0: the student ({student_cfg.num_layers} layers, "
                    f"{student_cfg.num_moe_experts} experts) has no trim_plan.json saying which teacher experts "
                    f"its experts are, and is not the teacher's shape ({teacher_cfg.num_layers} layers, "
                    f"{teacher_cfg.num_moe_experts} experts)"]
    experts = list(range(teacher_cfg.num_moe_experts))
    return [(i, i, experts) for i in range(student_cfg.num_layers)], []


def _router(gpt_model, layer: int):
    return modules.decoder_layer(gpt_model, layer).mlp.router


@contextlib.contextmanager
def capture_router_logits(gpt_model, layers: Sequence[int]):
    """Within the block, forward calls of `gpt_model` fill the yielded dict with
    {layer index: router logits [s*b, num_experts]} (Megatron's token order: s-major)."""
    store: Dict[int, torch.Tensor] = {}
    routers = []
    for index in sorted(set(layers)):
        router = _router(gpt_model, index)
        original = router.routing  # the bound method

        def routing(logits, *args, _original=original, _index=index, **kwargs):
            store[_index] = logits.reshape(-1, logits.shape[-1])
            return _original(logits, *args, **kwargs)

        router.routing = routing  # an instance attribute: shadows the class's method
        routers.append(router)
    try:
        yield store
    finally:
        for router in routers:
            del router.routing


def router_kd_loss(student_logits: Dict[int, torch.Tensor], teacher_logits: Dict[int, torch.Tensor],
                   pairs: Sequence[RouterPair], batch: int) -> torch.Tensor:
    """Per-token loss [b, s] (float32): the sum over pairs of KL(p_t || p_s), p = softmax of each
    router's logits, the teacher's restricted to the student's experts."""
    total: Optional[torch.Tensor] = None
    for s_layer, t_layer, experts in pairs:
        s_logits = student_logits[s_layer].float()  # [s*b, E_s]
        with torch.no_grad():
            index = torch.tensor(experts, device=s_logits.device)
            t_logp = torch.log_softmax(teacher_logits[t_layer].float().index_select(-1, index), dim=-1)  # [s*b, E_s]
        s_logp = torch.log_softmax(s_logits, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(dim=-1)  # [s*b]
        total = kl if total is None else total + kl
    return total.reshape(-1, batch).transpose(0, 1)  # [b, s]
