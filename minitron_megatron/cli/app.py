"""Thin Hydra mains: compose a typed config, start the runtime, run a stage, print the summary.

The last stdout line of every command (rank 0) is its one-line JSON summary; its
`seconds` is the command's wall time from process start (runtime/clock.py).
Exit status: 0 done; 2 bad input (one `error:` message on stderr, nothing written);
3 training diverged (NaN/Inf; the last good checkpoint is kept); 75 preempted by
SIGTERM/SIGUSR1 after saving a checkpoint (rerun the same command to resume).
"""

import json
import os
import sys
from dataclasses import fields, replace
from typing import List

from minitron_megatron.cli.registry import COMMANDS, Command
from minitron_megatron.config.files import conf_dir
from minitron_megatron.config.model import LOAD_SETTINGS, ModelConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime.preemption import PREEMPTED_EXIT, Preempted

CONF_DIR = str(conf_dir())
EXIT_CONFIG, EXIT_DIVERGED = 2, 3


def run_command(command: Command, cfg) -> dict:
    """Start the runtime from `cfg`'s common keys, run the stage, always tear down."""
    from minitron_megatron.model import validate_model
    from minitron_megatron.runtime import destroy_runtime, init_runtime

    # Before the runtime's world-size check, so `parallel.tp=3` on one process names the real problem.
    if command.builds_from_model and not cfg.load:
        validate_model(cfg.model, cfg.parallel)
    if not command.starts_runtime:
        summary = command.stage()(cfg, None)
        _print_summary(True, summary)
        return summary
    try:
        ctx = init_runtime(tp=cfg.parallel.tp, pp=cfg.parallel.pp, device=cfg.device, seed=cfg.seed,
                           ep=cfg.parallel.ep)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        summary = command.stage()(cfg, ctx)
        _print_summary(ctx.is_main, summary)
        return summary
    finally:
        destroy_runtime()


def _print_summary(is_main: bool, summary: dict) -> None:
    if is_main:
        print(json.dumps(summary), flush=True)


def _fail(status: int, message: str, summary: dict = None) -> None:
    is_main = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
    if summary is not None:
        _print_summary(is_main, summary)
    if is_main:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def model_keys_given(overrides: List[str]) -> List[str]:
    """The `model` fields the command line sets: `model.KEY=...` names KEY; `model=PRESET` names
    the preset's architecture (every field but LOAD_SETTINGS: a preset's dropout or dtype is a
    default, not a choice to impose on a loaded run). Read from Hydra's own parse of the
    overrides, so every spelling (`++model.k=v`, quoting, sweeps' per-job values) counts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set()
    for override in OverridesParser.create().parse_overrides(overrides):
        name = override.key_or_group
        if override.package is None and name == "model":
            keys.update(f.name for f in fields(ModelConfig) if f.name not in LOAD_SETTINGS)
        elif name.startswith("model."):
            keys.add(name.split(".")[1])
    return sorted(keys)


def _typed_config(dict_cfg):
    """The schema dataclass of the composed config, with `model_overrides` from this job's command line."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(dict_cfg)
    return replace(cfg, model_overrides=model_keys_given(list(HydraConfig.get().overrides.task)))


def _run_dict_config(command: Command, dict_cfg) -> None:
    from minitron_megatron.train.driver import TrainingDiverged

    try:
        run_command(command, _typed_config(dict_cfg))
    except ConfigError as err:
        _fail(EXIT_CONFIG, str(err))
    except TrainingDiverged as err:
        _fail(EXIT_DIVERGED, str(err), {"diverged": err.component, "step": err.step,
                                         "last_checkpoint": err.last_checkpoint})
    except Preempted as err:
        _fail(PREEMPTED_EXIT, str(err), {"preempted": err.signal_name, "step": err.step, "resumable": True})


RENAMED = {
    "model.seq_length": "seq_length= (the run's sequence length; the model's position limit is "
                        "model.max_position_embeddings)",
    "convert.seq_length": "seq_length= (the length the imported run dir records)",
}
"""Keys of earlier versions: named with their replacement rather than Hydra's "not in struct"."""


def _renamed_keys(argv: List[str]) -> List[str]:
    keys = [arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg]
    return [f"{key}= is now {RENAMED[key]}" for key in keys if key in RENAMED]


def main(name: str) -> None:
    """`python -m minitron_megatron.<name>` and the `minitron-<name>` console script."""
    import hydra

    from minitron_megatron.config.commands import register_configs

    renamed = _renamed_keys(sys.argv[1:])
    if renamed:
        _fail(EXIT_CONFIG, "; ".join(renamed))
    command = COMMANDS[name]
    register_configs()
    task = lambda dict_cfg: _run_dict_config(command, dict_cfg)
    hydra.main(config_path=CONF_DIR, config_name=command.name, version_base="1.3")(task)()
