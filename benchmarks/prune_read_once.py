"""Wall time and peak RSS of `prune` (stage=all) in two checkouts, side by side on one teacher.

    git worktree add /tmp/before 8bf2330        # prune before it read the checkpoint once
    python benchmarks/prune_read_once.py --before /tmp/before --after .

`create` writes a random-weight teacher run dir (default ~0.3B params, float32, the
stdlib corpus' tokenizer, so `data=stdlib` calibrates it) into --workdir, once. Then
`prune` runs in fresh processes under `/usr/bin/time -v`, alternating between the two
checkouts (`--repeats` rounds: the machine's noise hits both alike), each with the
same settings: a width target, one calibration microbatch, block importance only (no
loss-based depth passes), a one-microbatch zero-shot evaluation, so that building the
model and reading the checkpoint are a visible share of the run; `--cold` drops the
page cache before each run, so the checkpoint is read from disk. Prints one row per run,
the medians, and the after/before ratios; the last stdout line is a JSON summary.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="checkout of the baseline")
    p.add_argument("--after", default=str(ROOT), help="checkout to compare (default: this one)")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before each run (root only): reads come from disk, as from a "
                        "cluster file system, instead of from memory")
    p.add_argument("--workdir", default="/tmp/minitron_prune_bench")
    p.add_argument("--phase", choices=["create"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def create(a) -> None:
    """The teacher run dir: model.yaml + tokenizer + a dist checkpoint of random weights."""
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.checkpoint.dist import save_checkpoint
    from minitron_megatron.config.data import DataConfig
    from minitron_megatron.config.model import ModelConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.data import load_tokenizer, prepare_data
    from minitron_megatron.model import build_gpt_model, parameter_count, padded_vocab_size
    from minitron_megatron.runtime import destroy_runtime, init_runtime

    ctx = init_runtime(device="cpu")
    sources = prepare_data(DataConfig())
    cfg = ModelConfig(name="bench", num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=a.ffn,
                      num_attention_heads=16, num_query_groups=8, kv_channels=a.hidden // 16,
                      max_position_embeddings=256,
                      vocab_size=load_tokenizer(sources.tokenizer_model).vocab_size)
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    model = build_gpt_model(cfg, ctx, ParallelConfig(), padded)
    run_dir = Path(a.workdir) / "teacher"
    rd.write_model_yaml(run_dir, cfg, padded, sources.tokenizer_model)
    save_checkpoint(rd.checkpoint_root(run_dir), 1, model, ctx)
    rd.write_summary(run_dir, {"params": parameter_count(cfg, padded)})
    destroy_runtime()


def prune_once(tree: str, teacher: Path, save: Path, hidden: int) -> dict:
    overrides = [f"load={teacher}", "data=stdlib", "device=cpu", f"save={save}",
                 f"prune.target.hidden_size={hidden * 3 // 4}", "prune.importance.calibration_samples=4",
                 "prune.importance.micro_batch_size=4", "prune.importance.depth_metrics=[block_importance]",
                 "evaluate.samples=4", "evaluate.micro_batch_size=4"]
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "MINITRON_NO_PROGRESS": "1"}
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "minitron_megatron.prune", *overrides],
                          cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"prune in {tree} failed:\n{proc.stderr[-4000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(hours * 3600 + minutes * 60 + seconds, 1), "peak_rss_gib": round(rss_kib / 2 ** 20, 3),
            "val_loss": summary["val_loss"]}


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.phase == "create":
        return create(a)
    teacher = Path(a.workdir) / "teacher"
    if not (teacher / "summary.json").is_file():
        subprocess.run([sys.executable, __file__, "--phase", "create", "--before", a.before,
                        "--layers", str(a.layers), "--hidden", str(a.hidden), "--ffn", str(a.ffn),
                        "--workdir", a.workdir], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    params = json.loads((teacher / "summary.json").read_text())["params"]
    ckpt_gib = sum(f.stat().st_size for f in (teacher / "checkpoint").rglob("*") if f.is_file()) / 2 ** 30
    print(f"teacher: {params:,} params, checkpoint {ckpt_gib:.2f} GiB")
    runs = {"before": [], "after": []}
    for round_ in range(a.repeats):
        for side in ("before", "after"):
            if a.cold:
                subprocess.run(["sync"], check=True)
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
                result = prune_once(getattr(a, side), teacher, Path(tmp) / "pruned", a.hidden)
            runs[side].append(result)
            print(f"round {round_ + 1} {side:6s}: {result}", flush=True)
    medians = {side: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "peak_rss_gib")}
               for side, rs in runs.items()}
    ratios = {k: round(medians["after"][k] / medians["before"][k], 3) for k in ("wall_s", "peak_rss_gib")}
    same_loss = len({r["val_loss"] for rs in runs.values() for r in rs}) == 1
    print(f"median before {medians['before']}, after {medians['after']}, after/before {ratios}, "
          f"identical zero-shot val_loss: {same_loss}")
    print(json.dumps({"params": params, "checkpoint_gib": round(ckpt_gib, 3), "median": medians,
                      "after_over_before": ratios, "same_val_loss": same_loss}))


if __name__ == "__main__":
    main()
