"""BF16 mixed precision through the real commands, on CPU, in ONE 2-process gloo launch.

Megatron-LM's recipe: every parameter bf16 (the local spec's torch norms too, cast as its
Float16Module casts them), float32 `main_grad` buffers, float32 main parameters and Adam state
in Float16OptimizerWithFloat16Params, no loss scaling. The worker runs `train` and `distill`
in-process (the functions the CLI calls after `init_runtime`), re-initialising the same two
processes at each layout: TP=1 (DP=2) runs, then TP=2, then PP=2, then KD runs; last, every
run's final checkpoint is read back at TP=1. The tests below assert on what rank 0 saved.

These CPUs emulate bf16 (5-40x slower than float32), so the model is tiny: 2 layers,
hidden 32, seq 32, 3 steps of 4 samples.

Tolerances (bf16 has an 8-bit mantissa: one rounding is <= 2^-9 = 0.2% relative).
TP=2 rounds row-parallel partial sums to bf16 before their all-reduce, so it differs from
TP=1 by a few bf16 roundings per layer; the losses are float32 means over 128 tokens of a
float32 cross-entropy over near-uniform logits: bounded at 1e-3 relative, half a bf16
rounding (measured 8e-6).
Parameters are compared by the size of the training update: Adam's first steps move every
weight by about +-lr whatever the gradient's size, so a weight whose tiny gradient changes
sign moves the other way; but the layouts' updates must agree to a small fraction of the
update itself: |p_tp2 - p_tp1| <= 0.15 |p_tp1 - p_base| per tensor (measured 0.043).
A TP/PP bug (a missing reduce, a wrong shard, a gradient not synced, weights not loaded)
gives a difference as large as the update or larger: the PP=2 run found one, main params
cloned from the random init before `load=` (PP=2's second stage ended at 9x the update).
PP=2 measures bit-identical to TP=1 here (same ops per layer; two float32 gradient sums
in the same order), which the mixed-dtype KD test uses.
"""

import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow  # minutes: run first (tests/conftest.py)

STEPS = 3
MODEL = dict(name="tiny-bf16", num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
             num_query_groups=2, kv_channels=8, max_position_embeddings=32, params_dtype="bfloat16")
LOOP = dict(steps=STEPS, micro_batch_size=2, global_batch_size=4, eval_interval=100, eval_samples=4,
            save_interval=100, log_interval=1, tensorboard=False)


def _train_cfg(save, load=None, tp=1, pp=1, lr=3e-3, **loop):
    from minitron_megatron.config.commands import EvaluateConfig, TrainCommand
    from minitron_megatron.config.model import ModelConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.config.train import OptimConfig, TrainConfig

    # The plain optimizer's bf16 path (Float16OptimizerWithFloat16Params, whose groups the facts
    # below read): at DP=2 `auto` would pick the distributed optimizer (tests/test_distributed_optimizer.py).
    train = TrainConfig(**{**LOOP, **loop}, optim=OptimConfig(lr=lr, warmup_steps=1, use_distributed_optimizer="false"))
    return TrainCommand(model=ModelConfig(**MODEL), parallel=ParallelConfig(tp=tp, pp=pp), load=load,
                        save=str(save), device="cpu", train=train,
                        evaluate=EvaluateConfig(samples=8, micro_batch_size=2))


def _distill_cfg(save, teacher, student, pp=1, student_dtype=None, teacher_dtype=None):
    from minitron_megatron.config.commands import DistillCommand, EvaluateConfig
    from minitron_megatron.config.distill import DistillConfig, ModelSource
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.config.train import OptimConfig

    distill = DistillConfig(**{**LOOP, "eval_interval": 1},
                            optim=OptimConfig(warmup_steps=1, use_distributed_optimizer="false"))
    return DistillCommand(teacher=ModelSource(load=str(teacher), params_dtype=teacher_dtype),
                          student=ModelSource(load=str(student), params_dtype=student_dtype),
                          parallel=ParallelConfig(pp=pp), save=str(save), device="cpu", distill=distill,
                          evaluate=EvaluateConfig(samples=8, micro_batch_size=2))


def _log(run, kind="step"):
    import json

    rows = [json.loads(line) for line in (Path(run) / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _final_params(run, ctx, dtype=None):
    """{name: tensor} of `run`'s final checkpoint, loaded at this (TP=1, PP=1) context,
    in the run's own dtype or in `dtype`."""
    from minitron_megatron.checkpoint import dist as ckpt
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model

    cfg, padded, _ = rd.read_model_yaml(run)
    model = build_gpt_model(replace(cfg, params_dtype=dtype or cfg.params_dtype), ctx, ParallelConfig(), padded,
                            init="none")
    ckpt.load_checkpoint(rd.checkpoint_root(run), model, ctx)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _precision_facts(run, ctx):
    """The trainable model `train` builds, after loading `run`'s final checkpoint with its
    optimizer: which wrappers and optimizer class, and every dtype."""
    from minitron_megatron.checkpoint import dist as ckpt
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.train import setup

    cfg = _train_cfg(Path(run).parent / "unused", load=str(run))
    inputs = setup.prepare_run(cfg, ctx, num_train_samples=STEPS * 4, num_valid_samples=8)
    model, ddp, optimizer, scheduler = setup.trainable_model(inputs, cfg, ctx, cfg.train.optim, STEPS, 4)
    ckpt.load_checkpoint(rd.checkpoint_root(run), model, ctx, optimizer, scheduler)
    inner = optimizer.chained_optimizers[0] if hasattr(optimizer, "chained_optimizers") else optimizer
    pairs = [(p, main) for group, mains in zip(inner.float16_groups, inner.fp32_from_float16_groups)
             for p, main in zip(group, mains)]
    adam = [t for state in inner.optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    return {
        "wrappers": [type(ddp).__name__, type(ddp.module).__name__, type(ddp.module.module).__name__],
        "optimizer": type(inner).__name__,
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "main_grad_dtypes": sorted({str(p.main_grad.dtype) for p in model.parameters()}),
        "main_param_dtypes": sorted({str(main.dtype) for _, main in pairs}),
        "adam_state_dtypes": sorted({str(t.dtype) for t in adam}),
        "num_pairs": len(pairs), "num_params": len(list(model.parameters())), "num_fp32_params": sum(
            len(g) for g in inner.fp32_from_fp32_groups),
        "grad_scaler": inner.grad_scaler, "loss_scale": float(inner.get_loss_scale()),
        # The loaded float32 main params round to the bf16 params, but carry more than them.
        "main_rounds_to_param": all(torch.equal(main.bfloat16(), p) for p, main in pairs),
        "main_finer_than_param": sum(int((main != p.float()).sum()) for p, main in pairs),
        "main_params": [main.clone() for _, main in pairs],
    }


def _worker(rank, world, out_dir):
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.distill.loop import distill
    from minitron_megatron.runtime import destroy_runtime, init_runtime
    from minitron_megatron.train.loop import pretrain

    os.environ["MINITRON_NO_PROGRESS"] = "1"
    out = Path(out_dir)
    runs = {name: out / name for name in ("base", "tp1", "resumed", "tp2", "pp2", "teacher", "kd_bf16", "kd_fp32",
                                          "kd_pp2", "kd_t32", "kd_t32_pp2")}
    layout = lambda tp=1, pp=1: init_runtime(tp=tp, pp=pp, device="cpu", seed=7)  # noqa: E731

    ctx = layout()  # TP=1: the two processes are DP replicas
    pretrain(_train_cfg(runs["base"], steps=1), ctx)  # shared start: PP=2 draws its init per stage
    pretrain(_train_cfg(runs["tp1"], load=runs["base"]), layout())
    pretrain(_train_cfg(runs["resumed"], load=runs["base"], exit_after_steps=2), layout())
    pretrain(_train_cfg(runs["resumed"], load=runs["base"]), layout())  # resumes at step 2
    # KD's bf16 teacher: trained away from the base model (10x the lr), which it then retrains.
    pretrain(_train_cfg(runs["teacher"], load=runs["base"], lr=3e-2), layout())
    pretrain(_train_cfg(runs["tp2"], load=runs["base"], tp=2), layout(tp=2))
    pretrain(_train_cfg(runs["pp2"], load=runs["base"], pp=2), layout(pp=2))
    # KD: bf16 students at PP=2 and PP=1, a float32 one (the bf16 checkpoint loaded in float32).
    distill(_distill_cfg(runs["kd_pp2"], runs["teacher"], runs["base"], pp=2), layout(pp=2))
    # The bf16 teacher's checkpoint loaded in float32, beside a bf16 student, at PP=2 and PP=1.
    distill(_distill_cfg(runs["kd_t32_pp2"], runs["teacher"], runs["base"], pp=2, teacher_dtype="float32"),
            layout(pp=2))
    distill(_distill_cfg(runs["kd_t32"], runs["teacher"], runs["base"], teacher_dtype="float32"), layout())
    distill(_distill_cfg(runs["kd_bf16"], runs["teacher"], runs["base"]), layout())
    distill(_distill_cfg(runs["kd_fp32"], runs["teacher"], runs["base"], student_dtype="float32"), layout())

    ctx = layout()
    result = {
        "logs": {name: _log(run) for name, run in runs.items() if name != "base"},
        "evals": {name: _log(run, "eval") for name, run in runs.items() if name.startswith("kd")},
        "params": {name: _final_params(run, ctx) for name, run in runs.items()},
        "tp1_as_fp32": _final_params(runs["tp1"], ctx, dtype="float32"),
        "facts": _precision_facts(runs["tp1"], ctx),
        "resumed_facts": _precision_facts(runs["resumed"], ctx),
        "model_yaml_dtypes": {name: rd.read_model_yaml(run)[0].params_dtype for name, run in runs.items()},
    }
    if rank == 0:
        torch.save(result, out / "result.pt")
    destroy_runtime()


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    run_distributed(_worker, 2, str(out))
    return torch.load(out / "result.pt", weights_only=False)


def _losses(rows, key="loss"):
    return [r[key] for r in rows]


def _assert_losses_close(a, b, rel=1e-3):
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert math.isfinite(x) and math.isclose(x, y, rel_tol=rel), (step, x, y)


def _update_agreement(params, base, ref):
    """max over tensors of |p - ref| / |ref - base|: how far `params`' training update is
    from the reference's, as a fraction of the reference update."""
    worst = 0.0
    for name, r in ref.items():
        update = (r.float() - base[name].float()).norm()
        assert update > 0, name  # every tensor trained
        worst = max(worst, ((params[name].float() - r.float()).norm() / update).item())
    return worst


def test_bf16_everywhere_fp32_main_params_and_state(bf16):
    """Catches the local spec's float32 torch norms left in a bf16 model (Megatron's
    Float16Optimizer then fails to checkpoint them), a missing Float16Module, float32 main
    params or Adam state replaced by bf16 ones, bf16 gradient buffers, or loss scaling in bf16."""
    facts = bf16["facts"]
    assert facts["wrappers"] == ["DistributedDataParallel", "Float16Module", "GPTModel"]
    assert facts["optimizer"] == "Float16OptimizerWithFloat16Params"
    assert facts["param_dtypes"] == ["torch.bfloat16"]
    assert facts["main_grad_dtypes"] == ["torch.float32"]
    assert facts["main_param_dtypes"] == ["torch.float32"] and facts["adam_state_dtypes"] == ["torch.float32"]
    assert facts["num_pairs"] == facts["num_params"] and facts["num_fp32_params"] == 0
    assert facts["grad_scaler"] is None and facts["loss_scale"] == 1.0
    dtypes = dict(bf16["model_yaml_dtypes"])  # what model.yaml records for each run
    assert dtypes.pop("kd_fp32") == "float32" and set(dtypes.values()) == {"bfloat16"}


def test_bf16_checkpoint_restores_fp32_main_params_and_resumes_exactly(bf16):
    """Catches a resume that re-derives the main params from the bf16 weights (losing the
    float32 digits Adam accumulated) or loses Adam state: the loaded main params round to the
    weights yet differ from them, and a run stopped at step 2 and resumed ends bit-identical,
    losses, weights and main params, to the uninterrupted one."""
    facts, resumed = bf16["facts"], bf16["resumed_facts"]
    assert facts["main_rounds_to_param"] and facts["main_finer_than_param"] > 0
    assert _losses(bf16["logs"]["resumed"]) == _losses(bf16["logs"]["tp1"])
    for name, p in bf16["params"]["tp1"].items():
        assert torch.equal(bf16["params"]["resumed"][name], p), name
    for a, b in zip(resumed["main_params"], facts["main_params"]):
        assert torch.equal(a, b)


def test_bf16_checkpoint_loads_at_float32(bf16):
    """Catches a checkpoint tied to its dtype: the bf16 run's weights load into a float32
    model exactly (e.g. to evaluate a bf16-trained teacher in float32)."""
    for name, p in bf16["params"]["tp1"].items():
        as_fp32 = bf16["tp1_as_fp32"][name]
        assert as_fp32.dtype == torch.float32 and torch.equal(as_fp32, p.float()), name


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_bf16_training_sharded_follows_unsharded(bf16, layout):
    """Catches TP/PP bugs that only bf16 shows (p2p buffers or grad buffers in the wrong dtype,
    a stage's norms left float32, a gradient reduced in bf16 and lost): TP=2 and PP=2 follow
    TP=1's losses and updates within bf16 rounding (module docstring)."""
    losses, ref = _losses(bf16["logs"][layout]), _losses(bf16["logs"]["tp1"])
    agreement = _update_agreement(bf16["params"][layout], bf16["params"]["base"], bf16["params"]["tp1"])
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
    print(f"bf16 {layout} vs tp1: loss rel diff {rel:.2e}, update disagreement {agreement:.3f}")
    _assert_losses_close(losses, ref)
    assert agreement < 0.15


def test_kd_with_a_bf16_teacher(bf16):
    """Catches a bf16 teacher that breaks KD (dtype mismatch at the loss or between stages, the
    teacher cast with the student, the student's loaded weights dropped): bf16 and float32
    students learn from the bf16 teacher (validation KD loss, same samples, falls every step),
    PP=2 follows PP=1 in bf16, and the float32 student stays float32."""
    logs, evals, params = bf16["logs"], bf16["evals"], bf16["params"]
    for name in ("kd_bf16", "kd_fp32", "kd_pp2"):
        val_kd = [r["val_kd_loss"] for r in evals[name]]
        print(f"{name}: train kd {_losses(logs[name], 'kd_loss')}, val kd {val_kd}")
        assert len(val_kd) == STEPS and all(b < a for a, b in zip(val_kd, val_kd[1:])), (name, val_kd)
    _assert_losses_close(_losses(logs["kd_pp2"], "kd_loss"), _losses(logs["kd_bf16"], "kd_loss"))
    # float32 vs bf16 student: its own bf16 roundings (measured 4e-4)
    _assert_losses_close(_losses(logs["kd_fp32"], "kd_loss"), _losses(logs["kd_bf16"], "kd_loss"), rel=1e-2)
    assert {p.dtype for p in params["kd_fp32"].values()} == {torch.float32}
    assert {p.dtype for p in params["kd_bf16"].values()} == {torch.bfloat16}
    agreement = _update_agreement(params["kd_pp2"], params["base"], params["kd_bf16"])
    print(f"bf16 KD pp2 vs pp1: update disagreement {agreement:.3f}")
    assert agreement < 0.15


def test_kd_float32_teacher_beside_a_bf16_student_at_pp2(bf16):
    """Catches the teacher's hidden states rounded to the student's bf16 between pipeline
    stages (the inter-stage tensor must travel in the wider dtype): PP=2 gives PP=1's KD
    losses. PP=2 runs PP=1's arithmetic here (same ops per layer; two microbatches or two DP
    ranks add their float32 gradients in the same order: measured bit-identical for every
    bf16 pair above), so 1e-6 is far below one bf16 rounding of the teacher (~1e-3)."""
    logs = bf16["logs"]
    pp2, pp1 = _losses(logs["kd_t32_pp2"], "kd_loss"), _losses(logs["kd_t32"], "kd_loss")
    print(f"fp32 teacher, bf16 student: kd pp2 {pp2} pp1 {pp1}; bf16 teacher {_losses(logs['kd_bf16'], 'kd_loss')}")
    _assert_losses_close(pp2, pp1, rel=1e-6)
    assert {p.dtype for p in bf16["params"]["kd_t32_pp2"].values()} == {torch.bfloat16}
    assert _losses(logs["kd_t32"], "kd_loss") != _losses(logs["kd_bf16"], "kd_loss")  # the teacher ran in float32
