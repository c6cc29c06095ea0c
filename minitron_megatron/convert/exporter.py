"""Run directory -> HF directory (any run dir, pruned ones included), at any TP/PP.

The run dir is loaded at the context's TP/PP (each rank holds only its shard).
Parameters are then streamed one at a time: TP shards are gathered on TP rank 0 of
each stage, split into HF tensors and written straight into safetensors files of
bounded size (nothing buffered), which every stage writes in parallel. Rank 0 then names the files, writes the
index, config.json, generation_config.json and the tokenizer files, and renames the
temporary directory into place: a crash never leaves a directory that looks complete.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.convert import ConvertConfig
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.convert import tensor_map as tm
from minitron_megatron.convert.families import FAMILIES, Family, family_for_model, hf_config_from_model
from minitron_megatron.convert.hf_io import StreamingShardWriter, finalize_shards, optional_json
from minitron_megatron.convert.importer import HF_CONFIG, _check_target, assign_parameter
from minitron_megatron.data.tokenizer import HFTokenizer, load_tokenizer, write_hf_tokenizer
from minitron_megatron.errors import ConfigError
from minitron_megatron.model import validate_model
from minitron_megatron.runtime.context import ParallelContext


@dataclass
class ExportPlan:
    run_dir: Path
    out_dir: Path
    model_cfg: ModelConfig
    padded_vocab: int
    tokenizer_path: Optional[str]
    family: Family
    base_config: Optional[dict]


def plan_export(load: str, to_hf: str, options: ConvertConfig, parallel: ParallelConfig) -> ExportPlan:
    """Every reason this export cannot run, as a ConfigError; nothing is written."""
    run_dir = rd.check_loadable(load, "load")
    _check_target(to_hf, "to_hf")
    cfg, padded, tokenizer = rd.read_model_yaml(run_dir)
    base = optional_json(run_dir / HF_CONFIG)
    base_arch = (base or {}).get("architectures", [None])[0]
    family = family_for_model(cfg, options.architecture or (base_arch if base_arch in FAMILIES else None))
    validate_model(cfg, parallel)
    if padded % parallel.tp:
        raise ConfigError(f"parallel.tp={parallel.tp} does not divide the padded vocab {padded} of load={load}")
    if base_arch != family.architecture:
        base = None  # the original's extra keys belong to another architecture
    return ExportPlan(run_dir, Path(to_hf), cfg, padded, tokenizer, family, base)


def export_hf(load: str, to_hf: str, options: ConvertConfig, parallel: ParallelConfig,
              ctx: ParallelContext) -> Dict:
    """Write the run dir `load` as a HF directory `to_hf`; the JSON summary."""
    from minitron_megatron.checkpoint.dist import load_checkpoint
    from minitron_megatron.model import build_gpt_model, count_model_parameters

    start = time.time()
    plan = plan_export(load, to_hf, options, parallel)
    # Meta build + empty storage: the checkpoint overwrites every value, so Megatron's CPU init
    # (every weight plus a float32 master copy per layer) would be pure memory overhead.
    model = build_gpt_model(plan.model_cfg, ctx, parallel, plan.padded_vocab, init="meta")
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            assign_parameter(model, name, torch.empty(param.shape, dtype=param.dtype, device=ctx.device))
    load_checkpoint(rd.checkpoint_root(plan.run_dir), model, None)
    params = count_model_parameters(model, ctx)
    tmp = plan.out_dir.parent / f".{plan.out_dir.name}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    files = _stream_tensors(model, plan, ctx, tmp, options.max_shard_size_mb * 2**20)
    everyone = [(ctx.pp_rank, files)]
    if dist.is_initialized():
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, (ctx.pp_rank, files))
    summary = {"direction": "to_hf", "architecture": plan.family.architecture, "params": params,
               "to_hf": str(plan.out_dir)}
    if ctx.is_main:
        ordered = [f for _, stage_files in sorted(everyone, key=lambda e: e[0]) for f in stage_files]
        weight_map = finalize_shards(tmp, ordered)
        summary.update(tensors=len(weight_map), files=len(ordered), bytes=sum(f[2] for f in ordered))
        summary["tokenizer_files"] = _write_metadata(plan, tmp)
        if plan.out_dir.exists():  # an empty directory (checked by plan_export)
            plan.out_dir.rmdir()
        os.replace(tmp, plan.out_dir)
    ctx.barrier()
    summary["seconds"] = round(time.time() - start, 3)
    return summary


def _stream_tensors(model, plan: ExportPlan, ctx: ParallelContext, tmp: Path, max_bytes: int):
    """Gather each parameter on TP rank 0 of this stage and write its HF tensors; file list."""
    if ctx.dp_rank != 0:
        return []  # other replicas hold the same weights
    offset = tm.layer_offset_of(model)
    # Megatron's torch norms stay float32 in a bf16/fp16 model; HF files hold one dtype
    # (config.json's torch_dtype), and casting the imported values back is exact.
    dtype = getattr(torch, plan.model_cfg.params_dtype)
    params = [(name, param, tm.source_for(name, plan.model_cfg, plan.family, offset))
              for name, param in model.named_parameters()
              if not (plan.model_cfg.share_embeddings_and_output_weights and name == "output_layer.weight")]
    writer = None
    if ctx.tp_rank == 0:
        layout = [(hf_name, tuple(t.shape), dtype) for _, param, source in params
                  for hf_name, t in source.split(_meta_full(param, ctx.tp_size)).items()]
        writer = StreamingShardWriter(tmp, f"stage{ctx.pp_rank:03d}", max_bytes, layout)
    for name, param, source in params:
        shards = _gather_tp(param.data, ctx)  # the last stage's tied embedding copy is skipped above
        if writer is not None:
            for hf_name, tensor in source.split(tm.unshard(shards, param)).items():
                writer.add(hf_name, tensor.to(dtype))
        del shards
    if writer is None:
        return []
    writer.close()
    return writer.files


def _meta_full(param, tp_size: int) -> torch.Tensor:
    return torch.empty(tm.full_shape(param, tp_size), dtype=param.dtype, device="meta")


def _gather_tp(shard: torch.Tensor, ctx: ParallelContext):
    """Every TP rank's shard on TP rank 0 (a list in rank order there, None elsewhere)."""
    if ctx.tp_size == 1:
        return [shard]
    dst = dist.get_global_rank(ctx.tp_group, 0)
    gathered = [torch.empty_like(shard) for _ in range(ctx.tp_size)] if ctx.tp_rank == 0 else None
    dist.gather(shard.contiguous(), gathered, dst=dst, group=ctx.tp_group)
    return gathered


def _write_metadata(plan: ExportPlan, out: Path):
    """config.json, generation_config.json and the tokenizer files; the tokenizer file names."""
    bos = eos = None
    written = []
    if plan.tokenizer_path:
        tokenizer = load_tokenizer(plan.tokenizer_path)
        bos, eos = tokenizer.bos, tokenizer.eod
        if isinstance(tokenizer, HFTokenizer):
            written = write_hf_tokenizer(plan.tokenizer_path, out)
        else:  # sentencepiece: the model file under the name HF's sentencepiece tokenizers look for
            shutil.copyfile(plan.tokenizer_path, out / "tokenizer.model")
            written = ["tokenizer.model"]
        bos = bos if bos is not None and bos >= 0 else None
    config = hf_config_from_model(plan.model_cfg, plan.family, plan.base_config, bos, eos)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return written
