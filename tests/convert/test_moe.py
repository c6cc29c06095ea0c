"""Mixtral, Qwen2-MoE and Qwen3-MoE: HF -> run dir -> HF at TP=1, EP=2 and TP=2 against transformers
itself, and a pruned MoE (fewer, narrower experts) exported back to transformers.

One spawn of 2 gloo processes does every import, logits pass, trim and export
(moe_workers.convert_moe); this process compares with transformers' own results.
"""

import json
from pathlib import Path

import pytest
import torch

from minitron_megatron.convert.families import family_for_model, hf_config_from_model, model_config_from_hf
from minitron_megatron.errors import ConfigError
from tests.convert.hf_models import moe_configs, reference_logits
from tests.convert.moe_workers import MOE_EXPORT_AT, MOE_LAYOUTS, PRUNE, SHARED_PRUNED, convert_moe
from tests.convert.test_roundtrip import ATOL, _tensors
from tests.dist_utils import run_distributed

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = pytest.mark.compat

MOE_FAMILIES = sorted(moe_configs())
NO_BAD_KEYS = ("missing_keys", "unexpected_keys", "mismatched_keys")


@pytest.fixture(scope="module")
def converted(hf_moe_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_moe")
    (root / "hf").symlink_to(next(iter(hf_moe_models.values())).parent)
    run_distributed(convert_moe, 2, str(root), MOE_FAMILIES)
    return root


def _load(hf_dir):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(hf_dir), output_loading_info=True,
                                                       attn_implementation="eager")
    assert not any(info.get(k) for k in NO_BAD_KEYS), info
    return model.eval()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_imported_moe_logits_match_transformers(converted, hf_moe_models, family):
    """Catches a router row order, a swapped gate/up (w1/w3) in an expert's fc1, a local expert
    read as another global one at EP=2 (rank 1 loading experts 0-1 again), an expert split over TP
    like a dense MLP at TP=2, a missing shared expert or shared-expert gate, Qwen3's Q/K head norms
    missing or swapped, and the wrong routing
    normalisation (Mixtral renormalises the top-k; Qwen2-MoE with norm_topk_prob=false does not):
    the saved run dir's logits must equal transformers' within 1e-4 in float32."""
    ref = torch.load(hf_moe_models[family] / "reference_logits.pt")
    for layout in MOE_LAYOUTS:
        got = torch.load(converted / f"logits-{family}-{layout}.pt")
        diff = (got - ref).abs().max().item()
        assert diff <= ATOL, f"{family} imported at {layout}: max |logits diff| {diff}"


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_export_reproduces_every_tensor_and_loads(converted, hf_moe_models, family):
    """Catches an export that loses the experts of EP rank 1 (or writes them under local numbers,
    so two ranks both write expert 0), writes an expert twice from its TP or data-parallel
    replicas, de-interleaves an expert's [gate; up] wrongly, or a config.json that names the
    wrong expert count, widths or routing: every tensor equals the original bit for bit and
    transformers computes the original logits from the export."""
    original = _tensors(hf_moe_models[family])
    ref = torch.load(hf_moe_models[family] / "reference_logits.pt")
    tokens = torch.load(converted / "hf" / "tokens.pt")
    for source in MOE_EXPORT_AT:
        out = converted / f"out-{family}-{source}"
        exported = _tensors(out)
        assert sorted(exported) == sorted(original)
        for name, tensor in original.items():
            assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
        torch.testing.assert_close(reference_logits(_load(out), tokens), ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_pruned_moe_export_loads_in_transformers(converted, family):
    """Catches a pruned MoE export whose config.json keeps the original expert count or widths
    (num_local_experts / num_experts, intermediate_size / moe_intermediate_size,
    shared_expert_intermediate_size), that writes the kept experts under their old numbers, or
    drops one EP rank's kept expert: transformers must load it with no missing or unexpected keys
    and compute the pruned Megatron model's logits."""
    out = converted / f"out-pruned-{family}"
    model = _load(out)
    config = json.loads((out / "config.json").read_text())
    if family == "mixtral":
        assert (config["num_local_experts"], config["intermediate_size"]) == tuple(PRUNE.values())
    elif family == "qwen3_moe":
        assert (config["num_experts"], config["moe_intermediate_size"]) == tuple(PRUNE.values())
    else:
        assert (config["num_experts"], config["moe_intermediate_size"], config["shared_expert_intermediate_size"]) \
            == (*PRUNE.values(), SHARED_PRUNED)
    got = reference_logits(model, torch.load(converted / "hf" / "tokens.pt"))
    diff = (got - torch.load(converted / f"logits-pruned-{family}.pt")).abs().max().item()
    assert diff <= ATOL, f"pruned {family}: max |logits diff| {diff}"


# The architectural keys of published config.json files (mistralai/Mixtral-8x7B-v0.1,
# Qwen/Qwen1.5-MoE-A2.7B), transformers-4 spelling.
PUBLISHED_MOE = {
    "mixtral-8x7b": dict(
        architectures=["MixtralForCausalLM"], hidden_act="silu", hidden_size=4096, initializer_range=0.02,
        intermediate_size=14336, max_position_embeddings=32768, num_attention_heads=32, num_experts_per_tok=2,
        num_hidden_layers=32, num_key_value_heads=8, num_local_experts=8, output_router_logits=False,
        rms_norm_eps=1e-5, rope_theta=1e6, router_aux_loss_coef=0.02, sliding_window=None,
        tie_word_embeddings=False, torch_dtype="bfloat16", vocab_size=32000),
    "qwen1.5-moe-a2.7b": dict(
        architectures=["Qwen2MoeForCausalLM"], hidden_act="silu", hidden_size=2048, initializer_range=0.02,
        intermediate_size=5632, max_position_embeddings=8192, moe_intermediate_size=1408, norm_topk_prob=False,
        num_attention_heads=16, num_experts=60, num_experts_per_tok=4, num_hidden_layers=24,
        num_key_value_heads=16, output_router_logits=False, rms_norm_eps=1e-6, rope_theta=1e6,
        router_aux_loss_coef=0.001, shared_expert_intermediate_size=5632, sliding_window=32768,
        tie_word_embeddings=False, torch_dtype="bfloat16", use_sliding_window=False, vocab_size=151936,
        decoder_sparse_step=1),
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], attention_bias=False, decoder_sparse_step=1, head_dim=128,
        hidden_act="silu", hidden_size=2048, initializer_range=0.02, intermediate_size=6144,
        max_position_embeddings=40960, mlp_only_layers=[], moe_intermediate_size=768, norm_topk_prob=True,
        num_attention_heads=32, num_experts=128, num_experts_per_tok=8, num_hidden_layers=48,
        num_key_value_heads=4, output_router_logits=False, rms_norm_eps=1e-6, rope_theta=1000000.0,
        router_aux_loss_coef=0.001, sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16",
        use_sliding_window=False, vocab_size=151936),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MOE))
def test_moe_config_round_trips(name):
    """Catches a MoE key read or written under the other family's name, or routing mapped
    one way and written back the other: config.json -> ModelConfig -> config.json -> the same
    ModelConfig, and the family is inferred from the model alone."""
    hf = PUBLISHED_MOE[name]
    cfg = model_config_from_hf(hf, name=name)
    assert cfg.num_moe_experts == hf.get("num_local_experts", hf.get("num_experts"))
    assert cfg.moe_router_pre_softmax == (not hf.get("norm_topk_prob", True))  # Mixtral: renormalised
    assert cfg.qk_layernorm == (name == "qwen3-30b-a3b")
    family = family_for_model(cfg)
    assert family.architecture == hf["architectures"][0]
    out = hf_config_from_model(cfg, family, base=hf)
    assert model_config_from_hf(out, name=name) == cfg


def test_moe_configs_we_cannot_compute_are_refused():
    """Catches a converter that silently drops what Megatron's MoE layer would not compute: dense
    layers between MoE layers, router jitter, a Qwen2-MoE without Q/K/V bias; and an export that
    writes a MoE model as a dense family or a router it cannot express."""
    qwen = PUBLISHED_MOE["qwen1.5-moe-a2.7b"]
    with pytest.raises(ConfigError, match="mlp_only_layers=\\[1\\]"):
        model_config_from_hf({**qwen, "mlp_only_layers": [1]}, name="q")
    with pytest.raises(ConfigError, match="decoder_sparse_step=2"):
        model_config_from_hf({**qwen, "decoder_sparse_step": 2}, name="q")
    with pytest.raises(ConfigError, match="qkv_bias=false"):
        model_config_from_hf({**qwen, "qkv_bias": False}, name="q")
    with pytest.raises(ConfigError, match="router_jitter_noise=0.1"):
        model_config_from_hf({**PUBLISHED_MOE["mixtral-8x7b"], "router_jitter_noise": 0.1}, name="m")
    cfg = model_config_from_hf(qwen, name="q")
    with pytest.raises(ConfigError, match="cannot be written as LlamaForCausalLM"):
        family_for_model(cfg, "LlamaForCausalLM")
    with pytest.raises(ConfigError, match="moe_router_pre_softmax=True cannot be written as MixtralForCausalLM"):
        family_for_model(cfg, "MixtralForCausalLM")


def test_our_moe_run_dir_writes_a_config_transformers_builds(tmp_path):
    """Catches a config.json written without a key transformers needs, or with expert sizes that
    disagree with the tensors the export writes: tiny-moe (no HF original to start from) is
    written as Mixtral, and what transformers saves for that config.json has exactly the tensor
    names and shapes the export writes."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from minitron_megatron.config.files import conf_dir
    from minitron_megatron.config.model import ModelConfig
    from minitron_megatron.convert.hf_io import HFReader
    from minitron_megatron.convert.tensor_map import expected_hf_shapes

    body = yaml.safe_load((Path(conf_dir()) / "model" / "tiny-moe.yaml").read_text())
    cfg = ModelConfig(**{**body, "vocab_size": 320, "num_layers": 1})
    family = family_for_model(cfg)
    assert family.architecture == "MixtralForCausalLM"
    config = hf_config_from_model(cfg, family, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).save_pretrained(str(tmp_path))
    assert HFReader(tmp_path).shapes() == expected_hf_shapes(cfg, family)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routing_normalisation_is_visible_in_the_reference(hf_moe_models, family):
    """The logits tests can fail: flipping the top-k renormalisation (Mixtral's always on,
    Qwen2-MoE's norm_topk_prob=false, Qwen3-MoE's true) moves transformers' own logits far beyond
    the tolerance, so a converter that mapped Megatron's moe_router_pre_softmax the wrong way
    would be caught."""
    from transformers import AutoModelForCausalLM

    ref = torch.load(hf_moe_models[family] / "reference_logits.pt")
    tokens = torch.load(hf_moe_models[family].parent / "tokens.pt")
    model = AutoModelForCausalLM.from_pretrained(str(hf_moe_models[family]), attn_implementation="eager").eval()
    for block in (layer.mlp for layer in model.model.layers):
        router = block.gate
        if family == "mixtral":  # top-k of the softmax without renormalising
            router.forward = lambda x, r=router: _top_k_unnormalised(x, r)
        else:
            router.norm_topk_prob = not router.norm_topk_prob
    assert (reference_logits(model, tokens) - ref).abs().max().item() > 100 * ATOL


def _top_k_unnormalised(hidden_states, router):
    logits = torch.nn.functional.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
    values, indices = torch.topk(torch.softmax(logits.float(), dim=-1), router.top_k, dim=-1)
    return logits, values, indices


def test_imported_parameter_counts_are_exact(converted):
    """Catches a parameter count (model/params.py: plans, search budgets, summaries) that misses a
    MoE part the converter fills: the router, every expert, the shared expert and its gate,
    Qwen3's Q/K norms. Each import's counted parameters equal the formula's at every layout, and
    so do the pruned run dirs'."""
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.model import parameter_count

    summaries = json.loads((converted / "summaries.json").read_text())
    for family in MOE_FAMILIES:
        for layout in MOE_LAYOUTS:
            cfg, padded, _ = rd.read_model_yaml(converted / f"{family}-{layout}")
            assert summaries[f"import {family} {layout}"]["params"] == parameter_count(cfg, padded), (family, layout)
        cfg, padded, _ = rd.read_model_yaml(converted / f"pruned-{family}")
        assert summaries[f"export pruned {family}"]["params"] == parameter_count(cfg, padded), family
