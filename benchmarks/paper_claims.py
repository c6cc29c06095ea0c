"""The Minitron papers' claims at toy scale: each with both numbers and a verdict, whatever they are.

    python benchmarks/paper_claims.py --out runs/paper_claims            # every claim, 3 seeds
    python benchmarks/paper_claims.py --out /tmp/pc --seeds 1234 --steps 20 --quick   # a smoke run

One process runs every command in-process (Hydra compose + the commands' own stage
functions, `cli.app.run_command`), each into its own run dir under --out: a finished run
dir is reused, so an interrupted benchmark resumes. Per teacher seed (`train model=tiny
data=stdlib seed=S`, reused from --teachers/seed<S> when complete):

  kd_vs_ce       KD retraining vs CE retraining (`train load=PRUNED`) of the same pruned
                 model (`prune.target.param_budget=0.5`), same steps, data and schedule; and
                 CE given the KD run's compute (its steps x the FLOP ratio, teacher forward counted)
  kd_vs_scratch  the same architecture trained from random init (`train`'s own schedule) for
                 the KD run's tokens, and for its compute
  tokens_40x     retraining with <= 1/30 of the teacher's training tokens: student and
                 from-scratch val loss relative to the teacher's (paper: 40x fewer tokens)
  width_depth    depth pruning (4 -> 2 layers) vs width pruning to the same exact parameter
                 count, zero-shot and after KD
  search         `search` over a small space: Spearman of the zero-shot ranking (and of the
                 ranking after k steps, k < K) with the ranking after K steps
  iterative      one-shot prune -> KD(N) vs two rounds prune -> KD(N/2) to the same size
  aggregation    the 9 (batch, seq) importance aggregations: zero-shot loss of each
  hidden         hidden-channel importance variants (prune.importance.hidden_norms /
                 hidden_combine / prune.norm_rescale), zero-shot, if this checkout has them

Every val loss is `evaluate`'s measurement on the same `--eval-samples` validation samples.
Writes report.md (tables, verdicts, the machine, wall time) and PNG plots into --out; the
last stdout line is a JSON summary.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLAIMS = ("kd_vs_ce", "kd_vs_scratch", "tokens_40x", "width_depth", "search", "iterative", "aggregation", "hidden")
AGGS = ("mean", "l2", "var")
ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "kv_channels")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/paper_claims")
    p.add_argument("--teachers", default=None, help="a dir of complete teacher run dirs named seed<S> to reuse")
    p.add_argument("--seeds", default="1234,1,2")
    p.add_argument("--claims", default=",".join(CLAIMS))
    p.add_argument("--steps", type=int, default=100, help="retraining steps N (KD, CE, from scratch)")
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--calibration", type=int, default=1024, help="calibration samples of the main importance run")
    p.add_argument("--agg-calibration", type=int, default=256, help="calibration samples per aggregation pair")
    p.add_argument("--search-steps", type=int, default=40, help="K: distillation steps per search candidate")
    p.add_argument("--budget", type=float, default=0.5, help="parameter budget of the main target")
    p.add_argument("--quick", action="store_true", help="smaller everything (a smoke run, not a measurement)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- running commands


class Runner:
    """Runs commands in this process; a complete run dir is read instead of rerun."""

    def __init__(self, out: Path, common: list):
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from minitron_megatron.config.commands import register_configs
        from minitron_megatron.config.files import conf_dir

        register_configs()
        GlobalHydra.instance().clear()
        self._hydra = initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3")
        self._hydra.__enter__()
        self._compose = compose
        self.out, self.common = out, common
        self.seconds = {}

    def __call__(self, name: str, save: str, *overrides: str) -> dict:
        """`name` into out/save with the common overrides, then `overrides` (later ones win)."""
        from omegaconf import OmegaConf

        from minitron_megatron.checkpoint import run_dir as rd
        from minitron_megatron.cli.app import run_command
        from minitron_megatron.cli.registry import COMMANDS
        from minitron_megatron.runtime import clock

        path = self.out / save
        if rd.is_complete(path):
            return rd.read_summary(path)
        print(f"[paper_claims] {name} save={path} {' '.join(overrides)}", flush=True)
        cfg = OmegaConf.to_object(self._compose(config_name=name, overrides=[*self.common, f"save={path}",
                                                                                *overrides]))
        start = time.time()
        clock.restart()
        summary = run_command(COMMANDS[name], cfg)
        self.seconds[save] = round(time.time() - start, 1)
        return summary


def eval_curve(run_dir: Path) -> dict:
    """{tokens: val_loss} of a run's periodic evaluations (last record per step wins)."""
    path = Path(run_dir) / "train_log.jsonl"
    curve = {}
    for record in map(json.loads, path.read_text().splitlines()):
        if record.get("kind") == "eval":
            curve[record["step"]] = record["val_loss"]
    return dict(sorted(curve.items()))


def model_yaml(run_dir: Path):
    from minitron_megatron.checkpoint import run_dir as rd

    return rd.read_model_yaml(run_dir)[0]


def padded_vocab(run_dir: Path) -> int:
    from minitron_megatron.checkpoint import run_dir as rd

    return rd.read_model_yaml(run_dir)[1]


def arch_overrides(run_dir: Path) -> list:
    """`model.*` overrides that build a run dir's architecture from scratch."""
    cfg = model_yaml(run_dir)
    return [f"model.{name}={getattr(cfg, name)}" for name in ARCH_FIELDS]


def train_flops_per_token(cfg, vocab: int) -> float:
    """Forward matmul FLOPs per token (2 x the matmul parameters; the input embedding is a lookup)."""
    from minitron_megatron.model.params import parameter_count

    return 2.0 * (parameter_count(cfg, vocab) - vocab * cfg.hidden_size)


# --------------------------------------------------------------------------- statistics


def spearman(a, b) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den else float("nan")


def ms(values) -> str:
    """mean +- sample std over seeds (just the value for one seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def holds(flags) -> str:
    n, k = len(flags), sum(bool(f) for f in flags)
    return ("**yes**" if k == n else "**no**" if k == 0 else "**mixed**") + f" ({k}/{n} seeds)"


# --------------------------------------------------------------------------- the claims


class Claims:
    """One method per claim, called per teacher seed. Every run of seed S has `seed=S`: its
    retraining runs share one data order, and the seeds' runs are independent draws."""

    def __init__(self, args, runner: Runner):
        self.a, self.runner = args, runner
        self.seed = None

    def run(self, name: str, save: str, *overrides: str) -> dict:
        return self.runner(name, save, f"seed={self.seed}", *overrides)

    @property
    def out(self) -> Path:
        return self.runner.out

    # ---- shared pieces -------------------------------------------------------------------

    def teacher(self, seed: int) -> str:
        if self.a.teachers and (Path(self.a.teachers) / f"seed{seed}" / "summary.json").is_file():
            return str(Path(self.a.teachers) / f"seed{seed}")
        steps = ["train.steps=60"] if self.a.quick else []
        self.run("train", f"s{seed}/teacher", *steps)
        return str(self.out / f"s{seed}/teacher")

    def teacher_summary(self, seed: int) -> dict:
        from minitron_megatron.checkpoint import run_dir as rd

        return rd.read_summary(self.teacher(seed))

    def importance(self, seed: int, name: str = "importance") -> str:
        """One importance run per teacher (its dir gets no summary.json: importance.json is the
        stage's commit point), shared by every trim of that teacher."""
        from minitron_megatron.importance.io import has_importance

        if not has_importance(self.out / f"s{seed}/{name}"):
            self.run("prune", f"s{seed}/{name}", f"load={self.teacher(seed)}", "prune.stage=importance",
                     f"prune.importance.calibration_samples={self.a.calibration}")
        return str(self.out / f"s{seed}/{name}")

    def prune(self, seed: int, name: str, *target: str, load: str = None, scores: str = "importance") -> dict:
        """Trim (reusing the seed's importance scores when pruning the teacher) + zero-shot."""
        load = load or self.teacher(seed)
        scores = ["prune.stage=trim", f"prune.scores={self.importance(seed, scores)}"] \
            if load == self.teacher(seed) else [f"prune.importance.calibration_samples={self.a.calibration}"]
        return self.run("prune", f"s{seed}/{name}", f"load={load}", *scores, *target)

    def retrain(self, kind: str, seed: int, name: str, start: str, steps: int, teacher: str = None) -> dict:
        """kd (distill), ce (train load=start) or scratch (train the start's architecture from init)."""
        loop = ["steps", "eval_interval", "save_interval"]
        values = [steps, min(self.a.eval_interval, steps), steps]
        if kind == "kd":
            keys = [f"distill.{k}={v}" for k, v in zip(loop, values)] + self.retrain_optim("distill")
            return self.run("distill", f"s{seed}/{name}", f"teacher.load={teacher or self.teacher(seed)}",
                            f"student.load={start}", *keys)
        keys = [f"train.{k}={v}" for k, v in zip(loop, values)]
        if kind == "ce":
            return self.run("train", f"s{seed}/{name}", f"load={start}", *keys, *self.retrain_optim("train"))
        # From scratch: train's own schedule (the one that trained the teacher), the same data order.
        return self.run("train", f"s{seed}/{name}", *arch_overrides(Path(start)), *keys)

    @staticmethod
    def retrain_optim(prefix: str) -> list:
        """The retraining schedule of KD and CE alike (benchmarks/distill_vs_ce.py's)."""
        return [f"{prefix}.optim.lr=1e-3", f"{prefix}.optim.min_lr=1e-4", f"{prefix}.optim.warmup_steps=10",
                f"{prefix}.eval_samples=64"]

    def main_pruned(self, seed: int) -> dict:
        return self.prune(seed, "pruned", f"prune.target.param_budget={self.a.budget}")

    def compute_steps(self, seed: int) -> int:
        """CE / from-scratch steps with the FLOPs of N KD steps: forward+backward of the student
        (3 x forward) plus the teacher's forward, per token."""
        student = model_yaml(self.out / f"s{seed}/pruned")
        teacher = model_yaml(Path(self.teacher(seed)))
        vocab = padded_vocab(self.out / f"s{seed}/pruned")
        s, t = train_flops_per_token(student, vocab), train_flops_per_token(teacher, vocab)
        return round(self.a.steps * (3 * s + t) / (3 * s))

    # ---- claims ----------------------------------------------------------------------------

    def kd_vs_ce(self, seed: int) -> dict:
        pruned = self.main_pruned(seed)
        start, n = str(self.out / f"s{seed}/pruned"), self.a.steps
        kd = self.retrain("kd", seed, "kd", start, n)
        ce = self.retrain("ce", seed, "ce", start, n)
        n_eq = self.compute_steps(seed)
        ce_eq = self.retrain("ce", seed, f"ce_{n_eq}", start, n_eq)
        return {"zero_shot": pruned["val_loss"], "kd": kd["val_loss"], "ce": ce["val_loss"],
                "ce_equal_compute": ce_eq["val_loss"], "equal_compute_steps": n_eq}

    def kd_vs_scratch(self, seed: int) -> dict:
        self.main_pruned(seed)
        start, n, n_eq = str(self.out / f"s{seed}/pruned"), self.a.steps, self.compute_steps(seed)
        kd = self.retrain("kd", seed, "kd", start, n)
        scratch = self.retrain("scratch", seed, "scratch", start, n)
        scratch_eq = self.retrain("scratch", seed, f"scratch_{n_eq}", start, n_eq)
        return {"kd": kd["val_loss"], "scratch": scratch["val_loss"], "scratch_equal_compute": scratch_eq["val_loss"],
                "equal_compute_steps": n_eq}

    def tokens_40x(self, seed: int) -> dict:
        t = self.teacher_summary(seed)
        n = max(1, t["steps"] // 30)  # <= 1/30 of the teacher's tokens (same global batch)
        out = {"teacher": t["val_loss"], "teacher_steps": t["steps"], "steps": n}
        for label, target in (("mild", ["prune.target.hidden_size=96", "prune.target.ffn_hidden_size=256"]),
                              ("half", [f"prune.target.param_budget={self.a.budget}"])):
            name = "pruned" if label == "half" else "pruned_mild"
            pruned = self.prune(seed, name, *target)
            start = str(self.out / f"s{seed}/{name}")
            kd = self.retrain("kd", seed, f"kd_{label}_{n}", start, n)
            scratch = self.retrain("scratch", seed, f"scratch_{label}_{n}", start, n)
            out[label] = {"params": pruned["params_after"], "zero_shot": pruned["val_loss"], "kd": kd["val_loss"],
                          "scratch": scratch["val_loss"]}
        return out

    def width_depth(self, seed: int) -> dict:
        from minitron_megatron.model.params import parameter_count

        teacher_cfg, vocab = model_yaml(Path(self.teacher(seed))), padded_vocab(Path(self.teacher(seed)))
        depth = self.prune(seed, "depth", f"prune.target.num_layers={teacher_cfg.num_layers // 2}")
        goal = depth["params_after"]
        best = None  # the width-only target (hidden, ffn) with the nearest exact count
        for hidden in range(teacher_cfg.hidden_size, 7, -8):
            for ffn in range(teacher_cfg.ffn_hidden_size, 7, -8):
                cfg = type(teacher_cfg)(**{**asdict(teacher_cfg), "hidden_size": hidden, "ffn_hidden_size": ffn})
                key = (abs(parameter_count(cfg, vocab) - goal), abs(ffn / hidden - teacher_cfg.ffn_hidden_size /
                                                             teacher_cfg.hidden_size))
                if best is None or key < best[0]:
                    best = (key, hidden, ffn)
        _, hidden, ffn = best
        width = self.prune(seed, "width", f"prune.target.hidden_size={hidden}", f"prune.target.ffn_hidden_size={ffn}")
        n = self.a.steps
        kd_d = self.retrain("kd", seed, "kd_depth", str(self.out / f"s{seed}/depth"), n)
        kd_w = self.retrain("kd", seed, "kd_width", str(self.out / f"s{seed}/width"), n)
        return {"depth_params": depth["params_after"], "width_params": width["params_after"],
                "width_arch": f"hidden {hidden}, ffn {ffn}", "depth_zero_shot": depth["val_loss"],
                "width_zero_shot": width["val_loss"], "depth_kd": kd_d["val_loss"], "width_kd": kd_w["val_loss"]}

    def search(self, seed: int) -> dict:
        k = self.a.search_steps
        space = ["search.space.num_layers=[1.0,0.5]", "search.space.num_attention_heads=[1.0]",
                 "search.space.ffn_ratio=[1.0,0.5,0.25]", "search.space.hidden_size=[0.75,0.625]",
                 "search.tolerance=0.12"]
        summary = self.run("search", f"s{seed}/search", f"load={self.teacher(seed)}",
                           f"search.param_budget={self.a.budget}", f"search.steps={k}",
                           f"distill.eval_interval={max(1, k // 4)}", f"distill.save_interval={k}",
                           f"prune.importance.calibration_samples={self.a.calibration}", *space,
                           *self.retrain_optim("distill"))
        done = [e for e in summary["candidates"] if e["status"] == "done"]
        if len(done) < 3:
            return {"unavailable": f"{len(done)} finished candidates: too few to rank"}
        root = self.out / f"s{seed}/search"
        curves = [eval_curve(root / e["student"]) for e in done]
        final = [e["val_loss"] for e in done]
        by_k = {}
        for step in sorted(set.intersection(*(set(c) for c in curves))):
            if step < k:
                by_k[step] = spearman([c[step] for c in curves], final)
        return {"candidates": len(done), "zero_shot_vs_final": spearman([e["zero_shot_loss"] for e in done], final),
                "step_vs_final": by_k, "best": done and min(done, key=lambda e: e["val_loss"])["arch"],
                "zero_shot_best": done and min(done, key=lambda e: e["zero_shot_loss"])["arch"],
                "entries": [{"arch": e["arch"], "params": e["params"], "zero_shot": e["zero_shot_loss"],
                             "val_loss": e["val_loss"]} for e in done]}

    def iterative(self, seed: int) -> dict:
        one = self.main_pruned(seed)
        kd_one = self.retrain("kd", seed, "kd", str(self.out / f"s{seed}/pruned"), self.a.steps)
        half = self.a.steps // 2
        step = math.sqrt(self.a.budget)
        r1 = self.prune(seed, "iter1_pruned", f"prune.target.param_budget={step}")
        kd1 = self.retrain("kd", seed, "iter1_kd", str(self.out / f"s{seed}/iter1_pruned"), half)
        # The second round prunes the first round's student to the one-shot model's size.
        fraction = one["params_after"] / kd1["params"]
        r2 = self.prune(seed, "iter2_pruned", f"prune.target.param_budget={fraction:.6f}",
                        load=str(self.out / f"s{seed}/iter1_kd"))
        kd2 = self.retrain("kd", seed, "iter2_kd", str(self.out / f"s{seed}/iter2_pruned"), self.a.steps - half)
        return {"one_shot_params": one["params_after"], "iterative_params": r2["params_after"],
                "one_shot_zero_shot": one["val_loss"], "one_shot_kd": kd_one["val_loss"],
                "round1_zero_shot": r1["val_loss"], "round1_kd": kd1["val_loss"],
                "round2_zero_shot": r2["val_loss"], "iterative_kd": kd2["val_loss"]}

    def aggregation(self, seed: int) -> dict:
        out = {}
        for batch in AGGS:
            for seq in AGGS:
                s = self.run("prune", f"s{seed}/agg_{batch}_{seq}", f"load={self.teacher(seed)}",
                             f"prune.importance.batch_agg={batch}", f"prune.importance.seq_agg={seq}",
                             f"prune.importance.calibration_samples={self.a.agg_calibration}",
                             f"prune.target.param_budget={self.a.budget}")
                out[f"{batch},{seq}"] = s["val_loss"]
        return out

    def hidden(self, seed: int) -> dict:
        from minitron_megatron.config.prune import ImportanceConfig, PruneConfig

        names = {f.name for f in fields(ImportanceConfig)}
        if "hidden_norms" not in names or "norm_rescale" not in {f.name for f in fields(PruneConfig)}:
            return {"unavailable": "this checkout has no prune.importance.hidden_norms / prune.norm_rescale"}
        out = {}
        for norms in ("all", "layers"):
            for combine in ("sum", "normalized"):
                for rescale in ("none", "calibrated"):
                    label = f"{norms},{combine},{rescale}"
                    # Scores from an importance run of a checkout that stores them per norm.
                    s = self.prune(seed, f"hidden_{norms}_{combine}_{rescale}",
                                   f"prune.target.param_budget={self.a.budget}",
                                   f"prune.importance.hidden_norms={norms}",
                                   f"prune.importance.hidden_combine={combine}", f"prune.norm_rescale={rescale}",
                                   scores="importance_by_norm")
                    out[label] = s["val_loss"]
        return out


# --------------------------------------------------------------------------- report


def verdicts(results: dict, seeds) -> list:
    """(claim, paper, our numbers, verdict) rows."""
    rows = []

    def per(claim):
        return [results[s][claim] for s in seeds if claim in results.get(s, {})]

    if per("kd_vs_ce"):
        r = per("kd_vs_ce")
        n_eq = r[0]["equal_compute_steps"]
        rows.append(("KD beats CE retraining, equal tokens", "LM loss 2.107 (KD) vs 2.117 (CE+KD); CE worse",
                     f"KD {ms([x['kd'] for x in r])} vs CE {ms([x['ce'] for x in r])} (zero-shot "
                     f"{ms([x['zero_shot'] for x in r])})", holds([x["kd"] < x["ce"] for x in r])))
        rows.append((f"KD beats CE at equal compute (CE {n_eq} steps: teacher forward counted)", "(not reported)",
                     f"KD {ms([x['kd'] for x in r])} vs CE {ms([x['ce_equal_compute'] for x in r])}",
                     holds([x["kd"] < x["ce_equal_compute"] for x in r])))
    if per("kd_vs_scratch"):
        r = per("kd_vs_scratch")
        rows.append(("prune + KD beats the same architecture from scratch, equal tokens", "4B: +13.5% MMLU",
                     f"KD {ms([x['kd'] for x in r])} vs scratch {ms([x['scratch'] for x in r])}",
                     holds([x["kd"] < x["scratch"] for x in r])))
        rows.append((f"... at equal compute (scratch {r[0]['equal_compute_steps']} steps)", "same",
                     f"KD {ms([x['kd'] for x in r])} vs scratch {ms([x['scratch_equal_compute'] for x in r])}",
                     holds([x["kd"] < x["scratch_equal_compute"] for x in r])))
    if per("tokens_40x"):
        r = per("tokens_40x")
        for label in ("mild", "half"):
            rel_kd = [x[label]["kd"] / x["teacher"] - 1 for x in r]
            rel_sc = [x[label]["scratch"] / x["teacher"] - 1 for x in r]
            rows.append((f"40x fewer tokens ({label} target, {r[0][label]['params']:,} params, {r[0]['steps']} "
                         f"steps = 1/{r[0]['teacher_steps'] // r[0]['steps']} of the teacher's)",
                         "goal: student within 5% of the teacher, scratch >= 30% worse",
                         f"teacher {ms([x['teacher'] for x in r])}; student {ms([x[label]['kd'] for x in r])} "
                         f"({ms([100 * v for v in rel_kd])} %); scratch {ms([x[label]['scratch'] for x in r])} "
                         f"({ms([100 * v for v in rel_sc])} %)",
                         holds([k <= 0.05 and s >= 0.30 for k, s in zip(rel_kd, rel_sc)])))
    if per("width_depth"):
        r = per("width_depth")
        rows.append((f"width beats depth after retraining ({r[0]['width_arch']} vs {r[0]['depth_params']:,}-param "
                     "half depth)", "Table 1: width better after retraining",
                     f"KD width {ms([x['width_kd'] for x in r])} vs depth {ms([x['depth_kd'] for x in r])}",
                     holds([x["width_kd"] < x["depth_kd"] for x in r])))
        rows.append(("... zero-shot order (reported, not a claim)", "depth looks better zero-shot",
                     f"width {ms([x['width_zero_shot'] for x in r])} vs depth {ms([x['depth_zero_shot'] for x in r])}",
                     "depth better zero-shot in " + str(sum(x["depth_zero_shot"] < x["width_zero_shot"] for x in r))
                     + f"/{len(r)} seeds"))
    if [x for x in per("search") if "unavailable" not in x]:
        r = [x for x in per("search") if "unavailable" not in x]
        ks = sorted(set.intersection(*(set(x["step_vs_final"]) for x in r)))
        by_k = ", ".join(f"k={k}: {ms([x['step_vs_final'][k] for x in r])}" for k in ks)
        rows.append((f"zero-shot ranking misleads ({r[0]['candidates']} candidates, K={results['_args']['search_steps']})",
                     "zero-shot rankings are misleading; rankings settle after ~300 of 400 steps",
                     f"Spearman(zero-shot, K) {ms([x['zero_shot_vs_final'] for x in r])}; Spearman(k, K) {by_k}",
                     holds([x["zero_shot_vs_final"] < min(x["step_vs_final"].values(), default=1.0) for x in r])
                     + " (zero-shot agrees less than any k)"))
    if per("iterative"):
        r = per("iterative")
        rows.append(("iterative (2 rounds) beats one-shot, same size and KD steps", "prune from the model closest "
                     "to the target (15B -> 8B -> 4B: +1% HellaSwag, +4.6% MMLU)",
                     f"iterative {ms([x['iterative_kd'] for x in r])} vs one-shot {ms([x['one_shot_kd'] for x in r])}",
                     holds([x["iterative_kd"] < x["one_shot_kd"] for x in r])))
    if per("aggregation"):
        r = per("aggregation")
        mean = {k: statistics.fmean(x[k] for x in r) for k in r[0]}
        order = sorted(mean, key=mean.get)
        rows.append(("(batch, seq) aggregation: (l2, mean) best, (var, var) worst", "Table 11: (l2, mean) 7.18 best, "
                     "(var, var) 10.55 worst", "best " + f"({order[0]}) {mean[order[0]]:.4f}, worst ({order[-1]}) "
                     f"{mean[order[-1]]:.4f}; (l2,mean) is #{order.index('l2,mean') + 1} of 9",
                     f"best: {'**yes**' if order[0] == 'l2,mean' else '**no**'}, worst: "
                     f"{'**yes**' if order[-1] == 'var,var' else '**no**'}"))
    return rows


def plots(out: Path, results: dict, seeds) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    seed = seeds[0]
    runs = {"KD": "kd", "CE retraining": "ce", "from scratch": "scratch"}
    if all((out / f"s{seed}" / d / "train_log.jsonl").is_file() for d in runs.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, d in runs.items():
            curve = eval_curve(out / f"s{seed}" / d)
            ax.plot(list(curve), list(curve.values()), marker="o", label=label)
        ax.set_xlabel("retraining step (2048 tokens each)")
        ax.set_ylabel("validation LM loss")
        ax.set_title(f"Same pruned architecture, same tokens (teacher seed {seed})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "retraining_curves.png", dpi=120)
        plt.close(fig)
        written.append("retraining_curves.png")
    if "entries" in results.get(seed, {}).get("search", {}):
        e = results[seed]["search"]["entries"]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter([x["zero_shot"] for x in e], [x["val_loss"] for x in e])
        ax.set_xlabel("zero-shot val loss")
        ax.set_ylabel(f"val loss after {results['_args']['search_steps']} KD steps")
        ax.set_title(f"Search candidates (teacher seed {seed})")
        fig.tight_layout()
        fig.savefig(out / "search_ranking.png", dpi=120)
        plt.close(fig)
        written.append("search_ranking.png")
    agg = [results[s]["aggregation"] for s in seeds if "aggregation" in results.get(s, {})]
    if agg:
        keys = list(agg[0])
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(keys, [statistics.fmean(a[k] for a in agg) for k in keys])
        ax.set_ylabel("zero-shot val loss (mean over seeds)")
        ax.set_xlabel("(batch, seq) aggregation")
        ax.set_ylim(min(statistics.fmean(a[k] for a in agg) for k in keys) - 0.2, None)
        fig.tight_layout()
        fig.savefig(out / "aggregation.png", dpi=120)
        plt.close(fig)
        written.append("aggregation.png")
    return written


def write_report(out: Path, results: dict, seeds, seconds: float, pngs: list) -> str:
    a = results["_args"]
    lines = [f"# Paper claims at toy scale ({len(seeds)} teacher seed(s): {', '.join(map(str, seeds))})", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; wall time "
             f"{seconds / 60:.1f} min for the runs this invocation made (finished run dirs are reused). "
             f"Retraining N={a['steps']} steps x 2048 tokens, val loss on {a['eval_samples']} samples, "
             f"main target param_budget={a['budget']}, calibration {a['calibration']} samples "
             f"({a['agg_calibration']} per aggregation pair), search K={a['search_steps']}.", "",
             "| claim | paper | ours (mean ± std over seeds) | holds |", "|---|---|---|---|"]
    lines += [f"| {c} | {p} | {o} | {v} |" for c, p, o, v in verdicts(results, seeds)]
    for seed in seeds:
        r = results.get(seed, {})
        if "aggregation" in r:
            lines += ["", f"Aggregation pairs, teacher seed {seed} (zero-shot val loss): " +
                      ", ".join(f"({k}) {v:.4f}" for k, v in sorted(r["aggregation"].items(), key=lambda kv: kv[1]))]
        if "hidden" in r:
            lines += ["", f"Hidden-importance variants, teacher seed {seed} (zero-shot): " +
                      ", ".join(f"({k}) {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in r["hidden"].items())]
    lines += ["", *[f"![{p}]({p})" for p in pngs], "", "Raw numbers: results.json."]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.calibration, args.agg_calibration, args.eval_samples = 32, 16, 16
        args.search_steps = min(args.search_steps, 8)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MINITRON_NO_PROGRESS", "1")
    seeds = [int(s) for s in args.seeds.split(",")]
    claims = [c for c in args.claims.split(",") if c]
    unknown = sorted(set(claims) - set(CLAIMS))
    if unknown:
        raise SystemExit(f"--claims: unknown {unknown}; choose from {list(CLAIMS)}")
    common = ["model=tiny", "data=stdlib", f"evaluate.samples={args.eval_samples}"]
    run = Runner(out, common)
    c = Claims(args, run)
    start = time.time()
    results = {"_args": vars(args)}
    for seed in seeds:
        results[seed], c.seed = {}, seed
        for claim in claims:
            results[seed][claim] = getattr(c, claim)(seed)
            (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    seconds = time.time() - start
    pngs = plots(out, results, seeds)
    print(write_report(out, results, seeds, seconds, pngs), flush=True)
    print(json.dumps({"report": str(out / "report.md"), "seconds": round(seconds, 1),
                      "rows": [dict(zip(("claim", "paper", "ours", "holds"), r)) for r in verdicts(results, seeds)]}))


if __name__ == "__main__":
    main()
