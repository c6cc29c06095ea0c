"""GPU measurements, side by side in one run (run by benchmarks/gpu_check.sh; needs one CUDA GPU).

    python benchmarks/gpu_bench.py [--tokens 8192] [--vocab 131072] [--hidden 4096]

Prints, each against its baseline measured in the same process:
  copy          device-to-device copy bandwidth (the ceiling for memory-bound kernels);
  kd_triton     the Triton KD kernel's forward+backward on bf16 [tokens, vocab] logits, as
                effective bandwidth (bytes it must move / time) and as a fraction of the copy's;
  fused_linear  the fused-linear KD loss forward+backward (both output matmuls included) vs
                materialised logits + float32 log-softmaxes + KL (what ModelOpt's loss does),
                time and peak memory, and its effective bandwidth over the weights and hidden states;
  fp8_gemm      BF16 vs FP8 (`model/fp8.py`) forward GEMMs at Llama-3.1-8B's layer shapes.
The last stdout line is a JSON summary. `--check` only parses arguments and exits.
"""

import argparse
import json
import sys
import time

LLAMA8B_LINEARS = {"qkv": (6144, 4096), "proj": (4096, 4096), "fc1": (28672, 4096), "fc2": (4096, 14336)}
"""(out, in) of Llama-3.1-8B's linears at TP=1 (GQA 32 heads / 8 groups, SwiGLU ffn 14336)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--check", action="store_true", help="parse the arguments and exit")
    return p.parse_args(argv)


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up, synchronised."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_gib(fn) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), repeats) / 1e9  # read + write, GB/s


def kd_triton(a, repeats: int) -> dict:
    import torch

    from minitron_megatron.distill.losses import kd_logit_loss

    s = torch.randn(a.tokens, a.vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(a.tokens, a.vocab, device="cuda", dtype=torch.bfloat16)

    def step():
        s.grad = None
        kd_logit_loss(s, t, tp_group=None, true_vocab_size=a.vocab, impl="triton").sum().backward()

    seconds = timed(step, repeats)
    moved = 5 * a.tokens * a.vocab * 2  # forward reads s, t; backward reads s, t, writes grad (bf16)
    return {"seconds": seconds, "effective_gb_s": moved / seconds / 1e9}


def fused_vs_materialised(a, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from minitron_megatron.distill.fused_linear import fused_linear_kd_loss

    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    h_s = torch.randn(a.tokens, a.hidden, **bf16, requires_grad=True)
    w_s = (torch.randn(a.vocab, a.hidden, **bf16) * 0.02).requires_grad_()
    h_t, w_t = torch.randn(a.tokens, a.hidden, **bf16), torch.randn(a.vocab, a.hidden, **bf16) * 0.02

    def fused():
        h_s.grad = w_s.grad = None
        kd, _ = fused_linear_kd_loss(h_s, w_s, h_t, w_t, tp_group=None, true_vocab_size=a.vocab)
        kd.sum().backward()

    def materialised():
        h_s.grad = w_s.grad = None
        log_p_s = F.log_softmax((h_s @ w_s.t()).float(), dim=-1)
        with torch.no_grad():
            p_t = F.softmax((h_t @ w_t.t()).float(), dim=-1)
        (p_t * (torch.log(p_t.clamp_min(1e-30)) - log_p_s)).sum().backward()

    out = {}
    for name, fn in (("materialised", materialised), ("fused_linear", fused)):
        out[name] = {"seconds": timed(fn, repeats), "peak_gib": peak_gib(fn)}
    weights_and_hidden = 2 * (2 * a.vocab * a.hidden + 2 * a.tokens * a.hidden)  # bf16 bytes read once
    out["fused_linear"]["effective_gb_s"] = weights_and_hidden / out["fused_linear"]["seconds"] / 1e9
    out["fused_linear"]["tflop_s"] = 8 * a.tokens * a.vocab * a.hidden / out["fused_linear"]["seconds"] / 1e12
    return out


def fp8_gemms(a, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from minitron_megatron.model.fp8 import Fp8Gemm

    out = {}
    for name, (n_out, n_in) in LLAMA8B_LINEARS.items():
        x = torch.randn(a.tokens, n_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * 0.02
        gemm = Fp8Gemm(w)
        bf16_s = timed(lambda: F.linear(x, w), repeats)
        fp8_s = timed(lambda: gemm(x), repeats)
        out[name] = {"bf16_ms": 1e3 * bf16_s, "fp8_ms": 1e3 * fp8_s, "fp8_over_bf16": fp8_s / bf16_s}
    return out


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.check:
        print(json.dumps({"check": "ok", **vars(a)}))
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: gpu_bench.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    copy = copy_bandwidth(a.tokens * a.vocab * 2, a.repeats)
    print(f"copy: {copy:.0f} GB/s", flush=True)
    kd = kd_triton(a, a.repeats)
    print(f"kd_triton: {kd['seconds'] * 1e3:.2f} ms, {kd['effective_gb_s']:.0f} GB/s = "
          f"{kd['effective_gb_s'] / copy:.2f}x copy", flush=True)
    fused = fused_vs_materialised(a, a.repeats)
    ratio = fused["fused_linear"]["seconds"] / fused["materialised"]["seconds"]
    mem = fused["fused_linear"]["peak_gib"] / fused["materialised"]["peak_gib"]
    print(f"fused_linear: {fused}; time {ratio:.2f}x, peak memory {mem:.3f}x the materialised loss", flush=True)
    fp8 = fp8_gemms(a, a.repeats)
    for name, row in fp8.items():
        print(f"fp8 {name}: bf16 {row['bf16_ms']:.3f} ms, fp8 {row['fp8_ms']:.3f} ms "
              f"({row['fp8_over_bf16']:.2f}x)", flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_gb_s": copy, "kd_triton": kd,
                      "fused_linear": fused, "fused_over_materialised": {"time": ratio, "peak": mem},
                      "fp8_gemm": fp8, "shape": {"tokens": a.tokens, "vocab": a.vocab, "hidden": a.hidden}}))


if __name__ == "__main__":
    main()
