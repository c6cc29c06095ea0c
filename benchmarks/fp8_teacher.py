"""Benchmark: an FP8 teacher (`teacher.precision=fp8`) against BF16 and FP32, on CPU, in one run.

    python benchmarks/fp8_teacher.py --teacher runs/teacher --steps 50 --work /tmp/fp8-teacher

Reports
(a) the teacher's validation loss at teacher.precision fp32, bf16 and fp8, on the same
    `evaluate.samples` validation samples that `evaluate` scores;
(b) KD of one pruned student (pruned once from the teacher with `prune`, reused) for
    --steps steps with an FP8 and with a BF16 teacher: both final validation losses and KD
    losses, from the `distill` command's JSON summaries (everything else identical);
(c) the teacher's linear-weight memory: bytes of the tensors its transformer linears
    (QKV, proj, fc1, fc2) hold, measured from the modules: BF16 weights vs FP8 weights +
    float32 per-row scales; and the whole model's parameter + buffer bytes.
(a) and (c) run in this process (the modules `distill` builds: build, load, then
`apply_teacher_precision`) while (b)'s two KD runs, real `distill` commands, run side by side
as subprocesses (so their `seconds` are not speeds). The human table
comes first; the last stdout line is a one-line JSON summary.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from commands import start, summary  # noqa: E402  benchmarks/commands.py

PRECISIONS = ("fp32", "bf16", "fp8")
LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _linear_bytes(model) -> int:
    """Bytes held by the transformer linears' tensors (weights, FP8 data, scales)."""
    total = 0
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in LINEARS:
            tensors = list(module.parameters()) + list(module.buffers())
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def teacher_precisions(teacher: str, samples: int, micro_batch_size: int) -> dict:
    """{precision: {val_loss, linear_bytes, model_bytes, seconds}} on one process (TP=1)."""
    from minitron_megatron.checkpoint import dist as ckpt
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.config.commands import EvaluateCommand, EvaluateConfig
    from minitron_megatron.distill.teacher import apply_teacher_precision
    from minitron_megatron.runtime import destroy_runtime, init_runtime
    from minitron_megatron.train import setup
    from minitron_megatron.train.step import evaluate_loss

    cfg = EvaluateCommand(load=teacher, device="cpu", evaluate=EvaluateConfig(samples=samples,
                                                                              micro_batch_size=micro_batch_size))
    ctx = init_runtime(device="cpu")
    try:
        run = setup.prepare_run(cfg, ctx, num_train_samples=1, num_valid_samples=samples)
        batches = run.valid_batches(micro_batch_size, ctx)
        results = {}
        for precision in PRECISIONS:
            model = setup.build_model(run, cfg, ctx, init="none")
            ckpt.load_checkpoint(rd.checkpoint_root(teacher), model, ctx)
            model = apply_teacher_precision(model.eval(), precision)
            start = time.perf_counter()
            loss = evaluate_loss([model], batches, ctx, len(batches), micro_batch_size, run.seq_length)
            results[precision] = {"val_loss": loss["val_loss"], "tokens": loss["tokens"],
                                  "linear_bytes": _linear_bytes(model), "model_bytes": _model_bytes(model),
                                  "eval_seconds": round(time.perf_counter() - start, 1)}
        return results
    finally:
        destroy_runtime()


def pruned_student(teacher: str, work: Path, target: list, samples: int) -> str:
    """The pruned student (made once; a finished run dir in `work` is reused)."""
    pruned = work / "pruned"
    if not (pruned / "summary.json").is_file():
        summary(start("prune", f"load={teacher}", "data=stdlib", "device=cpu", *target, f"save={pruned}",
                        f"evaluate.samples={samples}"), "prune")
    return str(pruned)


def start_distills(precisions, teacher: str, student: str, work: Path, steps: int, samples: int) -> dict:
    """{precision: finished summary or running process}: one KD run per teacher precision,
    side by side (independent processes; a finished run dir in `work` is reused)."""
    runs = {}
    for precision in precisions:
        save = work / f"kd-{precision}-{steps}steps"
        if (save / "summary.json").is_file():
            runs[precision] = json.loads((save / "summary.json").read_text())
            continue
        runs[precision] = start(
            "distill", f"teacher.load={teacher}", f"student.load={student}", "data=stdlib", "device=cpu",
            f"teacher.precision={precision}", f"distill.steps={steps}", f"distill.eval_interval={steps}",
            f"distill.save_interval={steps}", "distill.tensorboard=false", f"evaluate.samples={samples}",
            f"save={save}")
    return runs


def wait_distills(runs: dict) -> dict:
    return {p: r if isinstance(r, dict) else summary(r, f"distill teacher.precision={p}") for p, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a trained run dir (e.g. from `train model=tiny`)")
    parser.add_argument("--work", default="/tmp/fp8-teacher", help="pruned student and KD run dirs")
    parser.add_argument("--steps", type=int, default=50, help="KD steps per teacher precision")
    parser.add_argument("--samples", type=int, default=256, help="evaluate.samples for every val loss")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--target", nargs="*", default=["prune.target.hidden_size=96",
                                                         "prune.target.ffn_hidden_size=256"],
                        help="prune overrides that make the student")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    student = pruned_student(args.teacher, work, args.target, args.samples)
    running = start_distills(("fp8", "bf16"), args.teacher, student, work, args.steps, args.samples)
    teacher = teacher_precisions(args.teacher, args.samples, args.micro_batch_size)  # while KD runs
    kd = wait_distills(running)

    print(f"\n(a) teacher {args.teacher}: val loss on {args.samples} samples "
          f"({teacher['fp32']['tokens']} tokens)")
    for p in PRECISIONS:
        t = teacher[p]
        print(f"  {p:5s} val_loss {t['val_loss']:.4f}  (vs bf16 {t['val_loss'] - teacher['bf16']['val_loss']:+.4f})"
              f"  eval {t['eval_seconds']} s")
    print(f"(b) KD of {student} for {args.steps} steps")
    for p, s in kd.items():
        print(f"  {p:5s} teacher: student val_loss {s['val_loss']:.4f}, kd_loss {s['kd_loss']:.4f}, "
              f"{s['seconds']} s")
    lin = {p: teacher[p]["linear_bytes"] for p in PRECISIONS}
    print(f"(c) transformer-linear bytes: fp32 {lin['fp32']}, bf16 {lin['bf16']}, fp8 {lin['fp8']} "
          f"(fp8/bf16 {lin['fp8'] / lin['bf16']:.3f}); whole model: "
          + ", ".join(f"{p} {teacher[p]['model_bytes']}" for p in PRECISIONS))
    print(json.dumps({
        "teacher": args.teacher, "samples": args.samples, "steps": args.steps,
        "teacher_val_loss": {p: teacher[p]["val_loss"] for p in PRECISIONS},
        "fp8_minus_bf16_val_loss": teacher["fp8"]["val_loss"] - teacher["bf16"]["val_loss"],
        "student_val_loss": {p: kd[p]["val_loss"] for p in kd},
        "student_kd_loss": {p: kd[p]["kd_loss"] for p in kd},
        "linear_bytes": lin, "model_bytes": {p: teacher[p]["model_bytes"] for p in PRECISIONS},
        "fp8_over_bf16_linear_bytes": lin["fp8"] / lin["bf16"],
    }))


if __name__ == "__main__":
    main()
