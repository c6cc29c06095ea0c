"""Checkpoints written by Megatron-LM's own training (`--save DIR --ckpt-format torch_dist`).

Such a directory holds `latest_checkpointed_iteration.txt` and `iter_XXXXXXX/`
but no model.yaml: the architecture comes from the user's `model=` settings and
the padded vocabulary (which depends on the TP it was trained at) is read from
the checkpoint's tensor metadata (`model.modules.padded_vocab_in_checkpoint`).
"""

from pathlib import Path

from minitron_megatron.checkpoint.dist import TRACKER


def is_megatron_lm_dir(path) -> bool:
    """A Megatron-LM save dir: a tracker file at its top and no model.yaml."""
    path = Path(path)
    return (path / TRACKER).is_file() and not (path / "model.yaml").is_file()
