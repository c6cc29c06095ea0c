"""Data: sentencepiece tokenizer, the embedded stdlib corpus, Megatron indexed
datasets and GPTDatasets, and deterministic DP-split micro-batches.

    sources = prepare_data(cfg.data)                 # build/reuse stdlib, or check custom files
    tokenizer = load_tokenizer(sources.tokenizer_model)
    train_ds, valid_ds = build_gpt_datasets(sources, tokenizer, seq_length, n_train, n_valid, seed)
    batches = MicroBatchIterator(train_ds, micro_batch_size, dp_rank, dp_size, consumed_samples)

`minitron_megatron.data.preprocess` (not imported here, it is a `python -m` entry
point) tokenizes .jsonl/.txt files into indexed datasets.
"""

from minitron_megatron.data.batches import MicroBatchIterator, calibration_batches, collate
from minitron_megatron.data.gpt_datasets import build_gpt_datasets, index_cache_dir
from minitron_megatron.data.indexed import IndexedStats, read_documents, write_indexed_dataset
from minitron_megatron.data.sources import DataSources, prepare_data
from minitron_megatron.data.stdlib_corpus import StdlibCorpus, build_stdlib_corpus
from minitron_megatron.data.tokenizer import SentencePieceTokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "DataSources",
    "IndexedStats",
    "MicroBatchIterator",
    "SentencePieceTokenizer",
    "StdlibCorpus",
    "build_gpt_datasets",
    "build_stdlib_corpus",
    "calibration_batches",
    "collate",
    "index_cache_dir",
    "load_tokenizer",
    "prepare_data",
    "read_documents",
    "train_sentencepiece",
    "write_indexed_dataset",
]
