"""Trimming time and peak memory (RSS) per rank, against one checkpoint load of the same model.

    python benchmarks/trim_memory.py                      # ~0.5B params at TP=2 (minutes on 2 cores)
    python benchmarks/trim_memory.py --layers 16 --hidden 2048 --ffn 5632   # ~1B params

Runs itself under torchrun (TP x PP processes, gloo, CPU). Two launches: `create` writes
a random-weight dist checkpoint (cached in --workdir), then `measure`, in fresh processes,
times each phase and reads the peak RSS of each (VmHWM, reset between phases through
/proc/self/clear_refs):
  load   build the model (no init) + load the checkpoint: what any command pays;
  trim   random-score plan + `apply_plan` (all width axes and some layers);
  save   dist-checkpoint the pruned model.
The last stdout line is a JSON summary (per phase: seconds, peak RSS GiB = max over ranks).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--keep", type=float, default=0.75, help="fraction of hidden/ffn/heads (per group) kept")
    p.add_argument("--drop-layers", type=int, default=4)
    p.add_argument("--workdir", default="/tmp/minitron_trim_bench")
    p.add_argument("--phase", choices=["create", "measure"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_config(a):
    from minitron_megatron.config.model import ModelConfig

    return ModelConfig(name="bench", num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=a.ffn,
                       num_attention_heads=a.heads, num_query_groups=a.groups, kv_channels=a.hidden // a.heads,
                       max_position_embeddings=256, vocab_size=a.vocab)


def _mem_gib(field: str) -> float:
    kib = int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    return kib / 2 ** 20


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _phase(name, results, fn):
    import gc

    gc.collect()
    _reset_peak()
    start_rss, start = _mem_gib("VmRSS"), time.time()
    out = fn()
    results[name] = {"seconds": time.time() - start, "peak_rss_gib": _mem_gib("VmHWM"),
                     "start_rss_gib": start_rss, "end_rss_gib": _mem_gib("VmRSS")}
    return out


def create(a, ctx, ckpt_dir: Path) -> None:
    """Random weights drawn shard-locally (CPU init would draw every full weight per rank)."""
    import torch

    from minitron_megatron.checkpoint.dist import save_checkpoint
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import padded_vocab_size
    from minitron_megatron.model import build_gpt_model

    cfg = model_config(a)
    model = build_gpt_model(cfg, ctx, ParallelConfig(tp=a.tp, pp=a.pp), padded_vocab_size(a.vocab, 128, a.tp), init="none")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    save_checkpoint(ckpt_dir, 1, model, ctx)


def measure(a, ctx, ckpt_dir: Path) -> dict:
    from minitron_megatron.checkpoint.dist import load_checkpoint, save_checkpoint
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import count_model_parameters, padded_vocab_size
    from minitron_megatron.model import build_gpt_model
    from minitron_megatron.trim import apply_plan, plan_from_scores, random_scores, validate_target

    cfg, parallel = model_config(a), ParallelConfig(tp=a.tp, pp=a.pp)
    padded = padded_vocab_size(a.vocab, 128, a.tp)
    results = {"baseline_rss_gib": _mem_gib("VmRSS")}

    def load():
        model = build_gpt_model(cfg, ctx, parallel, padded, init="none")
        load_checkpoint(ckpt_dir, model, ctx)
        return model

    model = _phase("load", results, load)
    results["params_before"] = count_model_parameters(model, ctx)
    target = _target(a, cfg)
    new_cfg = validate_target(cfg, target, a.tp, a.pp, padded_vocab=padded)
    plan = plan_from_scores(cfg, new_cfg, random_scores(cfg, seed=0), depth_metric="block_importance")
    holder = [model]
    del model

    result = _phase("trim", results, lambda: apply_plan(holder.pop(), plan, cfg, ctx, parallel, padded))
    results["params_after"] = count_model_parameters(result.model, ctx)
    _phase("save", results, lambda: save_checkpoint(ckpt_dir.parent / "pruned", 0, result.model, ctx))
    return results


def _target(a, cfg):
    from minitron_megatron.config.prune import TrimTarget

    def keep(n, multiple):
        return max(multiple, int(n * a.keep) // multiple * multiple)

    per_group = a.heads // a.groups
    return TrimTarget(hidden_size=keep(a.hidden, 64), ffn_hidden_size=keep(a.ffn, 64 * a.tp),
                      num_attention_heads=a.groups * keep(per_group, 1) if per_group > 1 else None,
                      num_layers=a.layers - a.drop_layers if a.drop_layers else None)


def worker(a) -> None:
    from minitron_megatron.runtime import init_runtime

    ctx = init_runtime(tp=a.tp, pp=a.pp, device="cpu", seed=0)
    ckpt_dir = Path(a.workdir) / _signature(a) / "checkpoint"
    if a.phase == "create":
        create(a, ctx, ckpt_dir)
        return
    results = measure(a, ctx, ckpt_dir)
    (Path(a.workdir) / _signature(a) / f"rank{ctx.rank}.json").write_text(json.dumps(results))


def _signature(a) -> str:
    return f"L{a.layers}_h{a.hidden}_f{a.ffn}_a{a.heads}_g{a.groups}_v{a.vocab}_tp{a.tp}_pp{a.pp}"


def _launch(a, phase: str) -> None:
    args = [x for x in sys.argv[1:] if not x.startswith("--phase")] + [f"--phase={phase}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={a.tp * a.pp}",
           f"--master-port={_free_port()}", str(Path(__file__).resolve()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(a) -> dict:
    run = Path(a.workdir) / _signature(a)
    ranks = [json.loads(p.read_text()) for p in sorted(run.glob("rank*.json"))]
    out = {"model": _signature(a), "params_before": ranks[0]["params_before"], "params_after": ranks[0]["params_after"]}
    for phase in ("load", "trim", "save"):
        out[phase] = {"seconds": round(max(r[phase]["seconds"] for r in ranks), 2),
                      "peak_rss_gib": round(max(r[phase]["peak_rss_gib"] for r in ranks), 3),
                      "peak_over_start_gib": round(max(r[phase]["peak_rss_gib"] - r[phase]["start_rss_gib"]
                                                       for r in ranks), 3)}
    out["baseline_rss_gib"] = round(max(r["baseline_rss_gib"] for r in ranks), 3)
    out["trim_over_load_peak"] = round(out["trim"]["peak_rss_gib"] / out["load"]["peak_rss_gib"], 2)
    out["trim_over_load_seconds"] = round(out["trim"]["seconds"] / out["load"]["seconds"], 2)
    return out


def main() -> None:
    a = parse_args()
    if a.phase is not None:
        worker(a)
        return
    run = Path(a.workdir) / _signature(a)
    if not (run / "checkpoint" / "latest_checkpointed_iteration.txt").is_file():
        _launch(a, "create")
    for stale in run.glob("rank*.json"):
        stale.unlink()
    _launch(a, "measure")
    out = report(a)
    print(f"{'phase':<6} {'seconds':>8} {'peak RSS GiB':>13} {'peak - start':>13}   (max over {a.tp * a.pp} ranks)")
    for phase in ("load", "trim", "save"):
        r = out[phase]
        print(f"{phase:<6} {r['seconds']:>8.2f} {r['peak_rss_gib']:>13.3f} {r['peak_over_start_gib']:>13.3f}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
