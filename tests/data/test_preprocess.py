"""preprocess: .jsonl/.txt -> indexed dataset equal to tokenized documents + EOD."""

import json
import os
import runpy
import sys

import pytest

from minitron_megatron.data import load_tokenizer, read_documents
from minitron_megatron.data import preprocess as preprocess_module
from minitron_megatron.data.preprocess import iter_documents, main

from tests.data.conftest import write_jsonl


def _expected(tokenizer, texts):
    return [tokenizer.tokenize(t) + [tokenizer.eod] for t in texts]


def test_jsonl_via_command_line(tmp_path, tokenizer, stdlib_sources, sample_texts, monkeypatch, capsys):
    """The module run as a script (its `__main__` guard): documents round-trip, last line is JSON."""
    source = write_jsonl(tmp_path / "docs.jsonl", sample_texts + ["   "])  # blank doc skipped
    prefix = tmp_path / "out" / "docs_text_document"
    monkeypatch.setattr(sys, "argv", ["preprocess", "--input", source, "--tokenizer-model",
                                      stdlib_sources.tokenizer_model, "--output-prefix", str(prefix)])
    runpy.run_path(preprocess_module.__file__, run_name="__main__")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = _expected(tokenizer, sample_texts)
    assert summary["documents"] == len(sample_texts)
    assert summary["tokens"] == sum(map(len, expected))
    assert summary["prefix"] == str(prefix)
    assert [d.tolist() for d in read_documents(str(prefix))] == expected
    assert sorted(os.listdir(prefix.parent)) == ["docs_text_document.bin", "docs_text_document.idx"]


def test_txt_blocks_and_custom_json_key(tmp_path, tokenizer, stdlib_sources, capsys):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\n  \nsecond doc\n\nthird\n")
    write_jsonl(tmp_path / "b.jsonl", ["from json"], key="body")
    prefix = str(tmp_path / "mixed")
    main(["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--json-key", "body",
          "--tokenizer-model", stdlib_sources.tokenizer_model, "--output-prefix", prefix])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    texts = ["first doc\nline two", "second doc", "third", "from json"]
    assert summary["documents"] == 4
    assert [d.tolist() for d in read_documents(prefix)] == _expected(tokenizer, texts)


def test_rewrite_replaces_the_pair(tmp_path, stdlib_sources, capsys):
    prefix = str(tmp_path / "p")
    for texts in (["one", "two"], ["three"]):
        main(["--input", write_jsonl(tmp_path / "d.jsonl", texts),
              "--tokenizer-model", stdlib_sources.tokenizer_model, "--output-prefix", prefix])
    assert len(read_documents(prefix)) == 1
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "p.bin", "p.idx"]


@pytest.mark.parametrize("content, message", [
    ("", "no documents found"),
    ("\n  \n", "no documents found"),
    ('{"text": "ok"}\n{"text": \n', "d.jsonl:2: not valid JSON"),
    ('{"body": "no text key"}\n', "d.jsonl:1: no string field 'text'"),
])
def test_bad_jsonl_fails_with_one_message(tmp_path, stdlib_sources, capsys, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    prefix = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(tmp_path / "d.jsonl"), "--tokenizer-model",
              stdlib_sources.tokenizer_model, "--output-prefix", str(prefix)])
    assert exit_info.value.code != 0 and message in str(exit_info.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # nothing half-written


def test_missing_inputs(tmp_path, stdlib_sources):
    with pytest.raises(SystemExit, match="--tokenizer-model .*nope.model: file not found"):
        main(["--input", write_jsonl(tmp_path / "d.jsonl", ["x"]), "--tokenizer-model",
              str(tmp_path / "nope.model"), "--output-prefix", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--input .*missing.txt: file not found"):
        list(iter_documents([str(tmp_path / "missing.txt")]))
    with pytest.raises(FileNotFoundError, match="tokenizer model .*nope.model' not found"):
        load_tokenizer(str(tmp_path / "nope.model"))
