"""The memory planner (`python -m minitron_megatron.plan`): its parameter bytes against exact
counts, its activation formula against autograd's saved tensors of a real Megatron layer, its
settings' checks and the command's summary. Its agreement with measured CPU peaks is
benchmarks/plan_vs_measured.py (minutes: not in the suite)."""

from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from minitron_megatron.cli.app import CONF_DIR
from minitron_megatron.config.commands import register_configs
from minitron_megatron.errors import ConfigError
from minitron_megatron.model.params import layer_parameter_count, parameter_count
from minitron_megatron.plan import memory as M
from minitron_megatron.plan.command import estimate, plan_inputs
from tests.commands import run_command, summary

TINY = ["model=tiny", "model.vocab_size=4096", "seq_length=64", "distill.micro_batch_size=2",
        "distill.global_batch_size=8", "model.params_dtype=bfloat16"]


def _cfg(*overrides, base=TINY):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="plan", overrides=[*base, *overrides]))
    return cfg


@pytest.mark.parametrize("layout", [("parallel.tp=2",), ("parallel.pp=2",), ("plan.dp=2",),
                                    ("parallel.tp=2", "parallel.pp=2", "plan.world_size=8")])
def test_weight_grad_optimizer_bytes_are_exact_counts(layout):
    """Catches a per-rank count that is not what a rank holds: TP shards counted whole (or norms,
    replicated over TP, halved), a pipeline stage given the other's embedding/output layer, Adam
    state not sharded over DP with the distributed optimizer (on by default at DP > 1), or
    grads/optimizer in the wrong dtype (Megatron: float32 grad buffer; fp32 main + 2 moments)."""
    cfg = _cfg(*layout)
    inp = plan_inputs(cfg)
    result = estimate(inp)
    model, tp, pp = inp.student, inp.parallel.tp, inp.parallel.pp
    layer = sum(layer_parameter_count(model).values())
    norms = 2 * model.hidden_size  # RMSNorm weights of one layer: replicated over TP
    embedding = inp.padded_vocab * model.hidden_size
    per_layer_local = (layer - norms) // tp + norms
    layers = model.num_layers // pp
    expected = [layers * per_layer_local + (embedding // tp if rank == 0 else 0)
                + (embedding // tp + model.hidden_size if rank == pp - 1 else 0) for rank in range(pp)]
    assert sum(n * tp for n in expected) - (tp - 1) * (model.num_layers * norms + model.hidden_size) \
        == parameter_count(model, inp.padded_vocab)  # the expectation itself is the whole model
    dp = inp.dp
    assert inp.distributed_optimizer == (dp > 1)
    for stage, params in zip(result.stages, expected):
        assert stage["student_weights"] == 2 * params  # bf16
        assert stage["teacher_weights"] == 2 * params  # no target: the student is the teacher
        assert stage["gradients"] == 4 * params
        assert stage["optimizer"] == -(-12 * params // dp)


def test_targets_and_fp8_teacher():
    """Catches the student not being the pruned architecture (validate_target's), and an FP8
    teacher not counted as model/fp8.py keeps it: e4m3 linears + a float32 scale per row, the
    rest in bf16."""
    inp = plan_inputs(_cfg("prune.target.ffn_hidden_size=192", "prune.target.num_layers=2", "teacher.precision=fp8"))
    assert (inp.student.ffn_hidden_size, inp.student.num_layers) == (192, 2)
    stage = estimate(inp).stages[0]
    assert stage["student_weights"] == 2 * parameter_count(inp.student, inp.padded_vocab)
    t = inp.teacher
    parts = layer_parameter_count(t)
    linears = parts["qkv"] + parts["proj"] + parts["fc1"] + parts["fc2"]
    rows = (t.num_attention_heads + 2 * t.num_query_groups) * t.kv_channels + t.hidden_size \
        + 2 * t.ffn_hidden_size + t.hidden_size
    rest = parameter_count(t, inp.padded_vocab) - t.num_layers * linears
    assert stage["teacher_weights"] == t.num_layers * (linears + 4 * rows) + 2 * rest


def test_bad_settings_fail_in_one_config_error():
    """Catches a misspelt choice planned silently as a default, and a world size TP x PP does not divide."""
    with pytest.raises(ConfigError) as err:
        plan_inputs(_cfg("plan.attention=flash", "teacher.precision=int4"))
    assert "plan.attention='flash'" in str(err.value) and "teacher.precision='int4'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        plan_inputs(_cfg("parallel.tp=4", "plan.world_size=6"))
    assert "plan.world_size=6 must be a multiple of parallel.tp=4" in str(err.value)
    assert "parallel.tp=4 does not divide model.num_query_groups=2" in str(err.value)
    with pytest.raises(ConfigError, match="ffn_hidden_size"):
        plan_inputs(_cfg("prune.target.ffn_hidden_size=100000"))


def _saved_bytes_of_one_layer(attention, params_dtype: str, seq: int, batch: int):
    """Bytes autograd saves inside decoder layer 1 of a real tiny GPTModel (one gloo process),
    parameters excluded, each storage once."""
    from minitron_megatron.config.model import ModelConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model.build import build_gpt_model
    from minitron_megatron.runtime import destroy_runtime, init_runtime

    cfg = ModelConfig(num_layers=2, vocab_size=512, max_position_embeddings=seq, params_dtype=params_dtype,
                      transformer_impl=attention)
    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=1)
    try:
        model = build_gpt_model(cfg, ctx, ParallelConfig(), 512)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved, recording = {}, [False]

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if recording[0] and ptr not in params:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        layer = model.decoder.layers[1]
        layer.register_forward_pre_hook(lambda *a: recording.__setitem__(0, True))
        layer.register_forward_hook(lambda *a: recording.__setitem__(0, False))
        ids = torch.randint(0, 500, (batch, seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, position_ids=torch.arange(seq)[None].expand(batch, seq), attention_mask=None,
                  labels=ids)
        return sum(saved.values()), cfg
    finally:
        destroy_runtime()


@pytest.mark.parametrize("attention", ["local", "sdpa"])
@pytest.mark.parametrize("params_dtype,seq,batch", [("float32", 64, 2), ("bfloat16", 32, 3)])
def test_activation_formula_equals_autograds_saved_tensors(attention, params_dtype, seq, batch):
    """Catches the activation formula drifting from what a Megatron local-spec layer (with its own or the SDPA core attention) really keeps for
    backward (a new saved tensor in a Megatron or torch release, the float32 norm copies, the
    softmax's float32 + bf16 probabilities, GQA's expanded k/v)."""
    got, cfg = _saved_bytes_of_one_layer(attention, params_dtype, seq, batch)
    shape = M.Shape(seq_length=seq, micro_batch_size=batch, tp=1, attention=attention)
    assert M.layer_activation_bytes(cfg, shape, M.DTYPE_BYTES[params_dtype]) == got


def test_pipeline_keeps_micro_batches_in_flight():
    """Catches 1F1B's in-flight micro-batches ignored: stage 0 of PP=2 keeps two micro-batches'
    activations (global batch 8 = 4 micro-batches), the last stage one, plus the KD loss."""
    inp = plan_inputs(_cfg("parallel.pp=2"))
    result = estimate(inp)
    assert result.micro_batches_in_flight == [2, 1]
    first, last = result.stages
    assert first["kd_loss"] == 0 < last["kd_loss"]
    assert first["activations"] == 2 * 2 * M.layer_activation_bytes(inp.student, M.Shape(64, 2, 1, inp.attention), 2)


def test_llama_70b_preset_is_the_published_architecture():
    """Catches a typo in conf/model/llama3.1-70b.yaml: 70,553,706,496 parameters (HF
    meta-llama/Llama-3.1-70B safetensors) with untied embeddings of 128256 x 8192."""
    model = _cfg("model=llama3.1-70b", base=()).model
    assert parameter_count(model) == 70_553_706_496


def test_plan_command_prints_table_and_summary():
    """Catches the command path (Hydra, registry, no runtime) broken, or a summary without the
    contract's fields: fits, per-rank bytes by kind, their total, the GPU's bytes."""
    proc = run_command("plan", *TINY, "parallel.tp=2", "plan.world_size=4", "prune.target.hidden_size=64",
                       "plan.gpu_memory_gb=0.01")
    out = summary(proc)
    assert out["fits"] is False and out["gpu_memory_bytes"] == 10_000_000
    assert out["total_bytes"] == sum(out["per_rank_bytes"].values()) > out["gpu_memory_bytes"]
    assert out["dp"] == 2 and out["student_params"] < out["teacher_params"]
    table = proc.stdout.splitlines()[:-1]
    assert table[0].startswith("plan (MiB per rank)") and [row.split()[0] for row in table[2:-1]] == [
        "teacher_weights", "student_weights", "gradients", "optimizer", "activations", "activation_transient",
        "kd_loss", "total"]


def test_distill_refuses_a_plan_over_the_device_before_loading():
    """Catches the distill guard planning another run than the command's (its total must be the
    plan command's for the same settings, from this rank's own meta build), or letting a run
    that cannot fit go on to load its teacher."""
    from types import SimpleNamespace

    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.plan.guard import refuse_if_over
    from minitron_megatron.runtime import destroy_runtime, init_runtime

    cfg = _cfg("prune.target.ffn_hidden_size=192")
    inp = plan_inputs(cfg)
    planned = sum(estimate(inp).stages[0].values())
    run = SimpleNamespace(model_cfg=inp.student, padded_vocab=inp.padded_vocab, seq_length=inp.seq_length)
    inputs = SimpleNamespace(run=run, teacher=SimpleNamespace(cfg=inp.teacher, padded_vocab=inp.padded_vocab),
                             teacher_parallel=ParallelConfig())
    distill_cfg = replace(cfg, parallel=ParallelConfig())
    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=1)
    try:
        assert refuse_if_over(inputs, distill_cfg, ctx) is None  # CPU: no device limit, nothing checked
        assert refuse_if_over(inputs, distill_cfg, ctx, limit_bytes=planned) == planned
        with pytest.raises(ConfigError, match="needs about .* GiB on its largest rank"):
            refuse_if_over(inputs, distill_cfg, ctx, limit_bytes=planned - 1)
    finally:
        destroy_runtime()


def test_prune_refuses_weights_over_the_device_before_loading():
    """Catches the prune guard counting other weights than the rank holds (the source and the
    pruned copy trim builds beside it, each in its dtype, counted as model/params.py counts them)
    or letting a prune that cannot fit go on to read its checkpoint."""
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.plan.guard import prune_bytes, refuse_prune_if_over
    from minitron_megatron.runtime import destroy_runtime, init_runtime

    inp = plan_inputs(_cfg("prune.target.ffn_hidden_size=192"))
    source, new, vocab, seq = inp.teacher, inp.student, inp.padded_vocab, inp.seq_length
    parallel = ParallelConfig()
    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=1)
    try:
        args = (source, new, ctx, parallel, parallel, vocab, seq, 4)
        kinds = prune_bytes(*args)
        assert kinds == {"source_weights": 2 * parameter_count(source, vocab),  # bf16
                         "pruned_weights": 2 * parameter_count(new, vocab),
                         "logits": 2 * 4 * seq * vocab * 4}
        assert prune_bytes(source, None, *args[2:])["pruned_weights"] == 0  # stage=importance
        total = sum(kinds.values())
        assert refuse_prune_if_over(*args) is None  # CPU: no device limit, nothing checked
        assert refuse_prune_if_over(*args, limit_bytes=total) == total
        with pytest.raises(ConfigError, match="this prune needs at least .* GiB on its largest rank"):
            refuse_prune_if_over(*args, limit_bytes=total - 1)
    finally:
        destroy_runtime()
