"""Benchmark: KD logit losses, forward + backward, peak memory and time.

    python benchmarks/kd_loss.py --tokens 1024 --vocab 262144 --hidden 4096 --dtype float32

Variants (forward KL, T=1, TP=1 so each rank's slice is the whole vocabulary):
on given logits `[tokens, vocab]` (student with grad, teacher without)
- materialised: ModelOpt's logits KD loss: float32 `log_softmax(student)` and
  `softmax(teacher)` of the whole vocab, `kl_div`, sum over the vocab;
- kl_div: plain `F.kl_div(log_softmax(s), log_softmax(t), log_target=True)`, the
  strongest plain-PyTorch form (no probability targets, so no xlogy pass);
- chunked: ours, `kd_logit_loss` (impl torch on CPU, triton on CUDA);
from final hidden states `[tokens, hidden]` and output weights `[vocab, hidden]`
(the logits are part of the work: both output matmuls, and in backward the
student's d hidden and d weight)
- materialised+matmul: the two output layers, then `materialised` on their logits;
- fused_linear: ours, `fused_linear_kd_loss` (no logits tensor exists whole);
- fused_linear_masked: the same with 10% of the tokens masked out of the loss, the
  mask passed as `token_weights`, as DistillationModel passes its loss mask (those
  tokens then get no gradient work);
- liger: Liger-Kernel's `LigerFusedLinearJSDLoss(beta=0)` (forward KL; pure PyTorch
  chunked loss, `compiled=False`, chunk size = ours), when the package imports
  (`pip install liger-kernel`, 0.8.5 measured; not in requirements/, as it pulls in Triton).

Each variant runs in a fresh subprocess, so one cannot inherit the other's heap:
- CPU memory: the process's peak resident set (Linux VmHWM, reset through
  /proc/self/clear_refs after the inputs exist) minus the resident set just
  before the loss: the loss's own peak, its returned gradients included. torch's
  CPU allocator has no cache and glibc returns large blocks to the OS.
- CUDA memory: torch.cuda.max_memory_allocated minus the allocation before the loss.
- "working" memory is that peak minus the parameter gradient (d weight, `[vocab,
  hidden]`), which every variant with weights returns and which Megatron
  accumulates into its persistent main_grad buffer in any implementation.
- Time: median of --repeats forward+backward passes after the measured first one.
Ratios: fused_linear's working memory over the materialised reference's peak
including its logit inputs (target <= 0.10x), and fused_linear's time over
materialised+matmul's (target <= 1.0x). The human table comes first; the last
stdout line is a one-line JSON summary.
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

LOGIT_VARIANTS = ("materialised", "kl_div", "chunked")
LINEAR_VARIANTS = ("materialised+matmul", "fused_linear", "fused_linear_masked", "liger")
VARIANTS = LOGIT_VARIANTS + LINEAR_VARIANTS
MASKED_FRACTION = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens (b*s) in one micro-batch")
    parser.add_argument("--vocab", type=int, default=262144, help="vocabulary size (TP=1: whole slice)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (student = teacher) of the linear variants")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"],
                        help="the chunked variant's implementation; auto = triton on cuda, torch on cpu")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="tokens per chunk of ours (default: each loss's own) and of liger (default: fused_linear's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset to run")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.impl == "auto":
        args.impl = "triton" if args.device == "cuda" else "torch"
    return args


def liger_chunk_tokens(args) -> int:
    """Liger gets fused_linear's chunks, so that both hold the same [chunk, vocab] buffers."""
    from minitron_megatron.distill.fused_linear import default_chunk_tokens

    return args.chunk_tokens or default_chunk_tokens(args.vocab)


# ------------------------------------------------------------------ the losses


def materialised_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ModelOpt-style KD: float32 log-probs and probs of the whole vocab, materialised."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)  # [tokens, vocab] float32
    p = F.softmax(teacher.float() / temperature, dim=-1)  # [tokens, vocab] float32
    return F.kl_div(log_q, p, reduction="none").sum(-1) * temperature**2


def kl_div_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch with log-probability targets (no xlogy pass)."""
    log_q = F.log_softmax(student.float(), dim=-1)
    log_p = F.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def chunked_loss(student, teacher, args) -> torch.Tensor:
    from minitron_megatron.distill import kd_logit_loss

    return kd_logit_loss(student, teacher, tp_group=None, true_vocab_size=args.vocab,
                         chunk_tokens=args.chunk_tokens, impl=args.impl)


def logit_step(inputs, args):
    """One forward + backward on logits; returns the gradients."""
    student, teacher = inputs
    x = student.detach().requires_grad_()
    fn = {"materialised": materialised_loss, "kl_div": kl_div_loss}.get(args.variant)
    loss = fn(x, teacher) if fn else chunked_loss(x, teacher, args)
    loss.sum().backward()
    return [x.grad]


def linear_step(inputs, args):
    """One forward + backward from hidden states and output weights; returns the gradients."""
    h_s, w_s, h_t, w_t, labels = inputs
    h, w = h_s.detach().requires_grad_(), w_s.detach().requires_grad_()
    weights = _token_weights(h_s.shape[0], h_s.device) if args.variant == "fused_linear_masked" else None
    if args.variant == "materialised+matmul":
        with torch.no_grad():
            teacher_logits = h_t @ w_t.t()  # [tokens, vocab]
        loss = materialised_loss(h @ w.t(), teacher_logits).sum()
    elif args.variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=False,
                                        chunk_size=liger_chunk_tokens(args))
        loss = liger(h, w, h_t, w_t, labels)
    else:
        from minitron_megatron.distill.fused_linear import fused_linear_kd_loss

        kd, _ = fused_linear_kd_loss(h, w, h_t, w_t, tp_group=None, true_vocab_size=args.vocab,
                                     chunk_tokens=args.chunk_tokens, token_weights=weights)
        loss = kd.sum() if weights is None else (kd * weights).sum()
    loss.backward()
    return [h.grad, w.grad]


def _token_weights(n: int, device) -> torch.Tensor:
    """A loss mask with MASKED_FRACTION of the tokens off."""
    weights = torch.ones(n, device=device)
    weights[torch.randperm(n, generator=torch.Generator().manual_seed(7))[: int(n * MASKED_FRACTION)]] = 0
    return weights


# ------------------------------------------------------------------ measurement (child)


def random_tensor(shape, args, scale: float, seed: int) -> torch.Tensor:
    """Random values built a block of rows at a time, so no full float32 copy ever exists."""
    gen = torch.Generator(device=args.device).manual_seed(seed)
    out = torch.empty(*shape, dtype=getattr(torch, args.dtype), device=args.device)
    for i in range(0, shape[0], 1024):
        block = out[i : i + 1024]
        block.copy_(torch.randn(block.shape, generator=gen, device=args.device) * scale)
    return out


def make_inputs(args):
    if args.variant in LOGIT_VARIANTS:
        return [random_tensor((args.tokens, args.vocab), args, 2.0, 0),
                random_tensor((args.tokens, args.vocab), args, 3.0, 1)]
    # Logit std ~2 (student) and ~3 (teacher), as for the logit variants.
    h_s = random_tensor((args.tokens, args.hidden), args, 1.0, 2)
    h_t = random_tensor((args.tokens, args.hidden), args, 1.0, 3)
    w_s = random_tensor((args.vocab, args.hidden), args, 2.0 / args.hidden**0.5, 4)
    w_t = random_tensor((args.vocab, args.hidden), args, 3.0 / args.hidden**0.5, 5)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=args.device)
    return [h_s, w_s, h_t, w_t, labels]


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
        return {"peak_bytes": torch.cuda.max_memory_allocated() - before, "result": result}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS") * 1024
    result = fn()
    return {"peak_bytes": _status_kib("VmHWM") * 1024 - before, "result": result}


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
    """Child process: build inputs, measure one pass's memory and time, then time more passes."""
    inputs = make_inputs(args)
    step = logit_step if args.variant in LOGIT_VARIANTS else linear_step
    start = time.perf_counter()
    mem = measure_peak(lambda: step(inputs, args), args.device)
    first = time.perf_counter() - start
    grads = mem.pop("result")
    checksum = grads[0].float().abs().sum().item()
    param_grad = grads[1].numel() * grads[1].element_size() if len(grads) > 1 else 0
    del grads
    seconds = timed(lambda: step(inputs, args), args.device, args.repeats) if args.repeats else first
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    return {"variant": args.variant, **mem, "param_grad_bytes": param_grad, "input_bytes": input_bytes,
            "seconds": seconds, "first_seconds": first, "grad_abs_sum": checksum}


# ------------------------------------------------------------------ driver (parent)


def spawn(variant: str, argv) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variant", variant]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_repo_root(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"variant": variant, "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _ratio(a: dict, b: dict, fn) -> float:
    if not a or not b or "error" in a or "error" in b:
        return float("nan")
    return round(fn(a) / fn(b), 3)


def report(args, res: dict) -> dict:
    """Print the table; return the JSON summary."""
    print(f"KD loss fwd+bwd (forward KL, T=1), {args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden} "
          f"(linear variants), {args.dtype}, {args.device}, chunk tokens {args.chunk_tokens or 'default'} "
          f"(fused_linear and liger: {liger_chunk_tokens(args)}), chunked impl={args.impl}")
    head = ("variant", "inputs GiB", "peak over inputs", "param grad", "working", "peak incl. inputs", "time s")
    print(f"{head[0]:<22}" + "".join(f"{h:>18}" for h in head[1:]))
    for name in (v for v in VARIANTS if v in res):
        r = res[name]
        if "error" in r:
            print(f"{name:<22}  did not run: {r['error']}")
            continue
        working = r["peak_bytes"] - r["param_grad_bytes"]
        cols = (_gib(r["input_bytes"]), _gib(r["peak_bytes"]), _gib(r["param_grad_bytes"]), _gib(working),
                _gib(r["peak_bytes"] + r["input_bytes"]), f"{r['seconds']:.2f}")
        print(f"{name:<22}" + "".join(f"{c:>18}" for c in cols))
    ref, mm, fused = res.get("materialised"), res.get("materialised+matmul"), res.get("fused_linear")
    summary = {
        "device": args.device, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
        "dtype": args.dtype, "chunk_tokens": args.chunk_tokens, "threads": torch.get_num_threads(),
        "fused_working_over_materialised_incl_inputs": _ratio(
            fused, ref, lambda r: r["peak_bytes"] - r["param_grad_bytes"] + (r["input_bytes"] if r is ref else 0)),
        "fused_time_over_materialised_matmul": _ratio(fused, mm, lambda r: r["seconds"]),
        "chunked_peak_over_materialised": _ratio(res.get("chunked"), ref, lambda r: r["peak_bytes"]),
        "chunked_time_over_materialised": _ratio(res.get("chunked"), ref, lambda r: r["seconds"]),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU times
        "results": res,
    }
    print(f"fused_linear working memory / materialised peak incl. its logit inputs: "
          f"{summary['fused_working_over_materialised_incl_inputs']}x (target <= 0.10x)")
    print(f"fused_linear time / materialised+matmul time: {summary['fused_time_over_materialised_matmul']}x "
          f"(target <= 1.0x)")
    print(f"chunked / materialised: peak {summary['chunked_peak_over_materialised']}x, "
          f"time {summary['chunked_time_over_materialised']}x")
    print(f"threads {torch.get_num_threads()}, 1-minute load average {summary['load_avg_1m']}")
    return summary


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, _repo_root())  # the parent reads fused_linear's default chunk too
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    chosen = [v for v in args.variants.split(",") if v]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    results = {}
    for variant in chosen:
        results[variant] = spawn(variant, argv)
        print(f"  {variant}: {json.dumps(results[variant])}", file=sys.stderr, flush=True)
    print(json.dumps(report(args, results)))


if __name__ == "__main__":
    main()
