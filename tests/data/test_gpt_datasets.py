"""prepare_data + build_gpt_datasets over the stdlib corpus and custom prefixes."""

from pathlib import Path

import pytest
import torch

from minitron_megatron.config.data import DataConfig
from minitron_megatron.data import build_gpt_datasets, index_cache_dir, prepare_data
from minitron_megatron.data.preprocess import preprocess
from minitron_megatron.errors import ConfigError

from tests.data.conftest import write_jsonl

SEQ = 64


@pytest.fixture(scope="module")
def custom_prefixes(tmp_path_factory, stdlib_sources):
    """Two small custom datasets (lines of the stdlib's own source as documents)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    data = tmp_path_factory.mktemp("custom_data")
    prefixes = []
    for name in ("argparse.py", "typing.py"):
        lines = (root / name).read_text(encoding="utf-8").split("\n\n")
        source = write_jsonl(data / f"{name}.jsonl", lines)
        prefix = str(data / f"{name[:-3]}_text_document")
        preprocess([source], stdlib_sources.tokenizer_model, prefix)
        prefixes.append(prefix)
    return prefixes


def _custom(stdlib_sources, cache_dir, train, valid=(), split="90,10,0"):
    return DataConfig(name="custom", train_prefixes=list(train), valid_prefixes=list(valid),
                      split=split, tokenizer_model=stdlib_sources.tokenizer_model, cache_dir=cache_dir)


def _check_sample(sample, tokenizer):
    sample = dict(sample)
    sample.pop("dataset_id", None)  # added by Megatron's BlendedDataset
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}  # no dense mask
    assert all(v.shape == (SEQ,) for v in sample.values())
    assert sample["tokens"].dtype == sample["labels"].dtype == torch.int64
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert 0 <= int(sample["tokens"].min()) and int(sample["tokens"].max()) < tokenizer.vocab_size


def test_stdlib_datasets(stdlib_sources, tokenizer, cache_dir):
    train, valid = build_gpt_datasets(stdlib_sources, tokenizer, SEQ, 500, None, seed=7)
    assert len(train) >= 500 and len(valid) > 100
    for ds in (train, valid):
        for i in (0, 1, len(ds) - 1):
            _check_sample(ds[i], tokenizer)
    again, _ = build_gpt_datasets(stdlib_sources, tokenizer, SEQ, 500, None, seed=7)
    assert torch.equal(again[42]["tokens"], train[42]["tokens"])
    other, _ = build_gpt_datasets(stdlib_sources, tokenizer, SEQ, 500, None, seed=8)
    assert not torch.equal(other[42]["tokens"], train[42]["tokens"])
    assert str(index_cache_dir(stdlib_sources)).startswith(str(Path(cache_dir).resolve()))
    assert list(index_cache_dir(stdlib_sources).glob("*GPTDataset-train-shuffle_index.npy"))


def test_custom_prefix_with_split(stdlib_sources, tokenizer, cache_dir, custom_prefixes):
    sources = prepare_data(_custom(stdlib_sources, cache_dir, custom_prefixes[:1]))
    assert sources.valid_blend is None and sources.train_blend == ([custom_prefixes[0]], None)
    train, valid = build_gpt_datasets(sources, tokenizer, SEQ, 2000, 20, seed=1)
    assert len(train) >= 2000 and len(valid) >= 20  # more than one epoch of train
    _check_sample(train[1999], tokenizer)
    _check_sample(valid[0], tokenizer)
    assert not (Path(custom_prefixes[0]).parent / "cache").exists()  # caches stay in cache_dir


def test_custom_blends(stdlib_sources, tokenizer, cache_dir, custom_prefixes):
    a, b = custom_prefixes
    weighted = prepare_data(_custom(stdlib_sources, cache_dir, ["0.3", a, "0.7", b], valid=[b]))
    assert weighted.train_blend == ([a, b], [0.3, 0.7])
    train, valid = build_gpt_datasets(weighted, tokenizer, SEQ, 300, None, seed=1)
    assert len(train) >= 300 and len(valid) > 0
    _check_sample(train[299], tokenizer)
    # Unweighted prefixes blend by token count and still give every sample asked for.
    plain = prepare_data(_custom(stdlib_sources, cache_dir, [a + ".bin", b]))
    train, valid = build_gpt_datasets(plain, tokenizer, SEQ, 3000, 10, seed=1)
    assert len(train) >= 3000 and len(valid) >= 10
    with pytest.raises(ValueError, match="num_valid_samples is required"):
        build_gpt_datasets(plain, tokenizer, SEQ, 30, None, seed=1)


def test_rewritten_prefix_gets_fresh_index_caches(tmp_path, stdlib_sources, cache_dir):
    """Megatron keys index caches by path; a re-tokenized prefix must not reuse stale ones."""
    prefix = str(tmp_path / "data")
    preprocess([write_jsonl(tmp_path / "a.jsonl", ["one text"] * 50)], stdlib_sources.tokenizer_model, prefix)
    before = index_cache_dir(prepare_data(_custom(stdlib_sources, cache_dir, [prefix])))
    preprocess([write_jsonl(tmp_path / "b.jsonl", ["other"] * 80)], stdlib_sources.tokenizer_model, prefix)
    after = index_cache_dir(prepare_data(_custom(stdlib_sources, cache_dir, [prefix])))
    assert before != after


def test_split_without_valid_share(stdlib_sources, tokenizer, cache_dir, custom_prefixes):
    sources = prepare_data(_custom(stdlib_sources, cache_dir, custom_prefixes[:1], split="100,0,0"))
    train, valid = build_gpt_datasets(sources, tokenizer, SEQ, 10, None, seed=1)
    assert valid is None and len(train) >= 10


def test_too_little_data_is_a_clear_error(tmp_path, stdlib_sources, tokenizer, cache_dir):
    prefix = str(tmp_path / "small")
    preprocess([write_jsonl(tmp_path / "s.jsonl", ["tiny", "docs"])], stdlib_sources.tokenizer_model, prefix)
    sources = prepare_data(_custom(stdlib_sources, cache_dir, [prefix], split="50,50,0"))
    with pytest.raises(ValueError, match=r"data.train_prefixes\[0\]=.*train part with data.split=50,50,0 "
                                         r"has \d+ tokens, fewer than seq_length\+1=65"):
        build_gpt_datasets(sources, tokenizer, SEQ, 10, 10, seed=1)


def test_bad_settings_name_the_setting(tmp_path, stdlib_sources, cache_dir, custom_prefixes):
    cases = [
        (DataConfig(name="nope"), "data.name=nope: expected one of stdlib, custom"),
        (DataConfig(name="custom", tokenizer_model=stdlib_sources.tokenizer_model),
         "data.train_prefixes is empty"),
        (DataConfig(name="custom", train_prefixes=custom_prefixes[:1]), "data.tokenizer_model is not set"),
        (DataConfig(name="custom", train_prefixes=custom_prefixes[:1], tokenizer_model="/no/tok.model"),
         "data.tokenizer_model=/no/tok.model: file not found"),
        (_custom(stdlib_sources, cache_dir, ["/x/y"]),
         "data.train_prefixes[0]=/x/y: /x/y.bin and /x/y.idx not found"),
        (_custom(stdlib_sources, cache_dir, ["0.5", custom_prefixes[0], "0.5", "/x/y"]),
         "data.train_prefixes[3]=/x/y: /x/y.bin and /x/y.idx not found"),
        (_custom(stdlib_sources, cache_dir, custom_prefixes, valid=["/x/v"]),
         "data.valid_prefixes[0]=/x/v: /x/v.bin and /x/v.idx not found"),
        (_custom(stdlib_sources, cache_dir, ["0", custom_prefixes[0]]),
         "data.train_prefixes[0]=0: blend weights must be > 0"),
        (_custom(stdlib_sources, cache_dir, custom_prefixes, split="a,b"), "data.split=a,b"),
        (DataConfig(name="stdlib", train_prefixes=["/x"]), "data.train_prefixes=['/x']: only used with"),
        (DataConfig(name="stdlib", cache_dir="/proc/no/cache"), "data.cache_dir=/proc/no/cache: cannot create"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError) as error:
            prepare_data(cfg)
        assert message in str(error.value), (cfg, str(error.value))
    half = str(tmp_path / "half")
    Path(half + ".bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"\[0\]=.*half: .*half.idx not found"):
        prepare_data(_custom(stdlib_sources, cache_dir, [half]))
