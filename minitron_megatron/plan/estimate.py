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


def stage_bytes(inp: PlanInputs, pp_rank: int, teacher_counts: Dict[str, int],
                student_counts: Dict[str, int]) -> Dict[str, int]:
    """Bytes by kind (KINDS) of one rank of pipeline stage `pp_rank`, from that rank's parameter
    counts (plan/layout.py `count_local`) and the formulas of plan/memory.py."""
    from minitron_megatron.distill.fused_linear import default_chunk_tokens
    from minitron_megatron.model.build import pipeline_layer_split

    pp, tp = inp.parallel.pp, inp.parallel.tp
    shape = M.Shape(inp.seq_length, inp.micro_batch_size, tp, inp.attention, inp.recompute)
    act_s = M.DTYPE_BYTES[inp.student_dtype]
    act_t = M.DTYPE_BYTES[M.teacher_dtype(inp.teacher_dtype, inp.teacher_precision)]
    layers = pipeline_layer_split(inp.student.num_layers, pp, inp.parallel.pp_layout)[pp_rank]
    vocab_local = inp.padded_vocab // tp
    chunk = inp.kd_chunk_tokens or default_chunk_tokens(vocab_local)
    last = pp_rank == pp - 1
    saved = layers * M.layer_activation_bytes(inp.student, shape, act_s)
    saved += M.final_norm_bytes(inp.student, shape, act_s) if last else 0
    params = student_counts["params"]
    return {
        "teacher_weights": M.teacher_weight_bytes(teacher_counts, inp.teacher_dtype, inp.teacher_precision),
        "student_weights": params * act_s,
        "gradients": M.grad_bytes(params),
        "optimizer": M.optimizer_bytes(params, inp.student_dtype, inp.dp, inp.distributed_optimizer),
        "activations": micro_batches_in_flight(inp, pp_rank) * saved,
        "activation_transient": max(M.layer_working_bytes(inp.student, shape, act_s),
                                    M.layer_working_bytes(inp.teacher, M.replace_recompute(shape), act_t)),
        "kd_loss": M.kd_loss_bytes(inp.student, inp.teacher, shape, vocab_local, act_t, chunk, inp.kd_impl,
                                   student_act=act_s) if last else 0,
    }


def micro_batches_in_flight(inp: PlanInputs, pp_rank: int) -> int:
    """1F1B keeps up to pp - pp_rank micro-batches' activations on a stage (Megatron's schedule)."""
    micro_batches = max(1, inp.global_batch_size // (inp.micro_batch_size * inp.dp))
    return max(1, min(inp.parallel.pp - pp_rank, micro_batches))


def plan_from_counts(inp: PlanInputs, teacher_counts: List[Dict[str, int]],
                     student_counts: List[Dict[str, int]]) -> Plan:
    """Every stage's bytes from per-stage parameter counts."""
    plan = Plan()
    for rank in range(inp.parallel.pp):
        plan.stages.append(stage_bytes(inp, rank, teacher_counts[rank], student_counts[rank]))
        plan.micro_batches_in_flight.append(micro_batches_in_flight(inp, rank))
    return plan
