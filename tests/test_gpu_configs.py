"""The configs a GPU run builds (device=cuda, bfloat16), checked on a CPU machine.

Every preset in conf/model/ is composed as the commands compose it, its CUDA TransformerConfig
and layer spec are built, and Megatron's own `GPTModel` is constructed from them on the meta
device: Megatron's asserts (torch norms vs persist_layer_norm, fusion/activation rules) run
exactly as on the GPU, with no memory. Also: the CPU-support patches end with the runtime.
"""

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from minitron_megatron.cli.app import CONF_DIR
from minitron_megatron.config.commands import register_configs
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.model import build_gpt_model, padded_vocab_size, parameter_count, transformer_config
from minitron_megatron.runtime import cpu_support, destroy_runtime, init_runtime

MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def _preset(model: str, impl: str, **run_settings):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="train", overrides=[f"model={model}"])).model
    # tiny takes its vocab from the tokenizer; 4096 is the embedded corpus's.
    return replace(cfg, params_dtype="bfloat16", transformer_impl=impl, vocab_size=cfg.vocab_size or 4096,
                   **run_settings)


@pytest.fixture(scope="module")
def cuda_ctx():
    """A one-process runtime (Megatron's parallel state at TP=PP=1) whose context says cuda.

    The CPU redirections are switched off so that anything in the build that names the GPU
    fails here ("Torch not compiled with CUDA") instead of silently landing on the CPU.
    """
    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=1)
    cpu_support.disable()
    yield replace(ctx, device=torch.device("cuda"))
    destroy_runtime()


def _fused_softmax_runs(model) -> None:
    """Megatron's FusedScaleMaskSoftmax picks its CUDA kernel from the config flag alone, at
    forward time; at these shapes (bf16, 16 < sk <= 4096, multiples of 4) it would import
    `scaled_masked_softmax_cuda`, absent from pip megatron-core. Run it on a small CPU tensor."""
    softmax = model.decoder.layers[0].self_attention.core_attention.scale_mask_softmax
    scores = torch.randn(1, 4, 32, 32).bfloat16()  # [b, heads/tp, sq, sk]
    causal = torch.ones(32, 32).triu(1).bool()[None, None]  # given: Megatron's default is made on "cuda"
    probs = softmax(scores, causal)
    torch.testing.assert_close(probs.float().sum(-1), torch.ones(1, 4, 32), rtol=1e-2, atol=1e-2)


def _check_cuda_build(model: str, impl: str, ctx, **run_settings):
    cfg = _preset(model, impl, **run_settings)
    parallel = ParallelConfig(tp=1, pp=1)
    config = transformer_config(cfg, ctx, parallel)
    assert not config.use_cpu_initialization and config.bf16  # really the CUDA config
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    gpt = build_gpt_model(cfg, ctx, parallel, padded, init="meta")
    params = list(gpt.parameters())
    assert all(p.is_meta for p in params)  # nothing allocated
    # Megatron's torch norms ignore params_dtype (float32, as Megatron-LM's Float16Module later casts).
    assert {p.dtype for name, p in gpt.named_parameters() if "norm" not in name} == {torch.bfloat16}
    assert sum(p.numel() for p in params) == parameter_count(cfg, padded)
    # The build-only flags are not left on the config every module shares.
    assert not gpt.config.use_cpu_initialization and not gpt.config.init_model_with_meta_device
    return gpt


@pytest.mark.parametrize("model", MODELS)
def test_cuda_bf16_config_builds_local_spec(cuda_ctx, model):
    """Catches GPU-only config bugs: persist_layer_norm with Megatron's torch norms (an assert
    at build), masked_softmax_fusion without its kernel (an ImportError at the first forward),
    fusion/activation combinations TransformerConfig rejects, and a meta build that allocates."""
    _fused_softmax_runs(_check_cuda_build(model, "local", cuda_ctx))


@pytest.mark.skipif(HAVE_TE, reason="with Transformer Engine installed, auto on CUDA builds TE's spec")
@pytest.mark.parametrize("model", MODELS)
def test_cuda_bf16_default_builds_sdpa_with_recompute(cuda_ctx, model):
    """The default (transformer_impl=auto) on CUDA without Transformer Engine, with selective
    recomputation: catches auto falling back to DotProductAttention (the O(seq^2) path), an
    SDPA core attention that names the GPU or allocates at build, and recompute settings that
    Megatron's TransformerConfig rejects for a GPU run."""
    from minitron_megatron.model.attention import SDPAttention

    gpt = _check_cuda_build(model, "auto", cuda_ctx, recompute_granularity="selective")
    assert all(isinstance(layer.self_attention.core_attention, SDPAttention) for layer in gpt.decoder.layers)
    assert all(layer.self_attention.checkpoint_core_attention for layer in gpt.decoder.layers)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TE and torch.cuda.is_available()),
                    reason="Transformer Engine's PyTorch extension builds only against CUDA (it is in "
                           "NGC containers); without it the TE spec cannot be constructed at all")
@pytest.mark.parametrize("model", MODELS)
def test_cuda_bf16_config_builds_te_spec(cuda_ctx, model):
    """As the local-spec test, with Transformer Engine modules (meta via init_model_with_meta_device)."""
    _check_cuda_build(model, "transformer_engine", cuda_ctx)


def test_cpu_support_ends_with_the_runtime():
    """Catches CPU redirections leaking past destroy_runtime (a CUDA-kwarg factory silently
    giving a CPU tensor afterwards) and a second runtime in one process not getting them back."""
    for _ in range(2):  # enable -> disable -> enable -> disable
        init_runtime(tp=1, pp=1, device="cpu", seed=1)
        assert cpu_support.is_enabled()
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.cuda.current_device() == torch.device("cpu")
        destroy_runtime()
        assert not cpu_support.is_enabled()
        if torch.cuda.is_available():
            assert torch.zeros(2, device="cuda").is_cuda
        else:
            # A CPU build says "Torch not compiled with CUDA"; PyPI's CUDA build (the Python 3.12
            # tier's) on a machine without a GPU says "Found no NVIDIA driver".
            with pytest.raises((AssertionError, RuntimeError), match="CUDA|NVIDIA driver"):
                torch.zeros(2, device="cuda")
        from megatron.core.tensor_parallel import random as mrandom

        assert not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, cpu_support.CpuRNGStatesTracker)


def test_cpu_support_runs_on_a_cuda_host(monkeypatch):
    """Catches enable() refusing a machine that has CUDA: `device=cpu` (the CPU suite) must run
    there beside the gpu tier. The host's CUDA is simulated: only `is_available` is asked."""
    assert not cpu_support.is_enabled()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu_support.enable()
    try:
        assert torch.zeros(2, device="cuda").device.type == "cpu"
    finally:
        cpu_support.disable()
    assert not cpu_support.is_enabled()
