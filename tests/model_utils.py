"""Test helpers: small model configs and gathering TP shards back into TP=1 layout."""

import torch
import torch.distributed as dist

from minitron_megatron.config.model import ModelConfig


def small_model(**overrides) -> ModelConfig:
    """A model small enough for multi-process CPU tests (seconds per step)."""
    base = dict(name="test", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                num_query_groups=2, kv_channels=16, max_position_embeddings=32, vocab_size=250,
                make_vocab_size_divisible_by=64)
    base.update(overrides)
    return ModelConfig(**base)


def gather_tp(tensor: torch.Tensor, param, tp_group, tp_size: int) -> torch.Tensor:
    """Full (TP=1 layout) tensor from this rank's shard, using Megatron's layout attributes.

    With partition stride s (s=2 for GLU fc1: each rank holds [gate_r; up_r]), the
    shard is s chunks along partition_dim; chunk j of every rank, in rank order, makes
    the j-th block of the full tensor.
    """
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    shards = [torch.empty_like(tensor) for _ in range(tp_size)]
    dist.all_gather(shards, tensor.detach().contiguous(), group=tp_group)
    chunks = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([chunks[r][j] for j in range(stride) for r in range(tp_size)], dim=dim)


def make_run_dir(run_dir, ctx) -> None:
    """A run dir as `train` writes it (model.yaml + tokenizer + checkpoint), without training:
    trimming and reloading must agree whatever the weights are."""
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.checkpoint.dist import save_checkpoint
    from minitron_megatron.config.data import DataConfig
    from minitron_megatron.config.model import ModelConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.data import load_tokenizer, prepare_data
    from minitron_megatron.model import build_gpt_model, padded_vocab_size

    sources = prepare_data(DataConfig())
    cfg = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=192, kv_channels=16, max_position_embeddings=64,
                      vocab_size=load_tokenizer(sources.tokenizer_model).vocab_size)
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    model = build_gpt_model(cfg, ctx, ParallelConfig(tp=ctx.tp_size), padded)
    if ctx.is_main:
        rd.write_model_yaml(run_dir, cfg, padded, sources.tokenizer_model)
    save_checkpoint(rd.checkpoint_root(run_dir), 1, model, ctx)
