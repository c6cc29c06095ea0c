"""Megatron-LM interop: its save dirs as our inputs, our checkpoints as its inputs.

- Checkpoints written by Megatron-LM's own training (`--save DIR --ckpt-format torch_dist`):
  such a directory holds `latest_checkpointed_iteration.txt` and `iter_XXXXXXX/` but no
  model.yaml; the architecture comes from the user's `model=` settings and the padded
  vocabulary (which depends on the TP it was trained at) from the checkpoint's tensor
  metadata (`model.modules.padded_vocab_in_checkpoint`).
- The `args` namespace our checkpoints carry for Megatron-LM's loader (`checkpoint_args`), and
  the `pretrain_gpt.py` arguments that load a run dir (`pretrain_gpt_args`, see
  trim/MEGATRON_LM.md); `python -m minitron_megatron.checkpoint.megatron_lm RUN_DIR --tp N` prints them.
"""

import argparse
import shlex
import sys
from argparse import Namespace
from pathlib import Path
from typing import List, Optional, Sequence

from minitron_megatron.checkpoint.dist import TRACKER
from minitron_megatron.config.model import ModelConfig


def is_megatron_lm_dir(path) -> bool:
    """A Megatron-LM save dir: a tracker file at its top and no model.yaml."""
    path = Path(path)
    return (path / TRACKER).is_file() and not (path / "model.yaml").is_file()


def checkpoint_args(cfg: ModelConfig, padded_vocab: int, tp: int, pp: int, *, seq_length: Optional[int] = None,
                    global_batch_size: int = 0, consumed_train_samples: int = 0, iteration: int = 0,
                    tokenizer_path: Optional[str] = None) -> Namespace:
    """The `args` namespace Megatron-LM saves in every checkpoint and reads back on load:
    `check_checkpoint_args` compares the model sizes with the command line, `--use-checkpoint-args`
    takes the model settings from it, and a resume reads `consumed_train_samples` from it
    (megatron/training/checkpointing.py at core_v0.16.1). Names are the `dest`s of Megatron-LM's
    parser (`--norm-epsilon` -> layernorm_epsilon, `--apply-layernorm-1p` ->
    layernorm_zero_centered_gamma: both generated from TransformerConfig's fields), plus
    `apply_layernorm_1p`, the older name `load_args_from_checkpoint` still reads.

    Megatron-LM's `--use-checkpoint-args` (core_v0.16.1) does not restore layernorm_epsilon,
    layernorm_zero_centered_gamma, use_rope_scaling or rope_scaling_factor: they are here for
    completeness, and `pretrain_gpt_args` always passes them on the command line.
    `seq_length` is the run's (default: the model's max_position_embeddings)."""
    cfg = cfg.resolved()
    return Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads, kv_channels=cfg.kv_channels,
        seq_length=seq_length or cfg.max_position_embeddings, max_position_embeddings=cfg.max_position_embeddings,
        # As Megatron-LM saves them for --position-embedding-type rope: add_position_embedding keeps
        # its default True (check_checkpoint_args compares it with the command line's) and the
        # deprecated --use-rotary-position-embeddings stays False.
        position_embedding_type=cfg.position_embedding_type, add_position_embedding=True,
        use_rotary_position_embeddings=False, rotary_base=cfg.rotary_base, rotary_percent=cfg.rotary_percent,
        rotary_interleaved=False, use_rope_scaling=cfg.rope_scaling, rope_scaling_factor=cfg.rope_scaling_factor,
        normalization=cfg.normalization, layernorm_epsilon=cfg.layernorm_epsilon,
        layernorm_zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
        apply_layernorm_1p=cfg.layernorm_zero_centered_gamma,
        swiglu=cfg.gated_linear_unit and cfg.activation == "silu",
        squared_relu=not cfg.gated_linear_unit and cfg.activation == "squared_relu",
        untie_embeddings_and_output_weights=not cfg.share_embeddings_and_output_weights,
        add_bias_linear=cfg.add_bias_linear, add_qkv_bias=cfg.add_qkv_bias or cfg.add_bias_linear,
        qk_layernorm=cfg.qk_layernorm,
        tokenizer_type=tokenizer_type(tokenizer_path), vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab,
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
HF_TOKENIZER_TYPE = "HuggingFaceTokenizer"
"""For Hugging Face tokenizers (imported runs): Megatron-LM's vocab_size is len(tokenizer), as
ours, and its `--tokenizer-model` is a directory AutoTokenizer.from_pretrained reads."""


GPT_BUILDER_ROPE_FACTOR = 8.0
"""GPTModel's default rope_scaling_factor: the one pretrain_gpt.py's builder always gets."""


def is_hf_tokenizer(path: Optional[str]) -> bool:
    """A run dir's tokenizer.model holding a HF tokenizer (JSON bundle or tokenizer.json), not a
    sentencepiece model (sniffed as data/tokenizer.py does: the name is the same for both)."""
    if not path or not Path(path).is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(1) == b"{"


def tokenizer_type(tokenizer_path: Optional[str]) -> str:
    return HF_TOKENIZER_TYPE if is_hf_tokenizer(tokenizer_path) else TOKENIZER_TYPE


def pretrain_gpt_args(cfg: ModelConfig, padded_vocab: int, run_dir, tp: int = 1,
                      hf_tokenizer_dir: Optional[str] = None, seq_length: Optional[int] = None) -> List[str]:
    """Model, tokenizer and load arguments for `pretrain_gpt.py` (add data, batch, LR, parallel sizes).

    `--make-vocab-size-divisible-by` is chosen so that Megatron-LM's padding at `tp`
    (a multiple of divisible_by x tp) lands exactly on our padded vocab. A run dir with a HF
    tokenizer needs `hf_tokenizer_dir`: a directory with its tokenizer.json (the HF directory it
    was imported from or exported to, or `data.tokenizer.write_hf_tokenizer(RUN/tokenizer.model, DIR)`).
    Every architectural flag is passed, also those `--use-checkpoint-args` would restore.
    `--seq-length` is `seq_length`, else the length the run dir records, else the position limit.
    """
    from minitron_megatron.checkpoint.run_dir import recorded_seq_length

    cfg = cfg.resolved()
    run_dir = Path(run_dir)
    if padded_vocab % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide the padded vocab {padded_vocab}")
    if cfg.rope_scaling and cfg.rope_scaling_factor != GPT_BUILDER_ROPE_FACTOR:
        raise ValueError(f"model.rope_scaling_factor={cfg.rope_scaling_factor}: pretrain_gpt.py (core_v0.16.1 "
                         "gpt_builders.py) never passes --rope-scaling-factor to GPTModel, whose factor stays "
                         f"{GPT_BUILDER_ROPE_FACTOR}; only that factor loads correctly there")
    tokenizer = str(run_dir / "tokenizer.model")
    if is_hf_tokenizer(tokenizer):
        if not hf_tokenizer_dir:
            raise ValueError(f"{tokenizer} is a Hugging Face tokenizer: Megatron-LM's HuggingFaceTokenizer reads a "
                             "directory; pass hf_tokenizer_dir (one holding its tokenizer.json)")
        tokenizer = str(hf_tokenizer_dir)
    args = [
        "--load", str(run_dir / "checkpoint"), "--ckpt-format", "torch_dist", "--finetune",
        "--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size,
        "--ffn-hidden-size", cfg.ffn_hidden_size, "--num-attention-heads", cfg.num_attention_heads,
        "--kv-channels", cfg.kv_channels,
        "--seq-length", seq_length or recorded_seq_length(run_dir) or cfg.max_position_embeddings,
        "--max-position-embeddings", cfg.max_position_embeddings,
        "--normalization", cfg.normalization, "--norm-epsilon", cfg.layernorm_epsilon,
        "--position-embedding-type", cfg.position_embedding_type,
        "--init-method-std", cfg.init_method_std,
        "--hidden-dropout", cfg.hidden_dropout, "--attention-dropout", cfg.attention_dropout,
        "--tokenizer-type", tokenizer_type(str(run_dir / "tokenizer.model")), "--tokenizer-model", tokenizer,
        "--make-vocab-size-divisible-by", padded_vocab // tp,
    ]
    if cfg.num_query_groups != cfg.num_attention_heads:
        args += ["--group-query-attention", "--num-query-groups", cfg.num_query_groups]
    if cfg.position_embedding_type == "rope":
        args += ["--rotary-base", cfg.rotary_base, "--rotary-percent", cfg.rotary_percent]
        if cfg.rope_scaling:  # llama3 scaling; Megatron-LM fixes the low/high factors and 8192 as we do
            args += ["--use-rope-scaling", "--rope-scaling-factor", cfg.rope_scaling_factor]
    if cfg.layernorm_zero_centered_gamma:
        args.append("--apply-layernorm-1p")
    args += _activation_args(cfg)
    if not cfg.share_embeddings_and_output_weights:
        args.append("--untie-embeddings-and-output-weights")
    if not cfg.add_bias_linear:
        args.append("--disable-bias-linear")
    if cfg.add_qkv_bias and not cfg.add_bias_linear:
        args.append("--add-qkv-bias")
    if cfg.qk_layernorm:
        args.append("--qk-layernorm")
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Print a run dir's `pretrain_gpt.py` arguments on one line, shell-quoted, for
    `$(python -m minitron_megatron.checkpoint.megatron_lm runs/pruned --tp 2)` in a launch script."""
    from minitron_megatron.checkpoint.run_dir import read_model_yaml
    from minitron_megatron.errors import ConfigError

    parser = argparse.ArgumentParser(prog="python -m minitron_megatron.checkpoint.megatron_lm",
                                     description="pretrain_gpt.py arguments that load a run dir")
    parser.add_argument("run_dir")
    parser.add_argument("--tp", type=int, default=1, help="the tensor parallel size of the Megatron-LM run")
    parser.add_argument("--hf-tokenizer-dir", default=None, help="for run dirs with a Hugging Face tokenizer")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="the Megatron-LM run's --seq-length (default: the one the run dir records)")
    args = parser.parse_args(argv)
    try:
        cfg, padded_vocab, _ = read_model_yaml(args.run_dir)
        flags = pretrain_gpt_args(cfg, padded_vocab, args.run_dir, args.tp, hf_tokenizer_dir=args.hf_tokenizer_dir,
                                  seq_length=args.seq_length)
    except (ConfigError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(shlex.join(flags))


if __name__ == "__main__":
    main()
