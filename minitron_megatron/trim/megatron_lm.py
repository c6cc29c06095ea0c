"""The Megatron-LM `pretrain_gpt.py` arguments that load a pruned run dir (see MEGATRON_LM.md)."""

from pathlib import Path
from typing import List

from minitron_megatron.config.model import ModelConfig


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
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(run_dir / "tokenizer.model"),
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
