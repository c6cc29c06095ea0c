"""importance.safetensors + importance.json in a run directory (written atomically).

The safetensors file is written first and the JSON last, each via a temporary name
and a rename: a run dir with importance.json always has the matching scores.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch

from minitron_megatron.checkpoint.run_dir import atomic_write_text
from minitron_megatron.errors import ConfigError

SCORES_FILE = "importance.safetensors"
META_FILE = "importance.json"


def save_importance(scores: Dict[str, torch.Tensor], meta: dict, run_dir) -> Path:
    """Write the score tensors (float32, CPU) and metadata into `run_dir`; call on one rank."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in scores.items()}
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{SCORES_FILE}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": str(meta.get("format", 1))})
        os.replace(tmp, run_dir / SCORES_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_text(run_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return run_dir / SCORES_FILE


def load_importance(run_dir) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(scores, meta) saved by `save_importance`; ConfigError when the run dir has none."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    scores_path, meta_path = run_dir / SCORES_FILE, run_dir / META_FILE
    if not (scores_path.is_file() and meta_path.is_file()):
        raise ConfigError(f"{run_dir}: no importance scores ({SCORES_FILE} and {META_FILE}); run "
                          "`python -m minitron_megatron.prune prune.stage=importance` first")
    return load_file(str(scores_path)), json.loads(meta_path.read_text())


def has_importance(run_dir) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / SCORES_FILE).is_file() and (run_dir / META_FILE).is_file()
