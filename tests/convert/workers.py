"""Bodies of the multi-rank convert tests (module level: spawned processes unpickle them)."""

import contextlib
import json
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {"tp1": (1, 1), "pp2": (1, 2), "tp2": (2, 1)}
"""Import layouts (tp, pp); 2 processes each (TP=1 runs as DP=2)."""
EXPORT_AT = {"tp1": "pp2", "pp2": "tp2"}
"""Run dir imported at key -> the layout it is exported at (always a different one)."""


def run_dir_logits(run_dir, ctx, tokens: torch.Tensor):
    """Logits [b, s, vocab] of a run dir loaded from its checkpoint at ctx's TP/PP, on the
    last stage's TP rank 0 of DP rank 0 (None elsewhere)."""
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.checkpoint.dist import load_checkpoint
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model

    cfg, padded, _ = rd.read_model_yaml(run_dir)
    model = build_gpt_model(cfg, ctx, ParallelConfig(tp=ctx.tp_size, pp=ctx.pp_size, ep=ctx.ep_size), padded,
                            init="none")
    load_checkpoint(rd.checkpoint_root(run_dir), model, None)
    model.eval()
    logits = _forward(model, ctx, tokens, cfg.hidden_size)
    return None if logits is None else logits[..., : cfg.vocab_size]


def _forward(model, ctx, tokens, hidden):
    """Megatron's GPTModel forward across pipeline stages (hidden states sent stage to stage)."""
    b, s = tokens.shape
    position_ids = torch.arange(s).expand(b, -1)
    with torch.no_grad():
        if not ctx.is_first_stage:
            recv = torch.empty(s, b, hidden)  # [s, b, h]
            dist.recv(recv, src=dist.get_global_rank(ctx.pp_group, ctx.pp_rank - 1))
            model.set_input_tensor(recv)
        out = model(tokens, position_ids, None)
        if not ctx.is_last_stage:
            dist.send(out.contiguous(), dst=dist.get_global_rank(ctx.pp_group, ctx.pp_rank + 1))
            return None
    shards = [torch.empty_like(out) for _ in range(ctx.tp_size)]  # [b, s, V_pad/tp] each
    dist.all_gather(shards, out.contiguous(), group=ctx.tp_group)
    return torch.cat(shards, dim=-1)


def _save_if_writer(ctx, logits, path):
    if logits is not None and ctx.tp_rank == 0 and ctx.dp_rank == 0:
        torch.save(logits, path)


def make_pruned_like_run(run_dir: Path, tokenizer: str, ctx) -> None:
    """A run dir shaped like a pruned one (head_dim 12 != 40/4, ffn 72, 3 layers), random weights."""
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.checkpoint.dist import save_checkpoint
    from minitron_megatron.config.model import ModelConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model, padded_vocab_size

    cfg = ModelConfig(name="pruned-like", num_layers=3, hidden_size=40, ffn_hidden_size=72, num_attention_heads=4,
                      num_query_groups=2, kv_channels=12,
                      max_position_embeddings=64, vocab_size=320, rotary_base=500000,
                      rope_scaling=True, rope_scaling_factor=8.0, layernorm_epsilon=1e-5)
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, ctx.tp_size)
    model = build_gpt_model(cfg, ctx, ParallelConfig(tp=ctx.tp_size, pp=ctx.pp_size), padded)
    gen = torch.Generator().manual_seed(5)  # same draw on every rank: replicas stay identical
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(noise + 1.0 if "norm" in name else noise)
    if ctx.is_main:
        rd.write_model_yaml(run_dir, cfg, padded, tokenizer)
    save_checkpoint(rd.checkpoint_root(run_dir), 1, model, ctx)


def trim_run(src: Path, dst: Path, ctx) -> None:
    """Prune an imported run dir with the real trimmer (random scores): hidden 64 -> 48, 2 of 4
    heads, ffn 96 -> 64, 3 -> 2 layers, so head_dim 16 != 48 / 2."""
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.checkpoint.dist import load_checkpoint
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.config.prune import TrimTarget
    from minitron_megatron.model import build_gpt_model
    from minitron_megatron.trim import apply_plan, plan_from_scores, random_scores, save_trimmed, validate_target

    cfg, padded, tokenizer = rd.read_model_yaml(src)
    parallel = ParallelConfig(tp=ctx.tp_size, pp=ctx.pp_size)
    model = build_gpt_model(cfg, ctx, parallel, padded, init="none")
    load_checkpoint(rd.checkpoint_root(src), model, None)
    target = TrimTarget(hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_layers=2)
    new_cfg = validate_target(cfg, target, ctx.tp_size, ctx.pp_size, padded_vocab=padded)
    plan = plan_from_scores(cfg, new_cfg, random_scores(cfg, seed=0), depth_metric="block_importance")
    result = apply_plan(model, plan, cfg, ctx, parallel, padded)
    save_trimmed(dst, result, plan, padded, tokenizer, ctx, summary={"trimmed": True})


def _read_into(sharded_state_dict) -> list:
    """The tensors a load reads into, one per parameter: a request tensor that is a view (an fc1
    half, a layer with its layer axis in its shape) counts as the tensor it views."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    targets = {}
    for v in nested_values(x=sharded_state_dict):
        if isinstance(v, ShardedBase) and isinstance(v.data, torch.Tensor):
            tensor = v.data if v.data._base is None else v.data._base
            targets[id(tensor)] = tensor
    return list(targets.values())


@contextlib.contextmanager
def recording_loads(calls: list):
    """Record, for every `dist_checkpointing.load` made inside, the bytes of the tensors it
    reads into (all, and the largest one) and how many tensors that earlier loads read into
    are still alive when it starts."""
    from megatron.core import dist_checkpointing

    original, earlier = dist_checkpointing.load, []

    def load(sharded_state_dict, **kwargs):  # our calls pass every argument by keyword
        targets = _read_into(sharded_state_dict)
        sizes = [t.numel() * t.element_size() for t in targets]
        calls.append({"bytes": sum(sizes), "largest": max(sizes, default=0),
                      "alive": sum(ref() is not None for ref in earlier)})
        earlier.extend(weakref.ref(t) for t in targets)
        return original(sharded_state_dict=sharded_state_dict, **kwargs)

    dist_checkpointing.load = load
    try:
        yield
    finally:
        dist_checkpointing.load = original


def convert_everything(rank, world, root, families):
    """Import every family at TP=1, PP=2 and TP=2, take each run dir's logits, and export every
    run dir at a different layout than it was imported at; plus a pruned-shaped run dir."""
    from minitron_megatron.config.commands import ConvertCommand
    from minitron_megatron.config.convert import ConvertConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.convert import convert
    from minitron_megatron.runtime import init_runtime

    root = Path(root)
    tokens = torch.load(root / "hf" / "tokens.pt")
    summaries, loads = {}, []

    def export(cmd, ctx):
        loads.append([])
        with recording_loads(loads[-1]):
            return convert(cmd, ctx)

    for layout, (tp, pp) in LAYOUTS.items():
        ctx = init_runtime(tp=tp, pp=pp, device="cpu", seed=3)
        parallel = ParallelConfig(tp=tp, pp=pp)
        for family in families:
            run = root / f"{family}-{layout}"
            summaries[f"import {family} {layout}"] = convert(
                ConvertCommand(from_hf=str(root / "hf" / family), save=str(run), parallel=parallel), ctx)
            _save_if_writer(ctx, run_dir_logits(run, ctx, tokens), root / f"logits-{family}-{layout}.pt")
        for source, target in EXPORT_AT.items():
            if target != layout:
                continue
            for family in families:
                summaries[f"export {family} {source}@{layout}"] = export(
                    ConvertCommand(load=str(root / f"{family}-{source}"), to_hf=str(root / f"out-{family}-{source}"),
                                   parallel=parallel, convert=ConvertConfig(max_shard_size_mb=1)), ctx)
        if layout == "pp2":  # a bf16 checkpoint, imported at PP=2 and exported at TP=2
            convert(ConvertCommand(from_hf=str(root / "hf" / "nemotron-bf16"), save=str(root / "bf16-pp2"),
                                   parallel=parallel), ctx)
        if layout == "tp2":
            export(ConvertCommand(load=str(root / "bf16-pp2"), to_hf=str(root / "out-bf16"), parallel=parallel), ctx)
        if layout == "tp1":
            make_pruned_like_run(root / "pruned", str(root / f"{families[0]}-tp1" / "tokenizer.model"), ctx)
            export(ConvertCommand(load=str(root / "pruned"), to_hf=str(root / "out-pruned-dp2"), parallel=parallel),
                   ctx)  # two data-parallel replicas: only one may write
        if layout == "tp2":
            _save_if_writer(ctx, run_dir_logits(root / "pruned", ctx, tokens), root / "logits-pruned.pt")
            if "nemotron" in families:  # layernorm1p, partial rotary, squared ReLU through the trimmer
                trim_run(root / "nemotron-tp2", root / "trimmed", ctx)
                _save_if_writer(ctx, run_dir_logits(root / "trimmed", ctx, tokens), root / "logits-trimmed.pt")
                summaries["export trimmed"] = export(
                    ConvertCommand(load=str(root / "trimmed"), to_hf=str(root / "out-trimmed"), parallel=parallel), ctx)
            summaries["export pruned"] = export(
                ConvertCommand(load=str(root / "pruned"), to_hf=str(root / "out-pruned"), parallel=parallel), ctx)
    (root / f"export-loads-rank{rank}.json").write_text(json.dumps(loads))
    if rank == 0:
        (root / "summaries.json").write_text(json.dumps(summaries, indent=1))


RECIPE_TARGET = dict(hidden_size=48, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2)
"""The TP=2 prune of the tiny Llama (hidden 64, 8 heads in 4 groups, head_dim 16, ffn 96): half
the heads and groups, so head_dim 16 != 48 / 4 and each rank keeps one group of two heads."""


def _recipe_data(run_dir: Path, root: Path, ctx) -> dict:
    """data=custom over the test corpus, tokenized (on rank 0) with the imported run dir's own
    HF tokenizer, as a user would with the preprocess command."""
    from minitron_megatron.config.data import DataConfig
    from minitron_megatron.data.preprocess import preprocess
    from tests.convert.hf_models import CORPUS

    tokenizer, prefix = str(run_dir / "tokenizer.model"), str(root / "corpus_text_document")
    if ctx.is_main:
        docs = root / "corpus.jsonl"
        docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
        preprocess([str(docs)], tokenizer, prefix)
    dist.barrier()
    return DataConfig(name="custom", train_prefixes=[prefix], valid_prefixes=[prefix], tokenizer_model=tokenizer,
                      cache_dir=str(root / "cache"))


def recipe_on_imported(rank, world, root, hf_dir):
    """The user's recipe on an imported HF Llama, at TP=2, through the commands' stages:
    convert from_hf -> prune (importance + trim) -> distill from the imported teacher ->
    convert to_hf of the pruned and of the distilled run dir; writes both run dirs' logits."""
    from minitron_megatron.config.commands import ConvertCommand, DistillCommand, EvaluateConfig, PruneCommand
    from minitron_megatron.config.distill import DistillConfig, ModelSource
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.config.prune import ImportanceConfig, PruneConfig, TrimTarget
    from minitron_megatron.config.train import OptimConfig
    from minitron_megatron.convert import convert
    from minitron_megatron.distill.loop import distill
    from minitron_megatron.recipes.prune import prune
    from minitron_megatron.runtime import init_runtime

    root = Path(root)
    ctx = init_runtime(tp=2, pp=1, device="cpu", seed=3)
    parallel, evaluate = ParallelConfig(tp=2), EvaluateConfig(samples=4, micro_batch_size=2)
    summaries = {"import": convert(ConvertCommand(from_hf=hf_dir, save=str(root / "teacher"), parallel=parallel,
                                                  seq_length=64), ctx)}
    data = _recipe_data(root / "teacher", root, ctx)
    icfg = ImportanceConfig(calibration_samples=8, micro_batch_size=2)
    summaries["prune"] = prune(PruneCommand(
        load=str(root / "teacher"), save=str(root / "pruned"), data=data, parallel=parallel, device="cpu",
        evaluate=evaluate, prune=PruneConfig(target=TrimTarget(**RECIPE_TARGET), importance=icfg)), ctx)
    steps = DistillConfig(steps=4, micro_batch_size=2, global_batch_size=2, eval_interval=2, eval_samples=4,
                          save_interval=4, log_interval=1, tensorboard=False,
                          optim=OptimConfig(lr=3e-3, min_lr=3e-3, warmup_steps=0))
    summaries["distill"] = distill(DistillCommand(
        teacher=ModelSource(load=str(root / "teacher")), student=ModelSource(load=str(root / "pruned")),
        save=str(root / "student"), data=data, parallel=parallel, device="cpu", distill=steps,
        evaluate=evaluate), ctx)
    tokens = torch.load(root / "tokens.pt")
    for run in ("pruned", "student"):
        summaries[f"export {run}"] = convert(ConvertCommand(load=str(root / run), to_hf=str(root / f"hf-{run}"),
                                                            parallel=parallel), ctx)
        _save_if_writer(ctx, run_dir_logits(root / run, ctx, tokens), root / f"logits-{run}.pt")
    if rank == 0:
        (root / "summaries.json").write_text(json.dumps(summaries, indent=1))


RUN_DIR_KINDS = ("train", "prune", "distill", "import")
"""Every kind of run dir the commands write, all at TP=2 (search's candidates are prune and
distill run dirs written by the same calls; `run`'s stages are train, search and distill)."""
ALONE_KINDS = RUN_DIR_KINDS + ("train-tp1",)
"""What the one-process export reads: those, and a teacher trained at TP=1 (whole-layer chunks)."""
STACKED_MODEL = dict(name="stacked", num_layers=4, hidden_size=64, ffn_hidden_size=512, num_attention_heads=4,
                     num_query_groups=2, kv_channels=16, max_position_embeddings=64)
"""tests/commands.py's SMALL with a wider MLP: the decoder's bytes (1.7 MiB) exceed the largest
parameter's (the 4096 x 64 embedding, 1 MiB), and so do the pruned model's (1.0 MiB > 0.75 MiB),
so a streamed export reads each layer-stacked key (`decoder.layers.*`, [4, ...]) in pieces."""
LOOP = dict(steps=2, micro_batch_size=4, global_batch_size=4, eval_interval=100, eval_samples=8,
            save_interval=100, log_interval=1, tensorboard=False)


def _common(parallel) -> dict:
    from minitron_megatron.config.commands import EvaluateConfig

    return dict(parallel=parallel, device="cpu", evaluate=EvaluateConfig(samples=8, micro_batch_size=4))


def _train_command(save: Path, parallel):
    from minitron_megatron.config.commands import TrainCommand
    from minitron_megatron.config.model import ModelConfig
    from minitron_megatron.config.train import OptimConfig, TrainConfig

    return TrainCommand(model=ModelConfig(**STACKED_MODEL), save=str(save),
                        train=TrainConfig(**LOOP, optim=OptimConfig(warmup_steps=1)), **_common(parallel))


def _commands(root: Path, hf_dir: str, parallel) -> dict:
    """kind -> (the library call its command makes, its config), in dependency order."""
    from minitron_megatron.config.commands import ConvertCommand, DistillCommand, PruneCommand
    from minitron_megatron.config.distill import DistillConfig, ModelSource
    from minitron_megatron.config.prune import ImportanceConfig, PruneConfig, TrimTarget
    from minitron_megatron.config.train import OptimConfig
    from minitron_megatron.convert import convert
    from minitron_megatron.distill.loop import distill
    from minitron_megatron.recipes.prune import prune
    from minitron_megatron.train.loop import pretrain

    run = {kind: str(root / kind) for kind in RUN_DIR_KINDS}
    importance = ImportanceConfig(calibration_samples=8, micro_batch_size=4, depth_metrics=None)  # width only
    prune_cfg = PruneConfig(target=TrimTarget(hidden_size=48, ffn_hidden_size=384), importance=importance)
    return {
        "train": (pretrain, _train_command(root / "train", parallel)),
        "prune": (prune, PruneCommand(load=run["train"], save=run["prune"], prune=prune_cfg, **_common(parallel))),
        "distill": (distill, DistillCommand(teacher=ModelSource(load=run["train"]),
                                            student=ModelSource(load=run["prune"]), save=run["distill"],
                                            distill=DistillConfig(**LOOP, optim=OptimConfig(warmup_steps=1)),
                                            **_common(parallel))),
        "import": (convert, ConvertCommand(from_hf=hf_dir, save=run["import"], parallel=parallel)),
    }


def _export_run_dirs(root: Path, kinds, ctx, layout: str) -> list:
    """Export each run dir root/<kind> to root/hf-<kind>-<layout>; the loads each export made."""
    from minitron_megatron.config.commands import ConvertCommand
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.convert import convert

    loads = []
    for kind in kinds:
        loads.append([])
        with recording_loads(loads[-1]):
            convert(ConvertCommand(load=str(root / kind), to_hf=str(root / f"hf-{kind}-{layout}"),
                                   parallel=ParallelConfig(tp=ctx.tp_size)), ctx)
    return loads


def write_every_run_dir(rank, world, root, hf_dir):
    """At TP=2, as the commands do: train a teacher, prune it, distil the pruned model from it and
    import a HF Llama; then our logits of each run dir and its export at TP=2."""
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.runtime import init_runtime

    root = Path(root)
    ctx = init_runtime(tp=2, pp=1, device="cpu", seed=3)
    for stage, cfg in _commands(root, hf_dir, ParallelConfig(tp=2)).values():
        stage(cfg, ctx)
    tokens = torch.load(root / "tokens.pt")
    for kind in RUN_DIR_KINDS:
        _save_if_writer(ctx, run_dir_logits(root / kind, ctx, tokens), root / f"logits-{kind}.pt")
    loads = _export_run_dirs(root, RUN_DIR_KINDS, ctx, "tp2")
    (root / f"loads-tp2-rank{rank}.json").write_text(json.dumps(loads))


def export_every_run_dir_alone(rank, world, root):
    """In a world of one process (the `convert` command without torchrun): train a teacher at TP=1
    (and take its logits), then export it and every TP=2 run dir at TP=1."""
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.runtime import init_runtime
    from minitron_megatron.train.loop import pretrain

    root = Path(root)
    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=3)
    pretrain(_train_command(root / "train-tp1", ParallelConfig()), ctx)
    _save_if_writer(ctx, run_dir_logits(root / "train-tp1", ctx, torch.load(root / "tokens.pt")),
                    root / "logits-train-tp1.pt")
    loads = _export_run_dirs(root, ALONE_KINDS, ctx, "tp1")
    (root / "loads-tp1-rank0.json").write_text(json.dumps(loads))
