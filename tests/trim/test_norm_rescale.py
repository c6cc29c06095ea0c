"""prune.norm_rescale=calibrated: a kept norm's output on calibration data follows the
unpruned norm's output on the kept channels more closely than the plain slice does.

A norm over fewer channels takes its statistic (RMSNorm: rms; LayerNorm: mean and std)
over those channels only; the importance pass stores per-norm moments of the normalised
norm inputs and the trimmer folds the estimated ratio into the kept gamma (and, for
LayerNorm, a mean shift into beta). One process: the real estimator, plan and trimmer on
a tiny GPTModel whose residual channels are given very different scales (as trained
models have), so that the statistic over the kept channels differs from the full one.
"""

from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.model_utils import small_model

PADDED, CALIB, MBS = 256, 8, 2
CASES = {
    "rms": dict(num_layers=2),
    "layernorm_1p": dict(num_layers=2, normalization="LayerNorm", layernorm_zero_centered_gamma=True,
                         add_bias_linear=True, gated_linear_unit=False, activation="gelu"),
}
NORMS = ("decoder.layers.0.input_layernorm", "decoder.layers.1.pre_mlp_layernorm", "decoder.final_layernorm")


def _capture_inputs(model, batches, names):
    """{norm module name: its inputs [tokens, h]} over the batches."""
    got, handles = {n: [] for n in names}, []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(
            lambda m, a, n=name: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for batch in batches:
            model(batch["tokens"], batch["position_ids"], None)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def worker(rank, world, out_dir):
    from dataclasses import replace

    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.config.prune import ImportanceConfig, PruneConfig, TrimTarget
    from minitron_megatron.data import calibration_batches
    from minitron_megatron.importance import batches_fn, estimate_importance
    from minitron_megatron.model import build_gpt_model
    from minitron_megatron.runtime import init_runtime
    from minitron_megatron.trim.apply import apply_plan
    from minitron_megatron.trim.stage import make_plan
    from minitron_megatron.trim.validate import validate_target
    from tests.importance.workers import synthetic_dataset

    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=3)
    out = {}
    for case, overrides in CASES.items():
        cfg = small_model(**overrides)
        model = build_gpt_model(cfg, ctx, ParallelConfig(), PADDED)
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():  # channels of very different scales, non-trivial gammas
            model.embedding.word_embeddings.weight.mul_(torch.randn(cfg.hidden_size, generator=gen).mul(1.5).exp())
            for name, p in model.named_parameters():
                if "layernorm" in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
        data = synthetic_dataset(cfg, CALIB, 0)
        icfg = ImportanceConfig(micro_batch_size=MBS, depth_metrics=["block_importance"])
        scores = estimate_importance(model, icfg, cfg, ctx, batches_fn(data, CALIB, MBS, ctx, "calib")).scores
        target = TrimTarget(hidden_size=40)
        new_cfg = validate_target(cfg, target, 1, 1, None, PADDED)
        inputs = _capture_inputs(model, list(calibration_batches(data, CALIB, MBS, 0, 1)), NORMS)
        errors = {}
        for mode in ("none", "calibrated"):
            prune = replace(PruneConfig(), target=target, norm_rescale=mode, importance=icfg)
            plan = make_plan(prune, cfg, new_cfg, scores=scores)
            pruned = apply_plan(model, plan, cfg, ctx, ParallelConfig(), PADDED, release_source=False).model
            kept = torch.tensor(plan.hidden)
            with torch.no_grad():
                errors[mode] = {n: ((pruned.get_submodule(n)(x[:, kept]) - model.get_submodule(n)(x)[:, kept])
                                    .square().mean() / model.get_submodule(n)(x)[:, kept].square().mean()).item()
                                for n, x in inputs.items()}
            errors[f"{mode}_scale"] = plan.norm_scale
        out[case] = errors
    torch.save(out, Path(out_dir) / "errors.pt")


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    out = tmp_path_factory.mktemp("rescale")
    run_distributed(worker, 1, str(out))
    return torch.load(out / "errors.pt")


@pytest.mark.parametrize("case", sorted(CASES))
def test_rescaled_norm_follows_the_unpruned_norm(errors, case):
    """Catches a ratio inverted (rms_full / rms_kept), taken over the wrong channels, applied
    to the stored gamma - 1 instead of gamma (zero-centred), a LayerNorm mean shift with the
    wrong sign, or a factor landing on another norm: for each norm (a layer's input norm, a
    pre-MLP norm, the final norm), the relative squared error of the kept channels' output
    against the unpruned norm must shrink at least 2x with the rescale."""
    got = errors[case]
    assert got["none_scale"] is None and got["calibrated_scale"] is not None
    for name in NORMS:
        plain, rescaled = got["none"][name], got["calibrated"][name]
        assert plain > 1e-3, (name, plain)  # the slice alone is measurably off on this model
        assert rescaled < plain / 2, (case, name, plain, rescaled)
