"""Shared cases of the distributed trim tests: models, targets, synthetic scores, batches.

Workers run in spawned processes (module-level functions); each writes its results to
files that the test process compares. One launch per parallel layout runs every case.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.prune import TrimTarget

PADDED = 256

GQA = ModelConfig(name="gqa", num_layers=4, hidden_size=64, ffn_hidden_size=160, num_attention_heads=8,
                  num_query_groups=4, kv_channels=8,
                  max_position_embeddings=16, vocab_size=250, make_vocab_size_divisible_by=64)
"""8 heads in 4 GQA groups, SwiGLU (fc1 stride 2), RMSNorm, RoPE, untied, no biases."""
MHA = ModelConfig(name="mha", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_query_groups=None, kv_channels=16,
                  max_position_embeddings=16, vocab_size=250, make_vocab_size_divisible_by=64,
                  normalization="LayerNorm", gated_linear_unit=False, activation="gelu",
                  position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True,
                  add_bias_linear=True)
"""Multi-head attention, LayerNorm (with bias), GELU without GLU, biases everywhere, tied embeddings."""


@dataclass
class Case:
    model: ModelConfig
    target: TrimTarget
    residual_heads: bool = False
    depth_metric: str = "block_importance"
    pp_layout: Optional[List[int]] = None


CASES: Dict[str, Case] = {
    "keep": Case(GQA, TrimTarget()),
    "hidden": Case(GQA, TrimTarget(hidden_size=40)),
    "heads": Case(GQA, TrimTarget(num_attention_heads=4)),               # 2 -> 1 per group, 4 groups
    "groups": Case(GQA, TrimTarget(num_query_groups=2)),                 # 8h/4g -> 4h/2g (whole groups)
    "ffn": Case(GQA, TrimTarget(ffn_hidden_size=96)),                    # 160 -> 96, uneven per rank
    "depth": Case(GQA, TrimTarget(num_layers=3)),
    "all_fold": Case(GQA, TrimTarget(hidden_size=48, num_attention_heads=2, num_query_groups=2,
                                     ffn_hidden_size=96, num_layers=3), residual_heads=True),
    "mha_all": Case(MHA, TrimTarget(hidden_size=48, num_attention_heads=2, ffn_hidden_size=64)),
}

PP_CASES: Dict[str, Case] = {
    # Old stages hold [0,1] [2,3]: new layer 0 (old 2) moves from stage 1 to stage 0.
    "pp_width_depth": Case(GQA, TrimTarget(hidden_size=48, num_query_groups=2, ffn_hidden_size=96,
                                           drop_layers=[0, 1])),
    # Explicit layout [1, 2]: new layer 1 (old 1) moves from stage 0 to stage 1.
    "pp_layout": Case(GQA, TrimTarget(num_attention_heads=4, drop_layers=[3]), pp_layout=[1, 2]),
}


def synthetic_scores(cfg: ModelConfig, seed: int) -> Dict[str, torch.Tensor]:
    """Random scores skewed so that resharding has work to do at TP=2: the kept groups and
    most kept neurons sit on TP rank 0 before trimming (uneven kept counts per rank)."""
    from minitron_megatron.trim import random_scores

    scores = random_scores(cfg, seed)
    groups, ffn = scores["attn.group"].shape[1], scores["mlp.neuron"].shape[1]
    scores["attn.group"][:, : groups // 2] += 10
    scores["attn.head"][:, : scores["attn.head"].shape[1] // 2] += 10  # MHA: heads are groups
    scores["mlp.neuron"][:, : ffn // 2 - 8] += 10
    return scores


def batches(cfg: ModelConfig, num: int = 2, mbs: int = 2) -> List[dict]:
    """Fixed microbatches in the forward-step format (tokens, labels, loss_mask, position_ids)."""
    gen = torch.Generator().manual_seed(0)
    seq = cfg.max_position_embeddings  # samples as long as the model allows
    out = []
    for _ in range(num):
        tokens = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), generator=gen)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).expand(mbs, -1).clone()})
    return out
