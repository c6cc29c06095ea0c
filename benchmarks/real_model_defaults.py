"""The pruning defaults, re-measured on a real pretrained model (issue 18, item 6).

    python benchmarks/real_model_defaults.py --teacher RUN/teacher --out OUT            # zero-shot
    python benchmarks/real_model_defaults.py --teacher RUN/teacher --out OUT --phase kd --kd NAME ...
    python benchmarks/real_model_defaults.py --teacher RUN/teacher --out OUT --phase table --search RUN/search RUN/search-0.7

RUN/teacher is an imported run dir (`run recipe=smollm2` writes one: SmolLM2-135M-Instruct);
`--set seq_length=256 ...` are overrides every command gets (the recipe's sequence length).

Phase `zero` (one process, the teacher loaded once), every loss on the same `--eval-samples`
validation samples with the library calls `prune` makes (make_plan, apply_plan, evaluate_loss):
- importance passes, saved under OUT/imp/<samples>-<batch>-<seq> and reused: the default
  (batch, seq) pair at every `--calibration` count, and every `--aggs` pair at `--base-samples`;
- hidden-channel variants (`prune.importance.hidden_norms` / `hidden_combine`,
  `prune.norm_rescale`) on the width targets;
- the aggregation pairs and the calibration counts with the default variant, and how many of the
  kept hidden channels / MLP neurons / heads each count shares with the largest count's choice;
- the depth metrics: block importance (free with the calibration pass), loss drop (one pass per
  layer) and contiguous (one block of exactly the dropped length: the only block length that can
  drop 11 or 19 of 30 layers), on the depth-only targets;
- the shape `prune.target.param_budget` resolves to, beside the search's candidates.
Phase `kd`: the named comparisons (KD_RUNS) through the CLI as a user runs them, `prune
prune.stage=trim prune.scores=...` then `distill` for `--kd-steps` steps with the recipe's
retraining settings. Results go to OUT/zero_shot.jsonl and OUT/kd.jsonl (a rerun skips what is
done); `table` prints the markdown of docs/real_model_defaults.md.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from commands import run as cli  # benchmarks/commands.py
from hidden_importance import append_jsonl, compose_prune, read_jsonl

# SmolLM2-135M shapes (30 layers, hidden 576, ffn 1536): the recipe's search candidates.
TARGETS = {
    "w0.7": dict(hidden_size=464, ffn_hidden_size=1240),            # width-only, 0.70x
    "w0.5": dict(hidden_size=368, ffn_hidden_size=984),             # width-only, 0.50x
    "d0.7": dict(num_layers=19),                                    # depth-only, 0.71x
    "d0.5": dict(num_layers=11),                                    # depth-only, 0.50x
    "m0.5": dict(num_layers=19, hidden_size=464, ffn_hidden_size=1240),  # the 0.5x search winner, 0.51x
    "budget0.5": dict(param_budget=0.5),                            # what param_budget=0.5 resolves to
}
WIDTH_TARGETS, DEPTH_TARGETS = ("w0.7", "w0.5"), ("d0.7", "d0.5")
DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH = "l2,mean", "all/sum/calibrated", "block_importance"
VARIANTS = ["all/sum/none", "all/sum/calibrated", "layers/sum/calibrated", "layers/normalized/calibrated",
            "all/normalized/calibrated", "input/sum/calibrated", "pre_mlp/sum/calibrated"]
DEPTH_METRICS = ("block_importance", "loss_drop", "contiguous")

# name -> (target, calibration samples, agg, variant, depth metric): the after-KD comparisons.
KD_RUNS = {
    "w0.5-default": ("w0.5", None, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH),
    "w0.5-no-rescale": ("w0.5", None, DEFAULT_AGG, "all/sum/none", DEFAULT_DEPTH),
    "w0.5-layers": ("w0.5", None, DEFAULT_AGG, "layers/sum/calibrated", DEFAULT_DEPTH),
    "w0.5-mean-mean": ("w0.5", None, "mean,mean", DEFAULT_VARIANT, DEFAULT_DEPTH),
    "w0.5-l2-l2": ("w0.5", None, "l2,l2", DEFAULT_VARIANT, DEFAULT_DEPTH),
    "w0.5-32-samples": ("w0.5", 32, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH),
    "m0.5-default": ("m0.5", None, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH),
    "budget0.5-default": ("budget0.5", None, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH),
    "d0.7-block_importance": ("d0.7", None, DEFAULT_AGG, DEFAULT_VARIANT, "block_importance"),
    "d0.7-loss_drop": ("d0.7", None, DEFAULT_AGG, DEFAULT_VARIANT, "loss_drop"),
    "d0.7-contiguous": ("d0.7", None, DEFAULT_AGG, DEFAULT_VARIANT, "contiguous"),
    "d0.5-loss_drop": ("d0.5", None, DEFAULT_AGG, DEFAULT_VARIANT, "loss_drop"),
    "d0.5-contiguous": ("d0.5", None, DEFAULT_AGG, DEFAULT_VARIANT, "contiguous"),
}


def imp_name(samples: int, agg: str) -> str:
    return f"{samples}-{agg.replace(',', '-')}"


def depth_dir(out: Path, target: str) -> Path:
    """Scores with the loss-based depth metrics for `target` (contiguous: one block of its drop)."""
    return out / "imp" / f"depth-{target}"


def key(r: dict) -> tuple:
    return r["samples"], r["agg"], r["variant"], r["depth"], r["target"]


# ---- phase zero ----------------------------------------------------------------------------------

def zero_shot(args) -> None:
    from minitron_megatron.config.prune import TrimTarget
    from minitron_megatron.importance.depth import loss_depth_scores
    from minitron_megatron.importance.io import has_importance, load_importance, save_importance
    from minitron_megatron.importance.stage import importance_batches, score_model
    from minitron_megatron.model.params import parameter_count
    from minitron_megatron.model.probes import find_probes
    from minitron_megatron.runtime import init_runtime
    from minitron_megatron.train import setup
    from minitron_megatron.train.step import evaluate_loss
    from minitron_megatron.trim.apply import apply_plan
    from minitron_megatron.trim.stage import load_source, make_plan, source_parallel
    from minitron_megatron.trim.validate import validate_target

    out = Path(args.out)
    results = out / "zero_shot.jsonl"
    done = {key(r) for r in read_jsonl(results)}
    cfg = compose_prune(args.teacher, str(out / "unused"), args.set)
    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=cfg.seed)
    run = setup.prepare_run(replace(cfg, parallel=source_parallel(cfg)), ctx,
                            num_train_samples=max(args.calibration), num_valid_samples=args.eval_samples)
    model = load_source(run, cfg, ctx)
    mbs, seq = cfg.evaluate.micro_batch_size, run.seq_length
    valid = run.valid_batches(mbs, ctx, args.eval_samples)

    def evaluate(m) -> float:
        return evaluate_loss([m], valid, ctx, len(valid), mbs, seq)["val_loss"]

    def record(samples, agg, variant, depth, target, **extra) -> None:
        r = {"samples": samples, "agg": agg, "variant": variant, "depth": depth, "target": target, **extra}
        append_jsonl(results, r)
        done.add(key(r))
        print({k: v for k, v in r.items() if k not in ("hidden", "kept")}, flush=True)

    if ("-", "-", "teacher", "-", "-") not in done:
        record("-", "-", "teacher", "-", "-", val_loss=evaluate(model), params=parameter_count(run.model_cfg, run.padded_vocab))

    def scores_for(samples: int, agg: str) -> dict:
        batch_agg, seq_agg = agg.split(",")
        icfg = replace(cfg.prune.importance, batch_agg=batch_agg, seq_agg=seq_agg,
                       calibration_samples=samples, depth_metrics=["block_importance"])
        path = out / "imp" / imp_name(samples, agg)
        if not has_importance(path):
            start = time.time()
            score_model(model, run, icfg, ctx, importance_batches(run, icfg, ctx), args.teacher, str(path),
                        verbose=False)
            print(f"importance {samples} samples ({agg}): {time.time() - start:.0f}s", flush=True)
        return load_importance(path)[0]

    def prune_eval(scores, samples, agg, variant, depth, target_name) -> None:
        if (samples, agg, variant, depth, target_name) in done:
            return
        norms, combine, rescale = variant.split("/")
        target = TrimTarget(**TARGETS[target_name])
        batch_agg, seq_agg = agg.split(",")
        prune = replace(cfg.prune, target=target, norm_rescale=rescale, depth_metric=depth,
                        importance=replace(cfg.prune.importance, hidden_norms=norms, hidden_combine=combine,
                                           batch_agg=batch_agg, seq_agg=seq_agg))
        new_cfg = validate_target(run.model_cfg, target, 1, 1, None, run.padded_vocab)
        plan = make_plan(prune, run.model_cfg, new_cfg, scores=scores)
        pruned = apply_plan(model, plan, run.model_cfg, ctx, source_parallel(cfg), run.padded_vocab,
                            None, release_source=False)
        record(samples, agg, variant, depth, target_name, val_loss=evaluate(pruned.model),
               params=parameter_count(new_cfg, run.padded_vocab), layers=plan.layers,
               shape=[new_cfg.num_layers, new_cfg.hidden_size, new_cfg.ffn_hidden_size],
               kept={"hidden": plan.hidden, "ffn": plan.ffn, "heads": plan.heads})
        del pruned

    base = scores_for(args.base_samples, DEFAULT_AGG)
    for variant in VARIANTS:                                   # hidden-channel variants
        for target in WIDTH_TARGETS:
            prune_eval(base, args.base_samples, DEFAULT_AGG, variant, DEFAULT_DEPTH, target)
    for target in ("m0.5", "budget0.5"):                       # the winner's shape vs param_budget's
        prune_eval(base, args.base_samples, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH, target)
    for agg in args.aggs:                                      # (batch, seq) aggregation pairs
        scores = scores_for(args.base_samples, agg)
        for target in WIDTH_TARGETS:
            prune_eval(scores, args.base_samples, agg, DEFAULT_VARIANT, DEFAULT_DEPTH, target)
    for samples in args.calibration:                           # calibration samples
        scores = scores_for(samples, DEFAULT_AGG)
        for target in WIDTH_TARGETS:
            prune_eval(scores, samples, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH, target)
    loss_drop = None                                           # one per-layer pass set serves both targets
    for target in DEPTH_TARGETS:                               # depth metrics
        path = depth_dir(out, target)
        if not has_importance(path):
            drop = run.model_cfg.num_layers - TARGETS[target]["num_layers"]
            start = time.time()
            for done_target in DEPTH_TARGETS:                  # a resumed run: the saved loss_drop
                if loss_drop is None and has_importance(depth_dir(out, done_target)):
                    saved, saved_meta = load_importance(depth_dir(out, done_target))
                    loss_drop = {"depth.loss_drop": saved["depth.loss_drop"],
                                 "layer_loss": saved_meta["depth"]["layer_loss"]}
            depth = loss_depth_scores([model], find_probes([model]), run.valid_batches(mbs, ctx, args.depth_samples),
                                      ctx, mbs, seq, ["contiguous"] if loss_drop else ["loss_drop", "contiguous"], drop)
            loss_drop = loss_drop or {k: depth[k] for k in ("depth.loss_drop", "layer_loss")}
            scores, meta = load_importance(out / "imp" / imp_name(args.base_samples, DEFAULT_AGG))
            scores.update({"depth.loss_drop": loss_drop["depth.loss_drop"].float(),
                           "depth.contiguous": depth["depth.contiguous"].float()})
            meta = {**meta, "depth": {"samples": args.depth_samples, "contiguous_k": drop,
                                      "baseline": depth["baseline"], "layer_loss": loss_drop["layer_loss"]}}
            save_importance(scores, meta, path)
            print(f"depth scores for {target} ({drop} dropped): {time.time() - start:.0f}s", flush=True)
        scores = load_importance(path)[0]
        for metric in DEPTH_METRICS:
            prune_eval(scores, args.base_samples, DEFAULT_AGG, DEFAULT_VARIANT, metric, target)


# ---- phase kd ------------------------------------------------------------------------------------

def kd(args) -> None:
    out = Path(args.out)
    results = out / "kd.jsonl"
    done = {r["name"] for r in read_jsonl(results)}
    for name in args.kd:
        if name in done:
            continue
        target, samples, agg, variant, depth = KD_RUNS[name]
        samples = samples or args.base_samples
        norms, combine, rescale = variant.split("/")
        scores = depth_dir(out, target) if depth != DEFAULT_DEPTH else out / "imp" / imp_name(samples, agg)
        student, kd_dir = out / "students" / name, out / "kd" / name
        common = [f"{s}" for s in args.set] + ["data=stdlib", "device=cpu"]
        if not (student / "summary.json").is_file():
            # No zero-shot evaluation here: phase `zero` measured it (same samples, same plan).
            cli("prune", f"load={args.teacher}", *common, "evaluate.samples=0", "prune.stage=trim",
                f"prune.scores={scores}", *[f"prune.target.{k}={v}" for k, v in TARGETS[target].items()],
                f"prune.importance.hidden_norms={norms}", f"prune.importance.hidden_combine={combine}",
                f"prune.norm_rescale={rescale}", f"prune.depth_metric={depth}", f"save={student}")
        start = time.time()
        # The recipe's retraining settings (conf/recipe/smollm2.yaml), as its search runs them.
        summary = cli("distill", f"teacher.load={args.teacher}", f"student.load={student}", *common,
                      f"distill.steps={args.kd_steps}", f"distill.eval_interval={args.kd_steps}",
                      f"distill.save_interval={args.kd_steps}", f"distill.eval_samples={args.eval_samples}",
                      f"evaluate.samples={args.eval_samples}",  # the zero-shot phase's samples
                      "distill.micro_batch_size=4", "distill.global_batch_size=8", "distill.optim.lr=3e-4",
                      "distill.optim.min_lr=3e-5", "distill.optim.warmup_steps=5", f"save={kd_dir}")
        append_jsonl(results, {"name": name, "target": target, "samples": samples, "agg": agg,
                               "variant": variant, "depth": depth, "val_loss": summary["val_loss"],
                               "steps": args.kd_steps, "seconds": round(time.time() - start)})
        print(f"{name}: after {args.kd_steps} KD steps {summary['val_loss']:.4f}", flush=True)


# ---- phase table ---------------------------------------------------------------------------------

def overlap(a, b) -> float:
    """Fraction of kept units shared (per-layer lists are flattened with their layer index)."""
    if a and isinstance(a[0], list):
        a = {(i, u) for i, units in enumerate(a) for u in units}
        b = {(i, u) for i, units in enumerate(b) for u in units}
    a, b = set(a), set(b)
    return len(a & b) / max(len(a), 1)


def search_results(dirs) -> dict:
    """(layers, hidden, ffn) -> val_loss after the search's KD steps, from `search` run dirs."""
    out = {}
    for d in dirs:
        for cand in sorted(Path(d).glob("candidates/*")):
            summary = cand / "student" / "summary.json"
            if summary.is_file():
                arch = json.loads((cand / "arch.json").read_text())
                shape = (arch["num_layers"], arch["hidden_size"], arch["ffn_hidden_size"])
                out[shape] = json.loads(summary.read_text())["val_loss"]
    return out


def table(args) -> None:
    out = Path(args.out)
    zero = read_jsonl(out / "zero_shot.jsonl")
    kd_rows = {r["name"]: r for r in read_jsonl(out / "kd.jsonl")}
    by = {key(r): r for r in zero}
    teacher = by.get(("-", "-", "teacher", "-", "-"))
    if teacher:
        print(f"teacher: val_loss {teacher['val_loss']:.4f}, {teacher['params']:,} params\n")
    base, widths = args.base_samples, WIDTH_TARGETS

    def cells(samples, agg, variant, depth, targets):
        return [f"{by[(samples, agg, variant, depth, t)]['val_loss']:.4f}" if (samples, agg, variant, depth, t) in by
                else "" for t in targets]

    searched = search_results(args.search)

    def kd_cell(*spec) -> str:
        names = [n for n, s in KD_RUNS.items() if s[0] == spec[0] and (s[1] or base) == spec[1]
                 and s[2:] == spec[2:]]
        if names and names[0] in kd_rows:
            return f"{kd_rows[names[0]]['val_loss']:.4f}"
        row = by.get(spec[1:] + (spec[0],))
        # The recipe's search distilled the same plan (the defaults' scores) with the same settings.
        if row and spec[1:] == (base, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH) and tuple(row["shape"]) in searched:
            return f"{searched[tuple(row['shape'])]:.4f} (search)"
        return ""

    shapes = {r["target"]: r for r in zero if "shape" in r}
    print("| target | shape (layers, hidden, ffn) | params |\n|---|---|---|")
    for t in TARGETS:
        if t in shapes:
            print(f"| {t} | {tuple(shapes[t]['shape'])} | {shapes[t]['params']:,} |")
    print(f"\n### Hidden-channel variants ({base} samples, {DEFAULT_AGG}), zero-shot; KD{args.kd_steps} at w0.5\n")
    print("| norms/combine/rescale | " + " | ".join(widths) + f" | w0.5 after KD{args.kd_steps} |\n|---|---|---|---|")
    for v in VARIANTS:
        print(f"| {v} | " + " | ".join(cells(base, DEFAULT_AGG, v, DEFAULT_DEPTH, widths))
              + f" | {kd_cell('w0.5', base, DEFAULT_AGG, v, DEFAULT_DEPTH)} |")
    print(f"\n### (batch, seq) aggregation ({base} samples, {DEFAULT_VARIANT})\n")
    print("| batch,seq | " + " | ".join(widths) + f" | w0.5 after KD{args.kd_steps} |\n|---|---|---|---|")
    for agg in [DEFAULT_AGG] + list(args.aggs):
        print(f"| {agg} | " + " | ".join(cells(base, agg, DEFAULT_VARIANT, DEFAULT_DEPTH, widths))
              + f" | {kd_cell('w0.5', base, agg, DEFAULT_VARIANT, DEFAULT_DEPTH)} |")
    top = max(args.calibration)
    print(f"\n### Calibration samples ({DEFAULT_AGG}, {DEFAULT_VARIANT}); kept units shared with {top} samples' "
          "choice at w0.5\n")
    print("| samples | " + " | ".join(widths) + f" | w0.5 after KD{args.kd_steps} | hidden | ffn | heads |\n"
          "|---|---|---|---|---|---|---|")
    for s in sorted(args.calibration):
        ref, row = by.get((top, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH, "w0.5")), \
            by.get((s, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH, "w0.5"))
        shared = [f"{overlap(row['kept'][u], ref['kept'][u]):.3f}" if row and ref else "" for u in
                  ("hidden", "ffn", "heads")]
        print(f"| {s} | " + " | ".join(cells(s, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH, widths))
              + f" | {kd_cell('w0.5', s, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH)} | " + " | ".join(shared) + " |")
    print(f"\n### Depth metric ({DEFAULT_VARIANT}); kept layers\n")
    print(f"| metric | d0.7 | d0.5 | d0.7 after KD{args.kd_steps} | d0.5 after KD{args.kd_steps} | d0.7 layers | d0.5 layers |\n"
          "|---|---|---|---|---|---|---|")
    for m in DEPTH_METRICS:
        layers = [str(by[(base, DEFAULT_AGG, DEFAULT_VARIANT, m, t)]["layers"]).replace(" ", "")
                  if (base, DEFAULT_AGG, DEFAULT_VARIANT, m, t) in by else "" for t in DEPTH_TARGETS]
        print(f"| {m} | " + " | ".join(cells(base, DEFAULT_AGG, DEFAULT_VARIANT, m, DEPTH_TARGETS))
              + f" | {kd_cell('d0.7', base, DEFAULT_AGG, DEFAULT_VARIANT, m)}"
              + f" | {kd_cell('d0.5', base, DEFAULT_AGG, DEFAULT_VARIANT, m)} | " + " | ".join(layers) + " |")
    print(f"\n### The param_budget=0.5 shape vs the search's 0.5x winner ({DEFAULT_VARIANT})\n")
    print(f"| target | zero-shot | after KD{args.kd_steps} |\n|---|---|---|")
    for t in ("budget0.5", "m0.5", "w0.5"):
        print(f"| {t} | " + cells(base, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH, [t])[0]
              + f" | {kd_cell(t, base, DEFAULT_AGG, DEFAULT_VARIANT, DEFAULT_DEPTH)} |")
    if kd_rows:
        secs = [r["seconds"] for r in kd_rows.values()]
        print(f"\nKD runs: {len(secs)}, {min(secs)}-{max(secs)} s each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="an imported run dir, e.g. RUN/teacher of recipe=smollm2")
    parser.add_argument("--out", default="/tmp/real_model_defaults")
    parser.add_argument("--phase", choices=("zero", "kd", "table"), default="zero")
    parser.add_argument("--set", nargs="*", default=["seq_length=256"], help="overrides every command gets")
    parser.add_argument("--base-samples", type=int, default=64, help="calibration samples of every comparison")
    parser.add_argument("--calibration", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--aggs", nargs="+", default=["mean,mean", "l2,l2", "var,mean"],
                        help="(batch,seq) pairs besides the default l2,mean")
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--depth-samples", type=int, default=32)
    parser.add_argument("--kd", nargs="+", default=list(KD_RUNS), choices=list(KD_RUNS))
    parser.add_argument("--kd-steps", type=int, default=12)
    parser.add_argument("--search", nargs="*", default=[],
                        help="table: the recipe's search dirs (RUN/search RUN/search-0.7), whose candidates "
                             "fill the after-KD cells of the same shapes with the default settings")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    {"zero": zero_shot, "kd": kd, "table": table}[args.phase](args)


if __name__ == "__main__":
    main()
