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


def test_default_layer_map_ends_on_the_teachers_last_layer():
    assert default_layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert default_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert default_layer_map(3, 8)[-1] == (2, 7)


def test_loss_func_dynamic_alpha_and_masking():
    """L = kd + alpha * is with alpha = kd / is detached, over unmasked tokens only."""
    out = torch.tensor([[[1.0, 5.0, 4.0], [3.0, 7.0, 2.0], [100.0, 100.0, 100.0]]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    total, tokens, report = DistillLoss(replace(DistillCommand().distill, ce_weight=0.5), True)(mask, out)
    kd, lm, state = 4.0, 12.0, 6.0
    alpha = kd / state
    assert int(tokens) == 2
    assert torch.isclose(total, torch.tensor(kd + 0.5 * lm + alpha * state))
    assert torch.allclose(report["alpha"], torch.tensor([alpha, 1.0]))
    assert torch.allclose(report["kd loss"], torch.tensor([kd, 2.0]))
    total.backward()
    # alpha is a constant: d total / d is = alpha on unmasked tokens; masked tokens get nothing.
    assert torch.allclose(out.grad[0, :, 2], torch.tensor([alpha, alpha, 0.0]))


def test_state_losses_are_zero_for_equal_states():
    h = torch.randn(5, 2, 16)
    assert per_token_state_loss(h, h.clone(), "cosine").abs().max() < 1e-6
    assert per_token_state_loss(h, h.clone(), "mse").abs().max() == 0
    assert per_token_state_loss(h, -h, "cosine").sub(2).abs().max() < 1e-6
