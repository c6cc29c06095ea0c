"""Megatron-LM interop: its save dirs as our inputs, our checkpoints as its inputs.

- Checkpoints written by Megatron-LM's own training (`--save DIR --ckpt-format torch_dist`):
  such a directory holds `latest_checkpointed_iteration.txt` and `iter_XXXXXXX/` but no
  model.yaml; the architecture comes from the user's `model=` settings and the padded
  vocabulary (which depends on the TP it was trained at) from the checkpoint's tensor
  metadata (`model.modules.padded_vocab_in_checkpoint`).
- The `args` namespace our checkpoints carry for Megatron-LM's loader (`checkpoint_args`), and
  the `pretrain_gpt.py` arguments that load a run dir (`pretrain_gpt_args`, see
  trim/MEGATRON_LM.md).
"""

from argparse import Namespace
from pathlib import Path
from typing import List

from minitron_megatron.checkpoint.dist import TRACKER
from minitron_megatron.config.model import ModelConfig


def is_megatron_lm_dir(path) -> bool:
    """A Megatron-LM save dir: a tracker file at its top and no model.yaml."""
    path = Path(path)
    return (path / TRACKER).is_file() and not (path / "model.yaml").is_file()


def checkpoint_args(cfg: ModelConfig, padded_vocab: int, tp: int, pp: int, *, global_batch_size: int = 0,
                    consumed_train_samples: int = 0, iteration: int = 0) -> Namespace:
    """The `args` namespace Megatron-LM saves in every checkpoint and reads back on load:
    `check_checkpoint_args` compares the model sizes with the command line, `--use-checkpoint-args`
    takes the model settings from it, and a resume reads `consumed_train_samples` from it
    (megatron/training/checkpointing.py at core_v0.16.1). Names are Megatron-LM's flags'."""
    cfg = cfg.resolved()
    rope = cfg.position_embedding_type == "rope"
    return Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads, kv_channels=cfg.kv_channels,
        seq_length=cfg.seq_length, max_position_embeddings=cfg.seq_length,
        position_embedding_type=cfg.position_embedding_type, add_position_embedding=not rope,
        use_rotary_position_embeddings=rope, rotary_base=cfg.rotary_base, rotary_percent=cfg.rotary_percent,
        rotary_interleaved=False, normalization=cfg.normalization, norm_epsilon=cfg.layernorm_epsilon,
        swiglu=cfg.gated_linear_unit and cfg.activation == "silu",
        squared_relu=not cfg.gated_linear_unit and cfg.activation == "squared_relu",
        untie_embeddings_and_output_weights=not cfg.share_embeddings_and_output_weights,
        add_bias_linear=cfg.add_bias_linear, add_qkv_bias=cfg.add_qkv_bias or cfg.add_bias_linear,
        tokenizer_type=TOKENIZER_TYPE, vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=padded_vocab // tp,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, data_parallel_random_init=False,
        global_batch_size=global_batch_size, consumed_train_samples=consumed_train_samples,
        consumed_valid_samples=0, iteration=iteration,
        bf16=cfg.params_dtype == "bfloat16", fp16=cfg.params_dtype == "float16",
        ckpt_format="torch_dist", use_dist_ckpt=True,
    )


TOKENIZER_TYPE = "GPTSentencePieceTokenizer"
"""Megatron-LM's tokenizer type for our sentencepiece models: it adds no special tokens, so
its padded vocabulary is ours (`SentencePieceTokenizer` adds 5 and pads to another size)."""


def pretrain_gpt_args(cfg: ModelConfig, padded_vocab: int, run_dir, tp: int = 1) -> List[str]:
    """Model, tokenizer and load arguments for `pretrain_gpt.py` (add data, batch, LR, parallel sizes).

    `--make-vocab-size-divisible-by` is chosen so that Megatron-LM's padding at `tp`
    (a multiple of divisible_by x tp) lands exactly on our padded vocab.
    """
    cfg = cfg.resolved()
    run_dir = Path(run_dir)
    if padded_vocab % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide the padded vocab {padded_vocab}")
    args = [
        "--load", str(run_dir / "checkpoint"), "--ckpt-format", "torch_dist", "--finetune",
        "--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size,
        "--ffn-hidden-size", cfg.ffn_hidden_size, "--num-attention-heads", cfg.num_attention_heads,
        "--kv-channels", cfg.kv_channels,
        "--seq-length", cfg.seq_length, "--max-position-embeddings", cfg.seq_length,
        "--normalization", cfg.normalization, "--norm-epsilon", cfg.layernorm_epsilon,
        "--position-embedding-type", cfg.position_embedding_type,
        "--init-method-std", cfg.init_method_std,
        "--hidden-dropout", cfg.hidden_dropout, "--attention-dropout", cfg.attention_dropout,
        "--tokenizer-type", TOKENIZER_TYPE, "--tokenizer-model", str(run_dir / "tokenizer.model"),
        "--make-vocab-size-divisible-by", padded_vocab // tp,
    ]
    if cfg.num_query_groups != cfg.num_attention_heads:
        args += ["--group-query-attention", "--num-query-groups", cfg.num_query_groups]
    if cfg.position_embedding_type == "rope":
        args += ["--rotary-base", cfg.rotary_base, "--rotary-percent", cfg.rotary_percent]
    args += _activation_args(cfg)
    if not cfg.share_embeddings_and_output_weights:
        args.append("--untie-embeddings-and-output-weights")
    if not cfg.add_bias_linear:
        args.append("--disable-bias-linear")
    if cfg.add_qkv_bias and not cfg.add_bias_linear:
        args.append("--add-qkv-bias")
    if cfg.params_dtype in ("bfloat16", "float16"):
        args.append("--bf16" if cfg.params_dtype == "bfloat16" else "--fp16")
    return [str(a) for a in args]


def _activation_args(cfg: ModelConfig) -> List[str]:
    if cfg.gated_linear_unit:
        if cfg.activation != "silu":
            raise ValueError(f"pretrain_gpt.py has a flag for SwiGLU only, not a gated {cfg.activation}")
        return ["--swiglu"]
    flags = {"gelu": [], "squared_relu": ["--squared-relu"]}  # gelu is pretrain_gpt.py's default
    if cfg.activation not in flags:
        raise ValueError(f"pretrain_gpt.py has no flag for a non-gated {cfg.activation} MLP")
    return flags[cfg.activation]
