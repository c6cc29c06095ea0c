"""KD retraining vs plain CE retraining of a pruned student, same steps, same schedule.

    python benchmarks/distill_vs_ce.py --teacher runs/teacher --steps 100 --out /tmp/distill_vs_ce
    python benchmarks/distill_vs_ce.py --teacher runs/teacher --student runs/pruned ...

Without --student, the teacher is pruned to about half its parameters first
(`python -m minitron_megatron.prune ... prune.target.param_budget=0.5`). Then,
from the same pruned weights and with the same optimizer settings and data order:
  zero-shot  `evaluate load=STUDENT`
  KD         `distill teacher.load=TEACHER student.load=STUDENT distill.steps=N`
  CE         `train load=STUDENT train.steps=N`
and a table of validation LM losses (every eval interval) plus a JSON line.
"""

import argparse
import json
import time
from pathlib import Path

from commands import run  # benchmarks/commands.py


def eval_curve(run_dir: Path) -> dict:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["val_loss"] for r in map(json.loads, lines) if r["kind"] == "eval"}


def schedule(prefix: str, args) -> list:
    """The same optimizer, batch and eval settings for both retraining runs."""
    keys = {"steps": args.steps, "eval_interval": args.eval_interval, "save_interval": args.steps,
            "eval_samples": args.eval_samples, "optim.lr": args.lr, "optim.min_lr": args.lr / 10,
            "optim.warmup_steps": args.warmup}
    return [f"{prefix}.{k}={v}" for k, v in keys.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="runs/teacher")
    parser.add_argument("--student", default=None, help="a pruned run dir (default: prune the teacher)")
    parser.add_argument("--out", default="/tmp/distill_vs_ce")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    out = Path(args.out)
    common = ["data=stdlib", f"device={args.device}"]
    student = args.student
    if student is None:
        student = str(out / "pruned")
        if not (Path(student) / "summary.json").is_file():
            run("prune", f"load={args.teacher}", *common, "prune.target.param_budget=0.5", f"save={student}")
    evaluate = [f"evaluate.samples={args.eval_samples}"]
    teacher_eval = run("evaluate", f"load={args.teacher}", *common, *evaluate)
    zero_shot = run("evaluate", f"load={student}", *common, *evaluate)
    start = time.time()
    kd = run("distill", f"teacher.load={args.teacher}", f"student.load={student}", *common,
             *schedule("distill", args), f"save={out / f'kd_{args.steps}'}")
    kd_seconds, start = time.time() - start, time.time()
    ce = run("train", f"load={student}", *common, *schedule("train", args), f"save={out / f'ce_{args.steps}'}")
    ce_seconds = time.time() - start
    kd_curve, ce_curve = eval_curve(out / f"kd_{args.steps}"), eval_curve(out / f"ce_{args.steps}")
    print(f"\nteacher val_loss {teacher_eval['val_loss']:.4f} ({teacher_eval['params']} params); "
          f"pruned student {zero_shot['params']} params, zero-shot val_loss {zero_shot['val_loss']:.4f}")
    print(f"{'step':>6} {'KD val_loss':>12} {'CE val_loss':>12}")
    for step in sorted(kd_curve):
        print(f"{step:>6} {kd_curve[step]:>12.4f} {ce_curve.get(step, float('nan')):>12.4f}")
    print(f"wall: KD {kd_seconds:.0f}s, CE {ce_seconds:.0f}s")
    print(json.dumps({"teacher_val_loss": teacher_eval["val_loss"], "zero_shot_val_loss": zero_shot["val_loss"],
                      "kd_val_loss": kd["val_loss"], "ce_val_loss": ce["val_loss"], "steps": args.steps,
                      "student_params": zero_shot["params"], "teacher_params": teacher_eval["params"],
                      "kd_curve": kd_curve, "ce_curve": ce_curve}))


if __name__ == "__main__":
    main()
