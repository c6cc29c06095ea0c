"""Checkpoints written by Megatron-LM's own training (`--save DIR --ckpt-format torch_dist`).

Such a directory holds `latest_checkpointed_iteration.txt` and `iter_XXXXXXX/`
but no model.yaml: the architecture comes from the user's `model=` settings and
the padded vocabulary (which depends on the TP it was trained at) is read from
the checkpoint's tensor metadata.
"""

from pathlib import Path

from minitron_megatron.checkpoint.dist import TRACKER, _committed_dir, latest_iteration
from minitron_megatron.errors import ConfigError


def is_megatron_lm_dir(path) -> bool:
    """A Megatron-LM save dir: a tracker file at its top and no model.yaml."""
    path = Path(path)
    return (path / TRACKER).is_file() and not (path / "model.yaml").is_file()


def padded_vocab_of(root) -> int:
    """Rows of the word embedding (or output layer) stored in the checkpoint."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        raise ConfigError(f"load={root}: {TRACKER} names no existing iter_XXXXXXX directory")
    metadata = dist_checkpointing.load_tensors_metadata(str(_committed_dir(root, iteration)))
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in metadata:
            return int(metadata[key].global_shape[0])
    raise ConfigError(f"load={root}: no GPT embedding in the checkpoint (keys: {sorted(metadata)[:5]}...)")
