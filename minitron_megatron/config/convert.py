"""The `convert` command: Hugging Face checkpoint <-> run directory.

```
python -m minitron_megatron.convert from_hf=hf/Llama-3.1-8B save=runs/llama8b parallel.tp=2
python -m minitron_megatron.convert load=runs/pruned to_hf=hf/pruned
```
"""

from dataclasses import dataclass, field
from typing import Optional

from minitron_megatron.config.commands import CommonConfig


@dataclass
class ConvertConfig:
    """Conversion options (`convert.*`)."""

    dtype: Optional[str] = None
    """Import: params dtype of the run dir (float32, bfloat16, float16); None keeps config.json's."""
    seq_length: Optional[int] = None
    """Import: model.seq_length of the run dir; None means config.json's max_position_embeddings."""
    architecture: Optional[str] = None
    """Export: HF architecture to write (e.g. MistralForCausalLM); None: the imported one, else
    the one the run dir's features imply (Nemotron, Qwen2 or Llama)."""
    max_shard_size_mb: int = 5000
    """Export: safetensors files hold at most about this many MB each (tensors are streamed
    into them: this is not a memory buffer)."""


@dataclass
class ConvertCommand(CommonConfig):
    """Exactly one direction: `from_hf` + `save` (import) or `load` + `to_hf` (export).
    `model` and `data` of CommonConfig are unused: the architecture comes from config.json
    or the run dir's model.yaml."""

    from_hf: Optional[str] = None
    """A HF model directory: config.json, *.safetensors (+ index), tokenizer.json."""
    to_hf: Optional[str] = None
    """The HF directory to write from the run dir `load`."""
    convert: ConvertConfig = field(default_factory=ConvertConfig)
