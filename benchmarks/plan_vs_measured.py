"""`plan`'s per-rank bytes against the measured peak of real `distill` steps on CPU.

    python benchmarks/plan_vs_measured.py            # the 3 configurations below (minutes on 2 cores)
    python benchmarks/plan_vs_measured.py --only a

For each configuration: `train` writes a small teacher (1 step: weights do not matter), then
`distill` runs 2 steps with that run dir as teacher AND student (the student is the teacher's
architecture: no scores needed) in a fresh process, and `plan` is asked about the same run
(load=, seq_length, micro batch, one process). What "measured" is, in the distill process:

  peak VmHWM during the 2 training steps (reset to the current RSS, /proc/self/clear_refs, just
  before the first step)  MINUS  RSS just before the first model is built.

So it includes everything the step's tensors take (both models' weights, the DDP grad buffer,
Adam's state, made in step 1, activations, the KD loss's buffers, the batch) and also what
is not a tensor of the step: allocator slack and whatever else the process grew by after the
baseline (the dataset index, the checkpoint loader's leftovers). It does not include the
interpreter, torch and Megatron, which are loaded before the baseline. glibc is told to mmap
every block over 64 KiB (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the RSS at once and
the high-water mark is that of live memory, not of a heap that never shrinks.
"""

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from commands import run  # noqa: E402

CONFIGS = {
    # name: (model overrides, seq_length, micro batch)
    "a": (["model.num_layers=4", "model.hidden_size=512", "model.ffn_hidden_size=1536", "model.num_attention_heads=8",
           "model.num_query_groups=4", "model.kv_channels=64"], 256, 8),
    "b": (["model.num_layers=6", "model.hidden_size=384", "model.ffn_hidden_size=1024", "model.num_attention_heads=6",
           "model.num_query_groups=2", "model.kv_channels=64", "model.max_position_embeddings=512"], 512, 4),
    "c": (["model.num_layers=4", "model.hidden_size=512", "model.ffn_hidden_size=1536", "model.num_attention_heads=8",
           "model.num_query_groups=4", "model.kv_channels=64", "model.params_dtype=bfloat16"], 256, 8),
}

GIB = 1 << 30


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def child() -> None:
    """Inside the distill process: wrap the model build and the train step to measure them."""
    import minitron_megatron.runtime as runtime

    init_runtime, out = runtime.init_runtime, os.environ["PLAN_BENCH_OUT"]
    state = {"peak_kib": 0, "steps": 0}

    def init_then_patch(*args, **kwargs):
        ctx = init_runtime(*args, **kwargs)
        from minitron_megatron.distill import loop  # after the runtime: Megatron imported its CPU way

        build, step = loop.build_distillation_model, loop.distill_train_step

        def measured_build(*a, **k):
            state["baseline_kib"] = _status_kib("VmRSS")
            return build(*a, **k)

        def measured_step(*a, **k):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            result = step(*a, **k)
            state["peak_kib"] = max(state["peak_kib"], _status_kib("VmHWM"))
            state["steps"] += 1
            if state["steps"] == 2:
                Path(out).write_text(json.dumps(state))
                os._exit(0)  # the steps are measured: no final evaluation or save
            return result

        loop.build_distillation_model, loop.distill_train_step = measured_build, measured_step
        return ctx

    runtime.init_runtime = init_then_patch
    from minitron_megatron.cli import main

    main("distill")


def measure(name: str, workdir: Path) -> dict:
    overrides, seq, mbs = CONFIGS[name]
    teacher = workdir / f"{name}-teacher"
    common = ["device=cpu", "data=stdlib", f"seq_length={seq}"]
    if not (teacher / "summary.json").is_file():
        run("train", *common, *overrides, f"save={teacher}", "train.steps=1", "train.micro_batch_size=1",
            "train.global_batch_size=1", "evaluate.samples=1", "evaluate.micro_batch_size=1", "train.tensorboard=false")
    out = workdir / f"{name}-measured.json"
    out.unlink(missing_ok=True)
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINITRON_NO_PROGRESS": "1", "PLAN_BENCH_OUT": str(out),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    distill = [f"teacher.load={teacher}", f"student.load={teacher}", f"save={workdir / (name + '-student')}",
               "distill.steps=2", f"distill.micro_batch_size={mbs}", f"distill.global_batch_size={mbs}",
               "distill.eval_interval=1000", "distill.save_interval=1000", "distill.tensorboard=false"]
    cmd = [sys.executable, __file__, "--child", *common, *distill]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if not out.is_file():
        raise SystemExit(f"distill {name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    measured = json.loads(out.read_text())
    planned = run("plan", f"load={teacher}", f"seq_length={seq}", f"distill.micro_batch_size={mbs}",
                  f"distill.global_batch_size={mbs}", "plan.attention=local")
    return {"name": name, "measured_bytes": (measured["peak_kib"] - measured["baseline_kib"]) * 1024,
            "planned": planned}


def report(rows) -> None:
    print(f"{'config':6} {'planned GiB':>11} {'measured GiB':>12} {'planned/measured':>16}   planned by kind (MiB)")
    for row in rows:
        planned, measured = row["planned"]["total_bytes"], row["measured_bytes"]
        kinds = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in row["planned"]["per_rank_bytes"].items())
        print(f"{row['name']:6} {planned / GIB:11.3f} {measured / GIB:12.3f} {planned / measured:16.3f}   {kinds}")
    print(json.dumps({row["name"]: {"planned_bytes": row["planned"]["total_bytes"],
                                    "measured_bytes": row["measured_bytes"],
                                    "ratio": round(row["planned"]["total_bytes"] / row["measured_bytes"], 4)}
                      for row in rows}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.argv = [sys.argv[0], *sys.argv[2:]]
        return child()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(CONFIGS), action="append")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "minitron_plan_bench"))
    a = p.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report([measure(name, workdir) for name in (a.only or sorted(CONFIGS))])


if __name__ == "__main__":
    main()
