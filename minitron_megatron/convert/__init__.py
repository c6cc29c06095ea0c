"""Hugging Face <-> run directory conversion (Llama incl. 3.1, Mistral, Qwen2, Nemotron; Mixtral,
Qwen2-MoE and Qwen3-MoE at any TP/EP), and GGUF in.

`convert(cfg, ctx)` is the command's stage; `import_hf` / `export_hf` are the two
directions; `import_gguf` reads a GGUF file through transformers. Weights stream: every rank reads only the slices of the HF tensors
it holds, and export writes bounded safetensors files per pipeline stage.
"""

from minitron_megatron.convert.exporter import export_hf, plan_export
from minitron_megatron.convert.families import FAMILIES, family_for_model, hf_config_from_model, model_config_from_hf
from minitron_megatron.convert.gguf_import import GGUF_ARCHITECTURES, import_gguf
from minitron_megatron.convert.importer import import_hf, plan_import
from minitron_megatron.convert.stage import convert

__all__ = ["FAMILIES", "GGUF_ARCHITECTURES", "convert", "export_hf", "family_for_model", "hf_config_from_model",
           "import_gguf", "import_hf",
           "model_config_from_hf", "plan_export", "plan_import"]
