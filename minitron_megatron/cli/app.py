"""Thin Hydra mains: compose a typed config, start the runtime, run a stage, print the summary.

The last stdout line of every command (rank 0) is its one-line JSON summary.
Bad input exits with status 2 and one `error:` message on stderr.
"""

import json
import os
import sys
from typing import Callable

from minitron_megatron.config.files import conf_dir
from minitron_megatron.errors import ConfigError

CONF_DIR = str(conf_dir())


def _to_dataclass(dict_cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_object(dict_cfg)


def _resolve(stage: str) -> Callable:
    """"package.module:function" -> the function, imported only now: after the runtime
    chose the device, so Megatron-core is imported the way that device needs."""
    import importlib

    module, name = stage.split(":")
    return getattr(importlib.import_module(module), name)


def run_stage(cfg, stage: str) -> dict:
    """Start the runtime from `cfg`'s common keys, run `stage(cfg, ctx)`, always tear down."""
    from minitron_megatron.config.commands import RunCommand, TrainCommand
    from minitron_megatron.model import validate_model
    from minitron_megatron.runtime import destroy_runtime, init_runtime

    # Before the runtime's world-size check, so `parallel.tp=3` on one process names the
    # real problem. Only train and run build from `model=`; other commands read run dirs.
    if isinstance(cfg, (TrainCommand, RunCommand)) and not cfg.load:
        validate_model(cfg.model, cfg.parallel)
    try:
        ctx = init_runtime(tp=cfg.parallel.tp, pp=cfg.parallel.pp, device=cfg.device, seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        summary = _resolve(stage)(cfg, ctx)
        if ctx.is_main:
            print(json.dumps(summary), flush=True)
        return summary
    finally:
        destroy_runtime()


def hydra_entry(config_name: str, stage: str) -> Callable[[], None]:
    """A console-script main for `stage` ("module:function") configured by conf/<config_name>.yaml."""
    import hydra

    from minitron_megatron.config.commands import register_configs

    register_configs()

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def _main(dict_cfg) -> None:
        try:
            run_stage(_to_dataclass(dict_cfg), stage)
        except ConfigError as err:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return _main
