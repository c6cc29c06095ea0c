"""Parameters per pipeline stage, counted on Megatron's own GPTModel built on the meta device
for one rank of the planned world (`runtime/simulated.py`): no memory, exact shapes."""

from dataclasses import dataclass
from typing import Dict, List

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.model.build import pipeline_layer_split

FP8_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""The weights model/fp8.py gives FP8 GEMMs (the transformer layers' linears)."""


@dataclass(frozen=True)
class StageKey:
    """What makes two pipeline stages hold different parameters."""

    first: bool
    last: bool
    layers: int


def stage_keys(num_layers: int, parallel: ParallelConfig) -> List[StageKey]:
    split = pipeline_layer_split(num_layers, parallel.pp, parallel.pp_layout)
    return [StageKey(first=i == 0, last=i == parallel.pp - 1, layers=n) for i, n in enumerate(split)]


def count_local(model) -> Dict[str, int]:
    """This rank's parameters: all of them, and those of the FP8-able linears (numel, rows)."""
    counts = {"params": 0, "fp8_params": 0, "fp8_rows": 0}
    for name, param in model.named_parameters():
        counts["params"] += param.numel()
        if name.endswith(".weight") and name.split(".")[-2] in FP8_LINEARS and "decoder.layers" in name:
            counts["fp8_params"] += param.numel()
            counts["fp8_rows"] += param.shape[0]
    return counts


def stage_parameter_counts(cfg: ModelConfig, parallel: ParallelConfig, dp: int, padded_vocab: int
                           ) -> List[Dict[str, int]]:
    """Per pipeline stage: the parameter counts of its TP rank 0 (every TP rank of a stage holds
    the same numbers: TP splits evenly or replicates). Stages with the same (first, last, layers)
    are built once."""
    from minitron_megatron.model.build import build_gpt_model
    from minitron_megatron.runtime.simulated import simulated_rank

    keys = stage_keys(cfg.num_layers, parallel)
    built: Dict[StageKey, Dict[str, int]] = {}
    for pp_rank, key in enumerate(keys):
        if key in built:
            continue
        with simulated_rank(tp=parallel.tp, pp=parallel.pp, dp=dp, pp_rank=pp_rank, ep=parallel.ep) as ctx:
            model = build_gpt_model(cfg, ctx, parallel, padded_vocab, init="meta")
            built[key] = count_local(model)
            del model
    return [built[key] for key in keys]
