"""`python -m minitron_megatron.plan`: the per-rank memory of distilling `model=`/`load=` into
its `prune.target`, at `parallel.*`, on GPUs of `plan.gpu_memory_gb`. Loads no weights: the
architecture is a preset or a run dir's model.yaml, the models are built on the meta device."""

import sys
from dataclasses import fields, replace
from typing import List, Optional, Tuple

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.plan import memory as M
from minitron_megatron.plan.estimate import KINDS, Plan, PlanInputs, plan_from_counts

GB, GIB, MIB = 1e9, 1 << 30, 1 << 20


def _teacher_config(cfg) -> Tuple[ModelConfig, Optional[int], Optional[int]]:
    """(architecture, padded vocab or None, recorded sequence length) of `load=` or `model=`."""
    if cfg.load:
        from minitron_megatron.checkpoint.run_dir import loaded_model_config, read_model_yaml, recorded_seq_length

        run_cfg, padded, _ = read_model_yaml(cfg.load)
        model = loaded_model_config(run_cfg, cfg.model, cfg.model_overrides, f"load={cfg.load}")
        return model, padded, recorded_seq_length(cfg.load)
    if cfg.model.vocab_size is None:
        raise ConfigError(f"model={cfg.model.name} has no vocab_size (it comes from a tokenizer, which plan "
                          "does not load): give model.vocab_size=N")
    return cfg.model, None, None


def _target_given(target) -> bool:
    return any(getattr(target, f.name) is not None for f in fields(target))


def _choice_problems(cfg) -> List[str]:
    from minitron_megatron.distill.teacher import PRECISIONS

    problems = []
    for key, value, allowed in (("plan.attention", cfg.plan.attention, M.ATTENTIONS),
                                ("plan.recompute", cfg.plan.recompute, M.RECOMPUTES),
                                ("distill.kd_impl", cfg.distill.kd_impl, ("fused_linear", "torch", "triton")),
                                ("teacher.precision", cfg.teacher.precision, (None, *PRECISIONS)),
                                ("teacher.params_dtype", cfg.teacher.params_dtype, (None, *M.DTYPE_BYTES)),
                                ("student.params_dtype", cfg.student.params_dtype, (None, *M.DTYPE_BYTES))):
        if value not in allowed:
            problems.append(f"{key}={value!r} is not one of {list(allowed)}")
    if cfg.plan.gpu_memory_gb <= 0:
        problems.append(f"plan.gpu_memory_gb={cfg.plan.gpu_memory_gb} must be > 0")
    return problems


def _world_problems(cfg) -> List[str]:
    tp, pp, world, dp = cfg.parallel.tp, cfg.parallel.pp, cfg.plan.world_size, cfg.plan.dp
    if world is None:
        return [] if dp >= 1 else [f"plan.dp={dp} must be >= 1"]
    if world < 1 or world % (tp * pp):
        return [f"plan.world_size={world} must be a multiple of parallel.tp={tp} x parallel.pp={pp} "
                "(DP is world_size / (tp * pp))"]
    return []


def _data_parallel(cfg) -> int:
    """DP of the planned run (checked by `_world_problems`)."""
    if cfg.plan.world_size is None:
        return cfg.plan.dp
    return cfg.plan.world_size // (cfg.parallel.tp * cfg.parallel.pp)


def plan_inputs(cfg) -> PlanInputs:
    """Every check of the plan's settings, in one ConfigError; then its resolved inputs."""
    from minitron_megatron.checkpoint.run_dir import run_seq_length
    from minitron_megatron.model.build import padded_vocab_size, validate_model
    from minitron_megatron.train.optimizer import resolve_distributed_optimizer
    from minitron_megatron.trim.validate import validate_target

    problems = _choice_problems(cfg) + _world_problems(cfg)
    teacher, padded, recorded = _teacher_config(cfg)
    teacher = teacher.resolved()
    try:
        validate_model(teacher, replace(cfg.parallel, pp_layout=None))
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    padded = padded or padded_vocab_size(teacher.vocab_size, teacher.make_vocab_size_divisible_by, cfg.parallel.tp)
    seq = run_seq_length(cfg.seq_length, teacher, recorded, f"load={cfg.load}" if cfg.load else f"model={teacher.name}")
    student = teacher
    if _target_given(cfg.prune.target):
        student = validate_target(teacher, cfg.prune.target, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                                  pp_layout=cfg.parallel.pp_layout, padded_vocab=padded, ep=cfg.parallel.ep)
    dp = _data_parallel(cfg)
    distributed = cfg.plan.distributed_optimizer
    if distributed is None:  # as the distill run would resolve it (a fresh run: no checkpoint to follow)
        distributed = resolve_distributed_optimizer(cfg.distill.optim.use_distributed_optimizer, dp)
    return PlanInputs(
        teacher=teacher, student=student.resolved(), parallel=cfg.parallel, dp=dp, padded_vocab=padded,
        seq_length=seq, micro_batch_size=cfg.distill.micro_batch_size,
        global_batch_size=cfg.plan.global_batch_size or cfg.distill.global_batch_size,
        teacher_dtype=cfg.teacher.params_dtype or teacher.params_dtype, teacher_precision=cfg.teacher.precision,
        student_dtype=cfg.student.params_dtype or student.params_dtype, distributed_optimizer=distributed,
        attention=cfg.plan.attention, recompute=cfg.plan.recompute, kd_impl=cfg.distill.kd_impl,
        kd_chunk_tokens=cfg.distill.kd_chunk_tokens)


def estimate(inp: PlanInputs) -> Plan:
    """Build both models per stage on the meta device, then the plan's arithmetic."""
    from minitron_megatron.plan.layout import stage_parameter_counts

    teacher_parallel = inp.parallel
    if inp.parallel.pp_layout is not None and sum(inp.parallel.pp_layout) != inp.teacher.num_layers:
        teacher_parallel = replace(inp.parallel, pp_layout=None)  # the layout is the student's
    teacher_counts = stage_parameter_counts(inp.teacher, teacher_parallel, inp.dp, inp.padded_vocab)
    student_counts = stage_parameter_counts(inp.student, inp.parallel, inp.dp, inp.padded_vocab)
    return plan_from_counts(inp, teacher_counts, student_counts)


def table(plan: Plan, inp: PlanInputs, limit_bytes: float) -> str:
    """Kinds x pipeline stages, in GiB (MiB for a plan under 1 GiB)."""
    unit, size = ("GiB", GIB) if max(plan.totals()) >= GIB else ("MiB", MIB)
    head = ["kind"] + [f"stage {i}" for i in range(len(plan.stages))]
    rows = [[kind] + [f"{stage[kind] / size:.2f}" for stage in plan.stages] for kind in KINDS]
    rows.append(["total"] + [f"{total / size:.2f}" for total in plan.totals()])
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [head] + rows]
    s, t = inp.student, inp.teacher
    intro = (f"plan ({unit} per rank): teacher {t.num_layers}L h{t.hidden_size} ffn{t.ffn_hidden_size} -> student "
             f"{s.num_layers}L h{s.hidden_size} ffn{s.ffn_hidden_size} heads{s.num_attention_heads}/"
             f"{s.num_query_groups}; tp={inp.parallel.tp} pp={inp.parallel.pp} dp={inp.dp} seq={inp.seq_length} "
             f"mbs={inp.micro_batch_size} in flight {plan.micro_batches_in_flight}; attention={inp.attention} "
             f"recompute={inp.recompute}; distributed optimizer {'on' if inp.distributed_optimizer else 'off'}")
    return "\n".join([intro, *lines, f"limit {limit_bytes / GIB:.2f} GiB ({limit_bytes / GB:.1f} GB)"])


def plan(cfg, ctx=None) -> dict:
    """The command's stage: `ctx` is unused (this command starts no runtime: it simulates ranks)."""
    from minitron_megatron.model.params import parameter_count

    inp = plan_inputs(cfg)
    result = estimate(inp)
    limit = (cfg.plan.gpu_memory_gb - cfg.plan.reserve_gb) * GB
    worst = result.worst_stage
    print(table(result, inp, limit), flush=True)
    total = result.totals()[worst]
    return {
        "fits": total <= limit,
        "per_rank_bytes": result.stages[worst],
        "total_bytes": total,
        "gpu_memory_bytes": int(limit),
        "stage": worst,
        "stage_total_bytes": result.totals(),
        "teacher_params": parameter_count(inp.teacher, inp.padded_vocab),
        "student_params": parameter_count(inp.student, inp.padded_vocab),
        "dp": inp.dp,
    }
