"""The recipe's before/after generation: the teacher and the distilled student exported to
Hugging Face (`convert load= to_hf=`, SAVE/hf/<name>/), then greedy continuations of the same
prompts by transformers from those directories. Generating from the exports is the point: what
a user ships is what speaks, and transformers (not our code) runs it.

SAVE/generations.json keeps the prompts, settings and texts; a rerun with the same ones reuses it.
"""

import importlib.util
import json
from pathlib import Path
from typing import Dict, List

from minitron_megatron.errors import ConfigError

GENERATIONS = "generations.json"
MODELS = ("teacher", "student")


def generate_problems(cfg) -> List[str]:
    g = cfg.generate
    if not g.prompts:
        return []
    problems = []
    if g.max_new_tokens < 1:
        problems.append(f"generate.max_new_tokens={g.max_new_tokens}: must be >= 1")
    if any(not isinstance(p, str) or not p.strip() for p in g.prompts):
        problems.append("generate.prompts: every prompt must be a non-empty string")
    if importlib.util.find_spec("transformers") is None:
        problems.append("generate.prompts needs transformers to run the exported models: pip install "
                        "'transformers>=5' (or generate.prompts=[] for no generation)")
    return problems


def export_models(cfg, dirs: Dict[str, Path], ctx) -> Dict[str, Path]:
    """{model: its HF directory}; an export already there (complete: written atomically) is kept."""
    from minitron_megatron.config.commands import ConvertCommand, derived_common
    from minitron_megatron.convert.stage import convert

    out = {}
    for name in MODELS:
        hf = Path(cfg.save) / "hf" / name
        if not (hf / "config.json").is_file():
            if ctx.is_main:
                print(f"[export] {dirs[name]} -> {hf}", flush=True)
            convert(ConvertCommand(**derived_common(cfg, load=str(dirs[name]), seq_length=None, model_overrides=[]),
                                   to_hf=str(hf)), ctx)
        out[name] = hf
    return out


def generate(cfg, hf_dirs: Dict[str, Path], ctx) -> dict:
    """{settings..., "texts": {model: [continuation per prompt]}} (rank 0 generates, on the
    recipe's device; every rank returns the same)."""
    from minitron_megatron.checkpoint import run_dir as rd

    path = Path(cfg.save) / GENERATIONS
    key = {"prompts": list(cfg.generate.prompts), "max_new_tokens": cfg.generate.max_new_tokens,
           "models": {name: str(hf) for name, hf in hf_dirs.items()}}
    kept = json.loads(path.read_text()) if path.is_file() else None
    if not (kept and kept.get("key") == key):
        if ctx.is_main:
            texts = {name: _greedy(hf, key["prompts"], key["max_new_tokens"], cfg.device)
                     for name, hf in hf_dirs.items()}
            rd.atomic_write_text(path, json.dumps({"key": key, "texts": texts}, indent=1))
        ctx.barrier()
        kept = json.loads(path.read_text())
    return kept


def _greedy(hf_dir: Path, prompts: List[str], max_new_tokens: int, device: str) -> List[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device)
    except (OSError, ValueError) as err:
        raise ConfigError(f"generate: transformers cannot load the export {hf_dir}: {err}") from err
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            tokens = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)
            out.append(tokenizer.decode(tokens[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def markdown(generations: dict) -> List[str]:
    """report.md's section: each prompt, then each model's continuation."""
    key, texts = generations["key"], generations["texts"]
    lines = ["## Generation (greedy, transformers on the exported models)", "",
             f"{key['max_new_tokens']} new tokens per prompt; teacher: `{key['models']['teacher']}`, student: "
             f"`{key['models']['student']}`.", ""]
    for i, prompt in enumerate(key["prompts"]):
        lines += [f"**Prompt {i + 1}:**", "", "```", prompt, "```", ""]
        for name in MODELS:
            lines += [f"{name}:", "", "```", texts[name][i], "```", ""]
    return lines
