"""FP8 GEMMs for a frozen teacher (model/fp8.py, distill/teacher.py).

Unit tests check the GEMM against a float64 reference of the same quantised math and measure
its error against bf16; one 2-process gloo launch checks a real GPTModel teacher (Megatron's
ColumnParallel/RowParallel layers) at TP=1 and TP=2.
"""

import math

import pytest
import torch

from minitron_megatron.model.fp8 import FP8, FP8_MAX, Fp8Gemm, quantize_rows
from tests.dist_utils import run_distributed
from tests.model_utils import small_model

# ---- a float64 reference of the quantised math, written independently of model/fp8.py ----------


def _ref_quantize(x: torch.Tensor, per_row: bool):
    """(dequantised float64 tensor, scales): e4m3 values times their float32 scale."""
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True) if per_row else x.abs().amax().reshape(1, 1)
    scale = torch.clamp(amax, min=1e-12) / 448.0
    q = torch.clamp(x / scale, -448.0, 448.0).to(torch.float8_e4m3fn)
    return q.double() * scale.double()


def _ref_gemm(x, w, per_token: bool):
    return _ref_quantize(x, per_token) @ _ref_quantize(w, per_row=True).t()  # [M, N] float64


def _data(m, k, n, seed=0):
    """Activations ~N(0, 1) with a few 20x outlier channels (as LLM activations have) and
    weights ~N(0, 0.02), the init scale of the presets."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, :8] *= 20
    return x, torch.randn(n, k, generator=gen) * 0.02


@pytest.mark.parametrize("scaling", ["token", "tensor"])
def test_fp8_gemm_is_the_quantised_math(scaling):
    """Catches wrong scale layouts (per row vs per column, reciprocal), a transposed weight, or
    a silently unquantised matmul: float32 output = the float64 dequantised product up to
    float32 accumulation order; bf16 output = the same rounded to bf16."""
    x, w = _data(48, 256, 80)
    gemm = Fp8Gemm(w, scaling)
    expected = _ref_gemm(x, w, per_token=scaling == "token")
    got = gemm(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    got_bf16 = gemm(x.bfloat16())  # quantises the bf16-rounded activations
    expected = _ref_gemm(x.bfloat16(), w, per_token=scaling == "token")
    assert got_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf16.double(), expected, rtol=2 ** -8, atol=2 ** -8 * expected.abs().max().item())


def test_fp8_error_against_bf16_is_what_fp8_costs():
    """Measures FP8's cost (relative Frobenius error of the output vs the bf16 linear, on the
    data of `_data`), bounded on both sides: a few percent, not bf16's ~0.3% (which would mean
    FP8 was not used) and not tens of percent (broken scales)."""
    x, w = _data(256, 1024, 1024)
    exact = x.double() @ w.double().t()
    bf16 = (x.bfloat16() @ w.bfloat16().t()).double()
    errors = {}
    for scaling in ("token", "tensor"):
        fp8 = Fp8Gemm(w.bfloat16(), scaling)(x.bfloat16()).double()
        errors[scaling] = ((fp8 - bf16).norm() / bf16.norm()).item()
    bf16_error = ((bf16 - exact).norm() / exact.norm()).item()
    print(f"relative error vs bf16: {errors}; bf16 vs float64: {bf16_error:.4f}")
    assert bf16_error < 0.005
    for scaling, error in errors.items():
        assert 0.01 < error < 0.06, (scaling, error)  # measured 0.034 (token), 0.037 (tensor)


def test_quantize_rows_handles_zeros_and_saturation():
    """Catches a 0/0 scale on an all-zero token (NaN through the whole model) and values
    above e4m3's range turning into NaN (e4m3fn has no infinity)."""
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1e4, 3.0]])
    q, scale = quantize_rows(x, "token")
    assert q.dtype == FP8 and scale.shape == (2, 1) and not torch.isnan(q.float()).any()
    assert torch.equal(q[0].float(), torch.zeros(3)) and q[1].float().abs().max() == FP8_MAX
    with pytest.raises(ValueError, match="token"):
        quantize_rows(x, "channel")


def _float32_outputs(fn) -> list:
    """numel of every float32 tensor an aten op creates while `fn` runs (the dispatcher's view:
    every copy, temporary and out-of-place result, not just the ones Python names)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    sizes.append(t.numel())
            return out

    with Record():
        fn()
    return sizes


@pytest.mark.parametrize("scaling", ["token", "tensor"])
def test_activation_quantisation_makes_no_float32_copy(monkeypatch, scaling):
    """Catches float32 copies of the whole activation in the FP8 linear's forward (the
    quantisation used to make three per GEMM: x.float(), |x|, x / scale, and the clamp's):
    with bf16 activations, no float32 tensor of more than one cast block is created, and the
    blocked cast (several blocks, a short last one) is bitwise the whole-tensor math."""
    from minitron_megatron.model import fp8

    x, w = _data(64, 256, 80)
    x = x.bfloat16()
    gemm = Fp8Gemm(w.bfloat16(), scaling)
    whole = gemm(x)
    monkeypatch.setattr(fp8, "_CAST_BLOCK_ELEMENTS", 10 * 256)  # 10 rows a block: 7 blocks for 64 rows
    sizes = _float32_outputs(lambda: gemm(x))
    assert max(sizes) <= 10 * 256, sorted(sizes)[-5:]
    assert torch.equal(gemm(x), whole)
    q, scale = quantize_rows(x, scaling)
    ref = _ref_quantize(x, per_row=scaling == "token")  # float64, the old float32-copy math
    assert torch.equal(q.double() * scale.double(), ref)


def test_dtype_casts_leave_fp8_weights_alone():
    """Catches `.bfloat16()` / Megatron-LM's Float16Module casting FP8 data and float32 scales
    (both floating point to torch) and so silently dropping the quantisation scales."""
    gemm = Fp8Gemm(torch.randn(32, 16), "token")
    x = torch.randn(4, 16)
    before = gemm(x)
    gemm.bfloat16().to("cpu").float()
    assert gemm.weight_fp8.dtype == FP8 and gemm.weight_scale.dtype == torch.float32
    assert torch.equal(gemm(x), before)


# ---- a real GPTModel teacher at TP=1 and TP=2 (one launch of 2 processes) ------------------------

CFG = small_model()  # 2 layers, h64, 4 heads / 2 groups, SwiGLU 96, vocab 250 (padded 256)
PADDED = 256
VARIANTS = ("fp32", "bf16", "fp8", "fp8_tensor", "fp8_output", "fp8_fp32_all")
"""Teacher precisions, then FP8 with per-tensor scaling, with the output layer too, and every
linear in FP8 with float32 activations (the tight TP check, see test_fp8_teacher_tp2_equals_tp1)."""


def _teacher(variant, ctx):
    """The same seeded weights at every TP size (CPU init splits one full draw), then `variant`."""
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.distill.teacher import apply_teacher_precision
    from minitron_megatron.model import build_gpt_model
    from minitron_megatron.model.fp8 import convert_to_fp8

    torch.manual_seed(11)
    model = build_gpt_model(CFG, ctx, ParallelConfig(tp=ctx.tp_size), PADDED).eval()
    if variant in ("fp32", "bf16", "fp8"):
        return apply_teacher_precision(model, variant)
    if variant != "fp8_fp32_all":
        model = model.bfloat16()
    convert_to_fp8(model, scaling="tensor" if variant == "fp8_tensor" else "token",
                   output_layer=variant in ("fp8_output", "fp8_fp32_all"))
    return model


def _logits(model, ctx):
    """Full-vocab logits [b, s, V] (vocab-parallel shards gathered over TP)."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.max_position_embeddings), generator=gen)
    positions = torch.arange(CFG.max_position_embeddings).expand(2, -1)
    with torch.no_grad():
        local = model(tokens, positions, None).float()  # [b, s, V/tp]
    if ctx.tp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)


def _weight_bytes(model) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _worker(rank, world, out_path):
    from minitron_megatron.runtime import destroy_runtime, init_runtime

    results = {}
    for tp in (1, 2):  # TP=1 (two DP replicas), then the same processes at TP=2
        ctx = init_runtime(tp=tp, pp=1, device="cpu", seed=7)
        results[tp] = {}
        for variant in VARIANTS:
            model = _teacher(variant, ctx)
            results[tp][variant] = {"logits": _logits(model, ctx), "bytes": _weight_bytes(model),
                                    "fp8": sorted(n for n, m in model.named_modules() if isinstance(m, Fp8Gemm))}
    if rank == 0:
        torch.save(results, out_path)
    destroy_runtime()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "results.pt"
    run_distributed(_worker, 2, str(path))
    return torch.load(path)


def _rel(a, b):
    """(max |a-b| / max |b|, mean |a-b| / mean |b|)."""
    diff = (a - b).abs()
    return (diff.max() / b.abs().max()).item(), (diff.mean() / b.abs().mean()).item()


def test_fp8_teacher_forward_is_close_to_bf16(teachers):
    """Catches an FP8 teacher whose logits drift beyond FP8's error (a wrong shard's scale,
    a GEMM fed the wrong input): close to the bf16 and fp32 teachers, yet not equal to bf16."""
    tp1 = teachers[1]
    assert len(tp1["fp8"]["fp8"]) == 4 * CFG.num_layers and "output_layer.fp8_gemm" not in tp1["fp8"]["fp8"]
    assert "output_layer.fp8_gemm" in tp1["fp8_output"]["fp8"]
    bf16 = tp1["bf16"]["logits"]
    bf16_vs_fp32 = _rel(bf16, tp1["fp32"]["logits"])
    report = {v: _rel(tp1[v]["logits"], bf16) for v in ("fp8", "fp8_tensor", "fp8_output")}
    report["fp8_fp32_all vs fp32"] = _rel(tp1["fp8_fp32_all"]["logits"], tp1["fp32"]["logits"])
    print(f"logits vs bf16 (max rel, mean rel): {report}; bf16 vs fp32: {bf16_vs_fp32}")
    for variant, (max_rel, mean_rel) in report.items():
        assert 0 < mean_rel < 0.08 and max_rel < 0.15, (variant, max_rel, mean_rel)


# TP=2 vs TP=1 limits (max rel, mean rel). FP8 rounding is a step function: with bf16
# activations, the bf16 all-reduce's different summation order moves some values across an
# e4m3 rounding boundary downstream, so bf16-based FP8 teachers agree only to about FP8's own
# error (measured up to 0.040 / 0.020). With float32 activations that order costs ~1e-7, so
# every linear (output layer included) in FP8 must give TP=1's logits almost exactly.
TP_LIMITS = {"fp32": (1e-5, 1e-5), "bf16": (0.02, 0.01), "fp8_fp32_all": (1e-3, 1e-4)}


def test_fp8_teacher_tp2_equals_tp1(teachers):
    """Catches TP semantics broken by the FP8 GEMM (column outputs not gathered, row partial
    sums not reduced, scales of row-parallel weights or inputs taken from one shard's half of
    the row): TP=2 FP8 logits equal TP=1 FP8 logits."""
    for variant in VARIANTS:
        max_rel, mean_rel = _rel(teachers[2][variant]["logits"], teachers[1][variant]["logits"])
        print(f"TP=2 vs TP=1 {variant}: max rel {max_rel:.2e}, mean rel {mean_rel:.2e}")
        max_limit, mean_limit = TP_LIMITS.get(variant, (0.06, 0.03))
        assert max_rel < max_limit and mean_rel < mean_limit, (variant, max_rel, mean_rel)


def test_fp8_teacher_weight_memory(teachers):
    """FP8 stores one byte per transformer-linear weight (plus a float32 scale per output row)
    where bf16 stores two; embeddings, norms and the output layer are unchanged."""
    bf16, fp8 = teachers[1]["bf16"]["bytes"], teachers[1]["fp8"]["bytes"]
    h, d, ffn = CFG.hidden_size, CFG.kv_channels, CFG.ffn_hidden_size
    qkv_out = (CFG.num_attention_heads + 2 * CFG.num_query_groups) * d
    linear = h * qkv_out + CFG.num_attention_heads * d * h + h * 2 * ffn + ffn * h  # per layer
    rows = qkv_out + h + 2 * ffn + h  # one float32 scale per output row
    print(f"teacher weight bytes: bf16 {bf16}, fp8 {fp8}")
    assert bf16 - fp8 == CFG.num_layers * (linear - 4 * rows)
    assert math.isclose(teachers[2]["fp8"]["bytes"] * 2, fp8, rel_tol=0.1)  # each TP rank holds about half


# ---- the `teacher.precision` setting -----------------------------------------------------------

def test_teacher_precision_is_checked_with_the_other_settings(tmp_path):
    """Catches a typo (fp16, "FP8") reaching the build: one message naming the setting and
    the allowed values, collected with the other distill settings."""
    from minitron_megatron.config.commands import DistillCommand
    from minitron_megatron.distill.setup import settings_problems
    from minitron_megatron.distill.teacher import apply_teacher_precision
    from minitron_megatron.runtime.context import ParallelContext

    ctx = ParallelContext(device=torch.device("cpu"), world_size=1, rank=0, tp_size=1, tp_rank=0,
                          pp_size=1, pp_rank=0, dp_size=1, dp_rank=0)
    cfg = DistillCommand(save=str(tmp_path / "out"))
    assert not any("precision" in p for p in settings_problems(cfg, ctx))
    cfg.teacher.precision = "fp16"
    assert "teacher.precision='fp16' is not one of ['fp8', 'bf16', 'fp32'] (or null: the teacher run's own " \
           "dtype)" in settings_problems(cfg, ctx)
    with pytest.raises(ValueError, match="teacher.precision='fp16'"):
        apply_teacher_precision(torch.nn.Linear(2, 2), "fp16")
