"""Hugging Face tokenizers behind Megatron's tokenizer interface, checked against transformers."""

import json
import shutil

import pytest

from minitron_megatron.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    bundle_hf_tokenizer,
    load_tokenizer,
    write_hf_tokenizer,
)
from tests.convert.hf_models import CORPUS

TEXTS = ["def forward(self, x):\n    return x", "héllo wörld 42", "", "</s> inside text"]


@pytest.fixture(scope="module")
def bundle(hf_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"  # the name every run dir uses
    path.write_text(bundle_hf_tokenizer(hf_models["llama"]), encoding="utf-8")
    return path


def test_matches_transformers_like_megatron_lm(hf_models, bundle):
    """Catches a tokenizer that drops the post-processor's BOS, picks the wrong EOD, or counts
    the vocabulary without added tokens (Megatron-LM: tokenize = tokenizer(text).input_ids,
    eod = eos_token_id, vocab_size = len(tokenizer))."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(hf_models["llama"]))
    ours = load_tokenizer(str(bundle))
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS + CORPUS[:6]:
        assert ours.tokenize(text) == ref(text).input_ids, text
    assert ours.tokenize_batch(TEXTS) == [ref(t).input_ids for t in TEXTS]
    assert ours.tokenize("x")[0] == ours.bos == ref.bos_token_id
    assert ours.eod == ours.eos == ref.eos_token_id and ours.vocab_size == len(ref)
    assert ours.detokenize(ref(TEXTS[0]).input_ids) == ref.decode(ref(TEXTS[0]).input_ids)


def test_plain_tokenizer_json_and_sentencepiece_still_load(hf_models, tmp_path, bundle):
    plain = load_tokenizer(str(hf_models["llama"] / "tokenizer.json"))  # sibling tokenizer_config.json
    assert plain.eod == load_tokenizer(str(bundle)).eod
    from minitron_megatron.data.tokenizer import train_sentencepiece

    sp = tmp_path / "sp.model"
    train_sentencepiece(CORPUS, 400, str(sp))
    assert isinstance(load_tokenizer(str(sp)), SentencePieceTokenizer)


def test_bundle_round_trips_files_byte_for_byte(hf_models, bundle, tmp_path):
    assert sorted(write_hf_tokenizer(str(bundle), tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (hf_models["llama"] / name).read_bytes()


def test_tokenizer_without_eos_is_refused(hf_models, tmp_path):
    shutil.copy(hf_models["llama"] / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((hf_models["llama"] / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|not-a-token|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="EOS"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_preprocess_with_hf_tokenizer(bundle, tmp_path):
    """The indexed-dataset tool takes the bundle like a sentencepiece model: documents are
    tokenize(text) + [eod]."""
    from minitron_megatron.data import read_documents
    from minitron_megatron.data.preprocess import preprocess

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[:3]) + "\n")
    preprocess([str(docs)], str(bundle), str(tmp_path / "docs"))
    tok = load_tokenizer(str(bundle))
    first = read_documents(str(tmp_path / "docs"))[0].tolist()
    assert first == tok.tokenize(CORPUS[0]) + [tok.eod]
