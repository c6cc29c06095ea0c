"""HF -> run dir -> HF for every family, at TP=1, PP=2 and TP=2, against transformers itself.

One spawn of 2 gloo processes does every import, logits pass and export (see
workers.convert_everything); this process compares with transformers' own results.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.convert.hf_models import family_configs, reference_logits
from tests.convert.workers import EXPORT_AT, LAYOUTS, convert_everything
from tests.dist_utils import run_distributed

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = pytest.mark.compat

FAMILIES = sorted(family_configs())  # float32; "nemotron-bf16" is the bf16 round trip
ATOL = 1e-4


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    (root / "hf").symlink_to(next(iter(hf_models.values())).parent)
    run_distributed(convert_everything, 2, str(root), FAMILIES)
    return root


def _tensors(hf_dir: Path) -> dict:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        with safe_open(str(hf_dir / file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    assert set(out) == set(index), "the index must list exactly the tensors in the files"
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_match_transformers(converted, hf_models, family):
    """Catches a wrong QKV interleave or GLU order per TP rank, a wrong vocab-parallel slice, a
    layer offset error at PP=2 (Nemotron's 3 layers split 2+1), and any config field mapped
    wrongly (llama3 RoPE scaling, partial rotary, layernorm1p, squared ReLU, Q/K/V bias, tied
    embeddings, head_dim != hidden/heads, eps): logits of the saved run dir, reloaded from its
    checkpoint, must equal transformers' within 1e-4 in float32."""
    ref = torch.load(hf_models[family] / "reference_logits.pt")
    for layout in LAYOUTS:
        got = torch.load(converted / f"logits-{family}-{layout}.pt")
        assert got.shape == ref.shape
        diff = (got - ref).abs().max().item()
        assert diff <= ATOL, f"{family} imported at {layout}: max |logits diff| {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reproduces_every_tensor_and_loads(converted, hf_models, family):
    """Catches an export that drops, renames, reorders (QKV/GLU de-interleave at another TP/PP
    than the import), pads or re-types any tensor, a bad index, or a config.json that
    transformers reads differently (rope scaling spelling, head_dim, tie flag)."""
    from transformers import AutoModelForCausalLM

    original = _tensors(hf_models[family])
    ref = torch.load(hf_models[family] / "reference_logits.pt")
    tokens = torch.load(converted / "hf" / "tokens.pt")
    for source in EXPORT_AT:
        out = converted / f"out-{family}-{source}"
        exported = _tensors(out)
        assert sorted(exported) == sorted(original)
        for name, tensor in original.items():
            assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
        model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True,
                                                           attn_implementation="eager")
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        torch.testing.assert_close(reference_logits(model.eval(), tokens), ref, rtol=0, atol=0)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (out / name).read_bytes() == (hf_models[family] / name).read_bytes()


def test_bf16_round_trip_is_bit_exact(converted, hf_models):
    """Catches an export that writes Megatron's float32 torch-norm weights of a bf16 model as
    float32, or any lossy cast on the way in or out."""
    original, exported = _tensors(hf_models["nemotron-bf16"]), _tensors(converted / "out-bf16")
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert tensor.dtype == torch.bfloat16 and exported[name].dtype == torch.bfloat16, name
        assert torch.equal(exported[name], tensor), name
    assert json.loads((converted / "out-bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_pruned_shaped_run_dir_exports_to_transformers(converted):
    """Catches an export that assumes head_dim == hidden/heads or standard sizes (as a pruned
    model has not): transformers must load the export cleanly and compute the run dir's logits."""
    from transformers import AutoModelForCausalLM

    out = converted / "out-pruned"
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True,
                                                       attn_implementation="eager")
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.head_dim == 12 and model.config.hidden_size == 40
    got = reference_logits(model.eval(), torch.load(converted / "hf" / "tokens.pt"))
    megatron = torch.load(converted / "logits-pruned.pt")
    assert (got - megatron).abs().max().item() <= ATOL
    at_dp2, at_tp2 = _tensors(converted / "out-pruned-dp2"), _tensors(out)  # exported at TP=1 x DP=2 / TP=2
    assert sorted(at_dp2) == sorted(at_tp2) and all(torch.equal(at_dp2[n], at_tp2[n]) for n in at_tp2)


def test_trimmed_nemotron_exports_to_transformers(converted):
    """Catches a gap between the trimmer's run dirs and export: the pruned model.yaml (head_dim
    16 != 48 / 2, 2 layers) and the tokenizer the trimmer copied must give a HF Nemotron that
    transformers loads cleanly and that computes the pruned Megatron model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = converted / "out-trimmed"
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True,
                                                       attn_implementation="eager")
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert (model.config.architectures, model.config.hidden_size, model.config.num_hidden_layers,
            model.config.num_attention_heads, model.config.head_dim) == (["NemotronForCausalLM"], 48, 2, 2, 16)
    got = reference_logits(model.eval(), torch.load(converted / "hf" / "tokens.pt"))
    assert (got - torch.load(converted / "logits-trimmed.pt")).abs().max().item() <= ATOL
    assert AutoTokenizer.from_pretrained(str(out)).eos_token == "</s>"


def test_rope_scaling_is_visible_in_the_reference(hf_models):
    """The logits tests can fail: without llama3 scaling the tiny Llama's logits move by far more
    than the tolerance, so a converter that dropped rope scaling would be caught."""
    from transformers import AutoModelForCausalLM

    config = json.loads((hf_models["llama"] / "config.json").read_text())
    theta = config["rope_parameters"]["rope_theta"]
    plain = AutoModelForCausalLM.from_pretrained(str(hf_models["llama"]), attn_implementation="eager",
                                                 rope_parameters={"rope_type": "default", "rope_theta": theta})
    tokens = torch.load(hf_models["llama"].parent / "tokens.pt")
    ref = torch.load(hf_models["llama"] / "reference_logits.pt")
    assert (reference_logits(plain.eval(), tokens) - ref).abs().max().item() > 100 * ATOL


def test_export_loads_a_few_parameters_at_a_time(converted):
    """Catches an export that loads the whole checkpoint at once (the shard plus Megatron's merged
    copy of every GLU fc1: 0.85x of a Llama checkpoint per rank at TP=2) or keeps a loaded tensor
    (a loop variable, a list of shards) alive into the next load: in every export above, at TP=2,
    PP=2 and DP=2, no `dist_checkpointing.load` may ask for more bytes than the export's largest
    parameter, and none of the tensors earlier loads returned may still be alive."""
    ranks = [json.loads((converted / f"export-loads-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(max(c["largest"] for c in calls) > 0 for calls in ranks[0])  # rank 0 reads in every export
    for calls in (calls for exports in ranks for calls in exports):  # one rank's loads in one export
        assert max(c["bytes"] for c in calls) <= max(c["largest"] for c in calls), "a load asked for too much"
        assert max(c["alive"] for c in calls) == 0, "a tensor from an earlier load was still alive"
