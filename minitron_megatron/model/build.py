"""Build Megatron-core's own `GPTModel` from a `ModelConfig` on the ranks of a `ParallelContext`."""

import contextlib
import math
from dataclasses import replace
from typing import List, Optional

import torch
import torch.nn.functional as F

from minitron_megatron.config.model import TRANSFORMER_IMPLS, ModelConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.megatron_compat import define_router_gemm_fallback
from minitron_megatron.runtime.context import ParallelContext

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    from minitron_megatron.runtime.parallel_rules import model_parallel_problems

    cfg = cfg.resolved()
    problems = []
    if cfg.num_attention_heads % cfg.num_query_groups:
        problems.append(
            f"model.num_attention_heads={cfg.num_attention_heads} must be a multiple of "
            f"model.num_query_groups={cfg.num_query_groups}"
        )
    problems += model_parallel_problems(cfg, parallel)
    for name, allowed in (
        ("normalization", ("RMSNorm", "LayerNorm")),
        ("activation", ("silu", "gelu", "squared_relu")),
        ("position_embedding_type", ("rope", "learned_absolute")),
        ("transformer_impl", TRANSFORMER_IMPLS),
        ("params_dtype", tuple(DTYPES)),
        *(MOE_CHOICES if cfg.is_moe else ()),
    ):
        if getattr(cfg, name) not in allowed:
            problems.append(f"model.{name}={getattr(cfg, name)!r} is not one of {list(allowed)}")
    problems += moe_problems(cfg) + recompute_problems(cfg)
    if problems:
        raise ConfigError(problems)


MOE_CHOICES = (
    ("moe_router_load_balancing_type", ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")),
    ("moe_router_score_function", ("softmax", "sigmoid")),
)


def moe_problems(cfg: ModelConfig) -> List[str]:
    """Mixture-of-experts settings that Megatron would reject or that contradict each other."""
    if not cfg.is_moe:
        set_fields = [name for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
                      if getattr(cfg, name) is not None]
        return [f"model.{name} needs model.num_moe_experts (a mixture-of-experts model)" for name in set_fields]
    problems = []
    if cfg.num_moe_experts < 1:
        problems.append(f"model.num_moe_experts={cfg.num_moe_experts} must be >= 1")
    elif not 1 <= cfg.moe_router_topk <= cfg.num_moe_experts:
        problems.append(f"model.moe_router_topk={cfg.moe_router_topk} must be in [1, model.num_moe_experts="
                        f"{cfg.num_moe_experts}]")
    for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            problems.append(f"model.{name}={getattr(cfg, name)} must be >= 1")
    if cfg.moe_grouped_gemm and cfg.transformer_impl not in ("transformer_engine", "auto"):
        problems.append("model.moe_grouped_gemm=true needs model.transformer_impl=transformer_engine "
                        "(Megatron's local spec runs one MLP per expert)")
    return problems


RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def recompute_problems(cfg: ModelConfig) -> List[str]:
    """The recompute_* combinations Megatron's TransformerConfig accepts, as ConfigError lines."""
    granularity, method, layers = cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers
    if granularity not in RECOMPUTE_GRANULARITIES:
        return [f"model.recompute_granularity={granularity!r} is not one of {list(RECOMPUTE_GRANULARITIES)}"]
    if granularity == "full":
        problems = []
        if method not in RECOMPUTE_METHODS:
            problems.append(f"model.recompute_granularity=full needs model.recompute_method in "
                            f"{list(RECOMPUTE_METHODS)} (got {method!r})")
        if layers is None or not 1 <= layers <= cfg.num_layers:
            problems.append(f"model.recompute_granularity=full needs model.recompute_num_layers in "
                            f"[1, {cfg.num_layers}] (got {layers!r})")
        return problems
    given = [f"model.{name}={value!r}" for name, value in (("recompute_method", method),
                                                            ("recompute_num_layers", layers)) if value is not None]
    return [f"{', '.join(given)} needs model.recompute_granularity=full (it is {granularity!r})"] if given else []


def moe_transformer_config(cfg: ModelConfig, parallel: ParallelConfig) -> dict:
    """TransformerConfig's mixture-of-experts fields ({} for a dense model); `cfg` resolved."""
    if not cfg.is_moe:
        return {}
    return dict(
        num_moe_experts=cfg.num_moe_experts,
        moe_router_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=cfg.moe_shared_expert_gate,
        moe_router_load_balancing_type=cfg.moe_router_load_balancing_type,
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_z_loss_coeff=cfg.moe_z_loss_coeff,
        moe_router_score_function=cfg.moe_router_score_function,
        moe_router_pre_softmax=cfg.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=cfg.moe_router_topk_scaling_factor,
        moe_grouped_gemm=cfg.moe_grouped_gemm,
        moe_token_dispatcher_type=parallel.moe_token_dispatcher_type,
        # As runtime/distributed.py initialises Megatron's groups: experts are whole on their EP rank.
        expert_tensor_parallel_size=1,
    )


def transformer_impl(cfg: ModelConfig, device: torch.device) -> str:
    """The implementation this run builds: `cfg.transformer_impl`, with auto resolved to
    transformer_engine on CUDA when Transformer Engine imports, else sdpa."""
    if cfg.transformer_impl != "auto":
        return cfg.transformer_impl
    return "transformer_engine" if device.type == "cuda" and _transformer_engine_importable() else "sdpa"


def _transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # not installed, or installed without its CUDA libraries
        return False
    return True


def transformer_config(cfg: ModelConfig, ctx: ParallelContext, parallel: ParallelConfig):
    """The Megatron `TransformerConfig` for `cfg` at the context's TP/PP sizes.

    Only `ctx.device.type` decides CPU vs GPU settings (initialisation path, fused kernels):
    nothing here touches CUDA, so a context that says cuda gives exactly the GPU run's config
    on a CPU machine, and tests check it against Megatron's asserts there.
    """
    from megatron.core.activations import squared_relu
    from megatron.core.transformer import TransformerConfig

    cfg = cfg.resolved()
    dtype = DTYPES[cfg.params_dtype]
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
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=ctx.tp_size,
        pipeline_model_parallel_size=ctx.pp_size,
        expert_model_parallel_size=ctx.ep_size,
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
        # Plain torch ops on CPU. On CUDA a fusion is enabled only where its kernel exists:
        # Megatron reads these flags as "use the kernel", it does not check for one.
        # Bias-activation and bias-dropout fusions are Megatron's own jit (torch.compile) code.
        bias_activation_fusion=not on_cpu and cfg.add_bias_linear and cfg.activation in ("silu", "gelu"),
        masked_softmax_fusion=not on_cpu and _softmax_kernels_importable(),
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # As Megatron-LM always sets it: the schedule frees each stage's sent activations and
        # asserts that they are not a view (our DistillLoss and p2p tensors never are).
        deallocate_pipeline_outputs=True,
        persist_layer_norm=not on_cpu and _persistent_norm_usable(cfg, ctx.device),
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        **moe_transformer_config(cfg, parallel),
    )


SOFTMAX_KERNELS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda", "scaled_softmax_cuda")
"""Megatron's fused softmax imports these compiled extensions at forward time (causal,
masked and unmasked paths); the pip megatron-core ships none of them."""


def _softmax_kernels_importable() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in SOFTMAX_KERNELS)


def _persistent_norm_usable(cfg: ModelConfig, device: torch.device) -> bool:
    """`persist_layer_norm` only selects apex's persistent kernel inside Megatron's
    FusedLayerNorm; WrappedTorchNorm (the local spec's norm without apex, and always for
    RMSNorm) asserts against the flag. So: only when every norm the model builds is a
    FusedLayerNorm and apex's kernel imports."""
    from megatron.core.fusions import fused_layer_norm

    if not fused_layer_norm.HAVE_PERSIST_LAYER_NORM:
        return False
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.identity_op import IdentityOp

    layer = layer_spec(cfg, device).submodules
    norms = {layer.input_layernorm, layer.pre_mlp_layernorm, transformer_block.LayerNormImpl} - {IdentityOp}
    return norms == {fused_layer_norm.FusedLayerNorm}


def layer_spec(cfg: ModelConfig, device: torch.device):
    """Transformer Engine's spec with its fused norm+linear modules, or Megatron's local (torch)
    spec, with the SDPA core attention (sdpa) or its own DotProductAttention (local)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from minitron_megatron.model.attention import with_sdpa_core_attention

    impl = transformer_impl(cfg, device)
    if impl == "transformer_engine":
        if not _transformer_engine_importable():
            raise ConfigError("model.transformer_impl=transformer_engine but Transformer Engine does not import "
                              "here; use model.transformer_impl=auto, sdpa or local")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.num_moe_experts, moe_grouped_gemm=cfg.moe_grouped_gemm, qk_layernorm=cfg.qk_layernorm)
    local = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False,
                                                     qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization)
    return with_sdpa_core_attention(local) if impl == "sdpa" else local


def _check_impl(cfg: ModelConfig, parallel: ParallelConfig, impl: str) -> None:
    """What needs Transformer Engine, checked once auto is resolved (validate_model lets auto pass)."""
    if impl == "transformer_engine":
        return
    needs = [name for name, on in (("parallel.sequence_parallel=true", parallel.sequence_parallel),
                                   ("model.moe_grouped_gemm=true", cfg.moe_grouped_gemm)) if on]
    if needs:
        raise ConfigError(f"{' and '.join(needs)} need(s) Transformer Engine, but this run builds "
                          f"transformer_impl={impl} (model.transformer_impl={cfg.transformer_impl}); on Megatron's "
                          "local spec turn them off, or run on CUDA with Transformer Engine")


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
    from dataclasses import replace

    from megatron.core.models.gpt import GPTModel

    from minitron_megatron.model.norms import with_zero_centered_gamma

    cfg = cfg.resolved()
    if cfg.is_moe:
        define_router_gemm_fallback()
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {list(INITS)}")
    if init == "meta" and cfg.share_embeddings_and_output_weights and ctx.pp_size > 1:
        init = "none"  # Megatron all-reduces the last stage's embedding copy while building
    config = transformer_config(cfg, ctx, parallel)
    if init != "random":
        config = replace(config, init_method=_no_init, output_layer_init_method=_no_init,
                         embedding_init_method=_no_init)
    impl = transformer_impl(cfg, ctx.device)
    _check_impl(cfg, parallel, impl)
    spec = layer_spec(cfg, ctx.device)
    if cfg.layernorm_zero_centered_gamma and impl != "transformer_engine":
        # Megatron's torch norms refuse zero-centred gamma (only TE/apex have it): see model/norms.py.
        spec = with_zero_centered_gamma(spec, config, ctx.pp_rank)
    build_flags = _meta_build_flags(impl) if init == "meta" else {}
    saved = {name: getattr(config, name) for name in build_flags}
    for name, value in build_flags.items():
        setattr(config, name, value)
    keyed_experts = init == "random" and config.use_cpu_initialization and cfg.is_moe
    with torch.device("meta") if init == "meta" else contextlib.nullcontext(), \
            experts_aside_from_default_generator() if keyed_experts else contextlib.nullcontext():
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab,
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=ctx.is_first_stage,
            post_process=ctx.is_last_stage,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            position_embedding_type=cfg.position_embedding_type,
            rotary_percent=cfg.rotary_percent,
            rotary_base=cfg.rotary_base,
            rope_scaling=cfg.rope_scaling,
            rope_scaling_factor=cfg.rope_scaling_factor,
        )
    for name, value in saved.items():  # every module shares this config object: the run's flags again
        setattr(config, name, value)
    if keyed_experts:
        draw_experts_by_global_index(model, ctx)
    model = in_params_dtype(model)
    return model if init == "meta" else model.to(ctx.device)


@contextlib.contextmanager
def experts_aside_from_default_generator():
    """For the duration, Megatron's SequentialMLP (a layer's routed experts) is built on a fork
    of torch's default generator, which it leaves as it found it.

    With CPU initialisation every weight comes from the default generator in build order, and an
    EP rank builds only its own experts: without the fork, every weight built after a layer's
    experts (the shared expert, later layers) would depend on the EP size. The experts' own draws
    are replaced by `draw_experts_by_global_index` right after the build.
    """
    from megatron.core.transformer.moe.experts import SequentialMLP

    build = SequentialMLP.__init__

    def build_with_forked_rng(self, *args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            build(self, *args, **kwargs)

    SequentialMLP.__init__ = build_with_forked_rng
    try:
        yield
    finally:
        SequentialMLP.__init__ = build


EXPERT_SEED_OFFSET = 7919
"""Keeps the experts' generators away from the runtime's seeds (seed, seed + 1024, seed + 2718 + tp)."""


@torch.no_grad()
def draw_experts_by_global_index(model, ctx: ParallelContext) -> None:
    """Redraw every routed expert's weights from a generator keyed by (seed, layer, global expert).

    Megatron's CPU initialisation draws each expert from the one default generator in build order,
    so at EP=2 rank 1's experts 4..7 would repeat rank 0's 0..3 (on GPUs Megatron forks a per-EP-rank
    RNG instead). Keyed draws give distinct experts and the same weights at every EP size, as CPU
    init gives the same weights at every TP size. Each weight is drawn whole with the config's own
    init method (Megatron's: fc1 by init_method, fc2 by output_layer_init_method; biases zero) and
    experts are never TP-split, so this is what Megatron's CPU init computes, from another generator.
    """
    from minitron_megatron.model.modules import routed_experts

    config, seed = model.config, torch.initial_seed()
    for layer, experts in routed_experts(model):
        for local, expert in enumerate(experts.local_experts):
            expert_index = ctx.ep_rank * len(experts.local_experts) + local
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + EXPERT_SEED_OFFSET + layer * 100_003 + expert_index)
                for weight, init_method in ((expert.linear_fc1.weight, config.init_method),
                                            (expert.linear_fc2.weight, config.output_layer_init_method)):
                    master = torch.empty(weight.shape, dtype=torch.float32)  # drawn in fp32, as Megatron does
                    init_method(master)
                    weight.copy_(master)


def in_params_dtype(model):
    """Every parameter in `config.params_dtype`, as Megatron-LM's `get_model` leaves a bf16 or
    fp16 model: its Float16Module casts the whole module, because Megatron's torch norms
    (WrappedTorchNorm, the local spec's) are created in float32 whatever params_dtype says.
    A mixed model runs, but Megatron's Float16OptimizerWithFloat16Params checkpoints only its
    float16 groups ("Param id ... does not match any model sharded param"), and a layer moved
    between pipeline stages would carry two dtypes. Casting here gives every command (train,
    evaluate, prune, distill) the same dtypes as Megatron-LM, so their checkpoints agree."""
    dtype = model.config.params_dtype
    return model if dtype == torch.float32 else model.to(dtype)


def _meta_build_flags(impl: str) -> dict:
    """Config flags that put a build's parameters on the meta device.

    Transformer Engine modules allocate on the device their config names: `init_model_with_meta_device`
    gives "meta", but only without `use_cpu_initialization` (checked first, it gives "cpu": a full
    host copy). Megatron's own layers (the local spec; embedding and output layer in both) have
    no meta switch: with CPU init they allocate without a device, so the meta context applies;
    without it they name the GPU. So the TE spec keeps the run's CPU-init flag (False on CUDA:
    its embedding and output layer are then allocated on the GPU, as in Megatron-LM's own meta
    init), and the local spec builds with CPU init.
    """
    if impl == "transformer_engine":
        return {"init_model_with_meta_device": True}
    return {"init_model_with_meta_device": True, "use_cpu_initialization": True}
