"""Bad input to `distill` fails before any model is built, naming the setting; and the
small pure pieces (layer map, the 3-tuple loss with dynamic alpha, state losses)."""

from dataclasses import replace

import pytest
import torch

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.commands import DistillCommand
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.distill.intermediate import default_layer_map, per_token_state_loss
from minitron_megatron.distill.objective import DistillLoss
from minitron_megatron.distill.setup import check_distill
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime.context import ParallelContext

TEACHER = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4,
                      num_query_groups=2, kv_channels=16, max_position_embeddings=64, vocab_size=4096)
STUDENT = replace(TEACHER, num_layers=2, hidden_size=48, ffn_hidden_size=96)


def _ctx(tp=1, pp=1, dp=1) -> ParallelContext:
    return ParallelContext(device=torch.device("cpu"), world_size=tp * pp * dp, rank=0, tp_size=tp, tp_rank=0,
                           pp_size=pp, pp_rank=0, dp_size=dp, dp_rank=0)


def _run_dir(path, cfg: ModelConfig, tokenizer):
    """A run dir that passes the loadability checks: model.yaml, tokenizer and a committed
    (empty) checkpoint. Checks must fail before anything reads the weights."""
    rd.write_model_yaml(path, cfg, 4096, str(tokenizer))
    (path / "checkpoint" / "iter_0000001").mkdir(parents=True)
    (path / "checkpoint" / "latest_checkpointed_iteration.txt").write_text("1\n")
    return path


@pytest.fixture
def dirs(tmp_path):
    tokenizer = tmp_path / "data.model"
    tokenizer.write_bytes(b"tokenizer-a")
    teacher = _run_dir(tmp_path / "teacher", TEACHER, tokenizer)
    student = _run_dir(tmp_path / "student", STUDENT, tokenizer)
    return tmp_path, teacher, student, str(tokenizer)


def _cfg(tmp_path, teacher, student, **distill) -> DistillCommand:
    cfg = DistillCommand(save=str(tmp_path / "out"))
    cfg.teacher.load, cfg.student.load = str(teacher), str(student)
    for key, value in distill.items():
        setattr(cfg.distill, key, value)
    return cfg


def _problems(cfg, tokenizer, **ctx) -> str:
    with pytest.raises(ConfigError) as err:
        check_distill(cfg, _ctx(**ctx), tokenizer)
    return str(err.value)


def test_valid_settings_pass(dirs):
    tmp_path, teacher, student, tok = dirs
    t, s = check_distill(_cfg(tmp_path, teacher, student, intermediate_loss="cosine"), _ctx(tp=2), tok)
    assert (t.cfg.hidden_size, s.cfg.hidden_size) == (64, 48)


def test_different_tokenizers(dirs):
    """Catches distilling across vocabularies: KD on logits needs one tokenizer."""
    tmp_path, teacher, student, tok = dirs
    (student / rd.TOKENIZER).write_bytes(b"tokenizer-b")
    msg = _problems(_cfg(tmp_path, teacher, student), tok)
    assert f"teacher.load={teacher} and student.load={student} use different tokenizers" in msg
    assert f"student.load={student} was trained with a different tokenizer" in msg


def test_layer_map_out_of_range(dirs):
    tmp_path, teacher, student, tok = dirs
    cfg = _cfg(tmp_path, teacher, student, intermediate_loss="cosine", layer_map=[[0, 1], [2, 3], [1, 4]])
    msg = _problems(cfg, tok)
    assert "distill.layer_map entry [2, 3]: student layer 2 is out of range [0, 2)" in msg
    assert "distill.layer_map entry [1, 4]: teacher layer 4 is out of range [0, 4)" in msg


def test_hidden_mismatch_without_projection(dirs):
    tmp_path, teacher, student, tok = dirs
    cfg = _cfg(tmp_path, teacher, student, intermediate_loss="mse", projection=False)
    assert "student hidden_size=48 differs from the teacher's 64 and distill.projection=false" in _problems(cfg, tok)


def test_not_loadable(dirs):
    tmp_path, teacher, student, tok = dirs
    msg = _problems(_cfg(tmp_path, tmp_path / "nothing", student), tok)
    assert f"teacher.load={tmp_path / 'nothing'}: directory not found" in msg
    (student / "checkpoint" / "latest_checkpointed_iteration.txt").unlink()
    msg = _problems(_cfg(tmp_path, teacher, student), tok)
    assert f"student.load={student}: no committed checkpoint" in msg


def test_parallel_sizes_must_fit_both_models(dirs):
    """The teacher is checked at the student's TP/PP too (they share ranks)."""
    tmp_path, teacher, student, tok = dirs
    rd.write_model_yaml(teacher, replace(TEACHER, num_attention_heads=6, num_query_groups=3, kv_channels=8),
                        4096, str(tmp_path / "data.model"))
    msg = _problems(_cfg(tmp_path, teacher, student), tok, tp=2)
    assert f"teacher.load={teacher}: parallel.tp=2 does not divide model.num_query_groups=3" in msg


def test_one_seq_length_within_both_position_limits_and_student_run_settings(dirs):
    """Catches a sequence length checked against the student alone (the teacher runs at the same
    one) and `model.*` keys that distill ignored: they concern the student like `load=`'s model."""
    tmp_path, teacher, student, tok = dirs
    rd.write_model_yaml(teacher, replace(TEACHER, max_position_embeddings=32), 4096, tok)
    msg = _problems(_cfg(tmp_path, teacher, student), tok)  # the student run's 64 tokens
    assert f"seq_length=64 is longer than the position limit of teacher.load={teacher}" in msg
    cfg = replace(_cfg(tmp_path, teacher, student), seq_length=32,
                  model=replace(STUDENT, hidden_dropout=0.1, num_layers=3),
                  model_overrides=["hidden_dropout", "num_layers"])
    assert f"student.load={student}: model.num_layers=3 (the run's: 2)" in _problems(cfg, tok)
    _, s = check_distill(replace(cfg, model_overrides=["hidden_dropout"]), _ctx(), tok)
    assert s.cfg.hidden_dropout == 0.1 and s.cfg.num_layers == 2


def test_intermediate_loss_needs_pp1_and_all_problems_are_listed(dirs):
    tmp_path, teacher, student, tok = dirs
    cfg = _cfg(tmp_path, teacher, student, intermediate_loss="cosine", logit_loss="kl", temperature=0.0)
    msg = _problems(cfg, tok, pp=2)
    assert "need parallel.pp=1" in msg
    assert "distill.logit_loss='kl'" in msg and "distill.temperature=0.0 must be > 0" in msg


def test_router_loss_needs_moe_models_and_pp1(dirs):
    """Catches a router-logit loss accepted for dense models (it would find no router) or at PP>1:
    both problems named in one message before any load; a negative weight refused."""
    tmp_path, teacher, student, tok = dirs
    msg = _problems(_cfg(tmp_path, teacher, student, router_loss_weight=0.5), tok, pp=2)
    assert "needs a MoE student and teacher (the student has no num_moe_experts)" in msg
    assert "distill.router_loss_weight > 0 needs parallel.pp=1 (got 2)" in msg
    msg = _problems(_cfg(tmp_path, teacher, student, router_loss_weight=-1.0), tok)
    assert "distill.router_loss_weight=-1.0 must be >= 0" in msg


def test_default_layer_map_ends_on_the_teachers_last_layer():
    assert default_layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert default_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert default_layer_map(3, 8)[-1] == (2, 7)


def test_loss_func_dynamic_alpha_and_masking():
    """L = kd + ce_weight * lm + alpha * is + router_weight * router with alpha = kd / is
    detached, over unmasked tokens only."""
    out = torch.tensor([[[1.0, 5.0, 4.0, 0.5], [3.0, 7.0, 2.0, 1.5], [100.0, 100.0, 100.0, 100.0]]],
                       requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    settings = replace(DistillCommand().distill, ce_weight=0.5, router_loss_weight=0.25)
    total, tokens, report = DistillLoss(settings, True)(mask, out)
    kd, lm, state, router = 4.0, 12.0, 6.0, 2.0
    alpha = kd / state
    assert int(tokens) == 2
    assert torch.isclose(total, torch.tensor(kd + 0.5 * lm + alpha * state + 0.25 * router))
    assert torch.allclose(report["alpha"], torch.tensor([alpha, 1.0]))
    assert torch.allclose(report["kd loss"], torch.tensor([kd, 2.0]))
    assert torch.allclose(report["router loss"], torch.tensor([router, 2.0]))
    total.backward()
    # alpha is a constant: d total / d is = alpha on unmasked tokens; masked tokens get nothing.
    assert torch.allclose(out.grad[0, :, 2], torch.tensor([alpha, alpha, 0.0]))
    assert torch.allclose(out.grad[0, :, 3], torch.tensor([0.25, 0.25, 0.0]))


def test_state_losses_are_zero_for_equal_states():
    h = torch.randn(5, 2, 16)
    assert per_token_state_loss(h, h.clone(), "cosine").abs().max() < 1e-6
    assert per_token_state_loss(h, h.clone(), "mse").abs().max() == 0
    assert per_token_state_loss(h, -h, "cosine").sub(2).abs().max() < 1e-6


# ---- teacher.precision=fp8: its needs, from model.yaml, before any weight is read ---------------

FP8_BAD = replace(TEACHER, hidden_size=72, ffn_hidden_size=200, kv_channels=12)
"""A teacher no FP8 GEMM can run at TP=2: hidden in a step of 8 (as a pruned round-teacher can
have), 4 heads x 12 / 2 = 24 per rank, FFN 200 / 2 = 100 (and its [gate; up] 200); the test
asks for TE layers (model.transformer_impl, a run setting)."""


def test_fp8_teacher_needs_are_all_listed_before_any_load(dirs, monkeypatch):
    """Catches the FP8 teacher's needs checked only once the teacher is built and loaded (minutes
    at 70B) or one at a time: every one is in the one ConfigError, naming the settings and what
    is allowed, and neither the build nor the checkpoint load ran (both would raise here)."""
    from minitron_megatron.checkpoint import dist as ckpt
    from minitron_megatron.distill import loop
    from minitron_megatron import model as model_pkg

    def never(*args, **kwargs):
        raise AssertionError("the teacher was built or loaded before the FP8 checks")

    monkeypatch.setattr(ckpt, "load_checkpoint", never)
    monkeypatch.setattr(model_pkg, "build_gpt_model", never)
    monkeypatch.setattr(loop.ckpt, "load_checkpoint", never)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    tmp_path, teacher, student, tok = dirs
    rd.write_model_yaml(teacher, FP8_BAD, 4096, tok)
    cfg = _cfg(tmp_path, teacher, student)
    cfg.teacher.precision = "fp8"
    cfg.model.transformer_impl, cfg.model_overrides = "transformer_engine", ["transformer_impl"]
    ctx = replace(_ctx(tp=2), device=torch.device("cuda", 0))
    with pytest.raises(ConfigError) as err:
        check_distill(cfg, ctx, tok)
    problems = [p for p in err.value.problems if p.startswith("teacher.precision=fp8")]
    prefix = f"teacher.precision=fp8 with teacher.load={teacher}: "
    expected = [
        "model.transformer_impl=transformer_engine builds Transformer Engine layers: FP8 GEMMs replace the "
        "GEMMs of Megatron's local spec (allowed: sdpa or local",
        "device=cuda:0 is NVIDIA A100 with compute capability 8.0: FP8 GEMMs need 8.9 or newer",
        "model.hidden_size = 72 (linear_qkv/linear_fc1 input, linear_proj/linear_fc2 output, at parallel.tp=2) "
        "is not a multiple of 16: every local dimension of an FP8 GEMM must be one",
        "model.num_attention_heads x model.kv_channels / parallel.tp = 24 (linear_proj input",
        "model.ffn_hidden_size / parallel.tp = 100 (the MLP's linear_fc2 input",
        "2 x model.ffn_hidden_size / parallel.tp = 200 (the MLP's linear_fc1 output ([gate; up])",
    ]
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert problem.startswith(prefix + start) and problem.endswith("use teacher.precision=bf16 for this "
                                                                       "teacher"), problem
    cfg.teacher.precision = "bf16"  # the same teacher in bf16 passes
    assert check_distill(cfg, ctx, tok)[0].cfg.hidden_size == 72


def test_fp8_teacher_that_fits_passes_and_moe_widths_split_as_built():
    """The presets' shapes pass at TP=2 on CPU; MoE: routed experts are whole on each rank
    (expert TP = 1), the shared expert splits over TP. Catches a check that refuses every
    teacher or divides the wrong widths by TP."""
    from minitron_megatron.model.fp8 import fp8_problems

    cpu = torch.device("cpu")
    assert fp8_problems(TEACHER.resolved(), 2, cpu) == []
    moe = replace(TEACHER, num_moe_experts=4, moe_ffn_hidden_size=40, moe_shared_expert_intermediate_size=48,
                  gated_linear_unit=False).resolved()
    assert [p.split(" (")[0] for p in fp8_problems(moe, 2, cpu)] == [
        "model.moe_ffn_hidden_size = 40",  # not 40 / 2 = 20: experts are whole
        "model.moe_shared_expert_intermediate_size / parallel.tp = 24"]  # not 48: split over TP
