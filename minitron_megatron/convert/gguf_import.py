"""GGUF file -> run directory, through transformers' own GGUF loader and dequantisation.

The file's `general.architecture` (GGUF metadata, read with the `gguf` package before any
tensor is touched) decides whether it is imported at all. Then transformers loads it in
float32, dequantising every tensor exactly as `from_pretrained(dir, gguf_file=name)` does for
any user, with the tokenizer the file carries; the loaded config, state dict and tokenizer go
through the HF import's own plan, checks and weight fill (importer.py), so a GGUF run dir is
the run dir its dequantised HF model would give.

Why transformers and not our own dequantiser: it is the reference the parity tests compare
with, and it knows each architecture's GGUF quirks (llama.cpp permutes Llama's Q/K rows for
its RoPE; transformers undoes it).
"""

import contextlib
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

from minitron_megatron.config.convert import ConvertConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.convert.families import FAMILIES
from minitron_megatron.convert.hf_io import StateDictReader
from minitron_megatron.convert.importer import ImportSource, check_target, import_plan, plan_source
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime.context import ParallelContext

GGUF_ARCHITECTURES: Dict[str, str] = {"llama": "LlamaForCausalLM"}
"""GGUF general.architecture -> the HF architecture it is imported as. Only what a test covers
(tests/convert/test_gguf.py: SmolLM2-135M-Instruct, a Llama-architecture GGUF)."""
REQUIRED_PACKAGES = ("gguf", "accelerate", "transformers")
"""What transformers' GGUF loader needs besides transformers itself: gguf reads the file,
accelerate is imported by from_pretrained's GGUF path."""


def _require_packages(setting: str) -> None:
    missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{setting} needs the Python packages {', '.join(missing)}, which are not installed: "
                          "pip install gguf accelerate 'transformers>=5' (or pip install 'minitron-megatron[gguf]')")


def gguf_architecture(path: Path, setting: str) -> str:
    """The file's `general.architecture`, read from its metadata only (no tensor is loaded)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, EOFError) as err:
        raise ConfigError(f"{setting}: not a readable GGUF file ({err})") from err
    field = reader.fields.get("general.architecture")
    if field is None or not field.data:
        raise ConfigError(f"{setting}: the GGUF metadata has no general.architecture; supported: "
                          f"{sorted(GGUF_ARCHITECTURES)}")
    return bytes(field.parts[field.data[0]]).decode("utf-8")  # a string field's value part


def _hf_config(model, architecture: str) -> dict:
    """config.json of the loaded model: its GGUF quantization_config dropped (the weights are
    dequantised float32 now) and `architectures` set, which transformers leaves empty."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    hf = json.loads(json.dumps(config.to_dict(), default=str))
    hf["architectures"] = [architecture]
    return hf


@contextlib.contextmanager
def loaded_gguf(path: Path, gguf_arch: str, setting: str) -> Iterator[ImportSource]:
    """The GGUF file as an import source, loaded by transformers in float32. The tokenizer
    files live in a temporary directory (small text files) for as long as the source is used."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = GGUF_ARCHITECTURES[gguf_arch]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf = _hf_config(model, architecture)
    if hf.get("model_type") != FAMILIES[architecture].model_type:
        raise ConfigError(f"{setting}: general.architecture={gguf_arch!r} loaded as model_type="
                          f"{hf.get('model_type')!r}, not {FAMILIES[architecture].model_type!r}")
    reader = StateDictReader(model.state_dict())
    del model  # the reader holds the tensors; nothing else of the model is needed
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with tempfile.TemporaryDirectory(prefix="minitron-gguf-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        yield ImportSource(setting, path.name.removesuffix(".gguf"), hf, reader, Path(tmp), {"from_gguf": str(path)})


def import_gguf(from_gguf: str, save: str, options: ConvertConfig, parallel: ParallelConfig,
                ctx: ParallelContext, seq_length: Optional[int] = None) -> Dict:
    """Convert a GGUF file into the run dir `save` at the context's TP/PP; the JSON summary.
    Every rank loads the file (transformers dequantises all of it) and keeps its own slices."""
    start = time.time()
    setting = f"from_gguf={from_gguf}"
    path = Path(from_gguf or "")
    if not from_gguf or not path.is_file():
        raise ConfigError(f"{setting}: file not found (a .gguf model file is needed)")
    _require_packages(setting)
    check_target(save, "save", unfinished_ok=True)
    gguf_arch = gguf_architecture(path, setting)
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"{setting}: general.architecture={gguf_arch!r} is not supported; supported: "
                          f"{sorted(GGUF_ARCHITECTURES)}")
    with loaded_gguf(path.resolve(), gguf_arch, setting) as source:
        plan = plan_source(source, save, options, parallel, seq_length)
        return import_plan(plan, parallel, ctx, start, summary_extra={"gguf_architecture": gguf_arch})
