"""The convert command's stage: `convert(cfg, ctx)` picks the direction and returns the JSON summary."""

from typing import Dict

from minitron_megatron.config.commands import ConvertCommand
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime.context import ParallelContext


def convert(cfg: ConvertCommand, ctx: ParallelContext) -> Dict:
    """`from_hf` / `from_gguf` + `save`: import a HF directory or a GGUF file; `load` + `to_hf`:
    export a run dir."""
    if sum(bool(x) for x in (cfg.from_hf, cfg.from_gguf, cfg.to_hf)) != 1:
        raise ConfigError("convert needs exactly one of from_hf=HF_DIR or from_gguf=FILE.gguf (with save=RUN), "
                          "or to_hf=HF_DIR (with load=RUN)")
    if cfg.model_overrides:
        raise ConfigError(f"convert takes the model from config.json (from_hf), the GGUF metadata (from_gguf) or "
                          f"model.yaml (load); "
                          f"{', '.join('model.' + key for key in cfg.model_overrides)} cannot apply: set run "
                          "settings on the commands that use the run dir")
    if cfg.from_hf:
        from minitron_megatron.convert.importer import import_hf

        if cfg.load:
            raise ConfigError("from_hf and load are exclusive: an import reads only from_hf")
        return import_hf(cfg.from_hf, cfg.save, cfg.convert, cfg.parallel, ctx, seq_length=cfg.seq_length)
    if cfg.from_gguf:
        from minitron_megatron.convert.gguf_import import import_gguf

        if cfg.load:
            raise ConfigError("from_gguf and load are exclusive: an import reads only from_gguf")
        return import_gguf(cfg.from_gguf, cfg.save, cfg.convert, cfg.parallel, ctx, seq_length=cfg.seq_length)
    from minitron_megatron.convert.exporter import export_hf

    if not cfg.load:
        raise ConfigError("to_hf needs load=RUN: the run directory to export")
    if cfg.seq_length is not None:
        raise ConfigError(f"seq_length={cfg.seq_length}: an export writes weights and config.json (whose "
                          "max_position_embeddings is the model's limit), no run length; leave it unset")
    return export_hf(cfg.load, cfg.to_hf, cfg.convert, cfg.parallel, ctx)
