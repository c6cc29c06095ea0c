"""Benchmark: our vocab-parallel KD loss vs a float32-materialising reference, forward + backward.

    python benchmarks/kd_loss.py --tokens 1024 --vocab 262144 --dtype bfloat16

The reference is how ModelOpt's logits KD loss computes it: float32
`log_softmax(student)`, `softmax(teacher)` over the full vocabulary, `kl_div`,
sum over the vocab, autograd backward. Ours is `kd_logit_loss` (TP=1 here, so
the same full vocabulary), forward KL, T=1.

Each variant runs in a fresh subprocess, so one cannot inherit the other's heap:
- CPU memory: the process's peak resident set (Linux VmHWM, reset through
  /proc/self/clear_refs after the inputs exist) minus the resident set just
  before the loss. torch's CPU allocator has no cache and glibc returns large
  blocks to the OS, so this is the loss's own peak working memory, the returned
  gradient included (both variants return the same gradient tensor).
- CUDA memory: torch.cuda.max_memory_allocated minus the allocation before the loss.
- Time: median of --repeats forward+backward passes after the measured first one.
Ratios are ours/reference; the target is memory <= 0.25x and time <= 1.0x. The
human table comes first; the last stdout line is a one-line JSON summary.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VARIANTS = ("reference", "ours")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens (b*s) in one micro-batch")
    parser.add_argument("--vocab", type=int, default=262144, help="vocabulary size (TP=1: whole slice)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"],
                        help="our implementation; auto = triton on cuda, torch on cpu")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="ours: tokens per chunk (default: auto)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes per variant")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.impl == "auto":
        args.impl = "triton" if args.device == "cuda" else "torch"
    return args


# ------------------------------------------------------------------ the two losses


def reference_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ModelOpt-style KD: float32 log-probs and probs of the whole vocab, materialised."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)  # [tokens, vocab] float32
    p = F.softmax(teacher.float() / temperature, dim=-1)  # [tokens, vocab] float32
    return F.kl_div(log_q, p, reduction="none").sum(-1) * temperature**2


def our_loss(student, teacher, args) -> torch.Tensor:
    from minitron_megatron.distill import kd_logit_loss

    return kd_logit_loss(
        student, teacher, tp_group=None, true_vocab_size=args.vocab,
        chunk_tokens=args.chunk_tokens, impl=args.impl,
    )


def step(student, teacher, args) -> torch.Tensor:
    """One forward + backward; returns the student gradient."""
    x = student.detach().requires_grad_()
    loss = reference_loss(x, teacher) if args.variant == "reference" else our_loss(x, teacher, args)
    loss.sum().backward()
    return x.grad


# ------------------------------------------------------------------ measurement (child)


def make_logits(args, scale: float, seed: int) -> torch.Tensor:
    """Random logits built a block of rows at a time, so no full float32 copy ever exists."""
    gen = torch.Generator(device=args.device).manual_seed(seed)
    out = torch.empty(args.tokens, args.vocab, dtype=getattr(torch, args.dtype), device=args.device)
    for i in range(0, args.tokens, 16):
        block = out[i : i + 16]
        block.copy_(torch.randn(block.shape, generator=gen, device=args.device) * scale)
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(fn, device: str) -> dict:
    """Peak memory of fn() above what is allocated before it, in bytes."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - before, "base_bytes": before, "result": result}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS") * 1024
    result = fn()
    return {"peak_bytes": _status_kib("VmHWM") * 1024 - before, "base_bytes": before, "result": result}


def timed(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_variant(args) -> dict:
    """Child process: build inputs, measure one pass's memory, then time passes."""
    student, teacher = make_logits(args, 2.0, 0), make_logits(args, 3.0, 1)
    mem = measure_peak(lambda: step(student, teacher, args), args.device)
    checksum = mem.pop("result").float().abs().sum().item()
    seconds = timed(lambda: step(student, teacher, args), args.device, args.repeats)
    return {"variant": args.variant, **mem, "seconds": seconds, "grad_abs_sum": checksum}


# ------------------------------------------------------------------ driver (parent)


def spawn(variant: str, argv) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variant", variant]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_repo_root(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(args, res: dict) -> dict:
    ref, ours = res["reference"], res["ours"]
    input_bytes = 2 * args.tokens * args.vocab * torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    summary = {
        "device": args.device, "impl": args.impl, "tokens": args.tokens, "vocab": args.vocab,
        "dtype": args.dtype, "chunk_tokens": args.chunk_tokens,
        "ours_peak_gib": round(ours["peak_bytes"] / 2**30, 3),
        "reference_peak_gib": round(ref["peak_bytes"] / 2**30, 3),
        "ours_s": round(ours["seconds"], 3), "reference_s": round(ref["seconds"], 3),
        "memory_ratio": round(ours["peak_bytes"] / ref["peak_bytes"], 3),
        "memory_ratio_with_inputs": round(
            (ours["peak_bytes"] + input_bytes) / (ref["peak_bytes"] + input_bytes), 3),
        "time_ratio": round(ours["seconds"] / ref["seconds"], 3),
        "grad_checksum_rel_diff": abs(ours["grad_abs_sum"] - ref["grad_abs_sum"]) / ref["grad_abs_sum"],
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU times
    }
    print(f"KD loss fwd+bwd, {args.tokens} tokens x vocab {args.vocab}, {args.dtype}, {args.device}, "
          f"ours impl={args.impl}; inputs (student+teacher) {_gib(input_bytes)}")
    print(f"{'variant':<12}{'peak over inputs':>18}{'peak incl. inputs':>19}{'time (median)':>15}")
    for name, r in (("reference", ref), ("ours", ours)):
        print(f"{name:<12}{_gib(r['peak_bytes']):>18}{_gib(r['peak_bytes'] + input_bytes):>19}{r['seconds']:>14.3f}s")
    print(f"{'ours/ref':<12}{summary['memory_ratio']:>17.3f}x{summary['memory_ratio_with_inputs']:>18.3f}x"
          f"{summary['time_ratio']:>14.3f}x   (targets: memory <= 0.25x, time <= 1.0x)")
    print(f"threads {torch.get_num_threads()}, 1-minute load average {summary['load_avg_1m']}")
    return summary


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {v: spawn(v, argv) for v in VARIANTS}
    print(json.dumps(report(args, results)))


if __name__ == "__main__":
    main()
