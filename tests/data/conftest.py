"""Shared data fixtures: one stdlib corpus per session (built or reused from the cache).

The cache is $MINITRON_CACHE when set (the user's warm cache works too), else a
session tmp dir; no test assumes a cold cache.
"""

import json
import os

import pytest

from minitron_megatron.config.data import DataConfig
from minitron_megatron.data import load_tokenizer, prepare_data

TINY = dict(vocab_size=512, max_mb=0.3, valid_percent=4.0)
"""A corpus small enough to build in about a second (determinism/concurrency tests)."""


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return os.environ.get("MINITRON_CACHE") or str(tmp_path_factory.mktemp("minitron_cache"))


@pytest.fixture(scope="session")
def stdlib_sources(cache_dir):
    return prepare_data(DataConfig(name="stdlib", cache_dir=cache_dir))


@pytest.fixture(scope="session")
def tokenizer(stdlib_sources):
    return load_tokenizer(stdlib_sources.tokenizer_model)


@pytest.fixture(scope="session")
def sample_texts():
    return [
        "def f(x):\n    return x + 1\n",
        "\tindented with a tab\n\n\nand blank lines  ",
        "unicode: héllo wörld, 日本語, emoji 🐍 and control \x01 chars",
        "   leading spaces and trailing ones   ",
        "x",
    ]


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({key: text, "id": len(text)}) + "\n")
    return str(path)
