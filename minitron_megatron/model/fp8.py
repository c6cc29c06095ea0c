"""FP8 (e4m3) GEMMs for the linear layers of a frozen GPTModel (local spec, no Transformer Engine).

Megatron's ColumnParallelLinear / RowParallelLinear `forward` does all TP communication
(copy-to / gather-from the TP region for column, reduce for row, the bias placement) around
one local GEMM, `self._forward_impl(input, weight, bias, ...)`. Only that GEMM is replaced,
per instance, so every collective stays Megatron's own.

Quantisation: weights once, per output channel (a row of the [out, in] weight), scale =
row amax / 448; activations per token (default) or per tensor, at every call. A row-parallel
layer's weight and input are split along `in` over TP, so their amaxes are max-reduced over the
layer's TP group (once for the weight; per call an [M, 1] all-reduce, tiny beside the layer's
[M, h] output all-reduce): scales, and so results, do not depend on the TP size. Without it
each shard's rounding differs, and TP=2 differs from TP=1 by as much as FP8 from bf16.

`torch._scaled_mm`, as checked on torch 2.13 CPU: both operands float8_e4m3fn, the second
column-major (the `.t()` of a row-major [out, in] weight), float32 scales that are either
both singletons (tensorwise) or [M, 1] and [1, N] (rowwise); a mix is rejected, so per-tensor
activation scales are expanded to [M, 1]. out_dtype bf16, fp16 or fp32. On CUDA (not run
here) rowwise scaling also wants bf16 output and dimensions that are multiples of 16.
Forward only: `_scaled_mm` has no backward here, which a frozen teacher never needs.
"""

import functools
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALINGS = ("token", "tensor")
LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
_MIN_AMAX = 1e-12  # an all-zero row or token gets a harmless scale, not a division by zero
GEMM_MULTIPLE = 16
"""Every dimension of an FP8 GEMM's operands but the token count must be a multiple of this on
CUDA (`torch._scaled_mm`: the weight's both dimensions, so each linear's local in and out)."""
MIN_CAPABILITY = (8, 9)
"""CUDA compute capability with FP8 tensor cores (Ada 8.9, Hopper 9.0 and later)."""


def fp8_problems(cfg, tp: int, device: torch.device) -> List[str]:
    """Why the transformer linears of a GPTModel built from `cfg` (a resolved ModelConfig) at
    tensor-parallel size `tp` on `device` cannot run as FP8 GEMMs (`convert_to_fp8`); [] if
    they can. Reads settings only, so a caller can refuse before loading any weight: each
    problem names the model settings it comes from and what is allowed.

    Sizes a TP split leaves fractional are `validate_model`'s to report and skipped here.
    """
    from minitron_megatron.model.build import transformer_impl

    problems = []
    if transformer_impl(cfg, device) == "transformer_engine":
        problems.append(f"model.transformer_impl={cfg.transformer_impl} builds Transformer Engine layers: FP8 "
                        "GEMMs replace the GEMMs of Megatron's local spec (allowed: sdpa or local; Transformer "
                        "Engine layers have FP8 recipes of their own)")
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < MIN_CAPABILITY:
            problems.append(f"device={device} is {torch.cuda.get_device_name(device)} with compute capability "
                            f"{capability[0]}.{capability[1]}: FP8 GEMMs need "
                            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell)")
    for setting, size, gemms in _local_gemm_dims(cfg, tp):
        if size % GEMM_MULTIPLE:
            problems.append(f"{setting} = {size} ({gemms}, at parallel.tp={tp}) is not a multiple of "
                            f"{GEMM_MULTIPLE}: every local dimension of an FP8 GEMM must be one")
    return problems


def _local_gemm_dims(cfg, tp: int) -> List[Tuple[str, int, str]]:
    """(the settings a dimension comes from, its size on one TP rank, the GEMMs it belongs to)
    for every linear `convert_to_fp8` converts. Column-parallel linears (qkv, fc1) split their
    output over TP, row-parallel ones (proj, fc2) their input; routed experts are whole on their
    EP rank (expert TP = 1, as model/build.py builds them), shared experts split like a dense MLP."""
    heads, groups, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    dims = [("model.hidden_size", cfg.hidden_size, "linear_qkv/linear_fc1 input, linear_proj/linear_fc2 output")]

    def split(setting: str, size: int, gemms: str, shards: int) -> None:
        if size % shards == 0:
            dims.append((setting if shards == 1 else f"{setting} / parallel.tp", size // shards, gemms))

    split("(model.num_attention_heads + 2 x model.num_query_groups) x model.kv_channels",
          (heads + 2 * groups) * d, "linear_qkv output", tp)
    split("model.num_attention_heads x model.kv_channels", heads * d, "linear_proj input", tp)
    mlps = [("model.moe_ffn_hidden_size", cfg.moe_ffn_hidden_size, "each routed expert's", 1),
            ("model.moe_shared_expert_intermediate_size", cfg.moe_shared_expert_intermediate_size,
             "the shared expert's", tp)] if cfg.is_moe else [("model.ffn_hidden_size", cfg.ffn_hidden_size, "the MLP's", tp)]
    for setting, width, whose, shards in mlps:
        if width is None:  # no shared expert
            continue
        if cfg.gated_linear_unit:  # fc1 holds [gate; up]: twice the width
            split(setting, width, f"{whose} linear_fc2 input", shards)
            split(f"2 x {setting}", 2 * width, f"{whose} linear_fc1 output ([gate; up])", shards)
        else:
            split(setting, width, f"{whose} linear_fc1 output and linear_fc2 input", shards)
    return dims


def quantize_rows(x: torch.Tensor, scaling: str = "token",
                  amax_group: Optional[dist.ProcessGroup] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 [M, K], float32 scales [M, 1]) with x ~= fp8 * scale.

    "token": one scale per row; "tensor": one for all rows (repeated, see the module docstring).
    With `amax_group`, x is this rank's slice of K and the amax is that of the whole K.
    One read of x for the amax and one for the scaled cast; neither makes a float32 copy of x
    (a bf16 activation used to get three, alive together): the result is bitwise the same as
    `(x.float() / scale).clamp(-448, 448).to(e4m3)` with `scale` from `x.float().abs()`'s amax.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"activation scaling {scaling!r} is not one of {list(SCALINGS)}")
    amax = _amax(x, scaling)  # float32 [M, 1] or [1, 1]
    if amax_group is not None and dist.get_world_size(amax_group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=amax_group)
    scale = (amax.clamp(min=_MIN_AMAX) / FP8_MAX).expand(x.shape[0], 1).contiguous()  # [M, 1]
    return _scaled_cast(x, scale), scale


def _amax(x: torch.Tensor, scaling: str) -> torch.Tensor:
    """max |x| per row ([M, 1]) or overall ([1, 1]), float32, as max(max x, -min x) in x's own
    dtype: no |x| temporary, and exact (a max selects a value; bf16 -> float32 is exact)."""
    if scaling == "token":
        lo, hi = torch.aminmax(x, dim=-1, keepdim=True)  # [M, 1] each
    else:
        lo, hi = (v.reshape(1, 1) for v in torch.aminmax(x))
    return torch.maximum(hi, lo.neg()).float()


_CAST_BLOCK_ELEMENTS = 1 << 20
"""The scaled cast goes through a float32 scratch of at most this many elements (4 MiB; at
least one row), a block of rows at a time, instead of a float32 copy of the whole activation."""


def _scaled_cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 of x / scale (x [M, K] any float dtype, scale float32 [M, 1]), clamped to e4m3's range.

    The division runs in float32 (the promoted dtype of x and scale, so the same values as
    x.float() / scale) into a block-sized scratch, clamped there, then cast into the output."""
    m, k = x.shape
    out = torch.empty(m, k, dtype=FP8, device=x.device)  # [M, K]
    rows = max(1, min(m, _CAST_BLOCK_ELEMENTS // max(k, 1)))
    scratch = torch.empty(rows, k, dtype=torch.float32, device=x.device)  # [rows, K]
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        block = torch.div(x[start:stop], scale[start:stop], out=scratch[: stop - start])
        out[start:stop].copy_(block.clamp_(-FP8_MAX, FP8_MAX))
    return out


class Fp8Gemm(torch.nn.Module):
    """One linear's local GEMM in FP8: y = x @ W.T for this rank's weight shard."""

    def __init__(self, weight: torch.Tensor, scaling: str = "token",
                 amax_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"activation scaling {scaling!r} is not one of {list(SCALINGS)}")
        self.scaling, self.amax_group = scaling, amax_group
        # [out/tp, in] (column) or [out, in/tp] (row, with its TP group: whole-row amaxes)
        w_fp8, scale = quantize_rows(weight.detach(), "token", amax_group)
        # Not persistent: the frozen teacher is never checkpointed, and its checkpoint is bf16/fp32.
        self.register_buffer("weight_fp8", w_fp8, persistent=False)
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # [1, out_local]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_local] -> [..., out_local] in x's dtype."""
        lead = x.shape[:-1]
        # [M, in_local] and [M, 1]
        x_fp8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]), self.scaling, self.amax_group)
        out = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=x.dtype)  # [M, out_local]
        return out.view(*lead, out.shape[-1])

    def _apply(self, fn, recurse=True):
        """Follow device moves only: a dtype cast of the whole model (`.bfloat16()`, Megatron-LM's
        Float16Module) must not turn FP8 data and float32 scales into bf16. The target device
        is read off `fn` applied to an empty probe."""
        device = fn(torch.empty(0, device=self.weight_fp8.device)).device
        self.weight_fp8 = self.weight_fp8.to(device)
        self.weight_scale = self.weight_scale.to(device)
        return self

    def extra_repr(self) -> str:
        return f"{tuple(self.weight_fp8.shape)}, scaling={self.scaling}"


def _fp8_forward_impl(gemm: Fp8Gemm, input, weight, bias, gradient_accumulation_fusion=False,
                      allreduce_dgrad=False, sequence_parallel=False, tp_group=None, **_unused):
    """Megatron's `linear_with_frozen_weight` (same signature and sequence-parallel gather, bias
    added after the GEMM) with the matmul in FP8. `weight` is Megatron's bf16 one: unused."""
    if sequence_parallel:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        input = gather_from_sequence_parallel_region(input_=input, tensor_parallel_output_grad=True, group=tp_group)
    out = gemm(input)
    return out + bias if bias is not None else out


def convert_linear(linear, scaling: str = "token", weight: Optional[torch.Tensor] = None) -> Fp8Gemm:
    """Give one Column/RowParallelLinear an FP8 local GEMM, in place; frees its own weight.

    `weight` is for a linear without one of its own (a tied output layer uses the embedding's).
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if not isinstance(linear, (ColumnParallelLinear, RowParallelLinear)):
        raise TypeError(f"{type(linear).__name__} is not a Megatron Column/RowParallelLinear (TE layers "
                        "have their own FP8 path: use Transformer Engine's recipes)")
    own = linear.weight is not None
    source = linear.weight if own else weight
    row_parallel = isinstance(linear, RowParallelLinear)
    gemm = Fp8Gemm(source, scaling, amax_group=linear.tp_group if row_parallel else None)
    linear.fp8_gemm = gemm  # a submodule, so `.to(device)` moves it
    linear._forward_impl = functools.partial(_fp8_forward_impl, gemm)  # shadows the class method
    if own:  # the bf16 copy would keep the memory FP8 is for; Megatron's forward still reads .weight
        linear.weight = torch.nn.Parameter(source.new_empty(0), requires_grad=False)
    return gemm


def convert_to_fp8(model, scaling: str = "token", output_layer: bool = False) -> List[str]:
    """FP8 GEMMs for every transformer linear of a frozen GPTModel shard (and, with
    `output_layer`, the logits GEMM); returns the converted module names.

    Collective over each layer's TP group (row-parallel weight scales), so every TP rank calls it.
    """
    names = []
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in LINEARS:
            convert_linear(module, scaling)
            names.append(name)
    if output_layer and getattr(model, "post_process", False):
        tied = model.output_layer.weight is None
        weight = model.shared_embedding_or_output_weight() if tied else None
        convert_linear(model.output_layer, scaling, weight=weight)
        names.append("output_layer")
    return names
