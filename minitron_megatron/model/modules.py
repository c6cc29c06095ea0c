"""Where Megatron-core's GPTModel keeps the parts other packages reach into.

Only `model/` knows Megatron's module and parameter names; the rest of the library
asks here for "layer i", "the embedding", "the final norm" or the checkpoint keys of
the vocabulary-sized tensors.
"""

from pathlib import Path
from typing import List, Tuple

import torch

from minitron_megatron.errors import ConfigError

VOCAB_WEIGHT_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
"""Checkpoint keys whose first (global) dimension is the padded vocabulary."""


def decoder_layer(gpt_model, index: int) -> torch.nn.Module:
    """Transformer layer `index` of this rank's pipeline stage (local numbering)."""
    return gpt_model.decoder.layers[index]


def embedding(gpt_model) -> torch.nn.Module:
    return gpt_model.embedding


def final_norm(gpt_model) -> torch.nn.Module:
    return gpt_model.decoder.final_layernorm


def is_routed_expert_param(name: str) -> bool:
    """A parameter of a routed expert (held by one EP rank), not the router or shared expert."""
    return ".mlp.experts." in f".{name}"


def routed_experts(gpt_model) -> List[Tuple[int, torch.nn.Module]]:
    """(0-based global layer index, `mlp.experts`) of this stage's MoE layers whose experts are
    Megatron's SequentialMLP (one MLP per expert in `local_experts`)."""
    found = []
    for layer in gpt_model.decoder.layers:
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is not None and hasattr(experts, "local_experts"):
            found.append((layer.layer_number - 1, experts))
    return found


def padded_vocab_in_checkpoint(root) -> int:
    """Rows of the word embedding (or output layer) stored in a Megatron dist checkpoint."""
    from megatron.core import dist_checkpointing

    from minitron_megatron.checkpoint.dist import TRACKER, _committed_dir, latest_iteration

    iteration = latest_iteration(root)
    if iteration is None:
        raise ConfigError(f"load={root}: no {TRACKER}, so no committed checkpoint")
    metadata = dist_checkpointing.load_tensors_metadata(checkpoint_dir=str(_committed_dir(Path(root), iteration)))
    for key in VOCAB_WEIGHT_KEYS:
        if key in metadata:
            return int(metadata[key].global_shape[0])
    raise ConfigError(f"load={root}: no GPT embedding in the checkpoint (keys: {sorted(metadata)[:5]}...)")
