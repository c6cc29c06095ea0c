"""The SDPA core attention (model/attention.py) against Megatron's DotProductAttention, the
transformer_impl run setting on a loaded run dir, and activation recomputation."""

from dataclasses import replace

import pytest
import torch
import yaml

from minitron_megatron.config.parallel import ParallelConfig
from tests.commands import run_command, summary
from tests.dist_utils import run_distributed
from tests.model_utils import small_model

# Megatron's attention classes and their call signatures are what a release could change.
pytestmark = pytest.mark.compat


def _loss_and_grads(model, tokens, labels, attention_mask=None):
    model.zero_grad(set_to_none=True)
    positions = torch.arange(tokens.size(1)).expand(tokens.size(0), -1)
    loss = model(tokens, positions, attention_mask, labels=labels).mean()  # [b, s] -> scalar
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _twin_models(cfg, ctx, parallel, impls):
    """One model per transformer_impl, all with the first one's weights (this rank's shards)."""
    from minitron_megatron.model import build_gpt_model, padded_vocab_size

    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, ctx.tp_size)
    models = [build_gpt_model(replace(cfg, **impl), ctx, parallel, padded) for impl in impls]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict(), strict=True)
    return models


def _sdpa_vs_dot_product(rank, world):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from minitron_megatron.model.attention import SDPAttention
    from minitron_megatron.runtime import init_runtime

    ctx = init_runtime(tp=world, pp=1, device="cpu", seed=7)
    cfg = small_model()  # 4 heads in 2 query groups: at TP=2 each rank's 2 heads share 1 K/V head
    local, sdpa = _twin_models(cfg, ctx, ParallelConfig(tp=world), [dict(transformer_impl="local"),
                                                                      dict(transformer_impl="sdpa")])
    assert isinstance(local.decoder.layers[0].self_attention.core_attention, DotProductAttention)
    assert isinstance(sdpa.decoder.layers[0].self_attention.core_attention, SDPAttention)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.max_position_embeddings), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (3, cfg.max_position_embeddings), generator=gen)
    s = cfg.max_position_embeddings
    # A given mask (True = masked out) beside the causal one: causal plus random holes, the diagonal kept.
    holes = (torch.rand(3, 1, s, s, generator=gen) > 0.7) & ~torch.eye(s, dtype=torch.bool)
    for mask in (None, torch.ones(s, s).triu(1).bool() | holes):
        ref_loss, ref_grads = _loss_and_grads(local, tokens, labels, mask)
        loss, grads = _loss_and_grads(sdpa, tokens, labels, mask)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for name in ref_grads:  # this rank's shards: both models split alike
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sdpa_equals_dot_product_attention_at_tp2():
    """Catches an SDPA core attention that computes another function than Megatron's own:
    wrong [s, b, heads, hn] layout, GQA groups repeated in the wrong order per TP partition,
    a missing or inverted causal / given mask, the wrong scale. Loss and every gradient of
    GPTModel at TP=2 (2 gloo processes, float32) equal DotProductAttention's, same weights."""
    run_distributed(_sdpa_vs_dot_product, 2)


@pytest.fixture(scope="module")
def one_rank():
    from minitron_megatron.runtime import destroy_runtime, init_runtime

    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=3)
    yield ctx
    destroy_runtime()


def _core_attentions(ctx, layer_number: int, softmax_scale=None, reference=True, **config_fields):
    """(DotProductAttention or None, SDPAttention) built from the same arguments."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from minitron_megatron.model import transformer_config
    from minitron_megatron.model.attention import SDPAttention

    config = replace(transformer_config(small_model(), ctx, ParallelConfig()), **config_fields)
    kwargs = dict(config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal,
                  attention_type="self", softmax_scale=softmax_scale)
    return DotProductAttention(**kwargs) if reference else None, SDPAttention(**kwargs)


def _qkv(sq=8, b=2, heads=4, groups=2, hn=16):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(sq, b, heads, hn, generator=gen), torch.randn(sq, b, groups, hn, generator=gen),
            torch.randn(sq, b, groups, hn, generator=gen))


@pytest.mark.parametrize("softmax_scale", [None, 0.3])
def test_query_key_layer_scaling_and_softmax_scale_as_dot_product_attention(one_rank, softmax_scale):
    """Catches applying Megatron's 1/layer_number score scaling without the softmax's matching
    layer_number factor (DotProductAttention's net scale is unchanged) or ignoring a given
    softmax_scale: the module outputs equal DotProductAttention's at layer 3."""
    dot, sdpa = _core_attentions(one_rank, 3, softmax_scale, apply_query_key_layer_scaling=True)
    assert sdpa.softmax_scale == dot.softmax_scale
    q, k, v = _qkv()
    out = sdpa(q, k, v, None)
    assert out.shape == (8, 2, 4 * 16)  # [sq, b, hp]
    torch.testing.assert_close(out, dot(q, k, v, None), rtol=1e-5, atol=1e-6)


def test_attention_dropout_in_training_only_from_the_model_parallel_rng(one_rank):
    """Catches dropout applied in eval mode, not applied in training, or drawn from the default
    generator (DotProductAttention draws it from Megatron's model-parallel RNG, so that TP
    ranks drop different heads' probabilities and the data order is not disturbed)."""
    _, sdpa = _core_attentions(one_rank, 1, attention_dropout=0.5)
    q, k, v = _qkv()
    sdpa.eval()
    clean = sdpa(q, k, v, None)
    torch.testing.assert_close(clean, _core_attentions(one_rank, 1)[1](q, k, v, None))
    sdpa.train()
    state = torch.get_rng_state()
    dropped = sdpa(q, k, v, None)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.allclose(dropped, clean)
    assert not torch.equal(sdpa(q, k, v, None), dropped)  # the tracker's state advanced


def test_unsupported_inputs_are_refused(one_rank):
    """Catches silently computing plain attention where Megatron asked for something else."""
    with pytest.raises(NotImplementedError, match="context parallelism"):
        _core_attentions(one_rank, 1, reference=False, context_parallel_size=2)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        _core_attentions(one_rank, 1, reference=False, window_size=(4, 0))
    _, sdpa = _core_attentions(one_rank, 1)
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="packed sequences"):
        sdpa(q, k, v, None, packed_seq_params=object())
    with pytest.raises(NotImplementedError, match="as many queries as keys"):
        sdpa(q, k[:4], v[:4], None)


RECOMPUTE = [dict(recompute_granularity="selective"),
             dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
             dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2)]


def test_recompute_gives_the_same_loss_and_grads(one_rank):
    """Catches recompute settings that do not reach Megatron (no recomputation happens: the
    core attention runs once per layer) or that change what is computed: loss and gradients
    equal the no-recompute model's, same weights, with attention and hidden dropout on (the
    recomputation must redraw the forward's masks: on the CPU, runtime/cpu_support.py's
    stand-in for the CUDA generator's state)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    cfg = small_model(attention_dropout=0.3, hidden_dropout=0.2)
    models = _twin_models(cfg, one_rank, ParallelConfig(), [{}] + RECOMPUTE)
    gen = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, cfg.vocab_size, (2, 16), generator=gen) for _ in range(2))
    calls = []
    for model in models:
        model.decoder.layers[0].self_attention.core_attention.register_forward_hook(lambda *_: calls.append(1))
    rng = torch.get_rng_state(), get_cuda_rng_tracker().get_states()

    def run(model):
        calls.clear()
        torch.set_rng_state(rng[0])
        get_cuda_rng_tracker().set_states(dict(rng[1]))
        return _loss_and_grads(model, tokens, labels)

    ref_loss, ref_grads = run(models[0])
    assert len(calls) == 1
    for settings, model in zip(RECOMPUTE, models[1:]):
        loss, grads = run(model)
        assert len(calls) == 2, settings  # forward, then again in the backward pass
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=f"{settings} {name}")


def test_recompute_settings_are_checked_in_one_message():
    """Catches a recompute combination Megatron would reject (full without method or layer
    count, a layer count without full) reaching its TransformerConfig as a bare ValueError
    instead of one ConfigError naming the keys, with an unknown transformer_impl beside it."""
    from minitron_megatron.errors import ConfigError
    from minitron_megatron.model import validate_model

    with pytest.raises(ConfigError) as err:
        validate_model(small_model(recompute_granularity="full", transformer_impl="flash"), ParallelConfig())
    message = str(err.value)
    assert "recompute_method" in message and "recompute_num_layers in [1, 2]" in message
    assert "model.transformer_impl='flash'" in message
    with pytest.raises(ConfigError, match="needs model.recompute_granularity=full"):
        validate_model(small_model(recompute_granularity="selective", recompute_num_layers=1), ParallelConfig())


EVALUATE = ["device=cpu", "evaluate.samples=8", "evaluate.micro_batch_size=4"]


def test_a_run_dir_evaluates_with_either_implementation(small_teacher):
    """Catches transformer_impl as part of a run dir's identity: the teacher (trained with the
    default, SDPA on CPU) records no implementation, and evaluates with Megatron's
    DotProductAttention (model.transformer_impl=local with load=) to the same val loss."""
    body = yaml.safe_load((small_teacher / "model.yaml").read_text())
    assert "transformer_impl" not in body["model"] and "recompute_granularity" not in body["model"]
    losses = {impl: summary(run_command("evaluate", f"load={small_teacher}", f"model.transformer_impl={impl}",
                                        *EVALUATE))["val_loss"] for impl in ("local", "sdpa")}
    assert losses["local"] == pytest.approx(losses["sdpa"], rel=1e-5), losses


def test_an_old_run_dir_recording_transformer_impl_loads_with_the_default():
    """Catches the lock-in of earlier run dirs, whose model.yaml records transformer_impl: local
    (the cross-version fixtures are such files): the value is read and ignored."""
    from pathlib import Path

    from minitron_megatron.checkpoint import run_dir as rd

    fixture = Path(__file__).parent / "fixtures" / "cross_version" / "mcore-0.16.1"
    assert yaml.safe_load((fixture / rd.MODEL_YAML).read_text())["model"]["transformer_impl"] == "local"
    assert rd.read_model_yaml(fixture)[0].transformer_impl == "auto"


def _cuda_sdpa(heads=32, groups=8, hn=128):
    """SDPAttention for a Llama-8B-like layer, bf16, TP=1, without Megatron's parallel state."""
    from types import SimpleNamespace

    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from minitron_megatron.model.attention import SDPAttention

    config = TransformerConfig(num_layers=1, hidden_size=heads * hn, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=hn, attention_dropout=0.0, bf16=True,
                               params_dtype=torch.bfloat16)
    one_rank_group = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    return SDPAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                        pg_collection=one_rank_group)


def _cuda_qkv(sq, heads=32, groups=8, hn=128):
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(sq, 1, n, hn, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            for n in (heads, groups, groups)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sdpa_on_cuda_is_exact_and_linear_in_memory():
    """On the GPU, bf16: the kernel SDPA picks computes causal GQA attention (against a float32
    softmax reference), and forward + backward at 8192 tokens stays far below the
    [heads, s, s] scores DotProductAttention would hold (4 GiB in bf16, 8 GiB as its float32
    softmax): catches a fallback to the math kernel (a mask or layout the flash and
    memory-efficient kernels refuse)."""
    sdpa = _cuda_sdpa()
    q, k, v = _cuda_qkv(256)
    out = sdpa(q, k, v, None).float()  # [s, 1, heads * hn]
    kk, vv = (t.float().repeat_interleave(4, dim=2) for t in (k, v))
    scores = torch.einsum("qbhd,kbhd->bhqk", q.float(), kk) / 128 ** 0.5
    scores = scores.masked_fill(torch.ones(256, 256, device="cuda").triu(1).bool(), float("-inf"))
    ref = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), vv).reshape(256, 1, -1)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    q, k, v = _cuda_qkv(8192)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sdpa(q, k, v, None).float().square().mean().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 2 << 30, f"forward + backward took {extra / 2**30:.2f} GiB beyond the inputs"
