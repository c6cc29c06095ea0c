"""An independent, unsharded trimmer for tests: slices full (TP=1 layout) weights with plain indexing.

It is written from the TP=1 layout alone (QKV rows `[q_1..q_n, k, v]` per group, fc1
`[gate; up]`), so agreeing with it checks the sharded trimmer's index arithmetic as well
as its communication.
"""

import re
from typing import Dict, List

import torch

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.trim.plan import TrimPlan


def reference_trim(full: Dict[str, torch.Tensor], plan: TrimPlan, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Expected TP=1 weights of the pruned model, keyed like its named_parameters."""
    cfg = cfg.resolved()
    hid = torch.tensor(plan.hidden)
    out = {}
    for name, w in full.items():
        match = re.match(r"decoder\.layers\.(\d+)\.(.+)", name)
        if match is None:
            out[name] = _outer(name, w, hid, plan, cfg)
            continue
        i, suffix = int(match.group(1)), match.group(2)
        if i in plan.layers:
            j = plan.layers.index(i)
            out[f"decoder.layers.{j}.{suffix}"] = _layer_param(suffix, w, plan, j, cfg, hid) * _norm_scale(suffix, plan, i)
    return out


def _outer(name: str, w: torch.Tensor, hid: torch.Tensor, plan: TrimPlan = None, cfg: ModelConfig = None):
    if name == "decoder.final_layernorm.weight" and plan is not None and plan.norm_scale:
        return w[hid] * plan.norm_scale[2 * cfg.num_layers]
    return w[:, hid] if w.dim() == 2 else w[hid]


def _norm_scale(suffix: str, plan: TrimPlan, original_layer: int) -> float:
    """The plan's factor on a layer norm's gamma (RMSNorm cases: no zero-centring, no bias)."""
    if not plan.norm_scale or not suffix.endswith("layernorm.weight"):
        return 1.0
    return plan.norm_scale[2 * original_layer + (suffix.startswith("pre_mlp_layernorm"))]


def _qkv_rows(plan: TrimPlan, j: int, cfg: ModelConfig) -> List[int]:
    n, d = cfg.num_attention_heads // cfg.num_query_groups, cfg.kv_channels
    rows = []
    for g in plan.groups[j]:
        base = g * (n + 2) * d
        for head in plan.heads[j]:
            if head // n == g:
                rows += range(base + (head % n) * d, base + (head % n + 1) * d)
        rows += range(base + n * d, base + (n + 2) * d)  # k, v
    return rows


def _proj_cols(plan: TrimPlan, j: int, cfg: ModelConfig) -> List[int]:
    d = cfg.kv_channels
    return [h * d + e for h in plan.heads[j] for e in range(d)]


def _folded_qkv(w: torch.Tensor, plan: TrimPlan, j: int, cfg: ModelConfig) -> torch.Tensor:
    n, d = cfg.num_attention_heads // cfg.num_query_groups, cfg.kv_channels
    w = w.clone()
    for kept, pruned in (plan.head_folds or [[]] * len(plan.layers))[j]:
        rk = (kept // n) * (n + 2) * d + (kept % n) * d
        rp = (pruned // n) * (n + 2) * d + (pruned % n) * d
        w[rk:rk + d] = 2 * w[rk:rk + d] - w[rp:rp + d]
    return w


def _layer_param(suffix, w, plan: TrimPlan, j: int, cfg: ModelConfig, hid) -> torch.Tensor:
    ffn = torch.tensor(plan.ffn[j])
    if "layernorm" in suffix or suffix.endswith(("linear_proj.bias", "linear_fc2.bias")):
        return w[hid]
    if "linear_qkv" in suffix:
        w = _folded_qkv(w, plan, j, cfg)[torch.tensor(_qkv_rows(plan, j, cfg))]
        return w[:, hid] if w.dim() == 2 else w
    if suffix == "self_attention.linear_proj.weight":
        return w[hid][:, torch.tensor(_proj_cols(plan, j, cfg))]
    if "linear_fc1" in suffix:
        rows = torch.cat([ffn, ffn + cfg.ffn_hidden_size]) if cfg.gated_linear_unit else ffn
        w = w[rows]
        return w[:, hid] if w.dim() == 2 else w
    if suffix == "mlp.linear_fc2.weight":
        return w[hid][:, ffn]
    raise KeyError(suffix)
