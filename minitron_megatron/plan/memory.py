"""Bytes per rank of a distillation step, by kind: pure arithmetic on shapes and counts.

The parameter counts come from Megatron's own GPTModel built on the meta device for one rank
(`plan/layout.py`); everything else here is a formula of the shapes, written for the layers
this project builds (Megatron's local spec) and checked against autograd's saved tensors of one
real layer (tests/test_plan.py) and against measured CPU peaks (benchmarks/plan_vs_measured.py).

Activations: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198, section 4.1) count 34*s*b*h + 5*a*s^2*b bytes per GPT layer (16-bit, GELU MLP
of 4h, dropout, LayerNorm). Their method, applied term by term to what autograd saves in
Megatron's local Llama-style layer (RMSNorm through torch, SwiGLU, GQA, no dropout), gives the
per-layer count of `layer_activation_bytes`; n = s*b tokens, B the activation dtype's bytes,
a_l heads and f_l ffn width of this TP rank, d the head dim:

  each of the 2 norms   n*h*(4 + 4 + B) + 4n   input and normalised input kept in float32
                                               (torch's RMSNorm upcasts), its output in B, rstd
  core attention local  4*B*n*a_l*d            q, k and v (expanded to every head) and context
                        b*a_l*s^2*(4 [+ B])    softmax output in float32 (and its B copy)
                        s^2 + 4*s*d*B          causal mask (bool), RoPE cos/sin
  core attention sdpa   4*B*n*a_l*d + 4*b*a_l*s   q, k, v, output, log-sum-exp
  MLP (GLU)             5*B*n*f_l              fc1 output [gate; up], act(gate), product, ...
  MLP (no GLU)          2*B*n*f_l

Without sequence parallelism the norm terms are replicated over TP (Korthikanti's 10*s*b*h).
"""

from dataclasses import dataclass
from typing import Dict, Optional

from minitron_megatron.config.model import ModelConfig

FP32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTENTIONS = ("local", "sdpa")
RECOMPUTES = ("none", "selective", "full")


@dataclass(frozen=True)
class Shape:
    """One rank's view of a run: sequence, micro-batch and parallel sizes."""

    seq_length: int
    micro_batch_size: int
    tp: int
    attention: str = "local"
    recompute: str = "none"


def _norm_bytes(n: int, h: int, act: int) -> int:
    return n * h * (FP32 + FP32 + act) + n * FP32


def _attention_bytes(cfg: ModelConfig, shape: Shape, act: int) -> int:
    s, b, n = shape.seq_length, shape.micro_batch_size, shape.seq_length * shape.micro_batch_size
    heads, d = cfg.num_attention_heads // shape.tp, cfg.kv_channels
    groups = max(cfg.num_query_groups // shape.tp, 1)
    rope = 4 * s * d * act if cfg.position_embedding_type == "rope" else 0
    if shape.recompute == "selective":  # core attention's inputs (k, v before GQA expansion) and output
        return act * n * d * (2 * heads + 2 * groups) + rope
    if shape.attention == "sdpa":
        return 4 * act * n * heads * d + FP32 * b * heads * s + rope
    probs = b * heads * s * s * (FP32 + (act if act != FP32 else 0))
    return 4 * act * n * heads * d + probs + s * s + rope


def _mlp_width(cfg: ModelConfig) -> int:
    """Tokens x this width is what one MLP saves per unit; MoE: each token passes topk experts."""
    if not cfg.is_moe:
        return cfg.ffn_hidden_size
    shared = cfg.moe_shared_expert_intermediate_size or 0
    return cfg.moe_router_topk * cfg.moe_ffn_hidden_size + shared


def layer_activation_bytes(cfg: ModelConfig, shape: Shape, act: int) -> int:
    """Bytes autograd keeps for one transformer layer's backward, one micro-batch, one TP rank."""
    cfg = cfg.resolved()
    n, h = shape.seq_length * shape.micro_batch_size, cfg.hidden_size
    if shape.recompute == "full":
        return n * h * act  # the layer's input; the rest is recomputed one layer at a time
    ffn_local = _mlp_width(cfg) // (1 if cfg.is_moe else shape.tp)
    mlp = (5 if cfg.gated_linear_unit else 2) * act * n * ffn_local
    return 2 * _norm_bytes(n, h, act) + _attention_bytes(cfg, shape, act) + mlp


def layer_working_bytes(cfg: ModelConfig, shape: Shape, act: int) -> int:
    """The largest short-lived set inside one layer: a forward without grad (the teacher) or the
    backward of one layer (the student). Local attention: the [b, a_l, s, s] scores/probabilities
    and their gradient in float32; else the MLP's [n, ffn] intermediates."""
    cfg = cfg.resolved()
    s, b, n = shape.seq_length, shape.micro_batch_size, shape.seq_length * shape.micro_batch_size
    heads = cfg.num_attention_heads // shape.tp
    attention = 2 * b * heads * s * s * FP32 if shape.attention == "local" else 0
    mlp = 3 * act * n * (_mlp_width(cfg) // (1 if cfg.is_moe else shape.tp))
    full = layer_activation_bytes(cfg, replace_recompute(shape), act) if shape.recompute == "full" else 0
    return max(attention, mlp) + full


def replace_recompute(shape: Shape) -> Shape:
    from dataclasses import replace

    return replace(shape, recompute="none")


def final_norm_bytes(cfg: ModelConfig, shape: Shape, act: int) -> int:
    """The last stage's final norm (its output is the KD loss's h_s)."""
    return _norm_bytes(shape.seq_length * shape.micro_batch_size, cfg.hidden_size, act)


def kd_loss_bytes(student: ModelConfig, teacher: ModelConfig, shape: Shape, vocab_local: int,
                  teacher_act: int, chunk_tokens: int, impl: str = "fused_linear", student_act: int = FP32) -> int:
    """The KD loss's working set on the last stage, one micro-batch: the teacher's final hidden
    states [n, h_t], and for fused_linear (distill/fused_linear.py) the float32 grad_h [n, h_s]
    and grad_w [V/tp, h_s] it computes in forward and keeps for backward, per-token results
    [5, n] and two float32 [chunk, V/tp] logit buffers (a 16-bit student first computes both
    chunks' logits in its dtype, then copies them to float32, and its backward returns grad_h and
    grad_w cast to its dtype: those copies too); for torch/triton, both models' logits [n, V/tp]
    (student float32 for the loss, teacher in its dtype) and the chunk's buffers."""
    n = shape.seq_length * shape.micro_batch_size
    held = n * teacher.hidden_size * teacher_act
    chunk = min(chunk_tokens, n)
    if impl == "fused_linear":
        grads = n * student.hidden_size + vocab_local * student.hidden_size
        casts = 0 if student_act == FP32 else student_act * (2 * chunk * vocab_local + grads)
        return held + FP32 * (grads + 5 * n + 2 * chunk * vocab_local) + casts
    return held + n * vocab_local * (FP32 + teacher_act) + 2 * FP32 * chunk * vocab_local


def optimizer_bytes(params: int, params_dtype: str, dp: int, distributed: bool) -> int:
    """Adam in Megatron: exp_avg + exp_avg_sq in float32, plus float32 main weights when the
    model is bf16/fp16 (Float16OptimizerWithFloat16Params); the distributed optimizer keeps
    1/dp of them on each rank."""
    per_param = 2 * FP32 + (FP32 if params_dtype != "float32" else 0)
    total = params * per_param
    return -(-total // dp) if distributed else total


def grad_bytes(params: int) -> int:
    """Megatron DDP's contiguous grad buffer: grad_reduce_in_fp32 (train/optimizer.py), every
    trainable parameter of the rank, whatever the distributed optimizer does (it shards the
    reduce, not this buffer)."""
    return params * FP32


def teacher_weight_bytes(counts: Dict[str, int], dtype: str, precision: Optional[str]) -> int:
    """fp8 (model/fp8.py): the transformer linears' weights in e4m3 (1 byte) with a float32 scale
    per output row, everything else in bf16; otherwise every parameter in its dtype."""
    if precision == "fp8":
        rest = counts["params"] - counts["fp8_params"]
        return counts["fp8_params"] + FP32 * counts["fp8_rows"] + 2 * rest
    return counts["params"] * DTYPE_BYTES[teacher_dtype(dtype, precision)]


def teacher_dtype(dtype: str, precision: Optional[str]) -> str:
    """The teacher's activation/weight dtype: precision bf16/fp8 run in bfloat16, fp32 in float32."""
    return {"fp8": "bfloat16", "bf16": "bfloat16", "fp32": "float32", None: dtype}[precision]
