"""Shared start-up of every stage: resolve data, tokenizer and model config, build the model.

All checks run here, before any model is built, so bad input fails fast.
"""

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.checkpoint.megatron_lm import is_megatron_lm_dir, padded_vocab_of
from minitron_megatron.config.commands import CommonConfig
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.train import OptimConfig
from minitron_megatron.data import MicroBatchIterator, build_gpt_datasets, calibration_batches, load_tokenizer, prepare_data
from minitron_megatron.errors import ConfigError
from minitron_megatron.model import (
    build_gpt_model,
    count_model_parameters,
    padded_vocab_size,
    resolve_vocab,
    transformer_config,
    validate_model,
)
from minitron_megatron.runtime.context import ParallelContext


@dataclass
class RunInputs:
    """What a stage needs before building a model: resolved config, tokenizer, datasets."""

    model_cfg: ModelConfig
    padded_vocab: int
    tokenizer_path: str
    train_ds: object
    valid_ds: object
    num_valid_samples: int
    params: Optional[int] = None

    def valid_batches(self, micro_batch_size: int, ctx: ParallelContext) -> List[dict]:
        """The fixed validation set: the first `num_valid_samples` samples, split over DP."""
        per_step = micro_batch_size * ctx.dp_size
        num = min(self.num_valid_samples, len(self.valid_ds))
        return list(calibration_batches(self.valid_ds, num - num % per_step, micro_batch_size,
                                        ctx.dp_rank, ctx.dp_size))


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_model(cfg: CommonConfig, tokenizer_path: str, tokenizer_vocab: int, tp: int):
    """(model config, padded vocab): from `load`'s model.yaml if given, else from `model`."""
    if cfg.load and is_megatron_lm_dir(cfg.load):
        rd.check_loadable(cfg.load)  # architecture from `model=`, padded vocab from the checkpoint
        model_cfg, padded = resolve_vocab(cfg.model, tokenizer_vocab), padded_vocab_of(cfg.load)
        if padded < model_cfg.vocab_size or padded % tp:
            raise ConfigError(f"load={cfg.load}: its padded vocab {padded} does not fit model.vocab_size="
                              f"{model_cfg.vocab_size} at parallel.tp={tp}")
        return model_cfg, padded
    if cfg.load:
        rd.check_loadable(cfg.load)
        model_cfg, padded, run_tokenizer = rd.read_model_yaml(cfg.load)
        if run_tokenizer and _file_digest(run_tokenizer) != _file_digest(tokenizer_path):
            raise ConfigError(
                f"load={cfg.load} was trained with a different tokenizer than data={cfg.data.name} "
                f"uses ({tokenizer_path}); use the data the run was trained on"
            )
        if padded % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide the padded vocab {padded} of load={cfg.load}")
        return resolve_vocab(model_cfg, tokenizer_vocab), padded
    model_cfg = resolve_vocab(cfg.model, tokenizer_vocab)
    return model_cfg, padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp)


def prepare_run(cfg: CommonConfig, ctx: ParallelContext, num_train_samples: int,
                num_valid_samples: int) -> RunInputs:
    """Validate settings and build tokenizer + datasets (no model yet)."""
    sources = prepare_data(cfg.data)
    tokenizer = load_tokenizer(sources.tokenizer_model)
    model_cfg, padded = resolve_model(cfg, sources.tokenizer_model, tokenizer.vocab_size, ctx.tp_size)
    validate_model(model_cfg, cfg.parallel)
    train_ds, valid_ds = build_gpt_datasets(
        sources, tokenizer, model_cfg.seq_length, num_train_samples, num_valid_samples, cfg.seed
    )
    return RunInputs(model_cfg, padded, sources.tokenizer_model, train_ds, valid_ds, num_valid_samples)


def build_model(run: RunInputs, cfg: CommonConfig, ctx: ParallelContext):
    model = build_gpt_model(run.model_cfg, ctx, cfg.parallel, run.padded_vocab)
    run.params = count_model_parameters(model, ctx)
    return model


def trainable_model(run: RunInputs, cfg: CommonConfig, ctx: ParallelContext, optim: OptimConfig, steps: int):
    """(model, DDP-wrapped model, optimizer, LR scheduler)."""
    from minitron_megatron.train.optimizer import build_optimizer, wrap_ddp

    model = build_model(run, cfg, ctx)
    ddp = wrap_ddp(model, model.config)
    optimizer, scheduler = build_optimizer([ddp], optim, model.config, steps)
    return model, ddp, optimizer, scheduler


def train_batches(run: RunInputs, micro_batch_size: int, ctx: ParallelContext, consumed_samples: int) -> Iterator:
    return iter(MicroBatchIterator(run.train_ds, micro_batch_size, ctx.dp_rank, ctx.dp_size, consumed_samples))
