"""Do the importance scores rank units sensibly on a trained model?

    python benchmarks/importance_sanity.py --load runs/teacher [--out /tmp/importance_sanity]

Runs the importance stage on `--load` (writing importance.* and plots into --out),
then masks 25% of the units of one kind -- the least important by the scores, a
random 25% (mean over seeds), the most important -- and reports the validation
loss of each. Masking zeroes the unit's activation (a neuron's fc2 input, a head's
slice of the linear_proj input, a hidden channel of every norm output), which is
what removing it does to the forward pass (up to RMS statistics for channels).
Expected: least < random << most, for neurons, heads and hidden channels.
The last stdout line is JSON with every loss.
"""

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", default="runs/teacher")
    parser.add_argument("--data", default="stdlib")
    parser.add_argument("--out", default="/tmp/importance_sanity")
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--random-seeds", type=int, default=3)
    return parser.parse_args()


def _per_row_mask(scores, fraction: float, how: str, seed: int = 0):
    """[rows, n] bool, True = keep: drop the `fraction` least/most important (or random) per row."""
    import torch

    rows, n = scores.shape
    drop = int(round(n * fraction))
    gen = torch.Generator().manual_seed(seed)
    keep = torch.ones(rows, n, dtype=torch.bool)
    for r in range(rows):
        if how == "random":
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.sort(scores[r], descending=(how == "most"), stable=True).indices
        keep[r, order[:drop]] = False
    return keep


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _masked(probes, kind: str, keep):
    """Hooks zeroing the dropped units of `kind` (keep: [layers, n] or [1, h] for channels)."""
    handles = []
    if kind == "mlp.neuron":
        for p in probes.layers:
            mask = keep[p.layer_index].float()  # [ffn]
            handles.append(p.mlp_intermediate.module.register_forward_pre_hook(
                lambda m, args, mask=mask: (args[0] * mask, *args[1:])))
    elif kind == "attn.head":
        for p in probes.layers:
            mask = keep[p.layer_index].float().repeat_interleave(probes.kv_channels)  # [heads * d]
            handles.append(p.attention_output.module.register_forward_pre_hook(
                lambda m, args, mask=mask: (args[0] * mask, *args[1:])))
    else:
        mask = keep[0].float()  # [h]
        for norm in probes.all_norms():
            assert not norm.fused, "channel masking needs norm modules (local spec)"
            handles.append(norm.module.register_forward_hook(lambda m, args, out, mask=mask: out * mask))
    return _hooks(handles)


def main() -> None:
    args = _args()
    import torch

    from minitron_megatron.checkpoint import dist as ckpt
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.config.commands import CommonConfig
    from minitron_megatron.config.data import DataConfig
    from minitron_megatron.config.prune import ImportanceConfig
    from minitron_megatron.importance import run_importance_stage
    from minitron_megatron.model.probes import find_probes, skipped_layers
    from minitron_megatron.runtime import init_runtime
    from minitron_megatron.train import setup
    from minitron_megatron.train.step import evaluate_loss

    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=1234)
    cfg = CommonConfig(data=DataConfig(name=args.data), load=args.load, save=args.out, device="cpu")
    mbs = args.micro_batch_size
    icfg = ImportanceConfig(calibration_samples=args.calibration_samples, micro_batch_size=mbs, depth_samples=64)
    scores = run_importance_stage(cfg, icfg, ctx).scores

    run = setup.prepare_run(cfg, ctx, num_train_samples=1, num_valid_samples=args.eval_samples)
    model = setup.build_model(run, cfg, ctx)
    ckpt.load_checkpoint(rd.checkpoint_root(args.load), model, ctx)
    probes = find_probes([model])
    valid = run.valid_batches(mbs, ctx)
    loss = lambda: evaluate_loss([model], valid, ctx, len(valid), mbs, run.seq_length)["val_loss"]  # noqa
    results = {"baseline": loss(), "fraction": args.fraction}
    for kind in ("mlp.neuron", "attn.head", "hidden.channel"):
        table = scores[kind] if kind != "hidden.channel" else scores[kind][None]
        row = {}
        for how in ("least", "most"):
            with _masked(probes, kind, _per_row_mask(table, args.fraction, how)):
                row[how] = loss()
        randoms = []
        for seed in range(args.random_seeds):
            with _masked(probes, kind, _per_row_mask(table, args.fraction, "random", seed)):
                randoms.append(loss())
        row["random"] = sum(randoms) / len(randoms)
        row["random_each"] = randoms
        results[kind] = row
        print(f"{kind:15s} drop {args.fraction:.0%}: least {row['least']:.4f}  random {row['random']:.4f}  "
              f"most {row['most']:.4f}  (baseline {results['baseline']:.4f})", flush=True)
    for metric in ("depth.block_importance", "depth.loss_drop"):
        order = torch.sort(scores[metric], stable=True).indices.tolist()
        row = {}
        for how, layer in (("least", order[0]), ("most", order[-1])):
            with skipped_layers(probes, [layer]):
                row[how] = {"layer": layer, "val_loss": loss()}
        results[metric] = row
        print(f"{metric:23s} skip least important layer {row['least']['layer']}: {row['least']['val_loss']:.4f}  "
              f"most important layer {row['most']['layer']}: {row['most']['val_loss']:.4f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
