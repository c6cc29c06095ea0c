"""Data building by two real processes at once (a 2-rank gloo group, as under torchrun)."""

import json
from pathlib import Path

import torch

from tests.dist_utils import run_distributed

SEQ = 32
TINY_STDLIB = dict(stdlib_vocab_size=512, stdlib_max_mb=0.3)


def _build_on_rank(rank: int, world_size: int, cache: str, out: str) -> None:
    import torch.distributed as dist

    from minitron_megatron.config.data import DataConfig
    from minitron_megatron.data import build_gpt_datasets, build_stdlib_corpus, load_tokenizer, prepare_data

    dist.init_process_group("gloo", rank=rank, world_size=world_size)  # both ranks start together
    corpus = build_stdlib_corpus(cache, vocab_size=512, max_mb=0.3)
    sources = prepare_data(DataConfig(cache_dir=cache, **TINY_STDLIB))
    tokenizer = load_tokenizer(sources.tokenizer_model)
    train, valid = build_gpt_datasets(sources, tokenizer, SEQ, 100, None, seed=5)
    train_prefix, valid_prefix = sources.train_blend[0][0], sources.valid_blend[0][0]
    blend = DataConfig(name="custom", cache_dir=cache, tokenizer_model=sources.tokenizer_model,
                       train_prefixes=["0.5", train_prefix, "0.5", valid_prefix], valid_prefixes=[valid_prefix])
    blended, blended_valid = build_gpt_datasets(prepare_data(blend), tokenizer, SEQ, 100, 10, seed=5)
    samples = {name: torch.stack([ds[i]["tokens"] for i in range(10)])
               for name, ds in (("train", train), ("valid", valid), ("blended", blended),
                                ("blended_valid", blended_valid))}
    torch.save(samples, f"{out}/rank{rank}.pt")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"dir": corpus.directory, "reused": corpus.reused}))


def test_two_processes_build_one_corpus_and_the_same_datasets(tmp_path):
    """Two processes race for one cold cache: exactly one builds the stdlib corpus, the
    other waits on the lock and reuses it; both then get identical datasets.

    Would catch: a missing or broken lock (both build, or one reads a half-written
    corpus), a deadlock between our index-cache lock and Megatron's rank-0-first
    barrier, and BlendedDataset paths that only work in a single process."""
    cache = tmp_path / "cache"
    run_distributed(_build_on_rank, 2, str(cache), str(tmp_path))
    built = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert built[0]["dir"] == built[1]["dir"]
    assert sorted(b["reused"] for b in built) == [False, True]
    assert [p.name for p in cache.iterdir() if p.is_dir() and p.name.startswith(("stdlib", ".tmp"))] \
        == [Path(built[0]["dir"]).name]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def _build_without_shared_home(rank: int, world_size: int, data: dict, out: str) -> None:
    import os

    import torch.distributed as dist

    from minitron_megatron.config.data import DataConfig
    from minitron_megatron.data import build_gpt_datasets, index_cache_dir, load_tokenizer, prepare_data

    # Each rank on its own "node": its own home, no $MINITRON_CACHE, the first rank of its node.
    home = Path(out) / f"home{rank}"
    os.environ.update(HOME=str(home), LOCAL_RANK="0")
    os.environ.pop("MINITRON_CACHE", None)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    sources = prepare_data(DataConfig(name="custom", **data))  # the data: on a shared file system
    train, valid = build_gpt_datasets(sources, load_tokenizer(sources.tokenizer_model), SEQ, 100, 10, seed=5)
    chosen = index_cache_dir(sources)
    assert train.config.path_to_cache == str(chosen) and chosen.is_relative_to(home.resolve()), chosen
    assert list(chosen.glob("*GPTDataset-train-shuffle_index.npy")), "this node's caches are in its own home"
    torch.save(torch.stack([ds[i]["tokens"] for ds in (train, valid) for i in range(10)]), f"{out}/nodes{rank}.pt")


def test_nodes_without_a_shared_home_each_build_their_index_caches(tmp_path, stdlib_sources):
    """Two ranks as two nodes with distinct homes and no shared cache (data.cache_dir and
    $MINITRON_CACHE unset): Megatron's GPTDatasetConfig points at each node's ~/.cache, and
    both get the same samples.

    Would catch: Megatron's protocol left as it was (global rank 0 builds into its own home, the
    other node's ranks then find no caches and fail), and a cache path that is not the one the
    plugin chose (data.cache_dir / $MINITRON_CACHE / ~/.cache)."""
    data = dict(tokenizer_model=stdlib_sources.tokenizer_model, train_prefixes=stdlib_sources.train_blend[0],
                valid_prefixes=stdlib_sources.valid_blend[0])
    run_distributed(_build_without_shared_home, 2, data, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"nodes{r}.pt") for r in range(2))
    assert torch.equal(rank0, rank1)
