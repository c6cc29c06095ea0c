"""Cost of the importance hooks: the calibration pass with hooks over the same pass without.

    python benchmarks/importance_overhead.py [--samples 64] [--repeats 5] [--model tiny] [--device cpu]

Both passes run in this process on the same model and batches, alternating, so load
from other processes affects both alike. On CPU the clock is this process's CPU time
(wall time on a shared machine swings 3x with other users' load); on GPU wall time
after a synchronize. The ratio compares the fastest pass of each kind (the one least
disturbed), and the medians are printed alongside. Passes
go through Megatron's forward-only schedule exactly as `estimate_importance` runs
them. The last stdout line is JSON: {"ratio": ..., "ratio_width_only": ..., ...}.
Target: ratio <= 1.10.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--model", default="tiny", help="a preset in conf/model/")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: spinning OpenMP threads on a shared machine blur CPU time)")
    parser.add_argument("--seq-agg", default="mean")
    parser.add_argument("--batch-agg", default="l2")
    return parser.parse_args()


def _model_config(preset: str, vocab_size: int):
    import yaml

    from minitron_megatron.config.model import ModelConfig

    path = Path(__file__).resolve().parents[1] / "conf" / "model" / f"{preset}.yaml"
    body = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "defaults"}
    body["vocab_size"] = vocab_size
    return ModelConfig(**body)


def _batches(cfg, samples: int, mbs: int, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(samples // mbs):
        tokens = torch.randint(0, cfg.vocab_size, (mbs, cfg.max_position_embeddings), generator=gen)
        positions = torch.arange(cfg.max_position_embeddings).expand(mbs, -1).clone()
        out.append({"tokens": tokens, "position_ids": positions})
    return out


def _timed(fn, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    args = _args()
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.importance.calibration import calibration_pass
    from minitron_megatron.importance.collector import ImportanceCollector
    from minitron_megatron.importance.reduce import reduce_statistics
    from minitron_megatron.model import build_gpt_model, padded_vocab_size
    from minitron_megatron.model.probes import find_probes
    from minitron_megatron.runtime import init_runtime

    import torch

    torch.set_num_threads(args.threads)
    ctx = init_runtime(tp=1, pp=1, device=args.device, seed=1234)
    cfg = _model_config(args.model, args.vocab_size).resolved()
    model = build_gpt_model(cfg, ctx, ParallelConfig(), padded_vocab_size(cfg.vocab_size, 128, 1))
    probes = find_probes([model])
    batches = _batches(cfg, args.samples, args.micro_batch_size, ctx.device)
    seq = cfg.max_position_embeddings  # samples as long as the model allows

    def plain():
        calibration_pass([model], batches, ctx, args.micro_batch_size, seq)

    def hooked(block_importance: bool):
        def run():
            with ImportanceCollector(probes, args.seq_agg, ctx, block_importance=block_importance) as col:
                calibration_pass([model], batches, ctx, args.micro_batch_size, seq, col.end_microbatch)
            reduce_statistics(col, args.batch_agg, ctx)

        return run

    runs = {"plain": plain, "hooks": hooked(True), "hooks_width_only": hooked(False)}
    for fn in runs.values():  # warm-up
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(_timed(fn, ctx.device))
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:18s} min {best[name]:.3f}s  median {median[name]:.3f}s  runs {[round(x, 3) for x in t]}")
    summary = {
        "ratio": best["hooks"] / best["plain"],
        "ratio_width_only": best["hooks_width_only"] / best["plain"],
        "ratio_of_medians": median["hooks"] / median["plain"],
        "seconds_plain": best["plain"],
        "seconds_hooks": best["hooks"],
        "clock": "wall" if ctx.device.type == "cuda" else "process_cpu",
        "samples": args.samples,
        "tokens": args.samples * cfg.max_position_embeddings,
        "model": args.model,
        "device": str(ctx.device),
        "aggregation": f"seq={args.seq_agg},batch={args.batch_agg}",
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
