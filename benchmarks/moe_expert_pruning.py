"""Which experts to drop? 8 -> 4 routed experts of a trained `tiny-moe`, kept by importance
(the mean output norm over routed tokens; or that times the routing frequency), by routing
frequency (dropping the least-routed) and at random, zero-shot and after the same short distillation from the unpruned teacher.

    python benchmarks/moe_expert_pruning.py --out /tmp/moe_experts [--teacher RUN] [--train-steps 300]

Without --teacher, `tiny-moe` is trained first (`train model=tiny-moe`). Then the importance
stage runs once, and for each way of choosing experts the trim stage reuses its scores
(`prune.stage=trim prune.expert_metric=output_norm|contribution|frequency`, `prune.method=random` with
--random-seeds seeds), `evaluate` gives the zero-shot loss and `distill` the loss after
--kd-steps steps (same schedule, data order and teacher for every student). Ends with a table
and a JSON line.
"""

import argparse
import json
import statistics
from pathlib import Path

from commands import run  # benchmarks/commands.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/moe_experts")
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--kd-steps", type=int, default=40)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--random-seeds", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    common = ["data=stdlib", "device=cpu", f"seq_length={args.seq_length}"]
    evaluate = [f"evaluate.samples={args.eval_samples}", "evaluate.micro_batch_size=8"]
    teacher = Path(args.teacher) if args.teacher else out / "teacher"
    if not (teacher / "summary.json").is_file():
        run("train", "model=tiny-moe", *common, f"train.steps={args.train_steps}",
            f"train.eval_interval={args.train_steps}", f"save={teacher}")
    teacher_loss = run("evaluate", f"load={teacher}", *common, *evaluate)["val_loss"]
    scores = out / "scores"
    if not (scores / "summary.json").is_file():
        run("prune", f"load={teacher}", *common, "prune.stage=importance", f"save={scores}",
            f"prune.importance.calibration_samples={args.calibration_samples}", "prune.importance.depth_metrics=[]")
    ways = {"importance (output norm)": ["prune.expert_metric=output_norm"],
            "contribution (norm x freq)": ["prune.expert_metric=contribution"],
            "most routed (frequency)": ["prune.expert_metric=frequency"]}
    ways.update({f"random seed {s}": ["prune.method=random", f"seed={s}"] for s in range(args.random_seeds)})
    results = {}
    for name, keys in ways.items():
        tag = name.split()[0] + (name.split()[-1] if name.startswith("random") else "")
        student, distilled = out / f"pruned_{tag}", out / f"kd_{tag}"
        if not (student / "summary.json").is_file():
            run("prune", f"load={teacher}", *common, "prune.stage=trim", f"prune.scores={scores}",
                f"prune.target.num_moe_experts={args.experts}", *keys, *evaluate, f"save={student}")
        zero_shot = run("evaluate", f"load={student}", *common, *evaluate)["val_loss"]
        if not (distilled / "summary.json").is_file():
            run("distill", f"teacher.load={teacher}", f"student.load={student}", *common,
                f"distill.steps={args.kd_steps}", f"distill.eval_interval={args.kd_steps}",
                f"distill.save_interval={args.kd_steps}", f"distill.eval_samples={args.eval_samples}",
                f"save={distilled}")
        results[name] = {"zero_shot": zero_shot,
                         "after_kd": run("evaluate", f"load={distilled}", *common, *evaluate)["val_loss"]}
    randoms = [r for name, r in results.items() if name.startswith("random")]
    if randoms:
        results["random (mean)"] = {k: statistics.mean(r[k] for r in randoms) for k in ("zero_shot", "after_kd")}
    print(f"\nteacher (8 experts): val loss {teacher_loss:.4f}; students keep {args.experts} experts, "
          f"KD {args.kd_steps} steps")
    print(f"{'experts kept by':28s} {'zero-shot':>10s} {'after KD':>10s}")
    for name, r in results.items():
        print(f"{name:28s} {r['zero_shot']:10.4f} {r['after_kd']:10.4f}")
    print(json.dumps({"teacher_val_loss": teacher_loss, "experts": args.experts, "kd_steps": args.kd_steps,
                      "results": results}))


if __name__ == "__main__":
    main()
