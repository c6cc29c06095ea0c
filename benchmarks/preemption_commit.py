"""Seconds from SIGTERM to a committed checkpoint, plain vs fully-parallel vs async save, in one run.

Each variant trains the same model under `torchrun --nproc-per-node 2` (DP=2, CPU, gloo) with a
periodic save every `--save-interval` steps, and gets SIGTERM (to torchrun's process group, as
a scheduler signals a job) once step `--signal-at` is logged. The time of each train_log.jsonl
line and of each tracker change is recorded by polling every 10 ms. Printed per variant:

- `sigterm_to_commit_s`: SIGTERM -> the tracker naming the preemption checkpoint (the step in
  flight finishes first, then the ranks agree to stop and save; with async, a periodic save
  still in flight is committed before the preemption save starts);
- `sigterm_to_exit_s`: SIGTERM -> torchrun's exit;
- `step_s`: median seconds between log lines of steps without a save, and `save_stall_s`: the
  median extra seconds of a step that saved (what a periodic save costs the training loop);
- `checkpoint_mb`: the committed iteration's size.

    python benchmarks/preemption_commit.py                     # ~11M params, ~130 MB per checkpoint
    python benchmarks/preemption_commit.py --hidden-size 512 --num-layers 6 --repeats 3

On one machine both ranks write to the same disk: fully-parallel save halves the bytes each rank
writes and lets both write at once; across nodes (each with its own link to the file system)
that is where its gain comes from, so numbers here bound it from below.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minitron_megatron.runtime.distributed import free_port  # noqa: E402

VARIANTS = {
    "plain": ["train.fully_parallel_save=false", "train.fully_parallel_load=false"],
    "fully_parallel": ["train.fully_parallel_save=true", "train.fully_parallel_load=true"],
    "fully_parallel+async": ["train.fully_parallel_save=true", "train.fully_parallel_load=true",
                             "train.async_save=true"],
}


def _model(args) -> list:
    return ["model=tiny", f"model.num_layers={args.num_layers}", f"model.hidden_size={args.hidden_size}",
            f"model.ffn_hidden_size={3 * args.hidden_size}", "model.num_attention_heads=8",
            f"model.kv_channels={args.hidden_size // 8}", "seq_length=64", "device=cpu",
            "train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=100000",
            "train.eval_interval=100000", "train.eval_samples=16", "train.log_interval=1",
            f"train.save_interval={args.save_interval}", "train.tensorboard=false"]


def _tracker(root: Path):
    try:
        return int((root / "latest_checkpointed_iteration.txt").read_text())
    except (OSError, ValueError):
        return None


def _step_lines(log: Path) -> int:
    try:
        return sum(1 for line in log.read_text().splitlines() if line.endswith("}") and '"kind": "step"' in line)
    except OSError:
        return 0


def measure(name: str, overrides: list, args, workdir: Path) -> dict:
    save = workdir / name
    env = {**os.environ, "MINITRON_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "minitron_megatron.train", *_model(args), *overrides, f"save={save}"]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log, root = save / "train_log.jsonl", save / "checkpoint"
    step_times, tracker_changes, sigterm = {}, [], None
    deadline = time.time() + args.timeout
    while proc.poll() is None and time.time() < deadline:
        now, steps, committed = time.time(), _step_lines(log), _tracker(root)
        for step in range(len(step_times) + 1, steps + 1):
            step_times[step] = now
        if not tracker_changes or tracker_changes[-1][1] != committed:
            tracker_changes.append((now, committed))
        if sigterm is None and steps >= args.signal_at:
            sigterm = time.time()
            os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(f"{name}: no exit within {args.timeout} s")
    exited = time.time()
    _, err = proc.communicate()
    final = _tracker(root)
    if sigterm is None or final is None or final < args.signal_at:
        raise SystemExit(f"{name}: no preemption checkpoint (tracker {final}):\n{err[-4000:]}")
    committed_at = next((t for t, value in tracker_changes if value == final), exited)
    gaps = {step: step_times[step] - step_times[step - 1] for step in step_times if step - 1 in step_times}
    saved = [gap for step, gap in gaps.items() if (step - 1) % args.save_interval == 0 and step > 2]
    plain = [gap for step, gap in gaps.items() if (step - 1) % args.save_interval and step > 2]
    size = sum(p.stat().st_size for p in (root / f"iter_{final:07d}").iterdir())
    return {"variant": name, "sigterm_to_commit_s": round(committed_at - sigterm, 2),
            "sigterm_to_exit_s": round(exited - sigterm, 2), "preempted_at_step": final,
            "step_s": round(statistics.median(plain), 2) if plain else None,
            "save_stall_s": round(statistics.median(saved) - statistics.median(plain), 2) if saved and plain else None,
            "checkpoint_mb": round(size / 2**20, 1)}


def _median(rounds: list) -> dict:
    """Per-field medians of one variant's rounds (the variant's name and round count kept)."""
    merged = {"variant": rounds[0]["variant"], "rounds": len(rounds)}
    for key, value in rounds[0].items():
        if key != "variant":
            values = [r[key] for r in rounds if r[key] is not None]
            merged[key] = round(statistics.median(values), 2) if values else None
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--save-interval", type=int, default=3)
    parser.add_argument("--signal-at", type=int, default=11, help="SIGTERM once this many steps are logged")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all variants, interleaved; medians")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    runs = {name: [] for name in args.variants.split(",")}
    with tempfile.TemporaryDirectory(prefix="preemption_commit.") as tmp:
        for round_ in range(args.repeats):
            for name in runs:
                runs[name].append(measure(name, VARIANTS[name], args, Path(tmp) / str(round_)))
                print(json.dumps(runs[name][-1]), flush=True)
    results = [_median(rounds) for rounds in runs.values()]
    print(f"\n{'variant':22} {'SIGTERM->commit s':>18} {'SIGTERM->exit s':>16} {'step s':>7} "
          f"{'save stall s':>13} {'ckpt MB':>8}")
    for r in results:
        print(f"{r['variant']:22} {r['sigterm_to_commit_s']:>18} {r['sigterm_to_exit_s']:>16} {r['step_s']!s:>7} "
              f"{r['save_stall_s']!s:>13} {r['checkpoint_mb']:>8}")
    print(json.dumps({"machine": f"{os.cpu_count()} CPUs, {os.uname().machine}", "results": results}))


if __name__ == "__main__":
    main()
