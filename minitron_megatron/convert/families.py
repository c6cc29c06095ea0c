"""Hugging Face model families <-> ModelConfig: what each `config.json` means in Megatron terms.

Only what Megatron-core 0.16.1's GPTModel computes exactly is accepted; anything
else (a RoPE scaling type it lacks, sliding-window attention that would bite, biases
it cannot place) is refused with a ConfigError naming the config.json field, so a
converted model never silently computes something else than the original.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """One HF architecture, as far as conversion cares."""

    architecture: str
    model_type: str
    norm: str
    """rmsnorm (weight only) or layernorm1p (weight + bias, zero-centred gamma)."""
    gated: bool
    """SwiGLU MLP (gate_proj, up_proj, down_proj) or plain (up_proj, down_proj)."""
    hidden_act: str
    eps_key: str
    qkv_bias: bool = False
    moe: Optional[str] = None
    """None (a dense MLP), or the HF module prefix of a layer's mixture of experts:
    "block_sparse_moe" (Mixtral: experts.{e}.w1/w3/w2, gate) or "mlp" (Qwen2-MoE:
    experts.{e}.gate_proj/up_proj/down_proj, gate, shared_expert, shared_expert_gate)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head (self_attn.q_norm / k_norm): Megatron's qk_layernorm."""


LLAMA = Family("LlamaForCausalLM", "llama", "rmsnorm", True, "silu", "rms_norm_eps")
MISTRAL = Family("MistralForCausalLM", "mistral", "rmsnorm", True, "silu", "rms_norm_eps")
QWEN2 = Family("Qwen2ForCausalLM", "qwen2", "rmsnorm", True, "silu", "rms_norm_eps", qkv_bias=True)
NEMOTRON = Family("NemotronForCausalLM", "nemotron", "layernorm1p", False, "relu2", "norm_eps")
MIXTRAL = Family("MixtralForCausalLM", "mixtral", "rmsnorm", True, "silu", "rms_norm_eps", moe="block_sparse_moe")
QWEN2_MOE = Family("Qwen2MoeForCausalLM", "qwen2_moe", "rmsnorm", True, "silu", "rms_norm_eps", qkv_bias=True,
                   moe="mlp")
QWEN3_MOE = Family("Qwen3MoeForCausalLM", "qwen3_moe", "rmsnorm", True, "silu", "rms_norm_eps", moe="mlp",
                   qk_norm=True)
MOE_FAMILIES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)
FAMILIES: Dict[str, Family] = {f.architecture: f for f in (LLAMA, MISTRAL, QWEN2, NEMOTRON) + MOE_FAMILIES}
_QWEN = (QWEN2, QWEN2_MOE, QWEN3_MOE)
"""Families whose sliding window applies only with use_sliding_window."""
_WINDOWED = (MISTRAL, MIXTRAL) + _QWEN
"""Families whose config.json may name a sliding window (Qwen's only bites with use_sliding_window)."""

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# Megatron-core 0.16.1 RotaryEmbedding._apply_scaling: only `factor` is a parameter.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def family_of(hf: dict) -> Family:
    """The family named by config.json's `architectures`, or a ConfigError listing the supported ones."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in FAMILIES:
        raise ConfigError(f"from_hf: config.json architectures={archs} is not supported; supported: "
                          f"{sorted(FAMILIES)}")
    return FAMILIES[archs[0]]


def rope_parameters(hf: dict) -> dict:
    """RoPE settings from either config.json spelling: transformers 4 (`rope_theta`,
    `rope_scaling`, `partial_rotary_factor`) or 5 (one `rope_parameters` dict)."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in hf and key not in params:
            params[key] = hf[key]
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _rope_fields(hf: dict, problems: List[str]) -> dict:
    rope = rope_parameters(hf)
    theta = float(rope.get("rope_theta", 10000.0))
    if theta != int(theta):
        problems.append(f"config.json rope_theta={theta} is not an integer (Megatron's rotary_base is an int)")
    fields = dict(rotary_base=int(theta), rotary_percent=float(rope.get("partial_rotary_factor", 1.0)))
    kind = rope["rope_type"]
    if kind == "llama3":
        fixed = {k: rope.get(k) for k in _LLAMA3_FIXED}
        if any(float(fixed[k] or 0) != v for k, v in _LLAMA3_FIXED.items()):
            problems.append(f"config.json rope_scaling={fixed}: Megatron-core's llama3 RoPE scaling fixes "
                            f"{_LLAMA3_FIXED}; only `factor` may differ")
        fields.update(rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
    elif kind != "default":
        problems.append(f"config.json rope_scaling.rope_type={kind!r} is not supported; supported: "
                        "['default', 'llama3']")
    return fields


def _window(hf: dict, family: Family) -> Optional[int]:
    """The attention window config.json asks for, or None (full causal attention)."""
    if family in _QWEN and not hf.get("use_sliding_window", False):
        return None
    return hf.get("sliding_window") if family in _WINDOWED else None


def position_limit(hf: dict, family: Family) -> int:
    """The run dir's max_position_embeddings: config.json's, capped at the sliding window
    (Mistral-7B-v0.1: 32768 -> 4096). Megatron's attention has no sliding window; up to the
    window, causal attention is exactly sliding-window attention, and the cap keeps every
    run's seq_length there."""
    window = _window(hf, family)
    limit = int(hf.get("max_position_embeddings", 4096))
    return min(limit, window) if window else limit


def position_limit_note(hf: dict, family: Family) -> str:
    """Why an import's position limit is what it is, for a too-long seq_length's message."""
    window = _window(hf, family)
    if window is not None and window < int(hf.get("max_position_embeddings", 4096)):
        return (f" (config.json sliding_window={window} caps it: sliding-window attention is not supported, "
                "and up to the window causal attention is exact)")
    return ""


def _bias_problems(hf: dict, family: Family) -> List[str]:
    flags = {k: hf.get(k) for k in ("attention_bias", "mlp_bias") if hf.get(k)}
    if family in (QWEN2, QWEN2_MOE):
        flags.pop("attention_bias", None)  # Qwen2 always has exactly Q/K/V biases (Qwen2-MoE: qkv_bias)
    problems = [f"config.json {k}=true is not supported for {family.architecture} (only Qwen2's Q/K/V bias is)"
                for k in flags]
    if family is QWEN2_MOE and not hf.get("qkv_bias", True):
        problems.append("config.json qkv_bias=false is not supported for Qwen2MoeForCausalLM (its Q/K/V bias is "
                        "mapped, never dropped)")
    return problems


def _moe_fields(hf: dict, family: Family, problems: List[str]) -> dict:
    """ModelConfig's mixture-of-experts fields for a MoE family ({} for a dense one).

    Routing: Mixtral takes the softmax over the top-k logits (softmax, top-k, renormalise: the
    same numbers), Megatron's `moe_router_pre_softmax=false`; Qwen2-MoE with norm_topk_prob=false
    keeps the top-k of the softmax over every expert, `moe_router_pre_softmax=true`.
    """
    if family.moe is None:
        return {}
    if float(hf.get("router_jitter_noise", 0.0) or 0.0):
        problems.append(f"config.json router_jitter_noise={hf['router_jitter_noise']} is not supported "
                        "(Megatron's router has no multiplicative jitter); set it to 0")
    coeff = float(hf.get("router_aux_loss_coef", 0.0) or 0.0)
    common = dict(moe_router_topk=hf["num_experts_per_tok"], moe_router_load_balancing_type="aux_loss",
                  moe_aux_loss_coeff=coeff, moe_router_score_function="softmax")
    if family is MIXTRAL:
        return dict(common, num_moe_experts=hf["num_local_experts"], moe_ffn_hidden_size=hf["intermediate_size"],
                    moe_router_pre_softmax=False)
    # Qwen's `num_experts`; transformers 5 saves Qwen3-MoE's as `num_local_experts` (an attribute_map alias).
    count = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
    experts = dict(common, num_moe_experts=count, moe_ffn_hidden_size=hf["moe_intermediate_size"],
                   moe_router_pre_softmax=not hf.get("norm_topk_prob", False))
    dense = [f"mlp_only_layers={hf['mlp_only_layers']}"] if hf.get("mlp_only_layers") else []
    if int(hf.get("decoder_sparse_step", 1)) != 1:
        dense.append(f"decoder_sparse_step={hf['decoder_sparse_step']}")
    if dense:
        problems.append(f"config.json {' and '.join(dense)}: dense MLP layers between MoE layers are not "
                        "supported (every layer must be a MoE layer: mlp_only_layers=[], decoder_sparse_step=1)")
    if family is QWEN3_MOE:  # no shared expert
        return experts
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    if shared < 1:
        problems.append(f"config.json shared_expert_intermediate_size={shared}: Qwen2MoeForCausalLM always has a "
                        "shared expert, so it must be >= 1")
    return dict(experts, moe_shared_expert_intermediate_size=shared or None, moe_shared_expert_gate=True)


def model_config_from_hf(hf: dict, name: str, params_dtype: Optional[str] = None) -> ModelConfig:
    """The ModelConfig computing exactly what this config.json computes, or every reason it cannot."""
    family = family_of(hf)
    problems: List[str] = []
    heads = hf["num_attention_heads"]
    if hf.get("hidden_act", family.hidden_act) != family.hidden_act:
        problems.append(f"config.json hidden_act={hf['hidden_act']!r}: {family.architecture} is converted "
                        f"with {family.hidden_act!r} only")
    dtype = params_dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        problems.append(f"convert.dtype={dtype!r} is not one of {sorted(_DTYPES)}")
    rope = _rope_fields(hf, problems)
    problems += _bias_problems(hf, family)
    moe = _moe_fields(hf, family, problems)
    if problems:
        raise ConfigError(problems)
    return ModelConfig(
        name=name,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=position_limit(hf, family),
        vocab_size=hf["vocab_size"],
        normalization="RMSNorm" if family.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=float(hf.get(family.eps_key, 1e-5 if family is NEMOTRON else 1e-6)),
        layernorm_zero_centered_gamma=family.norm == "layernorm1p",
        gated_linear_unit=family.gated,
        activation="silu" if family.gated else "squared_relu",
        position_embedding_type="rope",
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_norm,
        init_method_std=float(hf.get("initializer_range", 0.02)),
        params_dtype=_DTYPES.get(dtype, "float32"),
        **rope,
        **moe,
    )


def family_for_model(cfg: ModelConfig, architecture: Optional[str] = None) -> Family:
    """The HF family a run dir exports to: `architecture` when given, else the one its features imply."""
    cfg = cfg.resolved()
    if architecture:
        if architecture not in FAMILIES:
            raise ConfigError(f"convert.architecture={architecture!r} is not supported; supported: {sorted(FAMILIES)}")
        family = FAMILIES[architecture]
    elif cfg.layernorm_zero_centered_gamma:
        family = NEMOTRON
    elif cfg.is_moe:  # a shared expert (with its gate) is Qwen2-MoE's; Q/K norms, Qwen3-MoE's; else Mixtral's
        family = (QWEN2_MOE if cfg.add_qkv_bias or cfg.moe_shared_expert_intermediate_size
                  else QWEN3_MOE if cfg.qk_layernorm else MIXTRAL)
    else:
        family = QWEN2 if cfg.add_qkv_bias else LLAMA
    problems = _export_problems(cfg, family)
    if problems:
        raise ConfigError(problems)
    return family


def loadable_family(cfg: ModelConfig, family: Family) -> Family:
    """`family`, or Mistral for a Llama whose hidden size its head count does not divide.

    transformers 5's LlamaConfig refuses such a config even with head_dim set (a width-pruned
    Llama: SmolLM2's 9 heads at hidden 464); MistralConfig takes head_dim as given and, written
    with no sliding window, computes exactly the same model. RoPE scaling stays Llama's.
    """
    cfg = cfg.resolved()
    if family is LLAMA and not cfg.rope_scaling and cfg.hidden_size % cfg.num_attention_heads:
        return family_for_model(cfg, MISTRAL.architecture)
    return family


def _export_problems(cfg: ModelConfig, family: Family) -> List[str]:
    want = dict(normalization="RMSNorm" if family.norm == "rmsnorm" else "LayerNorm",
                layernorm_zero_centered_gamma=family.norm == "layernorm1p", gated_linear_unit=family.gated,
                activation="silu" if family.gated else "squared_relu", position_embedding_type="rope",
                add_bias_linear=False, add_qkv_bias=family.qkv_bias, qk_layernorm=family.qk_norm)
    problems = [f"model.{k}={getattr(cfg, k)!r} cannot be written as {family.architecture} (needs {v!r})"
                for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.rope_scaling and family is NEMOTRON:
        problems.append(f"model.rope_scaling=true cannot be written as {family.architecture}")
    return problems + _moe_export_problems(cfg, family)


def _moe_export_problems(cfg: ModelConfig, family: Family) -> List[str]:
    """What a MoE run dir must compute to be written as `family` (and a dense one, as a dense family)."""
    name = family.architecture
    if family.moe is None:
        return [f"model.num_moe_experts={cfg.num_moe_experts} cannot be written as {name} (a dense model); "
                f"supported for mixtures of experts: {[f.architecture for f in MOE_FAMILIES]}"] \
            if cfg.is_moe else []
    if not cfg.is_moe:
        return [f"model.num_moe_experts=None (a dense model) cannot be written as {name}"]
    want = dict(moe_router_score_function="softmax", moe_router_topk_scaling_factor=None)
    if family is MIXTRAL:
        want.update(moe_router_pre_softmax=False, moe_shared_expert_intermediate_size=None)
    elif family is QWEN3_MOE:  # no shared expert; either routing normalisation
        want.update(moe_shared_expert_intermediate_size=None)
    else:  # Qwen2-MoE: always a shared expert with a sigmoid gate; either routing normalisation
        want.update(moe_shared_expert_gate=True)
    problems = [f"model.{k}={getattr(cfg, k)!r} cannot be written as {name} (needs {v!r})"
                for k, v in want.items() if getattr(cfg, k) != v]
    if family is QWEN2_MOE and not cfg.moe_shared_expert_intermediate_size:
        problems.append(f"model.moe_shared_expert_intermediate_size=None cannot be written as {name} (it always "
                        "has a shared expert)")
    return problems


def hf_config_from_model(cfg: ModelConfig, family: Family, base: Optional[dict] = None,
                         bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None) -> dict:
    """config.json for `cfg`: `base` (the imported original, if any) with every architectural key rewritten.

    RoPE is written in the transformers-4 spelling (`rope_theta`, `rope_scaling`), which
    transformers 5 also reads, so either version loads the result.
    """
    cfg = cfg.resolved()
    out = {k: v for k, v in (base or {}).items()
           if k not in ("rope_parameters", "rope_scaling", "partial_rotary_factor", "transformers_version",
                        "torch_dtype", "dtype", "_name_or_path", "layer_types")}  # layer_types: derived, per layer
    keep_max_pos = base is not None and base.get("max_position_embeddings", 0) >= cfg.max_position_embeddings
    out.update(
        architectures=[family.architecture], model_type=family.model_type, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.kv_channels, hidden_act=family.hidden_act,
        max_position_embeddings=base["max_position_embeddings"] if keep_max_pos else cfg.max_position_embeddings,
        initializer_range=cfg.init_method_std, tie_word_embeddings=cfg.share_embeddings_and_output_weights,
        rope_theta=float(cfg.rotary_base), torch_dtype=cfg.params_dtype, attention_bias=family.qkv_bias,
        attention_dropout=0.0,
    )
    out[family.eps_key] = cfg.layernorm_epsilon
    out["rope_scaling"] = ({"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **_LLAMA3_FIXED}
                           if cfg.rope_scaling else None)
    if family is NEMOTRON or cfg.rotary_percent != 1.0:
        out["partial_rotary_factor"] = cfg.rotary_percent
    if family is not QWEN2:
        out["mlp_bias"] = False
    if family in _WINDOWED:
        # The original's window is kept: import accepted it only where it never bites.
        out.setdefault("sliding_window", None)
    if family in _QWEN:
        out.setdefault("use_sliding_window", False)
    for key in ("num_experts", "num_local_experts"):  # either spelling of the original's: ours replaces it
        out.pop(key, None)
    out.update(_moe_config(cfg, family, base))
    if bos_token_id is not None:
        out["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        out["eos_token_id"] = eos_token_id
    return out


def _moe_config(cfg: ModelConfig, family: Family, base: Optional[dict]) -> dict:
    """config.json's mixture-of-experts keys: expert count and width as the run dir has them (a
    pruned model's fewer, narrower experts), routing as Megatron computes it."""
    if family.moe is None:
        return {}
    common = dict(num_experts_per_tok=cfg.moe_router_topk, router_aux_loss_coef=cfg.moe_aux_loss_coeff,
                  output_router_logits=bool((base or {}).get("output_router_logits", False)))
    if family is MIXTRAL:
        # One width for every MLP: Mixtral's intermediate_size is its experts'.
        return dict(common, num_local_experts=cfg.num_moe_experts, intermediate_size=cfg.moe_ffn_hidden_size,
                    router_jitter_noise=0.0)
    # intermediate_size is the width of Qwen's dense layers (mlp_only_layers), of which there are none.
    qwen = dict(common, num_experts=cfg.num_moe_experts, moe_intermediate_size=cfg.moe_ffn_hidden_size,
                norm_topk_prob=not cfg.moe_router_pre_softmax, decoder_sparse_step=1, mlp_only_layers=[])
    if family is QWEN3_MOE:
        return qwen
    return dict(qwen, shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size, qkv_bias=True)
