"""The frozen teacher's precision (`teacher.precision`): fp32, bf16, or bf16 with FP8 GEMMs.

A teacher only runs forward, so its linears can run as FP8 GEMMs (`model.fp8`): half the
weight memory of bf16 for the transformer layers, at an output error of a few percent per
GEMM (tests/test_fp8.py measures it). The output layer stays bf16: its logits are what the
KD loss reads.
"""

from typing import Optional

import torch

PRECISIONS = ("fp8", "bf16", "fp32")
"""Allowed `teacher.precision` values (None keeps the run's own dtype)."""

_CAST = {"fp8": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""The dtype of every non-GEMM part (and of the FP8 GEMMs' inputs and outputs)."""


def apply_teacher_precision(teacher: torch.nn.Module, precision: Optional[str]) -> torch.nn.Module:
    """Cast a built, loaded teacher to `precision`; "fp8" also gives its transformer linears
    FP8 GEMMs (collective over TP: every TP rank calls it). None returns it unchanged."""
    if precision is None:
        return teacher
    if precision not in PRECISIONS:
        raise ValueError(f"teacher.precision={precision!r} is not one of {list(PRECISIONS)} (or null)")
    from minitron_megatron.model.fp8 import convert_to_fp8

    teacher = teacher.to(_CAST[precision])
    if precision == "fp8":
        convert_to_fp8(teacher)
    return teacher
