"""importance.safetensors / importance.json round trip, plots and the summary."""

import json

import pytest
import torch

from minitron_megatron.errors import ConfigError
from minitron_megatron.importance import format_summary, has_importance, load_importance, save_importance, save_plots

L, HEADS, GROUPS, FFN, H, K = 3, 4, 2, 12, 8, 2


def _scores():
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    return {"attn.head": rand(L, HEADS), "attn.group": rand(L, GROUPS), "mlp.neuron": rand(L, FFN),
            "hidden.channel": rand(H), "depth.block_importance": rand(L), "depth.loss_drop": rand(L),
            "depth.contiguous": rand(L - K + 1)}


def _meta(scores):
    return {"format": 1, "aggregation": {"seq": "mean", "batch": "l2"},
            "calibration": {"samples": 8, "tokens": 256}, "depth": {"contiguous_k": K},
            "layer_rankings": {"depth.loss_drop": [int(i) for i in scores["depth.loss_drop"].argsort()]}}


def test_round_trip_is_exact_and_leaves_no_temporaries(tmp_path):
    """Catches a trimmer reading different scores than were computed (dtype, names, shapes)
    and half-written files left behind by the atomic writes."""
    scores = _scores()
    save_importance(scores, _meta(scores), tmp_path)
    loaded, meta = load_importance(tmp_path)
    assert sorted(loaded) == sorted(scores)
    for name, tensor in scores.items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], tensor), name
    assert meta == json.loads(json.dumps(_meta(scores)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["importance.json", "importance.safetensors"]
    assert has_importance(tmp_path)


def test_missing_scores_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no importance scores"):
        load_importance(tmp_path)
    assert not has_importance(tmp_path)


def test_plots_and_summary(tmp_path):
    scores = _scores()
    paths = save_plots(scores, _meta(scores), tmp_path)
    assert [p.name for p in paths] == ["importance_width.png", "importance_depth.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    text = format_summary(scores, _meta(scores))
    assert "seq=mean batch=l2" in text and "contiguous k=2" in text
    assert len([line for line in text.splitlines() if line.strip()[:1].isdigit()]) == L


def test_stage_writes_a_loadable_score_set(reference_run):
    """Catches a stage that writes scores the trimmer cannot use: every contract tensor with
    its contract shape, metadata naming what was measured, and the plots, in the save dir."""
    from tests.importance import workers

    cfg = workers.small_model(**workers.CASES["gqa"])
    L, groups = cfg.num_layers, cfg.resolved().num_query_groups
    scores, meta = load_importance(reference_run / "scored")
    expected = {"attn.head": (L, cfg.num_attention_heads), "attn.group": (L, groups),
                "mlp.neuron": (L, cfg.ffn_hidden_size), "hidden.channel": (cfg.hidden_size,),
                "depth.block_importance": (L,), "depth.loss_drop": (L,), "depth.contiguous": (L - 1,),
                "hidden.channel_by_norm": (2 * L + 1, cfg.hidden_size),
                "hidden.norm_moments": (2 * L + 1, 2, cfg.hidden_size)}
    assert {k: tuple(v.shape) for k, v in scores.items()} == expected
    assert meta["hidden"]["norms"][:2] == ["layer0.input_norm", "layer0.pre_mlp_norm"]
    assert meta["hidden"]["norms"][-1] == "final_norm" and len(meta["hidden"]["norms"]) == 2 * L + 1
    assert all(torch.isfinite(v).all() for v in scores.values())
    assert meta["calibration"]["samples"] == 8 and meta["calibration"]["tokens"] == 8 * cfg.max_position_embeddings
    assert meta["aggregation"] == {"seq": "mean", "batch": "l2"}
    assert sorted(meta["layer_rankings"]["depth.loss_drop"]) == list(range(L))
    in_memory = torch.load(reference_run / "stage.pt")["scores"]
    assert all(torch.equal(in_memory[k], scores[k]) for k in scores)
    assert (reference_run / "scored" / "importance_width.png").is_file()
    assert (reference_run / "scored" / "importance_depth.png").is_file()
