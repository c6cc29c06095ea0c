"""GPT models built from typed configs with Megatron-core's own modules."""

from minitron_megatron.model.build import (
    build_gpt_model,
    padded_vocab_size,
    pipeline_layer_split,
    resolve_vocab,
    transformer_config,
    validate_model,
)
from minitron_megatron.model.params import (active_parameter_count, count_model_parameters, layer_parameter_count,
                                            parameter_count)

__all__ = [
    "active_parameter_count",
    "build_gpt_model",
    "count_model_parameters",
    "layer_parameter_count",
    "padded_vocab_size",
    "parameter_count",
    "pipeline_layer_split",
    "resolve_vocab",
    "transformer_config",
    "validate_model",
]
