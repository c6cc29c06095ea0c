"""Data config: where tokens come from (the embedded corpus or Megatron indexed datasets)."""

from dataclasses import dataclass, field
from typing import Optional

DATA_NAMES = ("stdlib", "custom")


@dataclass
class DataConfig:
    """Training/validation data and its tokenizer.

    `stdlib` builds (once, cached) a corpus from this machine's Python standard
    library sources plus a sentencepiece tokenizer trained on it; with a loaded run dir
    (`load=`, `student.load=`) it is tokenized with that run's tokenizer instead
    (sentencepiece or Hugging Face; cached per tokenizer). `custom` reads
    Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`, e.g. written by
    `python -m minitron_megatron.data.preprocess`) and their sentencepiece model.
    """

    name: str = "stdlib"
    """stdlib (the embedded corpus) or custom (the prefixes below)."""
    train_prefixes: list[str] = field(default_factory=list)
    """custom only. A Megatron blend list: prefixes ["/d/a_text_document", "/d/b"], or
    alternating weight/prefix ["0.3", "/d/a_text_document", "0.7", "/d/b"]. Prefixes
    without weights are blended in proportion to their token counts."""
    valid_prefixes: list[str] = field(default_factory=list)
    """custom only. A blend list for validation; when empty, `split` carves the
    validation set out of `train_prefixes` (by document)."""
    split: str = "98,2,0"
    """custom only, when valid_prefixes is empty: train,valid,test weights over the
    documents of each train prefix, as Megatron's --split."""
    tokenizer_model: Optional[str] = None
    """custom: the sentencepiece .model the prefixes were tokenized with. stdlib: a tokenizer
    file (sentencepiece .model or HF tokenizer.json) to tokenize the corpus with, e.g. to train
    from random weights with an imported model's tokenizer; null: the loaded run's, else the
    corpus's own sentencepiece model."""
    cache_dir: Optional[str] = None
    """Built corpora and Megatron's dataset index caches. Default: $MINITRON_CACHE,
    else ~/.cache/minitron_megatron. It need not be shared between nodes: the first rank
    of each node builds (or, on a shared directory, finds) what that node's ranks read."""
    stdlib_vocab_size: int = 4096
    """stdlib: sentencepiece vocabulary size (including 256 byte-fallback pieces); unused
    when a loaded run dir brings its own tokenizer."""
    stdlib_max_mb: float = 16.0
    """stdlib: cap on the source bytes used (the test-free 3.11 stdlib is ~11 MB)."""
    stdlib_valid_percent: float = 4.0
    """stdlib: share of source files (chosen by a stable hash of the path) held out
    for validation."""
