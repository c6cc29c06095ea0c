"""Tiny random Hugging Face models of each supported family, built by `transformers` itself.

Weights are redrawn larger than HF's init (std 0.1, norms off their defaults) so that
logits are O(1): a wrong layout, RoPE variant or norm shifts them far beyond 1e-4.
"""

import json
from pathlib import Path

import torch

VOCAB_ROWS = 320
"""Embedding rows: more than the tokenizer's tokens, like Qwen2.5's padded embedding."""
BATCH, SEQ = 2, 64
CORPUS = [
    "def forward(self, hidden_states, attention_mask=None):",
    "    return self.linear_proj(self.core_attention(query, key, value))",
    "Tensor parallelism splits attention heads and MLP neurons across ranks.",
    "Pipeline parallelism places consecutive transformer layers on different stages.",
    "import torch\nimport torch.distributed as dist\n",
    "The quick brown fox jumps over the lazy dog 0123456789.",
] * 20


def _base(**extra) -> dict:
    base = dict(vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    base.update(extra)
    return base


def family_configs():
    """(name -> transformers config) covering every feature the converter maps."""
    from transformers import LlamaConfig, MistralConfig, NemotronConfig, Qwen2Config

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    return {
        # Llama-3.1: llama3 RoPE scaling; head_dim 16 != 64 / 8 (explicit kv_channels); 4 query
        # groups, so a TP=2 prune can keep fewer of them (tests/convert/test_recipe.py).
        "llama": LlamaConfig(**_base(num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                                     rope_theta=10000.0, rope_scaling=llama3, rms_norm_eps=1e-5,
                                     max_position_embeddings=131072)),
        # Mistral: a sliding window no sequence of max_position_embeddings tokens reaches.
        "mistral": MistralConfig(**_base(sliding_window=4096, max_position_embeddings=4096, rope_theta=10000.0)),
        # Qwen2: Q/K/V bias only, tied embeddings, rope_theta 1e6, eps 1e-6.
        "qwen2": Qwen2Config(**_base(tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                     max_position_embeddings=4096)),
        # Nemotron: layernorm1p with bias, squared-ReLU (no gate), partial rotary; 3 layers (uneven PP).
        "nemotron": NemotronConfig(**_base(num_hidden_layers=3, head_dim=16, partial_rotary_factor=0.5,
                                           norm_eps=1e-5, max_position_embeddings=4096)),
    }


def moe_configs():
    """(name -> transformers config) of the mixture-of-experts families: 4 experts of width 32,
    top-2, so a pruned export can keep 2 experts of width 16."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    moe = dict(num_experts_per_tok=2, max_position_embeddings=4096, rope_theta=1000000.0)
    return {
        # Mixtral: softmax, top-k, renormalised (Megatron: softmax over the top-k logits).
        "mixtral": MixtralConfig(**_base(intermediate_size=32, num_local_experts=4, rms_norm_eps=1e-5, **moe)),
        # Qwen2-MoE: Q/K/V bias, a shared expert with its sigmoid gate, and norm_topk_prob=false
        # (top-k of the softmax over every expert, not renormalised: Megatron's pre-softmax).
        "qwen2_moe": Qwen2MoeConfig(**_base(intermediate_size=80, moe_intermediate_size=32, num_experts=4,
                                            shared_expert_intermediate_size=48, norm_topk_prob=False,
                                            rms_norm_eps=1e-6, **moe)),
        # Qwen3-MoE: RMSNorm on each query and key head (Megatron's qk_layernorm), head_dim 24 !=
        # 64 / 4, no shared expert, norm_topk_prob=true.
        "qwen3_moe": Qwen3MoeConfig(**_base(head_dim=24, intermediate_size=80, moe_intermediate_size=32,
                                            num_experts=4, norm_topk_prob=True, rms_norm_eps=1e-6, **moe)),
    }


def build_tokenizer(out_dir: Path):
    """A small BPE tokenizer that adds BOS like Llama 3's; saved with transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out_dir))
    return fast


def randomize(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            centred = "norm" in name and name.endswith("weight") and "nemotron" not in type(model).__name__.lower()
            param.copy_(noise + 1.0 if centred else noise)


def reference_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _save(config, root: Path, name: str, seed: int, tokenizer, tokens: torch.Tensor) -> Path:
    from transformers import AutoModelForCausalLM

    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    randomize(model, seed=seed)
    out = root / name
    model.save_pretrained(str(out), max_shard_size="100KB")
    tokenizer.save_pretrained(str(out))
    torch.save(reference_logits(model, tokens), out / "reference_logits.pt")
    return out


def build_moe(root: Path) -> dict:
    """The MoE families next to build_all's models (its tokenizer and token batch); {name: dir}."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    tokens = torch.load(root / "tokens.pt")
    return {name: _save(config, root, name, 200 + i, tokenizer, tokens)
            for i, (name, config) in enumerate(moe_configs().items())}


def build_all(root: Path) -> dict:
    """Save every family under root/<name> (sharded safetensors + index + tokenizer) with its
    reference logits; returns {name: dir} plus the token batch in root/tokens.pt."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tokenizer(root / "tokenizer")
    tokens = torch.randint(0, len(tokenizer), (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, root / "tokens.pt")
    dirs = {}
    for i, (name, config) in enumerate(family_configs().items()):
        dirs[name] = _save(config, root, name, 100 + i, tokenizer, tokens)
    # bf16 as released checkpoints are: Megatron keeps torch norms in float32 inside a bf16
    # model, so the export must cast back to the file dtype (exactly).
    bf16 = AutoModelForCausalLM.from_pretrained(str(dirs["nemotron"]), dtype=torch.bfloat16)
    bf16.save_pretrained(str(root / "nemotron-bf16"), max_shard_size="100KB")
    tokenizer.save_pretrained(str(root / "nemotron-bf16"))
    dirs["nemotron-bf16"] = root / "nemotron-bf16"
    (root / "families.json").write_text(json.dumps({k: str(v) for k, v in dirs.items()}))
    return dirs
