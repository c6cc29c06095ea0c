"""data=stdlib with a loaded run dir: the embedded corpus tokenized with that run's tokenizer
(here an imported tiny HF Llama's BPE), cached per tokenizer."""

import json
import math

import pytest

from minitron_megatron.data.indexed import read_documents
from minitron_megatron.data.preprocess import preprocess
from minitron_megatron.data.stdlib_corpus import build_stdlib_corpus, collect_stdlib_files, split_by_file
from minitron_megatron.data.tokenizer import load_tokenizer, train_sentencepiece
from tests.commands import run_command, summary

SMALL_CORPUS = dict(max_mb=0.3, valid_percent=4.0)
"""A corpus that tokenizes in about a second with any tokenizer."""
EVALUATE = ["evaluate.samples=8", "evaluate.micro_batch_size=4", "device=cpu", "seq_length=64"]


@pytest.fixture(scope="module")
def imported(hf_models, tmp_path_factory):
    """The tiny HF Llama imported into a run dir (its tokenizer: a byte-level BPE bundle)."""
    root = tmp_path_factory.mktemp("stdlib_hf")
    run_command("convert", f"from_hf={hf_models['llama']}", f"save={root / 'run'}", "seq_length=64")
    return root


def test_evaluate_on_stdlib_equals_the_corpus_built_by_hand(imported):
    """Catches data=stdlib ignoring the loaded run's tokenizer (today's refusal, or the
    sentencepiece ids fed to a model with another vocabulary), a corpus tokenized differently
    from what a user gets with data.preprocess (documents, EOD, split), or the wrong split
    scored: `evaluate load=RUN data=stdlib` must give the val loss of `data=custom` on the same
    stdlib files tokenized by hand."""
    run, cache = imported / "run", imported / "cache"
    stdlib = run_command("evaluate", f"load={run}", "data=stdlib", f"data.cache_dir={cache}",
                         f"data.stdlib_max_mb={SMALL_CORPUS['max_mb']}", *EVALUATE)
    by_tool = summary(stdlib)["val_loss"]
    assert math.isfinite(by_tool)

    train, valid = split_by_file(collect_stdlib_files(SMALL_CORPUS["max_mb"]), SMALL_CORPUS["valid_percent"])
    prefixes = {}
    for split, files in (("train", train), ("valid", valid)):
        jsonl = imported / f"{split}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": f.text}) + "\n" for f in files))
        prefixes[split] = preprocess([str(jsonl)], str(run / "tokenizer.model"), str(imported / split))["prefix"]
    custom = run_command("evaluate", f"load={run}", "data=custom", f"data.cache_dir={cache}",
                         f"data.train_prefixes=[{prefixes['train']}]", f"data.valid_prefixes=[{prefixes['valid']}]",
                         f"data.tokenizer_model={run / 'tokenizer.model'}", *EVALUATE)
    assert summary(custom)["val_loss"] == by_tool


def test_tokens_decode_to_the_stdlib_sources(imported):
    """Catches a corpus built with the wrong tokenizer or without its EOD: every held-out
    document, decoded with the run's tokenizer, is its stdlib file's text."""
    tokenizer_path = str(imported / "run" / "tokenizer.model")
    corpus = build_stdlib_corpus(str(imported / "cache-decode"), tokenizer_path=tokenizer_path, **SMALL_CORPUS)
    tokenizer = load_tokenizer(corpus.tokenizer_model)
    _, valid = split_by_file(collect_stdlib_files(SMALL_CORPUS["max_mb"]), SMALL_CORPUS["valid_percent"])
    documents = read_documents(corpus.valid_prefix)
    assert len(documents) == len(valid)
    for doc, source in zip(documents, valid):
        assert doc[-1] == tokenizer.eod
        bos = [tokenizer.bos] if doc[0] == tokenizer.bos else []  # the BPE's post-processor adds <s>
        assert tokenizer.detokenize(doc[len(bos):-1]) == source.text


def test_two_tokenizers_get_two_caches(imported, tmp_path):
    """Catches a cache keyed by path or by settings alone (a second tokenizer would reuse the
    first one's ids), one keyed by path (the same tokenizer copied elsewhere rebuilt), or the
    embedded corpus's own tokenizer rebuilt under another key."""
    cache = str(tmp_path / "cache")
    hf_bundle = imported / "run" / "tokenizer.model"
    first = build_stdlib_corpus(cache, tokenizer_path=str(hf_bundle), **SMALL_CORPUS)
    copy = tmp_path / "elsewhere.model"
    copy.write_bytes(hf_bundle.read_bytes())
    again = build_stdlib_corpus(cache, tokenizer_path=str(copy), **SMALL_CORPUS)
    assert not first.reused and again.reused and again.directory == first.directory

    sentencepiece = tmp_path / "sp.model"
    lines = [line for f in collect_stdlib_files(0.1) for line in f.text.splitlines() if line.strip()]
    train_sentencepiece(lines, 400, str(sentencepiece))
    other = build_stdlib_corpus(cache, tokenizer_path=str(sentencepiece), **SMALL_CORPUS)
    assert not other.reused and other.directory != first.directory
    assert other.manifest["vocab_size"] == 400 and first.manifest["vocab_size"] == load_tokenizer(
        str(hf_bundle)).vocab_size
    assert read_documents(other.valid_prefix)[0].tolist() != read_documents(first.valid_prefix)[0].tolist()

    own = build_stdlib_corpus(cache, vocab_size=512, **SMALL_CORPUS)
    mapped = build_stdlib_corpus(cache, vocab_size=512, tokenizer_path=own.tokenizer_model, **SMALL_CORPUS)
    assert mapped.directory == own.directory and mapped.reused
