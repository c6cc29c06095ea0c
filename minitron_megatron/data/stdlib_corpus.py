"""The embedded corpus: this machine's Python standard library sources, tokenized.

Deterministic: files are chosen and split by stable hashes of their relative
paths, the tokenizer trains on a fixed sample of train-split lines, and the
cache key hashes the Python version, every chosen file's content and the
settings. Layout of `<cache_dir>/stdlib-<key>/`:

    tokenizer.model                     sentencepiece BPE, eod = </s>
    train_text_document.{bin,idx}       one document per train file, EOD appended
    valid_text_document.{bin,idx}       one document per held-out file
    manifest.json                       key, settings, files per split, counts

With a given tokenizer (a loaded run dir's: sentencepiece or a Hugging Face bundle), the same
files and split are tokenized with it instead, into `<cache_dir>/stdlib-tok-<key>/` whose key
hashes the tokenizer file's bytes (and the tokenizer libraries' versions) in place of the
vocabulary size; `tokenizer.model` there is a byte copy of the given file, so runs compare
equal digests. The embedded corpus's own tokenizer maps to the embedded corpus itself.
"""

import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import sentencepiece
import tokenizers

from minitron_megatron.data.cache import atomic_directory, file_lock, remove_stale_temporaries, resolve_cache_dir
from minitron_megatron.data.indexed import write_indexed_dataset
from minitron_megatron.data.tokenizer import load_tokenizer, train_sentencepiece
from minitron_megatron.errors import ConfigError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the build changes, so old caches are not reused."""
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MAX_FILE_BYTES = 256_000
"""Larger files are generated tables (pydoc topics, codecs), not code worth learning."""
MAX_TOKENIZER_LINES = 300_000
MIN_VOCAB_SIZE = 384
"""256 byte-fallback pieces + 3 specials + room for merges."""


@dataclass
class SourceFile:
    """One standard-library file: path relative to the stdlib root, and its text."""

    rel_path: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()


@dataclass
class StdlibCorpus:
    """A built (or reused) embedded corpus."""

    directory: str
    tokenizer_model: str
    train_prefix: str
    valid_prefix: str
    manifest: dict
    reused: bool
    """True when an existing cache entry was found (nothing was built)."""


def _path_hash(rel_path: str) -> int:
    return int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:12], 16)


def _candidate_paths(root: Path) -> List[str]:
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        for name in files:
            # _sysconfigdata describes this build machine, not code.
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


def collect_stdlib_files(max_mb: float, root: str = "") -> List[SourceFile]:
    """Standard-library `.py` files (tests excluded) up to `max_mb` of source, sorted.

    Files are taken in stable-hash order until the cap, so a small cap still
    samples the whole library rather than its alphabetical start.
    """
    stdlib = Path(root or sysconfig.get_paths()["stdlib"])
    budget = int(max_mb * 1_000_000)
    chosen: List[SourceFile] = []
    for rel_path in sorted(_candidate_paths(stdlib), key=_path_hash):
        data = (stdlib / rel_path).read_bytes()
        if not data.strip() or len(data) > MAX_FILE_BYTES or len(data) > budget:
            continue
        try:
            chosen.append(SourceFile(rel_path, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
        budget -= len(data)
    return sorted(chosen, key=lambda f: f.rel_path)


def split_by_file(files: List[SourceFile], valid_percent: float) -> Tuple[List[SourceFile], List[SourceFile]]:
    """(train, valid) by a stable hash of each path; both non-empty when 2+ files."""
    if len(files) < 2:
        raise ValueError(f"the stdlib corpus needs at least 2 source files, found {len(files)}")
    threshold = valid_percent / 100.0
    valid = [f for f in files if (_path_hash(f.rel_path) % 10_000) / 10_000 < threshold]
    if not valid:  # tiny corpora: hold out the lowest-hash file
        valid = [min(files, key=lambda f: _path_hash(f.rel_path) % 10_000)]
    if len(valid) == len(files):
        valid = valid[:-1]
    held_out = {f.rel_path for f in valid}
    return [f for f in files if f.rel_path not in held_out], valid


def corpus_settings(files: List[SourceFile], vocab_size: int, max_mb: float, valid_percent: float) -> dict:
    """Everything the built corpus depends on; its hash is the cache key."""
    return {
        "format": FORMAT_VERSION,
        "python": f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}."
        f"{sys.version_info.micro}",
        "sentencepiece": sentencepiece.__version__,
        "vocab_size": vocab_size,
        "max_mb": max_mb,
        "valid_percent": valid_percent,
        "files": {f.rel_path: f.digest for f in files},
    }


def corpus_key(settings: dict) -> str:
    """A short stable hash of `corpus_settings`."""
    blob = json.dumps(settings, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _tokenizer_lines(files: List[SourceFile]) -> List[str]:
    lines = [line for f in files for line in f.text.split("\n") if line.strip()]
    stride = max(1, -(-len(lines) // MAX_TOKENIZER_LINES))
    return lines[::stride]


def tokenizer_corpus_settings(files: List[SourceFile], tokenizer_path: str, max_mb: float,
                              valid_percent: float) -> dict:
    """`corpus_settings` for the corpus tokenized with a given tokenizer file: its bytes' hash
    (and what reads it) replace the vocabulary size of a tokenizer we would train."""
    return {
        "format": FORMAT_VERSION,
        "python": f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}."
        f"{sys.version_info.micro}",
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "sentencepiece": sentencepiece.__version__,
        "tokenizers": tokenizers.__version__,
        "max_mb": max_mb,
        "valid_percent": valid_percent,
        "files": {f.rel_path: f.digest for f in files},
    }


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _build_into(directory: Path, train: List[SourceFile], valid: List[SourceFile],
                settings: dict, key: str, tokenizer_path: Optional[str] = None) -> dict:
    started = time.time()
    model_path = str(directory / "tokenizer.model")
    if tokenizer_path is None:
        train_sentencepiece(_tokenizer_lines(train), settings["vocab_size"], model_path)
    else:
        shutil.copyfile(tokenizer_path, model_path)  # byte for byte: digests compare equal
    tokenizer = load_tokenizer(model_path)
    counts = {}
    for split, files in (("train", train), ("valid", valid)):
        ids = tokenizer.tokenize_batch([f.text for f in files])
        stats = write_indexed_dataset(ids, tokenizer.eod, tokenizer.vocab_size,
                                      str(directory / f"{split}_text_document"))
        counts[split] = {"documents": stats.documents, "tokens": stats.tokens,
                         "bytes": sum(len(f.text.encode("utf-8")) for f in files)}
    manifest = {
        "key": key,
        "settings": {k: v for k, v in settings.items() if k != "files"},
        "files": {"train": [f.rel_path for f in train], "valid": [f.rel_path for f in valid]},
        "counts": counts,
        "eod": tokenizer.eod,
        "vocab_size": tokenizer.vocab_size,
        "build_seconds": round(time.time() - started, 2),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _corpus_at(directory: Path, reused: bool) -> StdlibCorpus:
    manifest = json.loads((directory / "manifest.json").read_text())
    return StdlibCorpus(
        directory=str(directory),
        tokenizer_model=str(directory / "tokenizer.model"),
        train_prefix=str(directory / "train_text_document"),
        valid_prefix=str(directory / "valid_text_document"),
        manifest=manifest,
        reused=reused,
    )


def build_stdlib_corpus(cache_dir: str = "", vocab_size: int = 4096, max_mb: float = 16.0,
                        valid_percent: float = 4.0, tokenizer_path: Optional[str] = None) -> StdlibCorpus:
    """Build the embedded corpus into the cache, or reuse it; safe to call from many processes.
    `tokenizer_path`: tokenize it with that tokenizer file (cached per tokenizer) instead of
    the corpus's own sentencepiece model (`vocab_size` is then unused)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"data.stdlib_vocab_size={vocab_size}: must be at least {MIN_VOCAB_SIZE}")
    if not 0 < valid_percent < 100:
        raise ConfigError(f"data.stdlib_valid_percent={valid_percent}: must be in (0, 100)")
    files = collect_stdlib_files(max_mb)
    if len(files) < 2:
        raise ConfigError(f"data.stdlib_max_mb={max_mb}: too small, the corpus needs at least 2 source files")
    root = resolve_cache_dir(cache_dir or None)
    settings = corpus_settings(files, vocab_size, max_mb, valid_percent)
    own = root / f"stdlib-{corpus_key(settings)}"
    if tokenizer_path is not None and not _is_tokenizer_of(own, tokenizer_path):
        settings = tokenizer_corpus_settings(files, tokenizer_path, max_mb, valid_percent)
        return _build_or_reuse(root / f"stdlib-tok-{corpus_key(settings)}", files, settings, tokenizer_path)
    return _build_or_reuse(own, files, settings)


def _is_tokenizer_of(corpus_dir: Path, tokenizer_path: str) -> bool:
    """Whether an already built corpus has this very tokenizer (a run trained on it)."""
    own = corpus_dir / "tokenizer.model"
    return corpus_dir.is_dir() and file_sha256(own) == file_sha256(tokenizer_path)


def _build_or_reuse(final: Path, files: List[SourceFile], settings: dict,
                    tokenizer_path: Optional[str] = None) -> StdlibCorpus:
    if final.is_dir():  # fast path: published directories are always complete
        return _corpus_at(final, reused=True)
    with file_lock(final.parent / f"{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return _corpus_at(final, reused=True)
        remove_stale_temporaries(final.parent, final.name)
        train, valid = split_by_file(files, settings["valid_percent"])
        logger.info("building the stdlib corpus (%d files) into %s", len(files), final)
        with atomic_directory(final) as tmp:
            _build_into(tmp, train, valid, settings, final.name.rsplit("-", 1)[-1], tokenizer_path)
    return _corpus_at(final, reused=False)
