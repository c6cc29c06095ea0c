"""`convert.*` settings: Hugging Face checkpoint <-> run directory (the command: ConvertCommand).

An import's run dir keeps config.json's max_position_embeddings (capped at a sliding window:
up to it, causal attention is exact) as the model's position limit; the top-level
`seq_length` (default: that limit) is recorded as the length later commands run at.

```
python -m minitron_megatron.convert from_hf=hf/Llama-3.1-8B save=runs/llama8b parallel.tp=2 seq_length=8192
python -m minitron_megatron.convert load=runs/pruned to_hf=hf/pruned
```
"""

from dataclasses import dataclass
from typing import Optional


@dataclass
class ConvertConfig:
    """Conversion options (`convert.*`)."""

    dtype: Optional[str] = None
    """Import: params dtype of the run dir (float32, bfloat16, float16); None keeps config.json's."""
    architecture: Optional[str] = None
    """Export: HF architecture to write (e.g. MistralForCausalLM); None: the imported one, else
    the one the run dir's features imply (Nemotron, Qwen2 or Llama)."""
    max_shard_size_mb: int = 5000
    """Export: safetensors files hold at most about this many MB each (tensors are streamed
    into them: this is not a memory buffer)."""
