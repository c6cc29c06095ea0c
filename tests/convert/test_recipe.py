"""The recipe on an imported model: HF Llama -> prune at TP=2 -> distill -> HF, against transformers.

One spawn of 2 gloo processes (TP=2) runs the commands' stages in order (workers.recipe_on_imported);
this process loads the exports with transformers and compares them with our own logits.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.convert.hf_models import reference_logits
from tests.convert.workers import RECIPE_TARGET, recipe_on_imported
from tests.dist_utils import run_distributed

ATOL = 1e-4


@pytest.fixture(scope="module")
def recipe(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    shutil.copy(hf_models["llama"].parent / "tokens.pt", root / "tokens.pt")
    run_distributed(recipe_on_imported, 2, str(root), str(hf_models["llama"]))
    return root, json.loads((root / "summaries.json").read_text())


def _load(out: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True,
                                                       attn_implementation="eager")
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("run", ["pruned", "student"])
def test_pruned_model_has_the_target_shape(recipe, hf_models, run):
    """Catches a prune that ignores part of the target on an imported model (query groups,
    explicit head_dim), and prune or distill dropping the imported config.json (export would
    then shrink max_position_embeddings to the training seq_length and lose extra keys)."""
    root, summaries = recipe
    config = json.loads((root / f"hf-{run}" / "config.json").read_text())
    original = json.loads((hf_models["llama"] / "config.json").read_text())
    assert config["max_position_embeddings"] == original["max_position_embeddings"] == 131072
    got = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")}
    assert got == dict(zip(got, RECIPE_TARGET.values()))
    assert config["head_dim"] == 16 != config["hidden_size"] // config["num_attention_heads"]
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_scaling"]["rope_type"] == "llama3"
    assert summaries["prune"]["params_after"] < summaries["prune"]["params_before"]


@pytest.mark.parametrize("run", ["pruned", "student"])
def test_export_loads_in_transformers_with_our_logits(recipe, run):
    """Catches an export of a pruned or distilled imported model that transformers reads
    differently from our GPTModel (head_dim != hidden/heads, fewer query groups, the QKV
    interleave of the kept groups, llama3 RoPE kept, the padded vocab cut back): transformers'
    logits must equal ours (float32, both models loaded from disk) within 1e-4."""
    root, _ = recipe
    model = _load(root / f"hf-{run}")
    tokens = torch.load(root / "tokens.pt")  # [2, 64]
    ours = torch.load(root / f"logits-{run}.pt")
    got = reference_logits(model, tokens)
    assert got.shape == ours.shape == (*tokens.shape, model.config.vocab_size)
    diff = (got - ours).abs().max().item()
    assert diff <= ATOL, f"{run}: max |logits diff| {diff}"


def test_distill_trained_the_imported_student(recipe):
    """Catches a distill that does not train a converted student (teacher not loaded, frozen
    student, NaN): its KD loss falls over the steps and its weights, hence logits, move."""
    root, summaries = recipe
    steps = [json.loads(line) for line in (root / "student" / "train_log.jsonl").read_text().splitlines()]
    kd = [r["kd_loss"] for r in steps if r["kind"] == "step"]
    val_kd = [r["val_kd_loss"] for r in steps if r["kind"] == "eval"]  # after steps 2 and 4, same samples
    assert len(kd) == 4 and all(torch.isfinite(torch.tensor(kd))), kd
    assert len(val_kd) == 2 and val_kd[1] < val_kd[0], val_kd
    moved = (torch.load(root / "logits-student.pt") - torch.load(root / "logits-pruned.pt")).abs().max().item()
    assert moved > 100 * ATOL
    assert summaries["distill"]["steps"] == 4


def test_generate_runs_on_the_distilled_export(recipe):
    """transformers' generate on the exported student: it runs, and its first greedy token is
    the argmax of our model's logits at the prompt's last position."""
    root, _ = recipe
    model = _load(root / "hf-student")
    tokens = torch.load(root / "tokens.pt")
    out = model.generate(tokens, max_new_tokens=4, do_sample=False, pad_token_id=model.config.eos_token_id)
    assert out.shape == (2, tokens.shape[1] + 4) and torch.equal(out[:, : tokens.shape[1]], tokens)
    ours = torch.load(root / "logits-student.pt")
    assert torch.equal(out[:, tokens.shape[1]], ours[:, -1].argmax(-1))
