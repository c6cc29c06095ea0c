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


LLAMA = Family("LlamaForCausalLM", "llama", "rmsnorm", True, "silu", "rms_norm_eps")
MISTRAL = Family("MistralForCausalLM", "mistral", "rmsnorm", True, "silu", "rms_norm_eps")
QWEN2 = Family("Qwen2ForCausalLM", "qwen2", "rmsnorm", True, "silu", "rms_norm_eps", qkv_bias=True)
NEMOTRON = Family("NemotronForCausalLM", "nemotron", "layernorm1p", False, "relu2", "norm_eps")
FAMILIES: Dict[str, Family] = {f.architecture: f for f in (LLAMA, MISTRAL, QWEN2, NEMOTRON)}

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
    if family is QWEN2 and not hf.get("use_sliding_window", False):
        return None
    return hf.get("sliding_window") if family in (MISTRAL, QWEN2) else None


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
    if family is QWEN2:
        flags.pop("attention_bias", None)  # Qwen2 always has exactly Q/K/V biases
    return [f"config.json {k}=true is not supported for {family.architecture} (only Qwen2's Q/K/V bias is)"
            for k in flags]


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
        init_method_std=float(hf.get("initializer_range", 0.02)),
        params_dtype=_DTYPES.get(dtype, "float32"),
        **rope,
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
    else:
        family = QWEN2 if cfg.add_qkv_bias else LLAMA
    problems = _export_problems(cfg, family)
    if problems:
        raise ConfigError(problems)
    return family


def _export_problems(cfg: ModelConfig, family: Family) -> List[str]:
    want = dict(normalization="RMSNorm" if family.norm == "rmsnorm" else "LayerNorm",
                layernorm_zero_centered_gamma=family.norm == "layernorm1p", gated_linear_unit=family.gated,
                activation="silu" if family.gated else "squared_relu", position_embedding_type="rope",
                add_bias_linear=False, add_qkv_bias=family.qkv_bias)
    problems = [f"model.{k}={getattr(cfg, k)!r} cannot be written as {family.architecture} (needs {v!r})"
                for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.rope_scaling and family is NEMOTRON:
        problems.append(f"model.rope_scaling=true cannot be written as {family.architecture}")
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
                        "torch_dtype", "dtype", "_name_or_path")}
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
    if family in (MISTRAL, QWEN2):
        # The original's window is kept: import accepted it only where it never bites.
        out.setdefault("sliding_window", None)
    if family is QWEN2:
        out.setdefault("use_sliding_window", False)
    if bos_token_id is not None:
        out["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        out["eos_token_id"] = eos_token_id
    return out
