"""The embedded stdlib corpus: deterministic, split by file, cached atomically."""

import filecmp
import json
from pathlib import Path

import pytest

from minitron_megatron.data import build_stdlib_corpus, read_documents
from minitron_megatron.data import stdlib_corpus as sc
from minitron_megatron.errors import ConfigError

from tests.data.conftest import TINY


def test_file_selection_and_key_are_deterministic():
    first, second = sc.collect_stdlib_files(2.0), sc.collect_stdlib_files(2.0)
    assert [f.rel_path for f in first] == [f.rel_path for f in second]
    assert [f.rel_path for f in first] == sorted(f.rel_path for f in first)
    assert all("site-packages" not in f.rel_path and "/test/" not in f"/{f.rel_path}" for f in first)
    assert sum(len(f.text.encode()) for f in first) <= 2_000_000
    key = sc.corpus_key(sc.corpus_settings(first, 4096, 2.0, 4.0))
    assert key == sc.corpus_key(sc.corpus_settings(second, 4096, 2.0, 4.0))
    assert key != sc.corpus_key(sc.corpus_settings(first, 2048, 2.0, 4.0))


def test_split_is_by_file_disjoint_and_stable():
    files = sc.collect_stdlib_files(16.0)
    train, valid = sc.split_by_file(files, 4.0)
    names_train, names_valid = {f.rel_path for f in train}, {f.rel_path for f in valid}
    assert not names_train & names_valid
    assert names_train | names_valid == {f.rel_path for f in files}
    assert 0.01 < len(valid) / len(files) < 0.08
    # A file's side of the split does not depend on which other files are present.
    train_small, valid_small = sc.split_by_file(files[::2], 4.0)
    assert {f.rel_path for f in valid_small} <= names_valid


def test_stdlib_corpus_contents(stdlib_sources, tokenizer):
    corpus_dir = Path(stdlib_sources.tokenizer_model).parent
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert tokenizer.vocab_size == manifest["vocab_size"] == 4096
    assert tokenizer.eod == manifest["eod"] == tokenizer.processor.piece_to_id("</s>")
    assert not set(manifest["files"]["train"]) & set(manifest["files"]["valid"])
    for split, prefix in (("train", stdlib_sources.train_blend[0][0]),
                          ("valid", stdlib_sources.valid_blend[0][0])):
        docs = read_documents(prefix)
        assert len(docs) == manifest["counts"][split]["documents"] == len(manifest["files"][split])
        assert sum(map(len, docs)) == manifest["counts"][split]["tokens"]
        assert all(doc[-1] == tokenizer.eod and tokenizer.eod not in doc[:-1] for doc in docs[:50])
    assert manifest["counts"]["train"]["tokens"] > 1_000_000


def test_first_document_is_the_first_source_file(stdlib_sources, tokenizer):
    corpus_dir = Path(stdlib_sources.tokenizer_model).parent
    first = json.loads((corpus_dir / "manifest.json").read_text())["files"]["valid"][0]
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / first).read_text(encoding="utf-8")
    doc = read_documents(stdlib_sources.valid_blend[0][0])[0]
    assert tokenizer.detokenize(doc[:-1]) == text


def test_tokenizer_round_trips(tokenizer, sample_texts):
    for text in sample_texts:
        ids = tokenizer.tokenize(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
    assert tokenizer.tokenize_batch(sample_texts) == [tokenizer.tokenize(t) for t in sample_texts]
    assert tokenizer.inv_vocab[tokenizer.vocab["</s>"]] == "</s>"
    assert len(tokenizer.vocab) == tokenizer.vocab_size


def test_second_call_reuses_the_cache(stdlib_sources, cache_dir):
    again = build_stdlib_corpus(cache_dir)
    assert again.reused and again.tokenizer_model == stdlib_sources.tokenizer_model


def test_tiny_builds_are_byte_identical(tmp_path):
    first = build_stdlib_corpus(str(tmp_path / "a"), **TINY)
    second = build_stdlib_corpus(str(tmp_path / "b"), **TINY)
    assert not first.reused and not second.reused
    assert Path(first.directory).name == Path(second.directory).name
    for name in ("tokenizer.model", "train_text_document.bin", "train_text_document.idx",
                 "valid_text_document.bin", "valid_text_document.idx"):
        assert filecmp.cmp(Path(first.directory) / name, Path(second.directory) / name, shallow=False)
    assert first.manifest["vocab_size"] == 512


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash mid-build")

    monkeypatch.setattr(sc, "write_indexed_dataset", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        build_stdlib_corpus(str(tmp_path), **TINY)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_leftover_of_a_killed_builder_is_removed(tmp_path):
    files = sc.collect_stdlib_files(TINY["max_mb"])
    key = sc.corpus_key(sc.corpus_settings(files, TINY["vocab_size"], TINY["max_mb"], TINY["valid_percent"]))
    leftover = tmp_path / f".tmp-stdlib-{key}-killed"
    leftover.mkdir()
    (leftover / "tokenizer.model").write_bytes(b"half")
    corpus = build_stdlib_corpus(str(tmp_path), **TINY)
    assert Path(corpus.directory).name == f"stdlib-{key}"
    assert not leftover.exists()
    assert (Path(corpus.directory) / "manifest.json").is_file()


def test_bad_stdlib_settings():
    with pytest.raises(ConfigError, match="data.stdlib_vocab_size=100"):
        build_stdlib_corpus("", vocab_size=100)
    with pytest.raises(ConfigError, match="data.stdlib_valid_percent=0"):
        build_stdlib_corpus("", valid_percent=0)
    with pytest.raises(ConfigError, match="data.stdlib_max_mb=0.0001"):
        build_stdlib_corpus("", max_mb=0.0001)
