"""Build Megatron-core's own `GPTModel` from a `ModelConfig` on the ranks of a `ParallelContext`."""

import math
from dataclasses import replace
from typing import List, Optional

import torch
import torch.nn.functional as F

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime.context import ParallelContext

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding: a multiple of make_vocab_size_divisible_by * TP."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def resolve_vocab(cfg: ModelConfig, tokenizer_vocab_size: Optional[int]) -> ModelConfig:
    """Fill `vocab_size` from the tokenizer and check that the tokenizer fits the model."""
    if cfg.vocab_size is None:
        if tokenizer_vocab_size is None:
            raise ConfigError("model.vocab_size is not set and there is no tokenizer to take it from")
        return replace(cfg, vocab_size=tokenizer_vocab_size)
    if tokenizer_vocab_size is not None and tokenizer_vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer_vocab_size} tokens but model.vocab_size={cfg.vocab_size}: "
            "use a tokenizer whose vocab fits the model, or model.vocab_size>="
            f"{tokenizer_vocab_size}"
        )
    return cfg


def pipeline_layer_split(num_layers: int, pp: int, layout: Optional[List[int]] = None) -> List[int]:
    """Layers per stage. Uneven splits put the remainder on the first stage."""
    if layout is not None:
        return list(layout)
    base, rem = divmod(num_layers, pp)
    return [base + rem] + [base] * (pp - 1)


def validate_model(cfg: ModelConfig, parallel: ParallelConfig) -> None:
    """Every reason this model cannot be built at this TP/PP, in one ConfigError."""
    cfg = cfg.resolved()
    tp, pp = parallel.tp, parallel.pp
    problems = []
    if cfg.num_attention_heads % cfg.num_query_groups:
        problems.append(
            f"model.num_attention_heads={cfg.num_attention_heads} must be a multiple of "
            f"model.num_query_groups={cfg.num_query_groups}"
        )
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        value = getattr(cfg, name)
        if value % tp:
            problems.append(f"parallel.tp={tp} does not divide model.{name}={value}")
    problems += _pipeline_problems(cfg.num_layers, pp, parallel.pp_layout)
    if parallel.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel=true needs parallel.tp>1")
    if parallel.sequence_parallel and cfg.transformer_impl != "transformer_engine":
        # Megatron's local spec wraps torch norms, which assert against sequence parallelism.
        problems.append("parallel.sequence_parallel=true needs model.transformer_impl=transformer_engine "
                        "(Megatron's local torch norms do not support it)")
    for name, allowed in (
        ("normalization", ("RMSNorm", "LayerNorm")),
        ("activation", ("silu", "gelu", "squared_relu")),
        ("position_embedding_type", ("rope", "learned_absolute")),
        ("transformer_impl", ("local", "transformer_engine")),
        ("params_dtype", tuple(_DTYPES)),
    ):
        if getattr(cfg, name) not in allowed:
            problems.append(f"model.{name}={getattr(cfg, name)!r} is not one of {list(allowed)}")
    if problems:
        raise ConfigError(problems)


def _pipeline_problems(num_layers: int, pp: int, layout: Optional[List[int]]) -> List[str]:
    if layout is not None:
        if len(layout) != pp or sum(layout) != num_layers or min(layout) < 1:
            return [
                f"parallel.pp_layout={layout} must list {pp} positive layer counts summing to "
                f"model.num_layers={num_layers}"
            ]
        if len(set(layout[1:-1])) > 1:
            return [f"parallel.pp_layout={layout}: the middle stages must hold equal layer counts"]
        return []
    if num_layers < pp:
        return [f"parallel.pp={pp} exceeds model.num_layers={num_layers}"]
    return []


def transformer_config(cfg: ModelConfig, ctx: ParallelContext, parallel: ParallelConfig):
    """The Megatron `TransformerConfig` for `cfg` at the context's TP/PP sizes."""
    from megatron.core.activations import squared_relu
    from megatron.core.transformer import TransformerConfig

    cfg = cfg.resolved()
    dtype = _DTYPES[cfg.params_dtype]
    split = pipeline_layer_split(cfg.num_layers, ctx.pp_size, parallel.pp_layout)
    uneven = len(set(split)) > 1
    on_cpu = ctx.device.type == "cpu"
    activation = {"silu": F.silu, "gelu": F.gelu, "squared_relu": squared_relu}[cfg.activation]
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon,
        layernorm_zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
        gated_linear_unit=cfg.gated_linear_unit,
        activation_func=activation,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=ctx.tp_size,
        pipeline_model_parallel_size=ctx.pp_size,
        sequence_parallel=parallel.sequence_parallel,
        num_layers_in_first_pipeline_stage=split[0] if uneven else None,
        num_layers_in_last_pipeline_stage=split[-1] if uneven and ctx.pp_size > 1 else None,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # CPU init draws the full weight from one generator and splits it, so weights
        # are the same at every TP size: that is what makes TP=2 == TP=1 testable.
        use_cpu_initialization=on_cpu,
        # Fusions need apex/TE/CUDA kernels; plain torch ops on CPU.
        bias_activation_fusion=not on_cpu and cfg.add_bias_linear,
        masked_softmax_fusion=not on_cpu,
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=not on_cpu,
    )


def layer_spec(cfg: ModelConfig):
    """Local (torch) spec, or Transformer Engine's with its fused norm+linear modules."""
    from megatron.core.models.gpt import gpt_layer_specs

    if cfg.transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                "model.transformer_impl=transformer_engine but Transformer Engine is not "
                "installed; use model.transformer_impl=local"
            ) from err
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=cfg.normalization)


INITS = ("random", "none", "meta")


def _no_init(weight: torch.Tensor) -> torch.Tensor:
    return weight


def build_gpt_model(cfg: ModelConfig, ctx: ParallelContext, parallel: ParallelConfig, padded_vocab: int,
                    init: str = "random"):
    """This rank's shard of the model: its pipeline stage, its TP slice, on ctx.device.

    init="random" draws Megatron's initialisation; "none" draws nothing (for weights a
    checkpoint load overwrites next); "meta" builds on the meta device (no memory) for a
    caller that assigns every parameter (`param.data = tensor`), as the trimmer does.
    Why no-op init methods rather than `perform_initialization=False`: with CPU init,
    Megatron sets `tensor_model_parallel` / `partition_dim` / `partition_stride` inside its
    init helper, so skipping init would leave TP weights looking replicated.
    """
    import contextlib
    from dataclasses import replace

    from megatron.core.models.gpt import GPTModel

    from minitron_megatron.model.norms import with_zero_centered_gamma

    cfg = cfg.resolved()
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {list(INITS)}")
    if init == "meta" and cfg.share_embeddings_and_output_weights and ctx.pp_size > 1:
        init = "none"  # Megatron all-reduces the last stage's embedding copy while building
    config = transformer_config(cfg, ctx, parallel)
    if init != "random":
        config = replace(config, init_method=_no_init, output_layer_init_method=_no_init,
                         embedding_init_method=_no_init)
    cpu_init = config.use_cpu_initialization
    config.use_cpu_initialization = cpu_init or init == "meta"  # explicit-device paths would allocate
    with torch.device("meta") if init == "meta" else contextlib.nullcontext():
        model = GPTModel(
            config=config,
            # Megatron's torch norms refuse zero-centred gamma (only TE/apex have it): see model/norms.py.
            transformer_layer_spec=(with_zero_centered_gamma(layer_spec(cfg), config, ctx.pp_rank)
                                    if cfg.layernorm_zero_centered_gamma and cfg.transformer_impl == "local"
                                    else layer_spec(cfg)),
            vocab_size=padded_vocab,
            max_sequence_length=cfg.seq_length,
            pre_process=ctx.is_first_stage,
            post_process=ctx.is_last_stage,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            position_embedding_type=cfg.position_embedding_type,
            rotary_percent=cfg.rotary_percent,
            rotary_base=cfg.rotary_base,
            rope_scaling=cfg.rope_scaling,
            rope_scaling_factor=cfg.rope_scaling_factor,
        )
    config.use_cpu_initialization = cpu_init  # every module shares this config object
    return model if init == "meta" else model.to(ctx.device)
