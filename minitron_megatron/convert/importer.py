"""HF directory -> run directory, at any TP/PP, each rank reading only its slices.

Every check (architecture, config fields, tensor names and shapes, tokenizer vs
vocab, TP/PP divisibility, the target directory) runs in `plan_import` on every
rank before anything is built or written, so bad input leaves no files behind.
A GGUF import (gguf_import.py) is the same import from an `ImportSource` whose tensors
transformers has already loaded: `plan_source` and `import_plan` serve both.
"""

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.checkpoint.megatron_lm import checkpoint_args
from minitron_megatron.config.convert import ConvertConfig
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.convert import tensor_map as tm
from minitron_megatron.convert.families import Family, family_of, model_config_from_hf, position_limit_note
from minitron_megatron.convert.hf_io import HFReader, read_config
from minitron_megatron.data.tokenizer import HFTokenizer, bundle_hf_tokenizer
from minitron_megatron.errors import ConfigError
from minitron_megatron.model import padded_vocab_size, validate_model
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.progress import Progress

HF_CONFIG = rd.HF_CONFIG
"""The imported config.json, kept in the run dir: export reuses its non-architectural keys."""
CHECKPOINT_ITERATION = 1
"""Megatron-LM refuses a tracker file that says 0."""


@dataclass
class ImportSource:
    """Where an import's config, tensors and tokenizer come from: a HF directory, or a GGUF file
    that transformers has loaded and dequantised (convert/gguf_import.py)."""

    setting: str
    """The command-line input, as messages name it: `from_hf=DIR` or `from_gguf=FILE`."""
    name: str
    """The run's model name (the directory's or the file's)."""
    hf_config: dict
    """config.json's content."""
    reader: object
    """HFReader or StateDictReader: names(), shapes(), read(name, dim, start, stop), missing_files()."""
    tokenizer_dir: Path
    """A directory holding the HF tokenizer files (tokenizer.json, tokenizer_config.json, ...)."""
    origin: Dict[str, str]
    """Recorded in the checkpoint and the JSON summary, e.g. {"from_hf": DIR}."""


def hf_dir_source(from_hf: str) -> ImportSource:
    """A HF directory as an import source, or a ConfigError when it is not one."""
    hf_dir = Path(from_hf or "")
    if not from_hf or not (hf_dir / "config.json").is_file():
        raise ConfigError(f"from_hf={from_hf}: no config.json there (a Hugging Face model directory is needed)")
    try:
        reader = HFReader(hf_dir)
    except FileNotFoundError as err:
        raise ConfigError(f"from_hf={from_hf}: {err}") from err
    return ImportSource(f"from_hf={from_hf}", hf_dir.name, read_config(hf_dir), reader, hf_dir,
                        {"from_hf": str(hf_dir)})


@dataclass
class ImportPlan:
    source: ImportSource
    save: Path
    family: Family
    model_cfg: ModelConfig
    padded_vocab: int
    tokenizer_bundle: str
    seq_length: int
    """Recorded in model.yaml: the length later commands on this run dir run at by default."""

    @property
    def hf_config(self) -> dict:
        return self.source.hf_config


def plan_import(from_hf: str, save: str, options: ConvertConfig, parallel: ParallelConfig,
                seq_length: Optional[int] = None) -> ImportPlan:
    """Every reason this import cannot run, as one ConfigError; nothing is written. `seq_length`
    (default: the position limit) must fit config.json's max_position_embeddings."""
    source = hf_dir_source(from_hf)
    check_target(save, "save", unfinished_ok=True)
    return plan_source(source, save, options, parallel, seq_length)


def plan_source(source: ImportSource, save: str, options: ConvertConfig, parallel: ParallelConfig,
                seq_length: Optional[int] = None) -> ImportPlan:
    """`plan_import` for any source (the target directory already checked)."""
    hf = source.hf_config
    family = family_of(hf)
    cfg = model_config_from_hf(hf, name=source.name, params_dtype=options.dtype)
    validate_model(cfg, parallel)
    problems = tensor_problems(source.reader, cfg, family, source.setting.split("=")[0])
    try:
        seq = rd.run_seq_length(seq_length, cfg, None, source.setting)
    except ConfigError as err:
        problems += [p + position_limit_note(hf, family) for p in err.problems]
    bundle, vocab = _tokenizer(source.tokenizer_dir, source.setting)
    if vocab > cfg.vocab_size:
        problems.append(f"{source.setting}: its tokenizer has {vocab} tokens but config.json vocab_size="
                        f"{cfg.vocab_size} embedding rows; the tokenizer does not fit the embedding")
    if problems:
        raise ConfigError(problems)
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, parallel.tp)
    return ImportPlan(source, Path(save), family, cfg, padded, bundle, seq)


_OWN_FILES = {rd.MODEL_YAML, rd.TOKENIZER, HF_CONFIG, rd.CHECKPOINT}


def check_target(path: str, setting: str, unfinished_ok: bool = False) -> None:
    """The target must be new or empty; `unfinished_ok` also admits an import that crashed
    (our files only, no summary.json), which is then written again from scratch."""
    if not path:
        raise ConfigError(f"{setting} is not set: name the directory to write")
    target = Path(path)
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    names = {p.name for p in target.iterdir() if not p.name.startswith(".")} if target.is_dir() else None
    if unfinished_ok and names is not None and names <= _OWN_FILES:
        return
    raise ConfigError(f"{setting}={path} already exists and is not empty; choose a new directory")


def _tokenizer(hf_dir: Path, setting: str) -> Tuple[str, int]:
    try:
        bundle = bundle_hf_tokenizer(hf_dir)
    except FileNotFoundError as err:
        raise ConfigError(f"{setting}: {err}") from err
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(bundle, encoding="utf-8")
        try:
            return bundle, HFTokenizer(str(path)).vocab_size
        except ValueError as err:
            raise ConfigError(f"{setting}: {err}") from err


def tensor_problems(reader, cfg: ModelConfig, family: Family, setting: str = "from_hf") -> List[str]:
    """Missing, unexpected and wrongly shaped tensors (shapes read from file headers only)."""
    absent = reader.missing_files()
    if absent:
        return [f"{setting}: the safetensors index names files that are missing: {_few(absent)}"]
    expected = tm.expected_hf_shapes(cfg, family)
    present = set(reader.names())
    shapes = reader.shapes()
    problems = []
    missing = [n for n in expected if n not in present]
    extra = sorted(present - set(expected))
    if missing:
        problems.append(f"{setting}: {len(missing)} tensors that config.json implies are missing: {_few(missing)}")
    if extra:
        problems.append(f"{setting}: {len(extra)} tensors that config.json does not explain: {_few(extra)}")
    for name, shape in expected.items():
        if name in present and shapes.get(name) != shape:
            problems.append(f"{setting}: tensor {name} has shape {list(shapes.get(name, ()))}, config.json "
                            f"implies {list(shape)}")
    return problems


def _few(names: List[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_hf_weights(model, plan: ImportPlan, ctx: ParallelContext) -> int:
    """Fill this rank's parameters from the HF files; returns the number of values read.

    A parameter still on the meta device gets fresh storage that the HF slices are copied
    into directly, so memory is the shard itself: no read buffer, no concatenated copy.
    """
    import torch

    reader = plan.source.reader
    offset = tm.layer_offset_of(model)
    experts = tm.expert_offset_of(plan.model_cfg, ctx.ep_rank, ctx.ep_size)  # this EP rank's first expert
    read = 0
    named = list(model.named_parameters())
    with Progress("import", len(named), unit="tensor", enabled=ctx.is_main) as progress:  # rank 0's share
        for name, param in named:
            source = tm.source_for(name, plan.model_cfg, plan.family, offset, experts)
            target = torch.empty(param.shape, dtype=param.dtype) if param.is_meta else param.data
            tm.fill_shard(source, reader.read, target, param, *tm.tp_of(name, ctx.tp_rank, ctx.tp_size))
            if param.is_meta:
                assign_parameter(model, name, target)
            read += target.numel()
            progress.update()
    return read


def assign_parameter(model, name: str, tensor) -> None:
    """Replace the meta parameter `name` by `tensor`, keeping Megatron's attributes on it
    (tensor_model_parallel, partition_dim, partition_stride, ...). A meta tensor's storage
    cannot be swapped for a real one, so a new Parameter takes the old one's place."""
    import torch

    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    old = module._parameters[leaf]
    new = torch.nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    module._parameters[leaf] = new


def import_hf(from_hf: str, save: str, options: ConvertConfig, parallel: ParallelConfig,
              ctx: ParallelContext, seq_length: Optional[int] = None) -> Dict:
    """Convert a HF directory into the run dir `save` at the context's TP/PP; the JSON summary."""
    start = time.time()
    return import_plan(plan_import(from_hf, save, options, parallel, seq_length), parallel, ctx, start)


def import_plan(plan: ImportPlan, parallel: ParallelConfig, ctx: ParallelContext, start: float,
                summary_extra: Optional[Dict] = None) -> Dict:
    """Build the model on meta, fill it from the plan's source, write the run dir; the JSON summary."""
    from minitron_megatron.model import build_gpt_model, count_model_parameters

    # Meta build: Megatron's CPU init would first allocate every weight (plus a float32 master
    # copy per layer) only for us to overwrite it; measured +0.9 GiB over a 1.65 GiB model.
    model = build_gpt_model(plan.model_cfg, ctx, parallel, plan.padded_vocab, init="meta")
    load_hf_weights(model, plan, ctx)
    params = count_model_parameters(model, ctx)
    _write_run_dir(plan, model, ctx)
    direction = next(iter(plan.source.origin))
    summary = {"direction": direction, "architecture": plan.family.architecture, **(summary_extra or {}),
               "params": params, "vocab_size": plan.model_cfg.vocab_size, "padded_vocab_size": plan.padded_vocab,
               "save": str(plan.save), "seconds": round(time.time() - start, 3)}
    if ctx.is_main:
        rd.write_summary(plan.save, summary)  # the commit point: written last
    ctx.barrier()
    return summary


def _write_run_dir(plan: ImportPlan, model, ctx: ParallelContext) -> None:
    run_dir = plan.save
    if ctx.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)  # new, empty or an unfinished import (plan_import)
        run_dir.mkdir(parents=True)
        tokenizer = run_dir / rd.TOKENIZER  # the run-dir name of any tokenizer; the content is sniffed
        rd.atomic_write_text(tokenizer, plan.tokenizer_bundle)
        rd.atomic_write_text(run_dir / HF_CONFIG, json.dumps(plan.hf_config, indent=2) + "\n")
        rd.write_model_yaml(run_dir, plan.model_cfg, plan.padded_vocab, str(tokenizer), seq_length=plan.seq_length)
    ctx.barrier()
    args = checkpoint_args(plan.model_cfg, plan.padded_vocab, ctx.tp_size, ctx.pp_size, iteration=CHECKPOINT_ITERATION,
                           seq_length=plan.seq_length, tokenizer_path=str(run_dir / rd.TOKENIZER))  # Megatron-LM's
    # The model is not used after this save: let it free each weight it has copied.
    ckpt.save_checkpoint(rd.checkpoint_root(run_dir), CHECKPOINT_ITERATION, model, ctx, args=args, release_model=True,
                         extra={"convert": {**plan.source.origin, "architecture": plan.family.architecture}})
