"""The plan of one run: per pipeline stage, bytes by kind; the worst stage decides `fits`."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.plan import memory as M

KINDS = ("teacher_weights", "student_weights", "gradients", "optimizer", "activations",
         "activation_transient", "kd_loss")


@dataclass(frozen=True)
class PlanInputs:
    teacher: ModelConfig
    student: ModelConfig
    parallel: ParallelConfig
    dp: int
    padded_vocab: int
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    teacher_dtype: str
    teacher_precision: Optional[str]
    student_dtype: str
    distributed_optimizer: bool
    attention: str = "local"
    recompute: str = "none"
    kd_impl: str = "fused_linear"
    kd_chunk_tokens: Optional[int] = None


@dataclass
class Plan:
    stages: List[Dict[str, int]] = field(default_factory=list)
    """Per pipeline stage: bytes by kind (KINDS)."""
    micro_batches_in_flight: List[int] = field(default_factory=list)

    def totals(self) -> List[int]:
        return [sum(stage.values()) for stage in self.stages]

    @property
    def worst_stage(self) -> int:
        totals = self.totals()
        return totals.index(max(totals))


def in_flight(pp: int, pp_rank: int, micro_batches: int) -> int:
    """1F1B keeps up to pp - pp_rank micro-batches' activations on a stage (Megatron's schedule)."""
    return max(1, min(pp - pp_rank, micro_batches))


def plan_from_counts(inp: PlanInputs, teacher_counts: List[Dict[str, int]],
                     student_counts: List[Dict[str, int]]) -> Plan:
    """Bytes per stage from per-stage parameter counts (plan/layout.py) and the formulas of plan/memory.py."""
    from minitron_megatron.distill.fused_linear import default_chunk_tokens
    from minitron_megatron.model.build import pipeline_layer_split

    pp, tp = inp.parallel.pp, inp.parallel.tp
    shape = M.Shape(inp.seq_length, inp.micro_batch_size, tp, inp.attention, inp.recompute)
    act_s, act_t = M.DTYPE_BYTES[inp.student_dtype], M.DTYPE_BYTES[M.teacher_dtype(inp.teacher_dtype,
                                                                                     inp.teacher_precision)]
    layers = pipeline_layer_split(inp.student.num_layers, pp, inp.parallel.pp_layout)
    micro_batches = max(1, inp.global_batch_size // (inp.micro_batch_size * inp.dp))
    vocab_local = inp.padded_vocab // tp
    chunk = inp.kd_chunk_tokens or default_chunk_tokens(vocab_local)
    transient = max(M.layer_working_bytes(inp.student, shape, act_s),
                    M.layer_working_bytes(inp.teacher, M.replace_recompute(shape), act_t))
    plan = Plan()
    for rank in range(pp):
        flight = in_flight(pp, rank, micro_batches)
        last = rank == pp - 1
        saved = layers[rank] * M.layer_activation_bytes(inp.student, shape, act_s)
        saved += M.final_norm_bytes(inp.student, shape, act_s) if last else 0
        student_params = student_counts[rank]["params"]
        plan.stages.append({
            "teacher_weights": M.teacher_weight_bytes(teacher_counts[rank], inp.teacher_dtype, inp.teacher_precision),
            "student_weights": student_params * M.DTYPE_BYTES[inp.student_dtype],
            "gradients": M.grad_bytes(student_params),
            "optimizer": M.optimizer_bytes(student_params, inp.student_dtype, inp.dp, inp.distributed_optimizer),
            "activations": flight * saved,
            "activation_transient": transient,
            "kd_loss": M.kd_loss_bytes(inp.student, inp.teacher, shape, vocab_local, act_t, chunk, inp.kd_impl,
                                         student_act=act_s)
            if last else 0,
        })
        plan.micro_batches_in_flight.append(flight)
    return plan
