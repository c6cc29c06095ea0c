"""Megatron's distributed optimizer and DDP overlap (train.optim.use_distributed_optimizer,
overlap_grad_reduce, overlap_param_gather) under real gloo processes, against the plain optimizer.

Few processes, combined checks: one plain reference at DP=1, one distributed run at TP=2 x DP=2
(overlap on) that stops after 2 steps, its resume at TP=2 x DP=1, and one distill at DP=2 (the
same wrap_ddp / build_optimizer, without TP) against DP=1. DP=1 is an exact reference for DP=2: the global batch is
the same samples, only split differently, so the curves agree to float32 rounding.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from tests.commands import SMALL, run_command, step_losses, summary

pytestmark = pytest.mark.slow
# The compatibility tier runs the tests marked compat: train's distributed optimizer and its resume
# (distill builds the same optimizer through the same code).

STEPS = ["train.steps=4", "train.eval_interval=4", "train.save_interval=4"]
OVERLAP = ["train.optim.overlap_grad_reduce=true", "train.optim.overlap_param_gather=true"]


def _same_curve(run_a, run_b, rel=1e-5):
    a, b = step_losses(run_a), step_losses(run_b)
    assert sorted(a) == sorted(b) == list(range(1, len(a) + 1)), (a, b)
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=rel), (step, a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """plain: DP=1, plain optimizer (auto at DP=1). tp2dp2: TP=2 x DP=2, distributed optimizer
    (auto at DP=2) with both overlaps, stopped and saved after step 2 (no evaluation first);
    then resumed to step 4 at TP=2 x DP=1 (auto follows the checkpoint: distributed). Same TP:
    a training resume restores the RNG state saved per (PP, TP) rank, so it keeps TP and PP."""
    root = tmp_path_factory.mktemp("dopt")
    plain = summary(run_command("train", *SMALL, *STEPS, f"save={root / 'plain'}"))
    run_command("train", *SMALL, *STEPS, *OVERLAP, "parallel.tp=2", "train.exit_after_steps=2",
                f"save={root / 'resumed'}", nproc=4)
    step2 = _checkpoint_tensors(root / "resumed" / "checkpoint" / "iter_0000002")
    resumed = summary(run_command("train", *SMALL, *STEPS, *OVERLAP, "parallel.tp=2", f"save={root / 'resumed'}",
                                  nproc=2))
    return SimpleNamespace(root=root, plain=plain, resumed=resumed, step2=step2)


def _checkpoint_tensors(path) -> dict:
    """Every tensor of a torch_dist checkpoint, whole (read with torch DCP, no Megatron)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    state = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in meta.items()
             if isinstance(m, TensorStorageMetadata)}
    load(state, storage_reader=reader, no_dist=True)
    return state


@pytest.mark.compat
def test_distributed_optimizer_at_tp2_dp2_resumes_at_dp1_on_the_plain_curve(runs):
    """Catches a distributed optimizer that trains differently from the plain one (a wrong
    reduce-scatter/all-gather, grad clipping over a shard, overlap hooks out of order) at
    TP=2 x DP=2; a checkpoint that does not reshard over DP (Megatron's bucket layout, padded
    per DP size, instead of model space); and a resume that restores the optimizer wrongly (torch Adam's
    step shared by every parameter after Megatron's load, which changes the update from the
    first resumed step on): the resumed run must follow the uninterrupted plain curve."""
    _same_curve(runs.root / "plain", runs.root / "resumed")
    assert math.isclose(runs.resumed["val_loss"], runs.plain["val_loss"], rel_tol=1e-5)


@pytest.mark.compat
def test_save_under_overlapped_param_gather_holds_the_stepped_weights(runs):
    """Catches a checkpoint saved between the optimizer step and the next forward with
    overlap_param_gather on: each rank holds only its own shard of the new weights until the
    forward pre-hooks gather the rest, so the model's weights in the checkpoint (written by DP
    rank 0) would be half stale. They must equal the optimizer's float32 main weights."""
    main = {k[len("optimizer.state.param."):]: v for k, v in runs.step2.items()
            if k.startswith("optimizer.state.param.")}
    assert main, sorted(runs.step2)[:20]
    for key, value in main.items():
        assert torch.equal(runs.step2[key], value), key


def test_distill_with_distributed_optimizer_at_dp2_follows_dp1(small_teacher, tmp_path):
    """Catches distill's student DDP/optimizer not getting the distributed optimizer right (the
    KD model wraps student and frozen teacher: only the student's parameters may be sharded)."""
    args = [f"teacher.load={small_teacher}", f"student.load={small_teacher}", "distill.steps=3",
            "distill.micro_batch_size=4", "distill.global_batch_size=8", "distill.eval_samples=16",
            "distill.eval_interval=3", "distill.log_interval=1", "distill.optim.warmup_steps=1",
            "device=cpu", "evaluate.samples=16", "evaluate.micro_batch_size=4"]
    dp1 = summary(run_command("distill", *args, f"save={tmp_path / 'dp1'}"))
    dp2 = summary(run_command("distill", *args, "distill.optim.overlap_grad_reduce=true",
                              f"save={tmp_path / 'dp2'}", nproc=2))
    _same_curve(tmp_path / "dp1", tmp_path / "dp2")
    assert math.isclose(dp2["val_loss"], dp1["val_loss"], rel_tol=1e-5)


@pytest.mark.compat
def test_bad_optimizer_settings_are_refused(runs, tmp_path):
    """Catches a setting that Megatron would reject late or silently ignore: an unknown choice,
    overlap_param_gather without the distributed optimizer, and a resume with the other
    optimizer than the checkpoint's (whose state it cannot read). One message each, naming the
    setting, among the loop's first checks. Also that `auto` chose the
    distributed optimizer at DP=2 and the plain one at DP=1 (what each checkpoint holds)."""
    from minitron_megatron.checkpoint import dist as ckpt
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.config.train import OptimConfig, TrainConfig
    from minitron_megatron.train.driver import loop_problems
    from minitron_megatron.train.optimizer import optimizer_problems

    def problems(dp_size=1, save=None, **settings):
        return optimizer_problems(OptimConfig(**settings), "train", dp_size, save)

    assert "must be one of auto, true, false" in problems(use_distributed_optimizer="maybe")[0]
    assert "needs the distributed optimizer" in problems(overlap_param_gather=True)[0]
    assert problems(dp_size=2, overlap_param_gather=True) == []
    plain, distributed = str(runs.root / "plain"), str(runs.root / "resumed")
    assert ckpt.optimizer_format(rd.checkpoint_root(distributed)) is True  # auto at DP=2 chose it
    assert ckpt.optimizer_format(rd.checkpoint_root(plain)) is False
    # `resumed` is complete (its resume finished) but its checkpoint is what a resume reads
    assert "written by the plain" in problems(save=plain, use_distributed_optimizer="true")[0]
    assert "written by the distributed" in problems(dp_size=2, save=distributed, use_distributed_optimizer="False")[0]
    assert problems(save=distributed, overlap_param_gather=True) == []  # auto follows it at DP=1

    # what `train`/`distill` check first (loop_problems), before any model or file exists; the CLI
    # turns a ConfigError into one "error:" line and exit 2 (tests/test_cli_errors.py)
    loop = TrainConfig(optim=OptimConfig(overlap_param_gather=True))
    assert loop_problems(loop, "distill", str(tmp_path / "run"), "", SimpleNamespace(dp_size=1)) == [
        "distill.optim.overlap_param_gather=true needs the distributed optimizer (it overlaps the all-gather of "
        "its updated weights): set distill.optim.use_distributed_optimizer=true"]
