"""Checkpoint commits that survive a power loss, and the number of step checkpoints kept.

A rename is durable only once the directory holding the new name is fsynced; until then a
power loss can undo it even though `rename` returned, so a checkpoint (or summary.json) that
looked committed could vanish. The spy below records, in one process, every rename and every
fsync of a directory during real saves, in order.
"""

import json
from pathlib import Path

import pytest

from minitron_megatron.checkpoint.dist import TRACKER, _prune_old, iteration_dir
from tests.dist_utils import run_distributed
from tests.model_utils import small_model

pytestmark = pytest.mark.compat


def _spy_worker(rank, world, out):
    import os
    import stat

    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.checkpoint.dist import save_checkpoint
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model, padded_vocab_size
    from minitron_megatron.runtime import init_runtime

    out = Path(out)
    ctx = init_runtime(device="cpu", seed=3)
    cfg = small_model()
    model = build_gpt_model(cfg, ctx, ParallelConfig(), padded_vocab_size(cfg.vocab_size, 64, 1))
    events, opened = [], {}
    real_open, real_fsync, real_rename, real_replace = os.open, os.fsync, os.rename, os.replace

    def spy_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = os.path.realpath(path)
        return fd

    def spy_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(["fsync_dir", opened.get(fd)])
        return real_fsync(fd)

    def spy_rename(real):
        def rename(src, dst, *args, **kwargs):
            events.append(["rename", os.path.realpath(dst)])
            return real(src, dst, *args, **kwargs)
        return rename

    os.open, os.fsync = spy_open, spy_fsync
    os.rename, os.replace = spy_rename(real_rename), spy_rename(real_replace)
    try:
        root = rd.checkpoint_root(out / "run")
        for iteration in (1, 2, 3):
            save_checkpoint(root, iteration, model, ctx, keep_last=2)
        rd.write_summary(out / "run", {"done": True})
    finally:
        os.open, os.fsync, os.rename, os.replace = real_open, real_fsync, real_rename, real_replace
    (out / "events.json").write_text(json.dumps(events))


def test_every_commit_rename_is_followed_by_an_fsync_of_its_directory(tmp_path):
    """Catches a commit (an `iter_` dir renamed into place, the tracker file, summary.json) whose
    rename is not made durable before the next step builds on it: a power loss after the tracker
    names an iteration could otherwise leave a tracker naming a directory the disk never kept."""
    run_distributed(_spy_worker, 1, str(tmp_path))
    events = json.loads((tmp_path / "events.json").read_text())
    root = (tmp_path / "run" / "checkpoint").resolve()
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    committed = {Path(events[i][1]).name for i in renames}
    assert {"iter_0000001", "iter_0000003", TRACKER, "summary.json"} <= committed, committed
    for i in renames:
        parent = str(Path(events[i][1]).parent)
        following = events[i + 1:(renames + [len(events)])[renames.index(i) + 1]]
        assert ["fsync_dir", parent] in following, (events[i], following)
    # The iter_ dir's rename is durable before the tracker names it.
    third = next(i for i in renames if events[i][1].endswith("iter_0000003"))
    tracker = next(i for i in renames if i > third and events[i][1].endswith(TRACKER))
    assert ["fsync_dir", str(root)] in events[third:tracker]
    # keep_last=2: the two newest committed iterations are what is left.
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000002", "iter_0000003"]


def test_only_committed_iterations_count_towards_keep_last(tmp_path):
    """Catches pruning by directory name alone: an `iter_` dir newer than the tracker (a crash
    between its rename and the tracker write) pushed the committed one (the one a resume reads)
    out of the kept set, and the next start found a tracker naming a deleted directory."""
    for iteration in (1, 4, 5, 6):
        iteration_dir(tmp_path, iteration).mkdir()
    (tmp_path / TRACKER).write_text("5\n")  # 6 was renamed into place, never committed
    _prune_old(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000005", "iter_0000006"]
    (tmp_path / TRACKER).write_text("6\n")
    _prune_old(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000005", "iter_0000006"]


def test_keep_last_below_one_is_refused():
    """Catches train.keep_last=0 (or distill.keep_last=0) accepted: each save would delete every
    committed checkpoint, the one a resume needs included."""
    from types import SimpleNamespace

    from minitron_megatron.config.train import TrainConfig
    from minitron_megatron.train.driver import loop_problems

    problems = loop_problems(TrainConfig(keep_last=0), "distill", "runs/x", "runs/x", SimpleNamespace(dp_size=1))
    assert problems == ["distill.keep_last=0 must be >= 1"]


def _parallel_io_worker(rank, world, out):
    import torch

    from minitron_megatron.checkpoint.dist import latest_iteration, load_checkpoint, save_checkpoint
    from minitron_megatron.checkpoint.parallel_io import AsyncSaves
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model, padded_vocab_size
    from minitron_megatron.runtime import init_runtime

    out = Path(out)
    ctx = init_runtime(device="cpu", seed=3)  # world 2, TP=PP=1: DP=2
    cfg = small_model()
    padded = padded_vocab_size(cfg.vocab_size, 64, 1)
    model = build_gpt_model(cfg, ctx, ParallelConfig(), padded)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    save_checkpoint(out / "plain", 1, model, ctx, fully_parallel=False)
    save_checkpoint(out / "spread", 1, model, ctx)  # the default at DP=2

    def loads_equal(root, spread):
        fresh = build_gpt_model(cfg, ctx, ParallelConfig(), padded, init="none")
        for p in fresh.parameters():
            p.data.zero_()
        load_checkpoint(root, fresh, ctx, fully_parallel=spread)
        return all(torch.equal(p, saved[name]) for name, p in fresh.named_parameters())

    results = {f"{root}-{spread}": loads_equal(out / root, spread)
               for root in ("plain", "spread") for spread in (False, True)}

    with AsyncSaves() as saves:
        save_checkpoint(out / "spread", 2, model, ctx, async_saves=saves)
        results["async_pending"] = (latest_iteration(out / "spread") == 1 and saves.pending == 1
                                    and not iteration_dir(out / "spread", 2).exists())
        saves.finish()
        results["async_committed"] = latest_iteration(out / "spread") == 2 and saves.pending == 0
    results["async-load"] = loads_equal(out / "spread", True)
    saves = AsyncSaves()  # a failure path: the write in flight is abandoned, never committed
    save_checkpoint(out / "spread", 3, model, ctx, async_saves=saves)
    saves.abort()
    results["async_abort"] = latest_iteration(out / "spread") == 2 and saves.pending == 0
    (out / f"results{rank}.json").write_text(json.dumps(results))


def _written_by(checkpoint: Path, rank: int) -> int:
    """Bytes of the torch_dist files rank `rank` wrote (`__<rank>_<thread>.distcp`)."""
    return sum(path.stat().st_size for path in checkpoint.glob(f"__{rank}_*.distcp"))


def test_fully_parallel_and_async_saves_round_trip_at_dp2(tmp_path):
    """Catches the fully-parallel wrapper not applied (DP rank 1 writes nothing, as with the plain
    strategy), a checkpoint one strategy writes that the other cannot read (or reads differently),
    an async save committed before its write finished (the tracker naming it while it is
    pending) or never committed by `finish`, and one committed after an abort (the driver's
    exception path)."""
    run_distributed(_parallel_io_worker, 2, str(tmp_path))
    for rank in (0, 1):
        assert all(json.loads((tmp_path / f"results{rank}.json").read_text()).values()), rank
    plain, spread = iteration_dir(tmp_path / "plain", 1), iteration_dir(tmp_path / "spread", 1)
    assert _written_by(plain, 1) < 0.05 * _written_by(plain, 0)  # DP rank 0 wrote the replica alone
    total = _written_by(spread, 0) + _written_by(spread, 1)
    assert min(_written_by(spread, 0), _written_by(spread, 1)) > 0.3 * total  # split over both
