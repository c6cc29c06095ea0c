"""Peak RSS and teacher reads of a 4-candidate search: this tree against an earlier revision.

    python benchmarks/search_memory.py                   # against --base (default: cf457f4)
    python benchmarks/search_memory.py --base HEAD~3 --steps 4

One launch trains a small teacher (a 4-layer, hidden-512 `tiny`, ~21M parameters, 1 step:
its quality does not matter) into --workdir, then runs the same search (four candidates
within the budget, `search.steps` KD steps each) twice in fresh processes: with the code of
`--base` (`git archive` into the workdir) and with this tree. Each search runs under
tests/search/spy_search.py, which records every checkpoint read and, after each candidate,
the process RSS; the peak RSS is the search process's `ru_maxrss`. The two runs' candidates.json
must agree (same losses): keeping the teacher resident and freeing each candidate's DDP,
grad buffer and optimizer must not change any number.

The last stdout line is a JSON summary: per tree, peak RSS (MiB), RSS after each candidate,
teacher reads and seconds.

Last run (2-core shared CPU, load ~20; seconds are noise there), cf457f4 -> this change:
peak RSS 1364 -> 969 MiB, RSS after each candidate [895, 1129, 1342, 1299] -> [811, 889, 815,
819] MiB, DDP + grad buffers of earlier candidates alive [2, 4, 2, 4] -> [0, 0, 0, 0], teacher
reads 9 -> 1, the same losses.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ["model=tiny", "model.num_layers=4", "model.hidden_size=512", "model.ffn_hidden_size=2048",
           "model.num_attention_heads=8", "model.num_query_groups=4", "model.kv_channels=64", "seq_length=128",
           "device=cpu", "train.steps=1", "train.micro_batch_size=4", "train.global_batch_size=8",
           "train.eval_samples=8", "train.optim.warmup_steps=0", "evaluate.samples=8", "evaluate.micro_batch_size=4"]
# Four architectures within 0.4 +- 15% of the teacher: 4 or 3 layers, 8 or 4 heads, hidden 384, ffn x0.5.
SEARCH = ["device=cpu", "evaluate.samples=8", "evaluate.micro_batch_size=4",
          "prune.importance.calibration_samples=8", "prune.importance.micro_batch_size=4",
          "prune.importance.depth_samples=8", "distill.micro_batch_size=4", "distill.global_batch_size=8",
          "distill.eval_samples=8", "distill.optim.warmup_steps=1",
          "search.space.num_layers=[1.0,0.75]", "search.space.num_attention_heads=[1.0,0.5]",
          "search.space.num_query_groups=[1.0]", "search.space.ffn_ratio=[0.5]", "search.space.hidden_size=[0.75]",
          "search.param_budget=0.4", "search.tolerance=0.15"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="cf457f4", help="the revision to compare with (before the change)")
    p.add_argument("--steps", type=int, default=2, help="search.steps: KD steps per candidate")
    p.add_argument("--workdir", default="/tmp/minitron_search_bench")
    return p.parse_args(argv)


def _env(tree: Path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MINITRON_NO_PROGRESS": "1"}


def _teacher(workdir: Path) -> Path:
    save = workdir / "teacher"
    if not (save / "summary.json").is_file():
        shutil.rmtree(save, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "minitron_megatron.train", *TEACHER, f"save={save}"], cwd=ROOT,
                       env=_env(ROOT), check=True, capture_output=True, text=True)
    return save


def _base_tree(workdir: Path, rev: str) -> Path:
    """The revision's files (spy included: it came with this change)."""
    tree = workdir / f"tree-{rev.replace('/', '_')}"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    shutil.copy(ROOT / "tests/search/spy_search.py", tree / "tests/search/spy_search.py")
    return tree


def _search(tree: Path, teacher: Path, save: Path, steps: int) -> dict:
    """One search in a fresh process of `tree`'s code: peak RSS, RSS per candidate, reads, seconds."""
    shutil.rmtree(save, ignore_errors=True)
    spy = save.parent / f"{save.name}.spy.json"
    measure = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    cmd = [sys.executable, "-c", measure, sys.executable, "-m", "tests.search.spy_search", str(spy), "-1", "--",
           f"load={teacher}", *SEARCH, f"search.steps={steps}", f"save={save}"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"search in {tree} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    seconds = time.time() - start
    peak_kib = int(proc.stdout.strip().splitlines()[-1])
    recorded = json.loads(spy.read_text())
    teacher_root = str((teacher / "checkpoint").resolve())
    return {"peak_rss_mib": round(peak_kib / 1024), "rss_after_candidate_mib": recorded.get("rss", []),
            "teacher_reads": recorded["loads"].count(teacher_root), "ddp_alive_after_candidate": recorded["left"],
            "seconds": round(seconds, 1),
            "candidates": json.loads((save / "candidates.json").read_text())}


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = _teacher(workdir)
    runs = {"before": _search(_base_tree(workdir, args.base), teacher, workdir / "before", args.steps),
            "after": _search(ROOT, teacher, workdir / "after", args.steps)}
    losses = {k: [(c["zero_shot_loss"], c["val_loss"]) for c in r.pop("candidates")] for k, r in runs.items()}
    print(f"{'':8} {'peak RSS MiB':>12} {'teacher reads':>14} {'seconds':>8}  RSS after each candidate (MiB); "
          "DDP + grad buffers alive then")
    for name, r in runs.items():
        print(f"{name:8} {r['peak_rss_mib']:>12} {r['teacher_reads']:>14} {r['seconds']:>8}  "
              f"{r['rss_after_candidate_mib']}; {r['ddp_alive_after_candidate']}")
    print(f"{len(losses['after'])} candidates; same losses before and after: {losses['before'] == losses['after']}")
    print(json.dumps({"base": args.base, "candidates": len(losses["after"]),
                      "same_losses": losses["before"] == losses["after"], **runs}))


if __name__ == "__main__":
    main()
