"""Start-up of `distill`: every check on teacher, student and settings, then the data.

All problems are found before any model is built and reported in one
ConfigError naming the settings (`teacher.load`, `distill.layer_map`, ...).
"""

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.commands import DistillCommand
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.distill.intermediate import IS_KINDS, layer_map_problems, resolve_layer_map
from minitron_megatron.distill.losses import IMPLS, KINDS
from minitron_megatron.distill.router_kd import RouterPair, router_pairs
from minitron_megatron.distill.teacher import PRECISIONS
from minitron_megatron.errors import ConfigError
from minitron_megatron.model import validate_model
from minitron_megatron.model.build import DTYPES
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.parallel_rules import vocab_problems
from minitron_megatron.train.driver import loop_problems
from minitron_megatron.train.setup import RunInputs, evaluate_problems, prepare_run


@dataclass
class RunModel:
    """One side (teacher or student) as read from its run dir."""

    setting: str  # "teacher.load" / "student.load", for messages
    path: str
    cfg: ModelConfig
    padded_vocab: int
    tokenizer: Optional[str]


@dataclass
class DistillInputs:
    """Everything the distill loop needs before building models."""

    run: RunInputs  # the student's resolved config, tokenizer and datasets
    teacher: RunModel
    teacher_parallel: ParallelConfig
    layer_pairs: List[Tuple[int, int]]  # [(student, teacher)]; empty without an intermediate loss
    router_pairs: List[RouterPair]  # [(student, teacher, teacher experts)]; empty without a router loss
    use_projection: bool
    num_microbatches: int


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_run(setting: str, path: Optional[str], dtype: Optional[str], model: Optional[ModelConfig] = None,
             model_overrides: Sequence[str] = ()) -> RunModel:
    """A teacher/student run dir, or a ConfigError naming `setting`; `model` with its given
    `model_overrides` applies as to any loaded run (the student's), then `dtype`."""
    if not path:
        raise ConfigError(f"{setting} is required: a run directory (model.yaml + checkpoint/)")
    rd.check_loadable(path, setting=setting)
    if not (Path(path) / rd.MODEL_YAML).is_file():
        raise ConfigError(f"{setting}={path}: distillation needs a minitron run directory with "
                          f"{rd.MODEL_YAML} (a bare Megatron-LM save dir does not describe its model)")
    cfg, padded, tokenizer = rd.read_model_yaml(path)
    if model is not None:
        cfg = rd.loaded_model_config(cfg, model, model_overrides, f"{setting}={path}")
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"{setting.split('.')[0]}.params_dtype={dtype!r} is not one of {list(DTYPES)}")
        cfg = replace(cfg, params_dtype=dtype)
    return RunModel(setting, path, cfg.resolved(), padded, tokenizer)


def teacher_parallel(parallel: ParallelConfig, student: ModelConfig, teacher: ModelConfig) -> ParallelConfig:
    """The teacher runs at the student's TP/PP on the same ranks; an explicit
    `parallel.pp_layout` describes the student, so a deeper teacher is split evenly."""
    same_depth = student.num_layers == teacher.num_layers
    return replace(parallel, pp_layout=parallel.pp_layout if same_depth else None)


def settings_problems(cfg: DistillCommand, ctx: ParallelContext) -> List[str]:
    """Every problem with the distill command's own settings (no run dirs read)."""
    d = cfg.distill
    problems = loop_problems(d, "distill", cfg.save, "runs/student", ctx)
    problems += evaluate_problems(cfg.evaluate, ctx)
    if cfg.teacher.precision is not None and cfg.teacher.precision not in PRECISIONS:
        problems.append(f"teacher.precision={cfg.teacher.precision!r} is not one of {list(PRECISIONS)} "
                        "(or null: the teacher run's own dtype)")
    if cfg.student.precision is not None:
        problems.append(f"student.precision={cfg.student.precision!r}: only the frozen teacher takes a precision; "
                        "set the student's dtype with student.params_dtype")
    if d.logit_loss not in KINDS:
        problems.append(f"distill.logit_loss={d.logit_loss!r} is not one of {list(KINDS)}")
    if d.kd_impl not in IMPLS:
        problems.append(f"distill.kd_impl={d.kd_impl!r} is not one of {list(IMPLS)}")
    if not d.temperature > 0:
        problems.append(f"distill.temperature={d.temperature} must be > 0")
    if d.ce_weight < 0:
        problems.append(f"distill.ce_weight={d.ce_weight} must be >= 0")
    if d.kd_chunk_tokens is not None and d.kd_chunk_tokens < 1:
        problems.append(f"distill.kd_chunk_tokens={d.kd_chunk_tokens} must be >= 1 (or null)")
    if d.intermediate_loss is not None and d.intermediate_loss not in IS_KINDS:
        problems.append(f"distill.intermediate_loss={d.intermediate_loss!r} is not one of {list(IS_KINDS)} or null")
    return problems


def _model_problems(side: RunModel, parallel: ParallelConfig, tp: int) -> List[str]:
    """Why this side cannot be built at this TP/PP, each message prefixed by its run dir."""
    problems = []
    try:
        validate_model(side.cfg, parallel)
    except ConfigError as err:
        problems += [f"{side.setting}={side.path}: {p}" for p in err.problems]
    problems += [f"{side.setting}={side.path}: {p}" for p in vocab_problems(side.padded_vocab, tp)]
    return problems


def _pair_problems(cfg: DistillCommand, teacher: RunModel, student: RunModel, data_tokenizer: str) -> List[str]:
    """Teacher and student must share a tokenizer (the data's) and a vocabulary."""
    problems = []
    for side in (teacher, student):
        if side.tokenizer and _digest(side.tokenizer) != _digest(data_tokenizer):
            problems.append(f"{side.setting}={side.path} was trained with a different tokenizer than "
                            f"data={cfg.data.name} uses ({data_tokenizer}); teacher, student and data "
                            "must share one tokenizer")
    if teacher.tokenizer and student.tokenizer and _digest(teacher.tokenizer) != _digest(student.tokenizer):
        problems.append(f"teacher.load={teacher.path} and student.load={student.path} use different "
                        "tokenizers: distillation needs one vocabulary")
    elif teacher.cfg.vocab_size != student.cfg.vocab_size:
        problems.append(f"teacher vocab_size={teacher.cfg.vocab_size} differs from student "
                        f"vocab_size={student.cfg.vocab_size}: distillation needs one vocabulary")
    return problems


def _seq_length_problems(cfg: DistillCommand, teacher: RunModel, student: RunModel) -> List[str]:
    """Teacher and student run at one sequence length (`seq_length`, else the student run's):
    within both models' position limits."""
    problems = []
    try:
        seq = rd.run_seq_length(cfg.seq_length, student.cfg, rd.recorded_seq_length(student.path),
                                f"{student.setting}={student.path}")
        rd.run_seq_length(seq, teacher.cfg, None, f"{teacher.setting}={teacher.path}")
    except ConfigError as err:
        problems += err.problems
    return problems


def _intermediate_problems(cfg: DistillCommand, ctx: ParallelContext, teacher: RunModel,
                           student: RunModel) -> List[str]:
    d = cfg.distill
    if d.intermediate_loss is None and not d.embedding_loss:
        return []
    problems = layer_map_problems(d.layer_map, student.cfg.num_layers, teacher.cfg.num_layers)
    if d.intermediate_loss is None:
        problems.append("distill.embedding_loss=true needs distill.intermediate_loss (cosine or mse)")
    if ctx.pp_size > 1:
        problems.append(f"distill.intermediate_loss / distill.embedding_loss need parallel.pp=1 (got "
                        f"{ctx.pp_size}): mapped layers may sit on different pipeline stages; use the logit "
                        "loss alone at PP>1")
    if teacher.cfg.hidden_size != student.cfg.hidden_size and not d.projection:
        problems.append(f"student hidden_size={student.cfg.hidden_size} differs from the teacher's "
                        f"{teacher.cfg.hidden_size} and distill.projection=false: intermediate losses need "
                        "equal hidden sizes or a learned projection (distill.projection=true)")
    return problems


def _student_plan(student: RunModel):
    """The student run dir's TrimPlan (which teacher layers and experts it kept), or None."""
    from minitron_megatron.trim import PLAN_JSON, read_plan

    return read_plan(student.path) if (Path(student.path) / PLAN_JSON).is_file() else None


def _router_problems(cfg: DistillCommand, ctx: ParallelContext, teacher: RunModel, student: RunModel) -> List[str]:
    d = cfg.distill
    if d.router_loss_weight == 0:
        return []
    if d.router_loss_weight < 0:
        return [f"distill.router_loss_weight={d.router_loss_weight} must be >= 0 (0 turns the router-logit loss off)"]
    problems = router_pairs(student.cfg, teacher.cfg, _student_plan(student))[1]
    if ctx.pp_size > 1:
        problems.append(f"distill.router_loss_weight > 0 needs parallel.pp=1 (got {ctx.pp_size}): paired MoE "
                        "layers may sit on different pipeline stages")
    if cfg.parallel.sequence_parallel:
        problems.append("distill.router_loss_weight > 0 does not run with parallel.sequence_parallel=true "
                        "(each rank's router sees its own part of the sequence)")
    return problems


def _teacher_precision_problems(cfg: DistillCommand, ctx: ParallelContext, teacher: RunModel) -> List[str]:
    """teacher.precision=fp8's needs (local spec, an FP8-capable GPU, every local GEMM dimension
    a multiple of 16 at this TP size) from the teacher's model.yaml: checked here, before the
    build and the checkpoint load (minutes at 70B), not by the first FP8 GEMM after them. A
    pruned teacher (a search round's winner, hidden in steps of 8) can miss the last one."""
    if cfg.teacher.precision != "fp8":
        return []
    from minitron_megatron.model.fp8 import fp8_problems

    return [f"teacher.precision=fp8 with {teacher.setting}={teacher.path}: {p}; use teacher.precision=bf16 "
            "for this teacher" for p in fp8_problems(teacher.cfg, ctx.tp_size, ctx.device)]


def check_distill(cfg: DistillCommand, ctx: ParallelContext, data_tokenizer: str) -> Tuple[RunModel, RunModel]:
    """(teacher, student) run models once every check passed; else one ConfigError."""
    problems = settings_problems(cfg, ctx)
    sides = []
    for setting, source, model in (("teacher.load", cfg.teacher, None), ("student.load", cfg.student, cfg.model)):
        try:
            sides.append(read_run(setting, source.load, source.params_dtype, model, cfg.model_overrides))
        except ConfigError as err:
            problems += err.problems
    if len(sides) < 2:
        raise ConfigError(problems)
    teacher, student = sides
    if "transformer_impl" in cfg.model_overrides:  # a run setting: the teacher runs on it too
        teacher = replace(teacher, cfg=replace(teacher.cfg, transformer_impl=cfg.model.transformer_impl))
    if cfg.teacher.precision == "fp8" and teacher.cfg.transformer_impl == "auto":
        # FP8 GEMMs replace the local spec's linears: an FP8 teacher never resolves auto to
        # Transformer Engine (SDPA's layers are the local spec's, with fused core attention).
        teacher = replace(teacher, cfg=replace(teacher.cfg, transformer_impl="sdpa"))
    problems += _pair_problems(cfg, teacher, student, data_tokenizer)
    problems += _seq_length_problems(cfg, teacher, student)
    parallel = replace(cfg.parallel, tp=ctx.tp_size, pp=ctx.pp_size)  # the sizes this run has
    problems += _model_problems(student, parallel, ctx.tp_size)
    problems += _model_problems(teacher, teacher_parallel(parallel, student.cfg, teacher.cfg), ctx.tp_size)
    problems += _intermediate_problems(cfg, ctx, teacher, student)
    problems += _router_problems(cfg, ctx, teacher, student)
    problems += _teacher_precision_problems(cfg, ctx, teacher)
    if problems:
        raise ConfigError(problems)
    return teacher, student


def _shared_tokenizer(cfg: DistillCommand) -> Optional[str]:
    """The tokenizer data=stdlib is tokenized with: the student's, when the teacher's has the same
    bytes. Otherwise None (the corpus's own), and check_distill names the mismatch before any
    corpus is tokenized with a tokenizer that cannot serve both."""
    from minitron_megatron.train.setup import run_tokenizer

    student, teacher = run_tokenizer(cfg.student.load), run_tokenizer(cfg.teacher.load)
    return student if student and teacher and _digest(student) == _digest(teacher) else None


def prepare_distill(cfg: DistillCommand, ctx: ParallelContext) -> DistillInputs:
    """Check everything, then build the tokenizer and datasets (no model yet)."""
    from minitron_megatron.data import prepare_data

    sources = prepare_data(cfg.data, _shared_tokenizer(cfg))
    teacher, student = check_distill(cfg, ctx, sources.tokenizer_model)
    t = cfg.distill
    run = prepare_run(replace(cfg, load=cfg.student.load), ctx, num_train_samples=t.steps * t.global_batch_size,
                      num_valid_samples=max(t.eval_samples, cfg.evaluate.samples))
    run.model_cfg = replace(run.model_cfg, params_dtype=student.cfg.params_dtype)
    d = cfg.distill
    pairs = []
    if d.intermediate_loss is not None:
        pairs = resolve_layer_map(d.layer_map, student.cfg.num_layers, teacher.cfg.num_layers)
    use_projection = bool(pairs) and teacher.cfg.hidden_size != student.cfg.hidden_size
    routers = router_pairs(student.cfg, teacher.cfg, _student_plan(student))[0] if d.router_loss_weight > 0 else []
    return DistillInputs(run=run, teacher=teacher,
                         teacher_parallel=teacher_parallel(cfg.parallel, student.cfg, teacher.cfg),
                         layer_pairs=pairs, router_pairs=routers, use_projection=use_projection,
                         num_microbatches=t.global_batch_size // (t.micro_batch_size * ctx.dp_size))
