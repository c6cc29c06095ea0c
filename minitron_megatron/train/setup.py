"""Shared start-up of every stage: resolve data, tokenizer and model config, build the model.

All checks run here, before any model is built, so bad input fails fast.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.checkpoint.megatron_lm import checkpoint_args, is_megatron_lm_dir
from minitron_megatron.config.commands import CommonConfig, EvaluateConfig
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.train import OptimConfig, TrainConfig
from minitron_megatron.data import MicroBatchIterator, build_gpt_datasets, calibration_batches, load_tokenizer, prepare_data
from minitron_megatron.errors import ConfigError
from minitron_megatron.model.modules import padded_vocab_in_checkpoint
from minitron_megatron.model import build_gpt_model, count_model_parameters, padded_vocab_size, resolve_vocab, validate_model
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.parallel_rules import moe_training_problems, vocab_problems


@dataclass
class RunInputs:
    """What a stage needs before building a model: resolved config, tokenizer, datasets."""

    model_cfg: ModelConfig
    padded_vocab: int
    tokenizer_path: str
    train_ds: object
    valid_ds: object
    num_valid_samples: int
    seq_length: int
    """Tokens per sample of this run (the `seq_length` setting, resolved)."""
    params: Optional[int] = None

    def valid_batches(self, micro_batch_size: int, ctx: ParallelContext,
                      num_samples: Optional[int] = None) -> List[dict]:
        """The fixed validation set: the first `num_samples` (default: all `num_valid_samples`)
        samples, split over DP. Within one pass over the validation split, the first N samples
        do not depend on how many the dataset was built for, so every command scores the same ones."""
        per_step = micro_batch_size * ctx.dp_size
        num = min(num_samples or self.num_valid_samples, len(self.valid_ds))
        return list(calibration_batches(self.valid_ds, num - num % per_step, micro_batch_size,
                                        ctx.dp_rank, ctx.dp_size))


def evaluate_problems(evaluate: EvaluateConfig, ctx: ParallelContext) -> List[str]:
    """The `evaluate.*` settings of any command that scores a model at its end."""
    per_step = evaluate.micro_batch_size * ctx.dp_size
    if evaluate.micro_batch_size < 1:
        return [f"evaluate.micro_batch_size={evaluate.micro_batch_size} must be >= 1"]
    if evaluate.samples < per_step:
        return [f"evaluate.samples={evaluate.samples} must be >= evaluate.micro_batch_size x DP size ({per_step})"]
    return []


def check_same_model(save: str, run: "RunInputs", what: str) -> None:
    """An unfinished `save` dir resumes only with the model and sequence length it was started
    with (another length would cut the samples it has consumed differently)."""
    saved_cfg, padded, _ = rd.read_model_yaml(save)
    if saved_cfg.architecture() != run.model_cfg.architecture() or padded != run.padded_vocab:
        raise ConfigError(f"save={save} holds an unfinished run of a different {what}; resume it with the same "
                          "settings, or choose a new save directory")
    saved_seq = rd.recorded_seq_length(save)
    if saved_seq != run.seq_length:
        raise ConfigError(f"save={save} holds an unfinished run at seq_length={saved_seq}, not {run.seq_length}; "
                          f"resume it with seq_length={saved_seq}, or choose a new save directory")


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_model(cfg: CommonConfig, tokenizer_path: str, tokenizer_vocab: int, tp: int):
    """(model config, padded vocab): from `load`'s model.yaml if given, else from `model`."""
    if cfg.load and is_megatron_lm_dir(cfg.load):
        rd.check_loadable(cfg.load)  # architecture from `model=`, padded vocab from the checkpoint
        model_cfg, padded = resolve_vocab(cfg.model, tokenizer_vocab), padded_vocab_in_checkpoint(cfg.load)
        if padded < model_cfg.vocab_size or padded % tp:
            raise ConfigError(f"load={cfg.load}: its padded vocab {padded} does not fit model.vocab_size="
                              f"{model_cfg.vocab_size} at parallel.tp={tp}")
        return model_cfg, padded
    if cfg.load:
        rd.check_loadable(cfg.load)
        model_cfg, padded, run_tokenizer = rd.read_model_yaml(cfg.load)
        model_cfg = rd.loaded_model_config(model_cfg, cfg.model, cfg.model_overrides, f"load={cfg.load}")
        if run_tokenizer and _file_digest(run_tokenizer) != _file_digest(tokenizer_path):
            raise ConfigError(
                f"load={cfg.load} was trained with a different tokenizer than data={cfg.data.name} "
                f"uses ({tokenizer_path}); use the data the run was trained on"
            )
        if vocab_problems(padded, tp):
            raise ConfigError(f"load={cfg.load}: {vocab_problems(padded, tp)[0]}")
        return resolve_vocab(model_cfg, tokenizer_vocab), padded
    model_cfg = resolve_vocab(cfg.model, tokenizer_vocab)
    return model_cfg, padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp)


def run_tokenizer(load: Optional[str]) -> Optional[str]:
    """The tokenizer file of the run dir `load` (None without one, or for a Megatron-LM
    checkpoint dir): data=stdlib is tokenized with it."""
    if not load or is_megatron_lm_dir(load) or not (Path(load) / rd.MODEL_YAML).is_file():
        return None
    tokenizer = rd.read_model_yaml(load)[2]
    return tokenizer if tokenizer and Path(tokenizer).is_file() else None


def prepare_run(cfg: CommonConfig, ctx: ParallelContext, num_train_samples: int,
                num_valid_samples: int) -> RunInputs:
    """Validate settings and build tokenizer + datasets (no model yet)."""
    sources = prepare_data(cfg.data, run_tokenizer(cfg.load))
    tokenizer = load_tokenizer(sources.tokenizer_model)
    model_cfg, padded = resolve_model(cfg, sources.tokenizer_model, tokenizer.vocab_size, ctx.tp_size)
    validate_model(model_cfg, cfg.parallel)
    seq = seq_length_of(cfg, model_cfg)
    train_ds, valid_ds = build_gpt_datasets(sources, tokenizer, seq, num_train_samples, num_valid_samples, cfg.seed)
    return RunInputs(model_cfg, padded, sources.tokenizer_model, train_ds, valid_ds, num_valid_samples, seq)


def seq_length_of(cfg: CommonConfig, model_cfg: ModelConfig) -> int:
    """The run's sequence length: `seq_length`, else `load`'s recorded one, else the model's limit."""
    subject = f"load={cfg.load}" if cfg.load else f"model={cfg.model.name}"
    recorded = rd.recorded_seq_length(cfg.load) if cfg.load else None
    return rd.run_seq_length(cfg.seq_length, model_cfg, recorded, subject)


def build_model(run: RunInputs, cfg: CommonConfig, ctx: ParallelContext, init: str = "random"):
    """This rank's model (`init="none"` when a checkpoint load overwrites every weight next)."""
    model = build_gpt_model(run.model_cfg, ctx, cfg.parallel, run.padded_vocab, init=init)
    run.params = count_model_parameters(model, ctx)
    return model


def trainable_model(run: RunInputs, cfg: CommonConfig, ctx: ParallelContext, optim: OptimConfig, steps: int,
                    global_batch_size: int):
    """(model, DDP-wrapped model, optimizer, LR scheduler)."""
    from minitron_megatron.train.optimizer import build_optimizer, data_parallel_settings, wrap_ddp, wrap_float16

    problems = moe_training_problems(run.model_cfg, cfg.parallel)
    if problems:
        raise ConfigError(problems)
    settings = data_parallel_settings(optim, "train", ctx.dp_size, cfg.save)
    model = build_model(run, cfg, ctx)
    ddp = wrap_ddp(wrap_float16(model), model.config, settings)  # DDP(Float16Module(GPTModel)), as Megatron-LM's get_model
    optimizer, scheduler = build_optimizer([ddp], optim, model.config, steps, global_batch_size=global_batch_size)
    return model, ddp, optimizer, scheduler


def train_batches(run: RunInputs, micro_batch_size: int, ctx: ParallelContext, consumed_samples: int) -> Iterator:
    return iter(MicroBatchIterator(run.train_ds, micro_batch_size, ctx.dp_rank, ctx.dp_size, consumed_samples))


def megatron_lm_args(run: RunInputs, t: TrainConfig, ctx: ParallelContext, consumed_samples: int, step: int):
    """The Megatron-LM `args` namespace of a training checkpoint at this step."""
    return checkpoint_args(run.model_cfg, run.padded_vocab, ctx.tp_size, ctx.pp_size, seq_length=run.seq_length,
                           global_batch_size=t.global_batch_size, consumed_train_samples=consumed_samples,
                           iteration=step, tokenizer_path=run.tokenizer_path)
