"""The router-logit KD loss (distill/router_kd.py): its value and gradient against a float64
reference, and how student experts are paired with the teacher's."""

import types

import pytest
import torch

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.distill.router_kd import router_kd_loss, router_pairs


def _reference(student: torch.Tensor, teacher: torch.Tensor, experts) -> torch.Tensor:
    """KL(p_t || p_s) per token, float64, p_t over the kept experts' teacher logits."""
    p_t = torch.softmax(teacher.double()[:, experts], dim=-1)
    return (p_t * (p_t.log() - torch.log_softmax(student.double(), dim=-1))).sum(-1)


def test_loss_and_gradient_equal_the_float64_reference_over_kept_experts():
    """Catches a loss taken over the teacher's full expert set (not the kept subset, in the
    student's order), a swapped KL direction, or a wrong [s*b] -> [b, s] token order."""
    s, b, experts = 5, 3, [6, 1, 4]
    gen = torch.Generator().manual_seed(0)
    teacher = {2: torch.randn(s * b, 8, generator=gen), 5: torch.randn(s * b, 8, generator=gen)}
    student = {0: torch.randn(s * b, 3, generator=gen, requires_grad=True),
               1: torch.randn(s * b, 3, generator=gen, requires_grad=True)}
    pairs = [(0, 2, experts), (1, 5, [0, 7, 3])]
    loss = router_kd_loss(student, teacher, pairs, batch=b)  # [b, s]
    want = sum(_reference(student[j], teacher[t], e) for j, t, e in pairs)  # [s*b], s-major
    assert loss.shape == (b, s)
    torch.testing.assert_close(loss.double(), want.reshape(s, b).t(), rtol=1e-6, atol=1e-7)
    loss.sum().backward()
    for j, t, e in pairs:  # d KL / d student logits = softmax(student) - p_t
        grad = torch.softmax(student[j].double(), -1) - torch.softmax(teacher[t].double()[:, e], -1)
        torch.testing.assert_close(student[j].grad.double(), grad, rtol=1e-5, atol=1e-6)


def test_a_student_routing_like_its_teacher_costs_nothing():
    """Catches a loss that is not a divergence (non-zero for equal distributions): logits equal
    up to a per-token shift give the same softmax, so zero loss."""
    teacher = {0: torch.randn(12, 8)}
    student = {0: teacher[0][:, [1, 2, 5]] + torch.randn(12, 1)}
    assert router_kd_loss(student, teacher, [(0, 0, [1, 2, 5])], batch=4).abs().max() < 1e-6


def _moe(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                 num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32), **kw})


def test_pairs_follow_the_trim_plan_or_need_the_teachers_shape():
    """Catches student experts paired by position rather than by the teacher experts they were
    cut from, or a silent pairing of a student that cannot be paired."""
    teacher = _moe()
    plan = types.SimpleNamespace(source={"num_layers": 4, "num_moe_experts": 8}, layers=[0, 2, 3],
                                 experts=[[1, 4], [0, 7], [2, 3]])
    pairs, problems = router_pairs(_moe(num_layers=3, num_moe_experts=2), teacher, plan)
    assert problems == [] and pairs == [(0, 0, [1, 4]), (1, 2, [0, 7]), (2, 3, [2, 3])]
    pairs, problems = router_pairs(_moe(), teacher, None)
    assert problems == [] and pairs == [(i, i, list(range(8))) for i in range(4)]
    _, problems = router_pairs(_moe(num_moe_experts=4), teacher, None)
    assert problems and "trim_plan.json" in problems[0]
    _, problems = router_pairs(_moe(num_moe_experts=None, moe_ffn_hidden_size=None), teacher, None)
    assert problems and "MoE student" in problems[0]
    other = types.SimpleNamespace(source={"num_layers": 6, "num_moe_experts": 8}, layers=[0], experts=[[0, 1]])
    _, problems = router_pairs(_moe(num_layers=1, num_moe_experts=2), teacher, other)
    assert problems and "not from this teacher" in problems[0]
