"""config.json <-> ModelConfig: the published configs map onto our presets field by field."""

from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import transformers
import yaml

from minitron_megatron.config.files import conf_dir
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.convert.families import (
    FAMILIES,
    family_for_model,
    family_of,
    hf_config_from_model,
    loadable_family,
    model_config_from_hf,
)
from minitron_megatron.errors import ConfigError

# The architectural keys of the published config.json files, transcribed from the model
# pages named in each preset's header (meta-llama/Llama-3.1-8B, mistralai/Mistral-7B-v0.1,
# Qwen/Qwen2.5-7B, nvidia/Minitron-8B-Base), in transformers-4 spelling.
PUBLISHED = {
    "llama3.1-8b": dict(
        architectures=["LlamaForCausalLM"], hidden_act="silu", hidden_size=4096, initializer_range=0.02,
        intermediate_size=14336, max_position_embeddings=131072, num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        torch_dtype="bfloat16", vocab_size=128256, attention_bias=False, mlp_bias=False,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "mistral-7b": dict(
        architectures=["MistralForCausalLM"], hidden_act="silu", hidden_size=4096, initializer_range=0.02,
        intermediate_size=14336, max_position_embeddings=32768, num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
        tie_word_embeddings=False, torch_dtype="bfloat16", vocab_size=32000),
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"], hidden_act="silu", hidden_size=3584, initializer_range=0.02,
        intermediate_size=18944, max_position_embeddings=131072, num_attention_heads=28, num_hidden_layers=28,
        num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072,
        use_sliding_window=False, tie_word_embeddings=False, torch_dtype="bfloat16", vocab_size=152064),
    "minitron-8b": dict(
        architectures=["NemotronForCausalLM"], hidden_act="relu2", hidden_size=4096, initializer_range=0.0134,
        intermediate_size=16384, max_position_embeddings=4096, num_attention_heads=48, num_hidden_layers=32,
        num_key_value_heads=8, head_dim=128, norm_eps=1e-5, partial_rotary_factor=0.5, rope_theta=10000,
        tie_word_embeddings=False, torch_dtype="bfloat16", vocab_size=256000),
}


def _preset(name: str) -> ModelConfig:
    body = yaml.safe_load((Path(conf_dir()) / "model" / f"{name}.yaml").read_text())
    return ModelConfig(**body).resolved()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_published_configs(name):
    """Catches a preset that disagrees with its model's config.json in any field the converter
    maps (RoPE scaling, theta, partial rotary, layernorm1p, eps, heads, head_dim, bias, tying,
    the position limit: a run's length is its own seq_length setting)."""
    preset = _preset(name)
    imported = model_config_from_hf(PUBLISHED[name], name=name)
    differ = {f.name: (getattr(preset, f.name), getattr(imported, f.name)) for f in fields(ModelConfig)
              if getattr(preset, f.name) != getattr(imported, f.name) and f.name != "make_vocab_size_divisible_by"}
    assert differ == {}, differ


def test_mistral_position_limit_is_its_window():
    assert model_config_from_hf(PUBLISHED["mistral-7b"], name="m").max_position_embeddings == 4096


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_export_config_round_trips(name):
    """config.json written on export reads back as the same ModelConfig (and keeps the original's
    max_position_embeddings / sliding window, so transformers sees the original model)."""
    hf = PUBLISHED[name]
    cfg = model_config_from_hf(hf, name=name)
    family = family_for_model(cfg, hf["architectures"][0])
    out = hf_config_from_model(cfg, family, base=hf, bos_token_id=1, eos_token_id=2)
    assert asdict(model_config_from_hf(out, name=name)) == asdict(cfg)
    assert out["max_position_embeddings"] == hf["max_position_embeddings"]
    assert out.get("sliding_window") == hf.get("sliding_window")


def test_export_architecture_inferred_and_refused():
    qwen = model_config_from_hf(PUBLISHED["qwen2.5-7b"], name="q")
    assert family_for_model(qwen).architecture == "Qwen2ForCausalLM"
    nemotron = model_config_from_hf(PUBLISHED["minitron-8b"], name="n")
    assert family_for_model(nemotron).architecture == "NemotronForCausalLM"
    with pytest.raises(ConfigError, match="model.add_qkv_bias=True cannot be written as LlamaForCausalLM"):
        family_for_model(qwen, "LlamaForCausalLM")
    with pytest.raises(ConfigError, match="convert.architecture='GPT2LMHeadModel'"):
        family_for_model(qwen, "GPT2LMHeadModel")


def test_pruned_llama_exports_as_a_config_transformers_loads():
    """A width-pruned SmolLM2 (9 heads of 64 at hidden 464) is refused by transformers' LlamaConfig;
    the export writes it as Mistral (no sliding window), which computes the same model."""
    smol = dict(architectures=["LlamaForCausalLM"], hidden_act="silu", hidden_size=576, intermediate_size=1536,
                max_position_embeddings=8192, num_attention_heads=9, num_hidden_layers=30, num_key_value_heads=3,
                rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, vocab_size=49152)
    teacher = model_config_from_hf(smol, name="smol")
    pruned = replace(teacher, hidden_size=464, ffn_hidden_size=1240, kv_channels=64)
    llama = family_for_model(pruned, "LlamaForCausalLM")
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        transformers.LlamaConfig(**hf_config_from_model(pruned, llama))
    family = loadable_family(pruned, llama)
    assert family.architecture == "MistralForCausalLM"
    out = hf_config_from_model(pruned, family, base=None)
    loaded = transformers.MistralConfig(**out)
    assert (loaded.hidden_size, loaded.head_dim, loaded.sliding_window) == (464, 64, None)
    assert asdict(model_config_from_hf(out, name="smol")) == asdict(model_config_from_hf(
        hf_config_from_model(pruned, llama), name="smol"))
    assert loadable_family(teacher, llama) is llama  # 576 = 9 x 64: Llama stays Llama


def test_both_rope_spellings_agree():
    v4 = PUBLISHED["llama3.1-8b"]
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": v4["rope_theta"]}
    assert model_config_from_hf(v5, name="x") == model_config_from_hf(v4, name="x")
    assert sorted(FAMILIES) == sorted(family_of({"architectures": [a]}).architecture for a in FAMILIES)
