"""`pretrain_gpt_args` and the checkpoint `args` namespace against Megatron-LM core_v0.16.1 itself.

The parser tests run Megatron-LM's own `add_megatron_arguments` and
`core_transformer_config_from_args` on our emitted flags (tests/megatron_lm_parser.py; skipped
when no Megatron-LM source is at hand); the coverage test runs everywhere.
"""

import types
from dataclasses import replace

import pytest
import torch

from minitron_megatron.checkpoint.megatron_lm import checkpoint_args, pretrain_gpt_args
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.parallel import ParallelConfig
from tests import megatron_lm_parser

# The compatibility tier (Python 3.12, megatron-core 0.19.2, Megatron-LM core_v0.19.0) runs this file too.
pytestmark = pytest.mark.compat

TP = 2
PADDED = 1024

FAMILIES = {
    # Llama-3.1: llama3 RoPE scaling, theta 5e5, GQA.
    "llama3.1": ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
                            num_query_groups=4, kv_channels=8, vocab_size=1000, rotary_base=500000,
                            rope_scaling=True, rope_scaling_factor=8.0),
    # Nemotron-4 / Minitron: layernorm1p, squared ReLU (no gate), partial rotary, eps 1e-5.
    "nemotron": ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                            num_query_groups=2, kv_channels=16, vocab_size=1000, normalization="LayerNorm",
                            layernorm_zero_centered_gamma=True, gated_linear_unit=False, activation="squared_relu",
                            rotary_percent=0.5),
    # Qwen2: Q/K/V bias only, tied embeddings, eps 1e-6, theta 1e6, bf16.
    "qwen2": ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=2, kv_channels=16, vocab_size=1000, add_qkv_bias=True,
                         share_embeddings_and_output_weights=True, layernorm_epsilon=1e-6, rotary_base=1000000,
                         params_dtype="bfloat16"),
    # A pruned model: head_dim 24 != 48 / 4, MHA (no GQA flag).
    "pruned": ModelConfig(num_layers=3, hidden_size=48, ffn_hidden_size=72, num_attention_heads=4,
                          num_query_groups=4, kv_channels=24, vocab_size=1000, init_method_std=0.0134),
}

TRANSFORMER_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                      "kv_channels", "normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma",
                      "gated_linear_unit", "activation_func", "add_bias_linear", "add_qkv_bias", "hidden_dropout",
                      "attention_dropout", "init_method_std", "bf16", "fp16")


def _ours(cfg: ModelConfig) -> dict:
    from minitron_megatron.model.build import transformer_config

    ctx = types.SimpleNamespace(tp_size=TP, pp_size=1, device=torch.device("cpu"))
    config = transformer_config(cfg, ctx, ParallelConfig(tp=TP))
    return {f: megatron_lm_parser._plain(getattr(config, f)) for f in TRANSFORMER_FIELDS}


def _gpt_model_kwargs(cfg: ModelConfig) -> dict:
    """What our build gives GPTModel, in the names gpt_builders.py (core_v0.16.1) reads from args."""
    cfg = cfg.resolved()
    return dict(position_embedding_type=cfg.position_embedding_type, rotary_percent=cfg.rotary_percent,
                rotary_base=cfg.rotary_base, use_rope_scaling=cfg.rope_scaling,
                untie_embeddings_and_output_weights=not cfg.share_embeddings_and_output_weights)


@pytest.fixture(scope="module")
def megatron_lm(tmp_path_factory):
    source = megatron_lm_parser.source_dir(tmp_path_factory.mktemp("mlm"))
    if source is None:
        pytest.skip("no Megatron-LM source (set MEGATRON_LM_SOURCE or MEGATRON_LM_GIT)")
    run_dir = tmp_path_factory.mktemp("run")
    argvs = [pretrain_gpt_args(cfg, PADDED, run_dir, tp=TP) for cfg in FAMILIES.values()]
    return dict(zip(FAMILIES, megatron_lm_parser.parse(source, argvs, TP)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_megatron_lm_builds_our_transformer_config(megatron_lm, family):
    """Catches a flag Megatron-LM does not know (argparse exits), a misspelt or missing one
    (rope scaling, --apply-layernorm-1p, --squared-relu, --add-qkv-bias with
    --disable-bias-linear, --kv-channels, --norm-epsilon, --rotary-percent, untied embeddings):
    Megatron-LM's core_transformer_config_from_args and its GPTModel arguments must give
    exactly the TransformerConfig fields and GPTModel options our build uses."""
    cfg, parsed = FAMILIES[family], megatron_lm[family]
    theirs = {f: parsed["config"][f] for f in TRANSFORMER_FIELDS}
    assert theirs == _ours(cfg)
    assert {k: parsed["args"][k] for k in _gpt_model_kwargs(cfg)} == _gpt_model_kwargs(cfg)
    if cfg.rope_scaling:
        assert parsed["args"]["rope_scaling_factor"] == cfg.rope_scaling_factor
    multiple = parsed["args"]["make_vocab_size_divisible_by"] * TP  # _vocab_size_with_padding
    assert -(-cfg.vocab_size // multiple) * multiple == PADDED


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_args_use_megatron_lm_names(megatron_lm, family):
    """Catches a checkpoint `args` field under a name Megatron-LM's parser does not have (as
    `norm_epsilon` was: the dest of --norm-epsilon is layernorm_epsilon) or with another value
    than the command line we emit, which check_checkpoint_args / --use-checkpoint-args compare
    (add_position_embedding was False: every resume in Megatron-LM asserted)."""
    cfg, parsed = FAMILIES[family], megatron_lm[family]["args"]
    saved = vars(checkpoint_args(cfg, PADDED, TP, 1))
    not_flags = {"apply_layernorm_1p", "consumed_train_samples", "consumed_valid_samples", "iteration",
                 "padded_vocab_size", "vocab_size", "use_dist_ckpt", "data_parallel_random_init",
                 "virtual_pipeline_model_parallel_size"}  # the last: set by validate_args
    assert sorted(set(saved) - set(parsed) - not_flags) == []
    shared = set(saved) & set(parsed) - {"vocab_size", "padded_vocab_size", "global_batch_size", "ckpt_format",
                                         "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                                         "data_parallel_random_init", "tokenizer_type", "max_position_embeddings"}
    if not parsed["group_query_attention"]:
        shared.discard("num_query_groups")  # unused without GQA (core_transformer_config_from_args: None)
    differ = {k: (saved[k], parsed[k]) for k in shared if megatron_lm_parser._plain(saved[k]) != parsed[k]}
    assert differ == {}
    assert saved["tokenizer_type"] == parsed["tokenizer_type"]


ARCHITECTURE_CHANGES = dict(
    num_layers=3, hidden_size=96, ffn_hidden_size=128, num_attention_heads=16, num_query_groups=1, kv_channels=12,
    max_position_embeddings=128, normalization="LayerNorm", layernorm_epsilon=1e-6, layernorm_zero_centered_gamma=True,
    gated_linear_unit=False, activation="squared_relu", rotary_base=10000, rotary_percent=0.5, rope_scaling=True,
    share_embeddings_and_output_weights=True, add_bias_linear=True, add_qkv_bias=True, init_method_std=0.01,
    params_dtype="bfloat16", hidden_dropout=0.1, attention_dropout=0.1,
)


@pytest.mark.parametrize("field", sorted(ARCHITECTURE_CHANGES))
def test_every_architectural_field_reaches_megatron_lm(tmp_path, field):
    """Catches a model field that pretrain_gpt_args or the checkpoint namespace silently drops
    (Megatron-LM would then build another model from our checkpoint): changing any one of them
    changes both."""
    base = FAMILIES["llama3.1"] if field != "rope_scaling" else replace(FAMILIES["llama3.1"], rope_scaling=False)
    changed = replace(base, **{field: ARCHITECTURE_CHANGES[field]})
    if field in ("gated_linear_unit", "activation"):  # pretrain_gpt.py's MLPs: SwiGLU, or a plain one
        changed = replace(changed, gated_linear_unit=False, activation="squared_relu")
    assert pretrain_gpt_args(changed, PADDED, tmp_path, TP) != pretrain_gpt_args(base, PADDED, tmp_path, TP)
    if field not in ("hidden_dropout", "attention_dropout", "init_method_std", "params_dtype"):
        assert checkpoint_args(changed, PADDED, TP, 1) != checkpoint_args(base, PADDED, TP, 1)


def test_refuses_what_pretrain_gpt_cannot_load(tmp_path):
    """gpt_builders.py never passes --rope-scaling-factor to GPTModel (its factor stays 8), and a
    HF tokenizer needs a directory for Megatron-LM's HuggingFaceTokenizer."""
    with pytest.raises(ValueError, match="rope_scaling_factor=4.0"):
        pretrain_gpt_args(replace(FAMILIES["llama3.1"], rope_scaling_factor=4.0), PADDED, tmp_path, TP)
    (tmp_path / "tokenizer.model").write_text('{"format": "minitron-hf-tokenizer/1", "files": {}}')
    with pytest.raises(ValueError, match="hf_tokenizer_dir"):
        pretrain_gpt_args(FAMILIES["llama3.1"], PADDED, tmp_path, TP)
    args = pretrain_gpt_args(FAMILIES["llama3.1"], PADDED, tmp_path, TP, hf_tokenizer_dir="/hf/llama")
    assert args[args.index("--tokenizer-type") + 1] == "HuggingFaceTokenizer"
    assert args[args.index("--tokenizer-model") + 1] == "/hf/llama"
    assert checkpoint_args(FAMILIES["llama3.1"], PADDED, TP, 1,
                           tokenizer_path=str(tmp_path / "tokenizer.model")).tokenizer_type == "HuggingFaceTokenizer"


def test_command_prints_the_run_dirs_flags_shell_quoted(tmp_path, capsys):
    """Catches the printing entry point (`python -m minitron_megatron.checkpoint.megatron_lm RUN --tp N`,
    what examples/megatron_lm/distill.sh and docs/distill.md launch with) drifting from
    `pretrain_gpt_args`, and a bad run dir or TP passing silently instead of exiting non-zero."""
    import shlex

    from minitron_megatron.checkpoint import megatron_lm
    from minitron_megatron.checkpoint.run_dir import write_model_yaml

    run_dir = tmp_path / "pruned run"  # a space: the output must stay one shell word per flag
    cfg = FAMILIES["pruned"]
    write_model_yaml(run_dir, cfg, PADDED, None)
    megatron_lm.main([str(run_dir), "--tp", str(TP)])
    assert shlex.split(capsys.readouterr().out) == pretrain_gpt_args(cfg, PADDED, run_dir, tp=TP)
    for argv in ([str(tmp_path / "missing")], [str(run_dir), "--tp", "3"]):  # 3 does not divide 1024
        with pytest.raises(SystemExit) as error:
            megatron_lm.main(argv)
        assert str(error.value).startswith("error: ")
