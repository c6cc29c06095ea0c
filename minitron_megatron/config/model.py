"""Model architecture config: field names map 1:1 onto Megatron's TransformerConfig / GPTModel."""

from dataclasses import dataclass
from typing import Optional

RUN_SETTINGS = ("transformer_impl", "recompute_granularity", "recompute_method", "recompute_num_layers")
"""The `model.*` keys that say how this run computes, not what the model is: a run dir's
model.yaml does not record them (one written before this rule has its value read and ignored),
so a loaded model takes this run's values (the defaults unless given). Every implementation
computes the same function from the same checkpoint keys, and recomputation only trades
memory for compute."""

LOAD_SETTINGS = ("hidden_dropout", "attention_dropout", "init_method_std", "params_dtype", "moe_aux_loss_coeff",
                 "moe_z_loss_coeff") + RUN_SETTINGS
"""The `model.*` keys a command applies to a model it loads (`load=`, distill's `student.load`):
they change neither the weights' shapes nor what the weights compute. Dropout is a training
setting, and so are the MoE router's auxiliary-loss weights (a distilled MoE student keeps its
load-balancing loss in its objective with the weight given here); init_method_std only
initialises weights the checkpoint then overwrites; params_dtype
casts the loaded weights (as Megatron-LM's --bf16 on a float32 checkpoint); RUN_SETTINGS above.
Every other key (shapes, norms, activations, RoPE, vocab, the position limit, the name) is the
run dir's: a different value given with `load=` is refused, never silently ignored."""

TRANSFORMER_IMPLS = ("auto", "sdpa", "local", "transformer_engine")


@dataclass
class ModelConfig:
    """A GPT architecture, dense or mixture-of-experts. `None` fields are derived (see `resolved`)."""

    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = 2
    """GQA groups; None means multi-head attention (one group per head)."""
    kv_channels: Optional[int] = 32
    """Head dimension; None means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 256
    """The model's position limit: GPTModel's `max_sequence_length` (learned position embeddings
    have this many rows). A run's sequence length is the top-level `seq_length`, at most this
    (and, with no `seq_length` and no run dir to take it from, equal to it)."""
    vocab_size: Optional[int] = None
    """True (unpadded) vocabulary size; None means take it from the tokenizer."""
    make_vocab_size_divisible_by: int = 128
    """Padded vocab = multiple of this times TP, as Megatron-LM pads it."""
    normalization: str = "RMSNorm"
    """RMSNorm or LayerNorm."""
    layernorm_epsilon: float = 1e-5
    layernorm_zero_centered_gamma: bool = False
    """Norm weights are stored as gamma - 1 and applied as (1 + weight): Megatron's
    `layernorm_zero_centered_gamma`, Nemotron's "layernorm1p"."""
    gated_linear_unit: bool = True
    """SwiGLU/GeGLU when true (fc1 holds [gate; up])."""
    activation: str = "silu"
    """silu, gelu or squared_relu."""
    position_embedding_type: str = "rope"
    """rope or learned_absolute."""
    rotary_base: int = 10000
    """RoPE theta (HF `rope_theta`)."""
    rotary_percent: float = 1.0
    """Fraction of each head's dims that RoPE rotates (HF `partial_rotary_factor`)."""
    rope_scaling: bool = False
    """Llama-3.x frequency scaling of RoPE (HF `rope_type: llama3`). Megatron-core 0.16.1
    fixes low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192;
    only the factor is free."""
    rope_scaling_factor: float = 8.0
    """HF `rope_scaling.factor` (used only when rope_scaling is true)."""
    share_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    """A norm (model.normalization, over head_dim, one weight shared by the heads) on every query and
    key head before RoPE: Megatron's `qk_layernorm`, Qwen3's q_norm / k_norm."""
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    transformer_impl: str = "auto"
    """Which modules compute the layers (a run setting, see RUN_SETTINGS): transformer_engine
    (Transformer Engine's fused modules; needs TE and CUDA), sdpa (Megatron's local torch spec
    with torch's scaled_dot_product_attention as core attention: flash / memory-efficient
    kernels on GPU), local (Megatron's local spec unchanged: its DotProductAttention, O(seq^2)
    memory) or auto (transformer_engine on CUDA when TE imports, else sdpa)."""
    recompute_granularity: Optional[str] = None
    """Megatron's activation recomputation (a run setting): selective (recompute core
    attention in the backward pass), full (recompute whole layers: needs recompute_method and
    recompute_num_layers) or None (keep every activation)."""
    recompute_method: Optional[str] = None
    """With recompute_granularity=full: uniform (checkpoint every recompute_num_layers layers as
    one chunk) or block (recompute the first recompute_num_layers layers of each pipeline stage)."""
    recompute_num_layers: Optional[int] = None
    """With recompute_granularity=full: layers per chunk (uniform) or recomputed layers per stage (block)."""
    params_dtype: str = "float32"
    """float32, bfloat16 or float16."""

    # ---- mixture of experts (Megatron's TransformerConfig names; None experts = a dense MLP) ----
    num_moe_experts: Optional[int] = None
    """Routed experts per layer; when set, every layer's MLP is Megatron's MoELayer."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: Optional[int] = None
    """FFN width of each routed expert; None means ffn_hidden_size (Megatron's default)."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Width of the shared expert(s) every token goes through (all shared experts together); None: none."""
    moe_shared_expert_gate: bool = False
    """A sigmoid gate on the shared expert's output (Qwen2-MoE)."""
    moe_router_load_balancing_type: str = "aux_loss"
    """aux_loss (GShard/Switch, over the micro-batch), seq_aux_loss (per sequence), global_aux_loss
    or none."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss in the training objective (0: not applied)."""
    moe_z_loss_coeff: Optional[float] = None
    """Weight of the router z-loss (ST-MoE); None: not applied."""
    moe_router_score_function: str = "softmax"
    """softmax or sigmoid over the router logits."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts before top-k (Mixtral normalises over the top-k after: false)."""
    moe_router_topk_scaling_factor: Optional[float] = None
    """Scale applied to the top-k routing weights (DeepSeek); None: 1."""
    moe_grouped_gemm: bool = False
    """Transformer Engine's grouped GEMM for the experts (GPU only); false: SequentialMLP, one MLP
    per expert, which every importance and trim path reads. (How tokens reach their experts is a
    run setting: parallel.moe_token_dispatcher_type.)"""

    def resolved(self) -> "ModelConfig":
        """A copy with derived fields filled in (groups, head dim)."""
        from dataclasses import replace

        groups = self.num_query_groups or self.num_attention_heads
        head_dim = self.kv_channels or self.hidden_size // self.num_attention_heads
        expert_ffn = self.moe_ffn_hidden_size
        if self.num_moe_experts is not None and expert_ffn is None:
            expert_ffn = self.ffn_hidden_size
        return replace(self, num_query_groups=groups, kv_channels=head_dim, moe_ffn_hidden_size=expert_ffn)

    def architecture(self) -> "ModelConfig":
        """`resolved()` with the RUN_SETTINGS at their defaults: what decides whether two configs
        are the same model (a run dir's model.yaml records the other fields only)."""
        from dataclasses import fields, replace

        defaults = {f.name: f.default for f in fields(self) if f.name in RUN_SETTINGS}
        return replace(self.resolved(), **defaults)

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None
