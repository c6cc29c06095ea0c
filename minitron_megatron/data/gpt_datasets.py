"""Megatron GPTDatasets (train, valid) from resolved DataSources.

The real `BlendedMegatronDatasetBuilder`, run by each rank as a lone process in three
turns (`_build_turn`): global rank 0 builds the index caches, then the first rank of
every other node builds or finds them, then everyone else finds them. Every rank of the
default group must call `build_gpt_datasets`.
"""

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from minitron_megatron.data.cache import file_lock
from minitron_megatron.data.indexed import sequence_lengths
from minitron_megatron.data.sources import Blend, DataSources
from minitron_megatron.data.tokenizer import SentencePieceTokenizer
from minitron_megatron.errors import ConfigError

SplitRange = Optional[Tuple[float, float]]


def _split_ranges(sources: DataSources) -> List[SplitRange]:
    """Per split (train, valid, test): the share of each train prefix's sequences, or None."""
    if sources.valid_blend is not None:
        return [(0.0, 1.0), (0.0, 1.0), None]
    return convert_split_vector_to_split_matrix(vector_a=parse_and_normalize_split(split=sources.split))


def _tokens_in_range(lengths: numpy.ndarray, split_range: Tuple[float, float]) -> int:
    # The same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
    begin = int(round(split_range[0] * float(len(lengths))))
    end = int(round(split_range[1] * float(len(lengths))))
    return int(lengths[begin:end].sum())


def _check_enough_tokens(sources: DataSources, seq_length: int) -> None:
    """Every prefix must hold one sample per split it feeds, or GPTDataset loops forever."""
    ranges = _split_ranges(sources)
    blends = [sources.train_blend, sources.valid_blend or sources.train_blend]
    for split, blend, split_range in zip(("train", "valid"), blends, ranges):
        if split_range is None:
            continue
        for prefix in blend[0]:
            tokens = _tokens_in_range(sequence_lengths(prefix), split_range)
            if tokens < seq_length + 1:
                via = "" if sources.valid_blend is not None else f" with data.split={sources.split}"
                raise ConfigError(
                    f"{sources.settings.get(prefix, prefix)}={prefix}: its {split} part{via} has "
                    f"{tokens} tokens, fewer than seq_length+1={seq_length + 1} (too little data)"
                )


def _token_weighted(blend: Blend) -> Blend:
    """Unweighted multi-prefix blends get weights proportional to token counts.

    Megatron would otherwise build exactly one epoch of each and cap the
    dataset there, returning fewer samples than asked for.
    """
    prefixes, weights = blend
    if weights is not None or len(prefixes) == 1:
        return blend
    return prefixes, [float(sequence_lengths(p).sum()) for p in prefixes]


def _file_identity(path: str, window: int = 1 << 20) -> list:
    """Size plus a hash of the head and tail: cheap, and equal for copies on other nodes."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(window))
        handle.seek(max(0, size - window))
        digest.update(handle.read(window))
    return [size, digest.hexdigest()]


def index_cache_dir(sources: DataSources) -> Path:
    """Where Megatron caches sample/shuffle indices: keyed by the data files' identity.

    Megatron keys its cache by prefix path only; adding the files' sizes and .idx
    contents makes a re-tokenized prefix at the same path miss the cache instead
    of reading stale indices. Kept under the cache dir so data may be read-only.
    """
    prefixes = sorted(set(sources.train_blend[0]) | set((sources.valid_blend or ([], None))[0]))
    identity = [[p, _file_identity(p + ".idx"), os.path.getsize(p + ".bin")] for p in prefixes]
    digest = hashlib.sha256(json.dumps(identity).encode("utf-8")).hexdigest()[:16]
    return Path(sources.cache_dir) / "gpt_index" / digest


def _gpt_config(sources: DataSources, tokenizer: SentencePieceTokenizer, seq_length: int,
                seed: int, path_to_cache: Path) -> GPTDatasetConfig:
    train_blend = _token_weighted(sources.train_blend)
    if sources.valid_blend is not None:
        blends = {"blend_per_split": [train_blend, sources.valid_blend, None]}
    else:
        blends = {"blend": train_blend, "split": sources.split}
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        path_to_cache=str(path_to_cache),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # The model applies its own causal mask (AttnMaskType.causal); a dense
        # [1, s, s] mask per sample would only cost memory.
        create_attention_mask=False,
        **blends,
    )


@contextlib.contextmanager
def _rank_zero_without_process_group() -> Iterator[None]:
    """Let Megatron's BlendedDataset build its cache in a single process.

    megatron-core 0.16.1 `BlendedDataset._build_indices` calls
    `torch.distributed.get_rank()` on a cache miss without checking
    `is_initialized()` (GPTDataset does check), so multi-prefix blends fail with
    no process group. A lone process is rank 0; we say so for the build only.
    """
    if torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


@contextlib.contextmanager
def _lone_process() -> Iterator[None]:
    """Megatron's builder as in a single process: it builds what is missing itself (as rank 0)
    instead of waiting on the other ranks (see `_build_turn`)."""
    initialized, rank = torch.distributed.is_initialized, torch.distributed.get_rank
    torch.distributed.is_initialized = lambda: False
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.is_initialized, torch.distributed.get_rank = initialized, rank


def _local_rank() -> int:
    """This rank's index on its node (torchrun's LOCAL_RANK, SLURM's SLURM_LOCALID); without
    either, the global rank, which makes rank 0 its node's only first rank."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return torch.distributed.get_rank()


def _build_turn() -> int:
    """0: global rank 0; 1: the first rank of every other node; 2: the rest.

    Why per node: the index caches live in data.cache_dir, by default $MINITRON_CACHE or
    ~/.cache, and a cluster's home (or a node-local $MINITRON_CACHE) is often not shared, so
    Megatron's protocol (global rank 0 builds, the others load after a barrier) failed on every
    other node: their cache directory had nothing in it. Each turn runs after the previous
    one's barrier, so on a shared directory turns 1 and 2 only read finished files (no two nodes
    ever write one file, whatever the filesystem's locking), and on a node-local one turn 1
    builds the same files again (same data, seed and sizes) where that node's ranks read them.
    Megatron's own default (a `cache/` dir beside each data prefix) would be shared wherever the
    data is, but data directories are often read-only, and the stdlib corpus lives in the cache
    dir itself, built on each node."""
    if torch.distributed.get_rank() == 0:
        return 0
    return 1 if _local_rank() == 0 else 2


def build_gpt_datasets(sources: DataSources, tokenizer: SentencePieceTokenizer, seq_length: int,
                       num_train_samples: int, num_valid_samples: Optional[int] = None,
                       seed: int = 1234) -> Tuple[GPTDataset, Optional[GPTDataset]]:
    """(train, valid) Megatron datasets of `seq_length`-token samples.

    `num_valid_samples=None` means one pass over the validation data (only for
    unweighted validation blends). `valid` is None when `split` gives it no share.
    Each sample: tokens, labels (tokens shifted by one), loss_mask, position_ids.
    """
    if seq_length < 1 or num_train_samples < 1:
        raise ValueError(f"seq_length={seq_length} and num_train_samples={num_train_samples} must be >= 1")
    _check_enough_tokens(sources, seq_length)
    config = _gpt_config(sources, tokenizer, seq_length, seed, index_cache_dir(sources))
    valid_blend = sources.valid_blend if sources.valid_blend is not None else config.blend
    if _split_ranges(sources)[1] is None:
        num_valid_samples = 0
    elif num_valid_samples is None and valid_blend[1] is not None:
        raise ValueError("num_valid_samples is required when the validation blend has weights "
                         "(or several unweighted train prefixes share it through data.split)")
    sizes = [num_train_samples, num_valid_samples, 0]
    builder = BlendedMegatronDatasetBuilder(cls=GPTDataset, sizes=sizes, is_built_on_rank=lambda: True,
                                            config=config)
    if not torch.distributed.is_initialized():
        with file_lock(Path(config.path_to_cache) / ".lock"), _rank_zero_without_process_group():
            train_ds, valid_ds, _ = builder.build()
        return train_ds, valid_ds
    mine = _build_turn()
    for turn in range(3):
        if turn == mine:
            # The lock serialises the ranks (and separate jobs) of one turn that share the
            # directory: the first builds what is missing, the others find it.
            with file_lock(Path(config.path_to_cache) / ".lock"), _lone_process():
                train_ds, valid_ds, _ = builder.build()
        if turn < 2:
            torch.distributed.barrier()
    return train_ds, valid_ds

