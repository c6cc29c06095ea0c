"""One distillation step against its parts, measured side by side in one run.

    python benchmarks/kd_step.py                      # TP1/PP1, TP2/PP1, TP1/PP2 on this machine
    python benchmarks/kd_step.py --configs 1x1,2x2 --hidden 4096 --layers 8 --vocab 128256   # a GPU node
    python benchmarks/kd_step.py --check              # parse the arguments, print the plan, exit

For each TPxPP configuration, one `torchrun` of `tp*pp` ranks builds a random teacher
(Megatron's GPTModel, `--hidden`/`--ffn`/`--layers`) and a student of half its width,
then times, interleaved over `--repeats` rounds after a warm-up (medians):

  teacher   the teacher's forward alone over the global batch (forward-only schedule)
  student   the student's training step alone: forward + backward + optimizer step
            (Megatron's schedule, DDP, optimizer), on its own copy of the student
  kd        the distillation step: `distill_train_step` on a DistillationModel of the same
            teacher and student (teacher forward, student forward + backward, the KD loss
            (`--kd-impl`, default fused_linear), optimizer step)

and prints kd / (teacher + student): the overhead of distilling over running the two
parts alone (1.00 = none; Megatron-LM documents KD iterations up to 40% slower than the
student alone, i.e. its floor is the sum). Memory: on CUDA the peak allocated during each
part above what was allocated before it; on CPU the peak RSS above the RSS before it
(sampled every millisecond; the workers fix glibc's mmap threshold so that freed tensors leave the
RSS), so the resident weights of all three models are not counted.
The last stdout line is a JSON summary.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("teacher", "student", "kd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="1x1,2x1,1x2", help="comma-separated TPxPP")
    p.add_argument("--hidden", type=int, default=1024, help="teacher hidden size (student: half)")
    p.add_argument("--ffn", type=int, default=None, help="teacher ffn size (default 3.5 x hidden; student: half)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4, help="microbatches per global batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kd-impl", default="fused_linear")
    p.add_argument("--dtype", default="float32", help="params_dtype of both models (bfloat16 on a GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--check", action="store_true", help="parse the arguments, print the plan, exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # TPxPP of this torchrun
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def configs(text: str):
    out = []
    for item in text.split(","):
        tp, pp = (int(x) for x in item.lower().split("x"))
        out.append((tp, pp))
    return out


# --------------------------------------------------------------------------- worker


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self._stop = self._rss(), threading.Event()
            self._max = self.base

            def sample():
                while not self._stop.is_set():
                    self._max = max(self._max, self._rss())
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self.base


def model_configs(args):
    from minitron_megatron.config.model import ModelConfig

    ffn = args.ffn or int(3.5 * args.hidden) // 128 * 128
    teacher = ModelConfig(name="kd-step-teacher", num_layers=args.layers, hidden_size=args.hidden,
                          ffn_hidden_size=ffn, num_attention_heads=args.heads, num_query_groups=args.groups,
                          kv_channels=args.hidden // args.heads,
                          max_position_embeddings=args.seq, vocab_size=args.vocab,
                          params_dtype=args.dtype)
    # Half the width, the teacher's heads and head size: what a width prune to ~0.4x gives.
    student = ModelConfig(**{**teacher.__dict__, "name": "kd-step-student", "hidden_size": args.hidden // 2,
                             "ffn_hidden_size": ffn // 2})
    return teacher, student


def microbatches(args, ctx, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(args.microbatches):
        tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq + 1), generator=g)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": torch.ones(args.micro_batch, args.seq),
                    "position_ids": torch.arange(args.seq).expand(args.micro_batch, -1).contiguous()})
    return out


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from minitron_megatron.config.distill import DistillConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.config.train import OptimConfig
    from minitron_megatron.distill.model import DistillationModel
    from minitron_megatron.distill.objective import DistillLoss
    from minitron_megatron.distill.step import distill_train_step
    from minitron_megatron.model.build import build_gpt_model, padded_vocab_size
    from minitron_megatron.runtime.distributed import destroy_runtime, init_runtime
    from minitron_megatron.train.optimizer import build_optimizer, wrap_ddp
    from minitron_megatron.train.step import lm_forward_step, run_schedule, train_step

    tp, pp = configs(args.worker)[0]
    ctx = init_runtime(tp=tp, pp=pp, device=args.device, seed=1234)
    parallel = ParallelConfig(tp=tp, pp=pp)
    t_cfg, s_cfg = model_configs(args)
    vocab = padded_vocab_size(args.vocab, 128, tp)
    teacher = build_gpt_model(t_cfg, ctx, parallel, vocab)
    settings = DistillConfig(kd_impl=args.kd_impl)
    kd_model = DistillationModel(build_gpt_model(s_cfg, ctx, parallel, vocab), teacher, settings,
                                 true_vocab_size=args.vocab, tp_group=ctx.tp_group, pp_size=ctx.pp_size)
    student = build_gpt_model(s_cfg, ctx, parallel, vocab)  # the student-alone part's own copy
    gbs = args.micro_batch * args.microbatches * ctx.dp_size
    kd_ddp, s_ddp = wrap_ddp(kd_model, kd_model.config), wrap_ddp(student, student.config)
    optim = OptimConfig(warmup_steps=0)
    kd_opt, kd_sched = build_optimizer([kd_ddp], optim, kd_model.config, 1000, global_batch_size=gbs)
    s_opt, s_sched = build_optimizer([s_ddp], optim, student.config, 1000, global_batch_size=gbs)
    loss = DistillLoss(settings, has_state_loss=False)
    data = microbatches(args, ctx, seed=ctx.dp_rank)
    nmb, mbs, seq = args.microbatches, args.micro_batch, args.seq

    def teacher_forward():
        with torch.no_grad():
            run_schedule(lm_forward_step(ctx.device), iter(data), [teacher], nmb, mbs, seq, forward_only=True)

    parts = {
        "teacher": teacher_forward,
        "student": lambda: train_step([s_ddp], s_opt, s_sched, iter(data), ctx, nmb, mbs, seq),
        "kd": lambda: distill_train_step([kd_ddp], kd_opt, kd_sched, iter(data), ctx, nmb, mbs, seq, loss),
    }

    def sync():
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    times = {name: [] for name in PARTS}
    peaks = {name: 0 for name in PARTS}
    for round_ in range(args.repeats + 1):  # round 0 warms up (allocator, optimizer state)
        for name in PARTS:
            sync()
            with PeakMemory(ctx.device) as mem:
                start = time.perf_counter()
                parts[name]()
                sync()
                elapsed = time.perf_counter() - start
            if round_ > 0:
                times[name].append(elapsed)
                peaks[name] = max(peaks[name], mem.peak)
    result = gather_result(times, peaks, ctx)
    if result is not None:
        Path(args.out).write_text(json.dumps(result))
    destroy_runtime()


def gather_result(times: dict, peaks: dict, ctx):
    """Rank 0's result (median seconds and every rank's largest peak per part: the stage that
    holds the most); None on the other ranks. The peaks travel on the run's device: on CUDA
    the default group is NCCL, which refuses a CPU tensor (tests/test_gpu_check.py)."""
    import torch
    import torch.distributed as dist

    peak_t = torch.tensor([peaks[n] for n in PARTS], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
    if ctx.rank != 0:
        return None
    return {name: {"seconds": sorted(ts)[len(ts) // 2], "all_seconds": ts, "peak_bytes": int(p)}
            for (name, ts), p in zip(times.items(), peak_t.tolist())}


# --------------------------------------------------------------------------- driver


def launch(args, tp: int, pp: int, out: Path) -> dict:
    argv = [a for a in sys.argv[1:] if a != "--check"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp * pp}",
           __file__, *argv, "--worker", f"{tp}x{pp}", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // (tp * pp)))),
           # A fixed mmap threshold: glibc then returns every freed tensor to the OS at once, so
           # the sampled RSS follows the live tensors (its default threshold adapts upwards and
           # keeps freed blocks, and a part would reuse the previous part's pages unseen).
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"TP{tp} PP{pp} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    plan = configs(args.configs)
    t_cfg, s_cfg = None, None
    if args.check:
        print(f"would run {len(plan)} torchrun(s): " + ", ".join(f"TP{tp} PP{pp} ({tp * pp} ranks)" for tp, pp in plan))
        print(json.dumps({"check": True, "configs": [f"{tp}x{pp}" for tp, pp in plan]}))
        return
    sys.path.insert(0, str(ROOT))
    from minitron_megatron.model.params import parameter_count

    t_cfg, s_cfg = model_configs(args)
    print(f"teacher {parameter_count(t_cfg, args.vocab):,} params, student {parameter_count(s_cfg, args.vocab):,}; "
          f"global batch {args.micro_batch * args.microbatches} x {args.seq} tokens per DP rank, "
          f"{args.dtype}, kd_impl={args.kd_impl}", flush=True)
    rows, summary = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for tp, pp in plan:
            r = launch(args, tp, pp, Path(tmp) / f"{tp}x{pp}.json")
            parts_sum = r["teacher"]["seconds"] + r["student"]["seconds"]
            ratio = r["kd"]["seconds"] / parts_sum
            summary[f"tp{tp}_pp{pp}"] = {**r, "kd_over_sum": ratio}
            mib = {n: r[n]["peak_bytes"] / 2 ** 20 for n in PARTS}
            rows.append(f"| TP{tp} PP{pp} | {r['teacher']['seconds']:.3f} | {r['student']['seconds']:.3f} | "
                        f"{r['kd']['seconds']:.3f} | **{ratio:.3f}x** | {mib['teacher']:.0f} | "
                        f"{mib['student']:.0f} | {mib['kd']:.0f} |")
            print(rows[-1], flush=True)
    print("| config | teacher fwd s | student step s | KD step s | KD / (teacher + student) | "
          "peak MiB teacher | student | KD |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
