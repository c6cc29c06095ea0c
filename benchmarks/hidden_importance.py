"""Hidden-channel importance variants, measured: which norms score the channels, how they
combine, the norm rescale, and the (batch, seq) aggregation pair.

    python benchmarks/hidden_importance.py --teachers /work/runs/teachers/seed1234 \\
        /work/runs/teachers/seed1 /work/runs/teachers/seed2 --out /work/runs/hidden_importance
    python benchmarks/hidden_importance.py ... --phase kd --kd-variants all/sum/none layers/sum/none [--kd-aggs mean,mean]
    python benchmarks/hidden_importance.py ... --phase table

Phase `zero` (in one process, each teacher loaded once): per teacher and (batch, seq)
aggregation pair, ONE importance pass over `--calibration-samples` training samples (saved
to OUT/imp/<seed>/<batch>-<seq>, reused when present); every hidden variant
(`prune.importance.hidden_norms` / `hidden_combine`, `prune.norm_rescale`) x target is then
trimmed from those scores in memory and scored zero-shot on `evaluate.samples` validation
samples, with the library calls `prune` itself makes (make_plan, apply_plan, evaluate_loss).
Phase `kd`: for the named variants, `prune prune.stage=trim prune.scores=...` writes the
student and `distill` retrains it for `--kd-steps` steps (the same settings for every run);
its final val_loss is on the same `evaluate.samples`. Results append to OUT/zero_shot.jsonl
and OUT/kd.jsonl (a rerun skips what is done); phase `table` prints the markdown tables.
"""

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path
from statistics import mean

from commands import run as cli  # benchmarks/commands.py
TARGETS = {
    "h96_f256": dict(hidden_size=96, ffn_hidden_size=256),
    "h96_f256_l3": dict(hidden_size=96, ffn_hidden_size=256, num_layers=3),
    "h80_f80": dict(hidden_size=80, ffn_hidden_size=80),
}
NORMS, COMBINES, RESCALES = ("all", "layers", "input", "pre_mlp"), ("sum", "normalized"), ("none", "calibrated")
ALL_VARIANTS = ["/".join(v) for v in itertools.product(NORMS, COMBINES, RESCALES)]
DEFAULT_AGG = "l2,mean"  # (batch, seq)


def seed_of(teacher: str) -> str:
    return Path(teacher).name


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# ---- phase zero: in-process, one model load per teacher ------------------------------------------

def compose_prune(teacher: str, save: str, extra=()):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from minitron_megatron.config.commands import register_configs
    from minitron_megatron.config.files import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return OmegaConf.to_object(compose("prune", [f"load={teacher}", f"save={save}", "data=stdlib",
                                                     "device=cpu", *extra]))


def zero_shot(args) -> None:
    from minitron_megatron.config.prune import TrimTarget
    from minitron_megatron.importance.io import has_importance, load_importance
    from minitron_megatron.importance.stage import importance_batches, score_model
    from minitron_megatron.runtime import init_runtime
    from minitron_megatron.train import setup
    from minitron_megatron.train.step import evaluate_loss
    from minitron_megatron.trim.apply import apply_plan
    from minitron_megatron.trim.stage import load_source, make_plan, source_parallel
    from minitron_megatron.trim.validate import validate_target

    out = Path(args.out)
    results = out / "zero_shot.jsonl"
    done = {(r["seed"], r["agg"], r["variant"], r["target"]) for r in read_jsonl(results)}
    ctx = None
    for teacher in args.teachers:
        seed = seed_of(teacher)
        cfg = compose_prune(teacher, str(out / "unused"))
        ctx = ctx or init_runtime(tp=1, pp=1, device="cpu", seed=cfg.seed)
        run = setup.prepare_run(replace(cfg, parallel=source_parallel(cfg)), ctx,
                                num_train_samples=args.calibration_samples, num_valid_samples=args.eval_samples)
        model = load_source(run, cfg, ctx)
        mbs = cfg.evaluate.micro_batch_size
        valid = run.valid_batches(mbs, ctx, args.eval_samples)
        seq = run.seq_length

        def evaluate(m) -> float:
            return evaluate_loss([m], valid, ctx, len(valid), mbs, seq)["val_loss"]

        if (seed, "teacher") not in {(r["seed"], r["variant"]) for r in read_jsonl(results)}:
            half = validate_target(run.model_cfg, TrimTarget(param_budget=0.5), 1, 1, None, run.padded_vocab)
            append_jsonl(results, {"seed": seed, "agg": "-", "variant": "teacher", "target": "-",
                                   "val_loss": evaluate(model),
                                   "param_budget_0.5": [half.hidden_size, half.ffn_hidden_size]})
        for agg in args.aggs:
            batch_agg, seq_agg = agg.split(",")
            icfg = replace(cfg.prune.importance, batch_agg=batch_agg, seq_agg=seq_agg,
                           calibration_samples=args.calibration_samples, depth_metrics=["block_importance"])
            imp_dir = out / "imp" / seed / f"{batch_agg}-{seq_agg}"
            if has_importance(imp_dir):
                scores = load_importance(imp_dir)[0]
            else:
                start = time.time()
                scores = score_model(model, run, icfg, ctx, importance_batches(run, icfg, ctx), teacher,
                                     str(imp_dir), verbose=False).scores
                print(f"{seed} {agg}: importance in {time.time() - start:.0f}s", flush=True)
            variants = args.variants if agg == DEFAULT_AGG else args.agg_variants
            for variant, target_name in itertools.product(variants, args.targets):  # variants in the order given
                if (seed, agg, variant, target_name) in done:
                    continue
                norms, combine, rescale = variant.split("/")
                target = TrimTarget(**TARGETS[target_name])
                prune = replace(cfg.prune, target=target, norm_rescale=rescale,
                                importance=replace(icfg, hidden_norms=norms, hidden_combine=combine))
                new_cfg = validate_target(run.model_cfg, target, 1, 1, None, run.padded_vocab)
                plan = make_plan(prune, run.model_cfg, new_cfg, scores=scores)
                pruned = apply_plan(model, plan, run.model_cfg, ctx, source_parallel(cfg), run.padded_vocab,
                                    None, release_source=False)
                record = {"seed": seed, "agg": agg, "variant": variant, "target": target_name,
                          "val_loss": evaluate(pruned.model), "hidden": plan.hidden}
                append_jsonl(results, record)
                done.add((seed, agg, variant, target_name))
                print(f"{seed} {agg} {target_name} {variant}: {record['val_loss']:.4f}", flush=True)
                del pruned


# ---- phase kd: the CLI, one student and one distill run per (variant, seed, target) -------------

def kd(args) -> None:
    out = Path(args.out)
    results = out / "kd.jsonl"
    done = {(r["seed"], r["agg"], r["variant"], r["target"]) for r in read_jsonl(results)}
    for teacher, agg, target_name, variant in itertools.product(args.teachers, args.kd_aggs, args.kd_targets,
                                                                 args.kd_variants):
        seed = seed_of(teacher)
        if (seed, agg, variant, target_name) in done:
            continue
        batch_agg, seq_agg = agg.split(",")
        norms, combine, rescale = variant.split("/")
        name = f"{seed}-{target_name}-{variant.replace('/', '-')}"
        if agg != DEFAULT_AGG:
            name += f"-{batch_agg}-{seq_agg}"
        student, kd_dir = out / "students" / name, out / "kd" / name
        common = ["data=stdlib", "device=cpu"]
        target = [f"prune.target.{k}={v}" for k, v in TARGETS[target_name].items()]
        if not (student / "summary.json").is_file():
            # No zero-shot evaluation here: phase `zero` measured it (same samples, same plan).
            cli("prune", f"load={teacher}", *common, "evaluate.samples=0", "prune.stage=trim",
                f"prune.scores={out / 'imp' / seed / f'{batch_agg}-{seq_agg}'}", *target,
                f"prune.importance.hidden_norms={norms}", f"prune.importance.hidden_combine={combine}",
                f"prune.norm_rescale={rescale}", f"save={student}")
        start = time.time()
        summary = cli("distill", f"teacher.load={teacher}", f"student.load={student}", *common,
                      f"evaluate.samples={args.eval_samples}",
                      f"distill.steps={args.kd_steps}", f"distill.eval_interval={args.kd_steps}",
                      f"distill.save_interval={args.kd_steps}", f"distill.eval_samples={args.eval_samples}",
                      "distill.optim.lr=1e-3", "distill.optim.min_lr=1e-4", "distill.optim.warmup_steps=10",
                      f"save={kd_dir}")
        record = {"seed": seed, "agg": agg, "variant": variant, "target": target_name,
                  "val_loss": summary["val_loss"], "steps": args.kd_steps,
                  "seconds": round(time.time() - start)}
        append_jsonl(results, record)
        print(f"{name}: after {args.kd_steps} KD steps {summary['val_loss']:.4f}", flush=True)


# ---- phase table ---------------------------------------------------------------------------------

def table(args) -> None:
    out = Path(args.out)
    zero, kd_rows = read_jsonl(out / "zero_shot.jsonl"), read_jsonl(out / "kd.jsonl")
    seeds = [seed_of(t) for t in args.teachers]
    teacher = {r["seed"]: r["val_loss"] for r in zero if r["variant"] == "teacher"}
    print("teacher val_loss: " + ", ".join(f"{s} {teacher[s]:.4f}" for s in seeds if s in teacher) + "\n")
    z = {(r["seed"], r["agg"], r["variant"], r["target"]): r["val_loss"] for r in zero if r["variant"] != "teacher"}
    k = {(r["seed"], r["agg"], r["variant"], r["target"]): r["val_loss"] for r in kd_rows}
    for target in args.targets:
        print(f"### target {target} ({TARGETS[target]})\n")
        head = [f"zero-shot {s}" for s in seeds] + ["zero-shot mean"]
        kd_head = [f"KD{args.kd_steps} {s}" for s in seeds] + [f"KD{args.kd_steps} mean"]
        print("| agg (batch,seq) | variant (norms/combine/rescale) | " + " | ".join(head + kd_head) + " |")
        print("|" + "---|" * (2 + len(head) + len(kd_head)))
        rows = sorted({(a, v) for (_, a, v, t) in z if t == target},
                      key=lambda av: (av[0] != DEFAULT_AGG, av[0], ALL_VARIANTS.index(av[1])))
        rows = [av for av in rows if av[0] == DEFAULT_AGG] + [av for av in rows if av[0] != DEFAULT_AGG]
        for agg, variant in rows:
            cells = []
            for source in (z, k):
                vals = [source.get((s, agg, variant, target)) for s in seeds]
                cells += [f"{v:.4f}" if v is not None else "" for v in vals]
                cells.append(f"{mean(vals):.4f}" if all(v is not None for v in vals) else "")
            print(f"| {agg} | {variant} | " + " | ".join(cells) + " |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", required=True)
    parser.add_argument("--out", default="/tmp/hidden_importance")
    parser.add_argument("--phase", choices=("zero", "kd", "table"), default="zero")
    parser.add_argument("--calibration-samples", type=int, default=1024)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--aggs", nargs="+", default=[DEFAULT_AGG, "mean,mean", "l2,l2", "var,mean"],
                        help="(batch,seq) pairs; the first pass per teacher and pair is the expensive part")
    parser.add_argument("--variants", nargs="+", default=ALL_VARIANTS,
                        help="hidden variants norms/combine/rescale scored for the default pair (l2,mean)")
    parser.add_argument("--agg-variants", nargs="+", default=["all/sum/none", "layers/sum/none"],
                        help="hidden variants scored for the non-default aggregation pairs")
    parser.add_argument("--kd-variants", nargs="+", default=["all/sum/none", "layers/sum/none"])
    parser.add_argument("--kd-aggs", nargs="+", default=[DEFAULT_AGG], help="(batch,seq) pairs of the KD phase")
    parser.add_argument("--kd-targets", nargs="+", default=["h96_f256", "h80_f80"], choices=list(TARGETS))
    parser.add_argument("--kd-steps", type=int, default=100)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    {"zero": zero_shot, "kd": kd, "table": table}[args.phase](args)


if __name__ == "__main__":
    main()
