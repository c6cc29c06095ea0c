"""Run directories: the self-describing output of every command.

```
RUN/
  model.yaml        architecture + vocab + tokenizer: enough to rebuild the model; and the
                    sequence length the run was made at (later commands' default)
  tokenizer.model   copy of the sentencepiece model the run used
  checkpoint/       Megatron-LM layout: latest_checkpointed_iteration.txt + iter_XXXXXXX/
  summary.json      written last: its presence marks the run as complete
  hf_config.json    only in runs derived from a HF import: the original config.json
```
Every file is written to a temporary name and renamed into place, so a crash
leaves either the old state or the new one, never something that looks complete.
Each rename is followed by an fsync of the directory it renamed into (`fsync_dir`): a rename
lives in the directory's own metadata, which a power loss can lose after the rename returned,
so without it a checkpoint or summary.json that looked committed could vanish on reboot.
"""

import json
import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional, Sequence, Tuple

import yaml

from minitron_megatron.config.model import LOAD_SETTINGS, RUN_SETTINGS, ModelConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime.faults import fault_point

MODEL_YAML = "model.yaml"
SUMMARY_JSON = "summary.json"
TOKENIZER = "tokenizer.model"
CHECKPOINT = "checkpoint"
HF_CONFIG = "hf_config.json"
"""The imported model's config.json (convert from_hf). Export keeps what the architecture does
not say (architecture name, max_position_embeddings, sliding window, extra keys), so every run
derived from an import (prune, distill, train load=) carries it over."""


def fsync_dir(path) -> None:
    """Make the entries of directory `path` durable (a file created or renamed into it)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_figure(fig, path) -> None:
    """A matplotlib figure saved as PNG via a temporary file in the same directory and a rename
    (the caller closes the figure)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text: str, fault: Optional[str] = None) -> None:
    """Write `text` to `path` via a temporary file in the same directory and a rename.

    `fault` names the fault-injection point (runtime/faults.py) between the two.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    if fault:
        fault_point(fault)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_model_yaml(run_dir, cfg: ModelConfig, padded_vocab_size: int, tokenizer_path: Optional[str],
                     origin: Optional[str] = None, seq_length: Optional[int] = None) -> None:
    """Write model.yaml (and copy the tokenizer) so the run dir rebuilds the model alone; `origin`
    is the run dir this one derives from, whose hf_config.json (if any) carries over;
    `seq_length` is the run's (default: the model's max_position_embeddings)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if origin and (Path(origin) / HF_CONFIG).is_file() and Path(origin).resolve() != run_dir.resolve():
        atomic_write_text(run_dir / HF_CONFIG, (Path(origin) / HF_CONFIG).read_text())
    model = {key: value for key, value in asdict(cfg.resolved()).items() if key not in RUN_SETTINGS}
    body = {"model": model, "padded_vocab_size": int(padded_vocab_size), "tokenizer": None,
            "seq_length": int(seq_length or cfg.max_position_embeddings)}
    if tokenizer_path:
        target = run_dir / TOKENIZER
        if Path(tokenizer_path).resolve() != target.resolve():
            tmp = run_dir / f".{TOKENIZER}.tmp"
            shutil.copyfile(tokenizer_path, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        body["tokenizer"] = TOKENIZER
    atomic_write_text(run_dir / MODEL_YAML, yaml.safe_dump(body, sort_keys=False))


def read_model_yaml(run_dir) -> Tuple[ModelConfig, int, Optional[str]]:
    """(model config, padded vocab size, tokenizer path or None) of a run dir."""
    path = Path(run_dir) / MODEL_YAML
    if not path.is_file():
        raise ConfigError(f"load={run_dir}: {path} not found (not a minitron run directory)")
    body = yaml.safe_load(path.read_text())
    # RUN_SETTINGS are this run's: a value an older run dir recorded (transformer_impl: local) is ignored.
    known = {f.name for f in fields(ModelConfig)} - set(RUN_SETTINGS)
    model = dict(body["model"])
    if "seq_length" in model:  # written before the run's length and the model's limit were apart
        model.setdefault("max_position_embeddings", model["seq_length"])
    cfg = ModelConfig(**{k: v for k, v in model.items() if k in known})
    tokenizer = str(Path(run_dir) / body["tokenizer"]) if body.get("tokenizer") else None
    return cfg, int(body["padded_vocab_size"]), tokenizer


def recorded_seq_length(run_dir) -> Optional[int]:
    """The sequence length the run in `run_dir` was made at (None: not a minitron run dir)."""
    path = Path(run_dir) / MODEL_YAML
    if not path.is_file():
        return None
    body = yaml.safe_load(path.read_text())
    seq = body.get("seq_length") or body["model"].get("seq_length") or body["model"]["max_position_embeddings"]
    return int(seq)


def run_seq_length(requested: Optional[int], model: ModelConfig, recorded: Optional[int], subject: str) -> int:
    """This run's sequence length: `requested` (the `seq_length` setting), else `recorded` (the
    loaded run's), else the model's position limit; a ConfigError when it exceeds the limit.
    `subject` names the model in messages (e.g. "load=runs/teacher")."""
    limit = model.max_position_embeddings
    if requested is not None and requested < 1:
        raise ConfigError(f"seq_length={requested} must be >= 1")
    seq = requested or recorded or limit
    if seq > limit:
        raise ConfigError(f"seq_length={seq} is longer than the position limit of {subject}: "
                          f"max_position_embeddings={limit}; use seq_length<={limit}")
    return seq


def loaded_model_config(run_cfg: ModelConfig, given: ModelConfig, keys: Sequence[str], setting: str) -> ModelConfig:
    """`run_cfg` (a loaded run's model.yaml) with the `model.*` keys the user gave (`keys`, values
    in `given`): LOAD_SETTINGS apply; any other whose value differs from the run's is refused,
    all of them in one ConfigError. `setting` names the run dir (e.g. "load=runs/teacher")."""
    from dataclasses import replace

    ours, theirs = run_cfg.resolved(), given.resolved()
    applied = {key: getattr(given, key) for key in keys if key in LOAD_SETTINGS}
    refused = [key for key in sorted(set(keys) - set(LOAD_SETTINGS)) if _differs(key, ours, theirs)]
    if refused:
        wanted = ", ".join(f"model.{key}={getattr(given, key)!r} (the run's: {getattr(ours, key)!r})"
                           for key in refused)
        allowed = ", ".join(f"model.{key}" for key in LOAD_SETTINGS)
        raise ConfigError(f"{setting}: {wanted} would change the loaded model, whose architecture is its "
                          f"model.yaml; refused. A loaded model takes only {allowed} (and the run's sequence "
                          "length is seq_length=)")
    return replace(run_cfg, **applied)


def _differs(key: str, ours: ModelConfig, theirs: ModelConfig) -> bool:
    """A given None (derive it: vocab from the tokenizer, ...) leaves the run's value as it is."""
    value = getattr(theirs, key)
    return value is not None and value != getattr(ours, key)


def write_summary(run_dir, summary: dict) -> None:
    """The run's last write: from here on the run dir is complete."""
    atomic_write_text(Path(run_dir) / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n", fault="summary.write")


def read_summary(run_dir) -> Optional[dict]:
    path = Path(run_dir) / SUMMARY_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def is_complete(run_dir) -> bool:
    """A run dir is complete once its summary is written (always the last step)."""
    return (Path(run_dir) / SUMMARY_JSON).is_file()


def checkpoint_root(run_dir) -> Path:
    """Where the dist checkpoints are: RUN/checkpoint, or RUN itself for a Megatron-LM save dir."""
    from minitron_megatron.checkpoint.megatron_lm import is_megatron_lm_dir

    return Path(run_dir) if is_megatron_lm_dir(run_dir) else Path(run_dir) / CHECKPOINT


def check_loadable(run_dir, setting: str = "load") -> Path:
    """The run dir, or a ConfigError naming `setting` when it cannot be loaded."""
    from minitron_megatron.checkpoint.dist import latest_iteration
    from minitron_megatron.checkpoint.megatron_lm import is_megatron_lm_dir

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{setting}={run_dir}: directory not found")
    if not (path / MODEL_YAML).is_file() and not is_megatron_lm_dir(path):
        raise ConfigError(
            f"{setting}={run_dir}: neither a minitron run directory ({MODEL_YAML}) nor a Megatron-LM "
            "save directory (latest_checkpointed_iteration.txt)"
        )

    if latest_iteration(checkpoint_root(path)) is None:
        raise ConfigError(f"{setting}={run_dir}: no committed checkpoint under {checkpoint_root(path)}")
    return path
