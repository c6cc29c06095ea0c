"""Write and inspect Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`)."""

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from minitron_megatron.data.cache import commit_indexed_files


@dataclass
class IndexedStats:
    """What went into an indexed dataset."""

    documents: int
    tokens: int


def write_indexed_dataset(
    documents: Iterable[Sequence[int]], eod: int, vocab_size: int, prefix: str
) -> IndexedStats:
    """Write one document per item, each followed by `eod`, to `prefix.{bin,idx}`.

    Token dtype is Megatron's optimal one for `vocab_size` (uint16 up to 65536).
    Files are built under temporary names and renamed into place at the end.
    """
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp_prefix = f"{prefix}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(bin_path=tmp_prefix + ".bin", dtype=DType.optimal_dtype(cardinality=vocab_size))
    stats = IndexedStats(documents=0, tokens=0)
    try:
        for ids in documents:
            tokens = numpy.append(numpy.asarray(ids, dtype=numpy.int64), eod)
            builder.add_item(torch.from_numpy(tokens))
            builder.end_document()
            stats.documents += 1
            stats.tokens += int(tokens.size)
        builder.finalize(tmp_prefix + ".idx")
        commit_indexed_files(tmp_prefix, prefix)
    finally:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)
    return stats


def missing_files(prefix: str) -> list[str]:
    """The files of `prefix.{bin,idx}` that do not exist."""
    return [prefix + suffix for suffix in (".bin", ".idx") if not os.path.isfile(prefix + suffix)]


def read_documents(prefix: str) -> list[numpy.ndarray]:
    """All documents of an indexed dataset as token arrays (for tests and small data)."""
    dataset = IndexedDataset(path_prefix=prefix)
    bounds = numpy.array(dataset.document_indices)
    return [
        numpy.concatenate([numpy.array(dataset[i]) for i in range(int(bounds[d]), int(bounds[d + 1]))])
        for d in range(len(bounds) - 1)
    ]


def sequence_lengths(prefix: str) -> numpy.ndarray:
    """Token count of every sequence (Megatron's unit for --split) of `prefix`."""
    # Copy while the dataset is alive: its arrays view an mmap closed on deletion.
    dataset = IndexedDataset(path_prefix=prefix)
    lengths = numpy.array(dataset.sequence_lengths, dtype=numpy.int64)
    del dataset
    return lengths
