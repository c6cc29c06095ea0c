"""Run directory -> HF directory (any run dir, pruned ones included), at any TP/PP/EP.

The model is built on the meta device at the context's TP/PP: it only names the
parameters and their shards. Parameters are then streamed: each rank reads its shards
from the checkpoint a few at a time (`checkpoint.dist.stream_parameters`), TP rank 0
of each stage gathers each parameter into the full tensor, splits it into HF tensors
and writes them straight into safetensors files of bounded size (nothing buffered),
which every stage writes in parallel, and drops it. A MoE layer's routed experts are whole
on their EP rank: each EP rank writes its own experts (under their global numbers), so the
experts are gathered over EP in the directory, never in one process. Rank 0 then names the files,
writes the index, config.json, generation_config.json and the tokenizer files, and
renames the temporary directory into place: a crash never leaves a directory that
looks complete."""

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.convert import ConvertConfig
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.convert import tensor_map as tm
from minitron_megatron.convert.families import (
    FAMILIES,
    Family,
    family_for_model,
    hf_config_from_model,
    loadable_family,
)
from minitron_megatron.convert.hf_io import StreamingShardWriter, finalize_shards, optional_json
from minitron_megatron.convert.importer import HF_CONFIG, check_target
from minitron_megatron.data.tokenizer import HFTokenizer, load_tokenizer, write_hf_tokenizer
from minitron_megatron.errors import ConfigError
from minitron_megatron.model import validate_model
from minitron_megatron.model.modules import is_routed_expert_param
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.progress import Progress


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
    check_target(to_hf, "to_hf")
    cfg, padded, tokenizer = rd.read_model_yaml(run_dir)
    base = optional_json(run_dir / HF_CONFIG)
    base_arch = (base or {}).get("architectures", [None])[0]
    family = family_for_model(cfg, options.architecture or (base_arch if base_arch in FAMILIES else None))
    if not options.architecture:
        family = loadable_family(cfg, family)
    validate_model(cfg, parallel)
    if padded % parallel.tp:
        raise ConfigError(f"parallel.tp={parallel.tp} does not divide the padded vocab {padded} of load={load}")
    if base_arch != family.architecture:
        base = None  # the original's extra keys belong to another architecture
    return ExportPlan(run_dir, Path(to_hf), cfg, padded, tokenizer, family, base)


def export_hf(load: str, to_hf: str, options: ConvertConfig, parallel: ParallelConfig,
              ctx: ParallelContext) -> Dict:
    """Write the run dir `load` as a HF directory `to_hf`; the JSON summary."""
    from minitron_megatron.model import build_gpt_model, count_model_parameters

    start = time.time()
    plan = plan_export(load, to_hf, options, parallel)
    # Meta build: the model only describes the parameters (names, shapes, TP attributes and the
    # checkpoint's sharded keys); their values are read a few at a time while streaming.
    model = build_gpt_model(plan.model_cfg, ctx, parallel, plan.padded_vocab, init="meta")
    params = count_model_parameters(model, ctx)
    tmp = plan.out_dir.parent / f".{plan.out_dir.name}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    files = _stream_tensors(model, plan, ctx, tmp, options.max_shard_size_mb * 2**20)
    everyone = [(ctx.rank, files)]
    if dist.is_initialized():
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, (ctx.rank, files))
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
    """Load each parameter's shard, gather it on TP rank 0 of this stage, write its HF tensors
    and drop it before taking the next: what is resident is at most one load's group (no more
    bytes than the largest parameter) and one full tensor. The file list.

    Two passes, each a collective stream that every rank runs to its end: the parameters every
    replica holds (written by data-parallel rank 0, gathered over TP), then the routed experts,
    which only their EP rank holds whole (written by each EP rank's first replica, no gather).
    Separate passes keep each TP group's sends and receives in step: the ranks of one TP group
    may write different experts, or none."""
    # Megatron's torch norms stay float32 in a bf16/fp16 model; HF files hold one dtype
    # (config.json's torch_dtype), and casting the imported values back is exact.
    dtype = getattr(torch, plan.model_cfg.params_dtype)
    params = _exported_params(model, plan, ctx)
    shared = {n: v for n, v in params.items() if not is_routed_expert_param(n)} if ctx.dp_rank == 0 else {}
    experts = {n: v for n, v in params.items() if is_routed_expert_param(n)} if ctx.expert_dp_rank == 0 else {}
    writes = {n: v for n, v in shared.items() if ctx.tp_rank == 0}
    writes.update(experts)
    writer = None
    if writes:
        layout = [(hf_name, tuple(t.shape), dtype) for name, (param, source) in writes.items()
                  for hf_name, t in source.split(_meta_full(name, param, ctx.tp_size)).items()]
        writer = StreamingShardWriter(tmp, f"rank{ctx.rank:05d}", max_bytes, layout)
    root = rd.checkpoint_root(plan.run_dir)
    with Progress("export", len(shared) + len(experts), unit="tensor", enabled=ctx.is_main) as progress:
        for group in (shared, experts):
            for name, shard in ckpt.stream_parameters(root, model, list(group), ctx.device):  # collective
                param, source = group[name]
                full = _gather_full(shard, param, ctx) if group is shared else shard  # None off TP rank 0
                del shard  # before the next load: the loop variable would keep it alive through it
                if full is not None and writer is not None:
                    _write_hf_tensors(writer, source.split(full), dtype)
                del full
                progress.update()
    if writer is None:
        return []
    writer.close()
    return writer.files


def _write_hf_tensors(writer: StreamingShardWriter, tensors: Dict[str, torch.Tensor], dtype) -> None:
    """A function, not a loop in the caller: a loop variable left bound to the last tensor (a view
    of the full one) would keep the full tensor alive through the next load."""
    for hf_name, tensor in tensors.items():
        writer.add(hf_name, tensor.to(dtype))


def _exported_params(model, plan: ExportPlan, ctx: ParallelContext) -> Dict[str, tuple]:
    """name -> (meta parameter, Source) of every parameter this rank holds, in model order
    (the last stage's tied copy of the embedding is the first stage's to write)."""
    offset = tm.layer_offset_of(model)
    experts = tm.expert_offset_of(plan.model_cfg, ctx.ep_rank, ctx.ep_size)
    tied = plan.model_cfg.share_embeddings_and_output_weights
    return {name: (param, tm.source_for(name, plan.model_cfg, plan.family, offset, experts))
            for name, param in model.named_parameters() if not (tied and name == "output_layer.weight")}


def _meta_full(name: str, param, tp_size: int) -> torch.Tensor:
    return torch.empty(tm.full_shape(param, tm.tp_of(name, 0, tp_size)[1]), dtype=param.dtype, device="meta")


def _gather_full(shard: torch.Tensor, param, ctx: ParallelContext) -> Optional[torch.Tensor]:
    """The full (TP=1) tensor of `param` on TP rank 0 of this stage, None on the others.

    Each rank's shard goes straight into its rows or columns of the full tensor, one piece per
    partition_stride block, so TP rank 0 holds the full tensor, its shard and at most one other
    rank's piece. (A `dist.gather` held every shard, gloo's flat copy of them all and then their
    concatenation: 3x the full tensor, 375 MiB for a 32000 x 2048 bf16 embedding.)
    """
    if ctx.tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return shard if ctx.tp_rank == 0 else None  # replicated: TP rank 0's copy is the full tensor
    dim, group = param.partition_dim, ctx.tp_group
    if ctx.tp_rank != 0:
        for _, local, length in tm.shard_pieces(param, ctx.tp_rank, ctx.tp_size):
            dist.send(shard.narrow(dim, local, length).contiguous(), dst=dist.get_global_rank(group, 0), group=group)
        return None
    full = torch.empty(tm.full_shape(param, ctx.tp_size), dtype=shard.dtype, device=shard.device)
    for rank in range(ctx.tp_size):
        for start, local, length in tm.shard_pieces(param, rank, ctx.tp_size):
            piece = full.narrow(dim, start, length)  # rows: contiguous; columns (row-parallel): strided
            if rank == 0:
                piece.copy_(shard.narrow(dim, local, length))
            else:
                _recv_into(piece, dist.get_global_rank(group, rank), group)
    return full


def _recv_into(target: torch.Tensor, src: int, group) -> None:
    """Receive into `target` in place when it is contiguous, else through a buffer of its size."""
    if target.is_contiguous():
        dist.recv(target, src=src, group=group)
        return
    buffer = torch.empty(target.shape, dtype=target.dtype, device=target.device)
    dist.recv(buffer, src=src, group=group)
    target.copy_(buffer)


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
