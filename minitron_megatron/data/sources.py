"""Resolve a DataConfig into files on disk: a tokenizer model and Megatron blends.

All checks that need no tokenization happen here, so bad settings fail before
any heavy work, with a message naming the setting.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron.core.datasets.utils import get_blend_from_list

from minitron_megatron.config.data import DATA_NAMES, DataConfig
from minitron_megatron.data.cache import resolve_cache_dir
from minitron_megatron.data.indexed import missing_files
from minitron_megatron.data.stdlib_corpus import build_stdlib_corpus
from minitron_megatron.errors import ConfigError

Blend = Tuple[List[str], Optional[List[float]]]
"""Megatron's blend: (prefixes, weights or None)."""


@dataclass
class DataSources:
    """Resolved data: everything `build_gpt_datasets` needs besides the tokenizer."""

    tokenizer_model: str
    train_blend: Blend
    valid_blend: Optional[Blend]
    """None: carve validation out of `train_blend` with `split`."""
    split: str
    cache_dir: str
    settings: Dict[str, str] = field(default_factory=dict)
    """prefix -> the setting that named it (e.g. "data.train_prefixes[1]"), for errors."""


def _strip_suffix(prefix: str) -> str:
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def parse_blend(values: List[str], setting: str) -> Tuple[Blend, Dict[str, str]]:
    """A Megatron blend list -> (absolute prefixes, weights) and prefix -> setting name.

    Paths given with a `.bin`/`.idx` suffix are accepted as their prefix.
    """
    prefixes, weights = get_blend_from_list(blend=list(values))
    stride, first = (2, 1) if weights is not None else (1, 0)
    names = [f"{setting}[{first + stride * i}]" for i in range(len(prefixes))]
    if weights is not None:
        for i, weight in enumerate(weights):
            if weight <= 0:
                raise ConfigError(f"{setting}[{2 * i}]={values[2 * i]}: blend weights must be > 0")
    resolved = [os.path.abspath(os.path.expanduser(_strip_suffix(p))) for p in prefixes]
    for name, raw, prefix in zip(names, prefixes, resolved):
        missing = missing_files(prefix)
        if missing:
            raise ConfigError(f"{name}={raw}: {' and '.join(missing)} not found "
                              "(a Megatron indexed dataset prefix, see minitron_megatron.data.preprocess)")
    return (resolved, weights), dict(zip(resolved, names))


def _check_split(split: str) -> None:
    parts = [p.strip() for p in split.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not values or len(values) > 3 or any(v < 0 for v in values) or values[0] <= 0:
        raise ConfigError(f"data.split={split}: expected up to 3 comma-separated non-negative "
                          "weights train,valid,test with train > 0, e.g. 98,2,0")


def _custom_sources(cfg: DataConfig, cache_dir: str) -> DataSources:
    if not cfg.train_prefixes:
        raise ConfigError("data.train_prefixes is empty: data=custom needs at least one "
                          "indexed dataset prefix (or use data=stdlib)")
    if not cfg.tokenizer_model:
        raise ConfigError("data.tokenizer_model is not set: data=custom needs the sentencepiece "
                          ".model the prefixes were tokenized with")
    if not os.path.isfile(cfg.tokenizer_model):
        raise ConfigError(f"data.tokenizer_model={cfg.tokenizer_model}: file not found")
    train_blend, settings = parse_blend(cfg.train_prefixes, "data.train_prefixes")
    valid_blend = None
    if cfg.valid_prefixes:
        valid_blend, valid_settings = parse_blend(cfg.valid_prefixes, "data.valid_prefixes")
        settings.update(valid_settings)
    else:
        _check_split(cfg.split)
    return DataSources(os.path.abspath(cfg.tokenizer_model), train_blend, valid_blend,
                       cfg.split, cache_dir, settings)


def _stdlib_sources(cfg: DataConfig, cache_dir: str, run_tokenizer: Optional[str]) -> DataSources:
    for name in ("train_prefixes", "valid_prefixes"):
        if getattr(cfg, name):
            raise ConfigError(f"data.{name}={getattr(cfg, name)}: only used with data=custom; "
                              "data=stdlib builds its own corpus")
    if cfg.tokenizer_model and not os.path.isfile(cfg.tokenizer_model):
        raise ConfigError(f"data.tokenizer_model={cfg.tokenizer_model}: file not found (data=stdlib: a "
                          "sentencepiece .model or a Hugging Face tokenizer.json to tokenize the corpus with)")
    # A model from random weights with another model's tokenizer (the recipe's from-scratch
    # baseline of an imported teacher) names it; a loaded run brings its own (setup checks
    # that the two agree).
    tokenizer = os.path.abspath(cfg.tokenizer_model) if cfg.tokenizer_model else run_tokenizer
    corpus = build_stdlib_corpus(cache_dir, cfg.stdlib_vocab_size, cfg.stdlib_max_mb,
                                 cfg.stdlib_valid_percent, tokenizer_path=tokenizer)
    settings = {corpus.train_prefix: "data=stdlib (train)", corpus.valid_prefix: "data=stdlib (valid)"}
    return DataSources(corpus.tokenizer_model, ([corpus.train_prefix], None),
                       ([corpus.valid_prefix], None), cfg.split, cache_dir, settings)


def prepare_data(cfg: DataConfig, run_tokenizer: Optional[str] = None) -> DataSources:
    """Check `cfg` and resolve it to files: builds (or reuses) the stdlib corpus. `run_tokenizer`
    (the loaded run dir's tokenizer file, if any): data=stdlib is tokenized with it, so any
    model, an imported one with its own tokenizer included, runs on the embedded corpus."""
    if cfg.name not in DATA_NAMES:
        raise ConfigError(f"data.name={cfg.name}: expected one of {', '.join(DATA_NAMES)}")
    cache_dir = str(resolve_cache_dir(cfg.cache_dir))
    if cfg.name == "stdlib":
        return _stdlib_sources(cfg, cache_dir, run_tokenizer)
    return _custom_sources(cfg, cache_dir)
