"""The drop-in API for Megatron-LM recipes, driven as Megatron-LM drives a model provider."""

import torch

from tests.dist_utils import run_distributed
from tests.model_utils import small_model


def _provider_worker(rank, world, tmp_path):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from minitron_megatron.checkpoint import dist as ckpt
    from minitron_megatron.config.distill import DistillConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.distill.api import distillation_loss_func, distillation_model_provider
    from minitron_megatron.distill.step import distill_forward_step
    from minitron_megatron.model import build_gpt_model
    from minitron_megatron.runtime import init_runtime
    from minitron_megatron.config.train import OptimConfig
    from minitron_megatron.train.optimizer import build_optimizer, wrap_ddp

    ctx = init_runtime(device="cpu", seed=3)
    t_cfg, s_cfg = small_model(), small_model(num_layers=1, hidden_size=48, ffn_hidden_size=64)
    padded = 256

    def gpt(cfg):
        return lambda pre_process=True, post_process=True, **_: build_gpt_model(cfg, ctx, ParallelConfig(), padded)

    saved_teacher = gpt(t_cfg)()
    ckpt.save_checkpoint(tmp_path / "teacher", 1, saved_teacher, ctx)
    kd = DistillConfig(intermediate_loss="cosine", embedding_loss=True)
    provider = distillation_model_provider(gpt(s_cfg), teacher_provider=gpt(t_cfg),
                                           teacher_checkpoint=str(tmp_path / "teacher"), settings=kd,
                                           true_vocab_size=t_cfg.vocab_size)
    model = provider(pre_process=True, post_process=True)

    # The teacher: loaded, frozen, invisible to parameters() and to the checkpoint.
    for (name, p), q in zip(model.teacher.named_parameters(), saved_teacher.parameters()):
        assert torch.equal(p, q) and not p.requires_grad, name
    assert not model.teacher.training
    own = {id(p) for p in model.parameters()}
    assert not own & {id(p) for p in model.teacher.parameters()}
    plain_keys = {v.key for v in gpt(s_cfg)().sharded_state_dict().values() if hasattr(v, "key")}
    keys = {v.key for v in model.sharded_state_dict().values() if hasattr(v, "key")}
    assert keys == plain_keys | {"kd_projection.weight"}

    # One Megatron optimizer step through the schedule: only the student moves.
    ddp = wrap_ddp(model, model.config)
    optimizer, scheduler = build_optimizer([ddp], OptimConfig(warmup_steps=0), model.config, 10, global_batch_size=2)
    loss = distillation_loss_func(kd)
    gen = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 250, (2, 2, 32), generator=gen)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(2, 32),
             "position_ids": torch.arange(32).expand(2, -1)}
    before = [p.detach().clone() for p in model.module.parameters()]
    teacher_before = [p.detach().clone() for p in model.teacher.parameters()]
    ddp.zero_grad_buffer()
    out = get_forward_backward_func()(forward_step_func=distill_forward_step(ctx.device, loss),
                                      data_iterator=iter([batch]), model=[ddp], num_microbatches=1,
                                      seq_length=32, micro_batch_size=2, decoder_seq_length=32, forward_only=False)
    optimizer.step()
    assert set(out[0]) == {"loss", "kd loss", "lm loss", "is loss", "alpha"}
    assert out[0]["kd loss"][0] > 0 and out[0]["is loss"][0] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.module.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, model.teacher.parameters()))

    # Float16Module / get_model cast and move the wrapper: the teacher follows.
    model.to(torch.bfloat16)
    assert next(model.teacher.parameters()).dtype == torch.bfloat16


def test_model_provider_wrapper_attaches_a_frozen_teacher(tmp_path):
    """Catches a teacher that trains, sits in the optimizer or the student's checkpoint,
    is not loaded, or does not follow the wrapper's device/dtype casts."""
    run_distributed(_provider_worker, 1, tmp_path)


def _pruned_student_load_worker(rank, world, tmp_path):
    from megatron.core import dist_checkpointing

    from minitron_megatron.checkpoint import dist as ckpt
    from minitron_megatron.config.distill import DistillConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.distill.api import distillation_model_provider
    from minitron_megatron.model import build_gpt_model
    from minitron_megatron.runtime import init_runtime

    ctx = init_runtime(device="cpu", seed=3)
    t_cfg, s_cfg = small_model(), small_model(num_layers=1, hidden_size=48, ffn_hidden_size=64)

    def gpt(cfg):
        return lambda pre_process=True, post_process=True, **_: build_gpt_model(cfg, ctx, ParallelConfig(), 256)

    ckpt.save_checkpoint(tmp_path / "teacher", 1, gpt(t_cfg)(), ctx)
    pruned = gpt(s_cfg)()
    ckpt.save_checkpoint(tmp_path / "pruned", 1, pruned, ctx)  # a plain student: no kd_projection
    provider = distillation_model_provider(gpt(s_cfg), teacher_provider=gpt(t_cfg),
                                           teacher_checkpoint=str(tmp_path / "teacher"),
                                           settings=DistillConfig(intermediate_loss="cosine"),
                                           true_vocab_size=t_cfg.vocab_size)
    model = provider(pre_process=True, post_process=True)
    projection = model.kd_projection.weight.detach().clone()

    # What Megatron-LM's load_checkpoint does with `--load PRUNED --dist-ckpt-strictness
    # log_unexpected`: drop the requested keys the checkpoint lacks, then a strict load_state_dict.
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                     str(ckpt.iteration_dir(tmp_path / "pruned", 1)), strict="log_unexpected")["model"]
    assert "kd_projection.weight" not in loaded
    model.load_state_dict(loaded, strict=True)
    assert torch.equal(model.kd_projection.weight, projection)  # left at its initialisation
    for (name, p), q in zip(model.module.named_parameters(), pruned.parameters()):
        assert torch.equal(p, q), name


def test_pruned_student_checkpoint_loads_into_a_model_with_a_projection(tmp_path):
    """Catches Megatron-LM's `--load` of a pruned student (no kd_projection in its checkpoint)
    failing for a provider built with an intermediate loss and differing hidden sizes: the
    strict load_state_dict raised on the absent projection, and Megatron-LM only got through by
    retrying with strict=False (printing `load_return: None`)."""
    run_distributed(_pruned_student_load_worker, 1, tmp_path)
