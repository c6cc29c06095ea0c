"""Megatron-LM's own argument parser and `core_transformer_config_from_args`, from its source.

Megatron-LM's training code is not on the package index. When a checkout of the tag that goes
with the installed megatron-core (megatron_compat.MEGATRON_LM_TAG: core_v0.16.1 or core_v0.19.0)
is at hand (`MEGATRON_LM_SOURCE=DIR` holding megatron/training, or `MEGATRON_LM_GIT=GIT_DIR`
of a clone, from which the tag is archived), the tests run it in a subprocess (`main` below)
against the installed megatron-core; otherwise they are skipped.
"""

import json
import os
import subprocess
import sys
import tarfile
import io
from pathlib import Path

from minitron_megatron.megatron_compat import MEGATRON_LM_TAG as TAG

DEFAULT_GIT = "/work/.mirror/NVIDIA+Megatron-LM/repo"


def packages(git_dir: str) -> list:
    """Megatron-LM's packages beside megatron/core at TAG (what `import megatron.training.arguments`
    pulls in: megatron/legacy at core_v0.16.1; megatron/inference and elastification at core_v0.19.0)."""
    names = subprocess.run(["git", "-C", git_dir, "ls-tree", "--name-only", TAG, "megatron/"],
                           capture_output=True, text=True, check=True).stdout.split()
    return [name for name in names if name != "megatron/core"]


def source_dir(cache: Path):
    """A directory with Megatron-LM's megatron/training at TAG, or None."""
    if os.environ.get("MEGATRON_LM_SOURCE"):
        return Path(os.environ["MEGATRON_LM_SOURCE"])
    git_dir = os.environ.get("MEGATRON_LM_GIT", DEFAULT_GIT)
    if not Path(git_dir).exists():
        return None
    out = cache / f"megatron-lm-{TAG}"
    if not (out / "megatron" / "training" / "arguments.py").is_file():
        archive = subprocess.run(["git", "-C", git_dir, "archive", TAG, *packages(git_dir)], capture_output=True, check=True)
        tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(out)
    return out


def parse(source: Path, argvs: list, tp: int) -> list:
    """For each argv: Megatron-LM's parsed args (JSON-able values) and its TransformerConfig fields."""
    proc = subprocess.run([sys.executable, __file__, str(source), str(tp)], input=json.dumps(argvs),
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if proc.returncode:
        raise AssertionError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _plain(value):
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def main(source: str, tp: int) -> None:
    import argparse
    import dataclasses
    import types

    sys.modules.setdefault("six", types.ModuleType("six"))  # bert_tokenization's only use: py2 shims
    sys.path.append(source)  # `megatron` is a namespace package: training/ joins the installed core/
    from minitron_megatron.runtime import cpu_support  # noqa: F401 (megatron-core on CPU)

    import torch
    import megatron.training.arguments as mlm

    results = []
    for argv in json.loads(sys.stdin.read()):
        args = mlm.add_megatron_arguments(argparse.ArgumentParser()).parse_args(argv)
        # The parts of validate_args (core_v0.16.1) that decide model fields, as it does them:
        if args.kv_channels is None:
            args.kv_channels = args.hidden_size // args.num_attention_heads
        if args.add_bias_linear:
            args.add_qkv_bias = True
        args.params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        args.tensor_model_parallel_size = tp
        # CPU: no fused kernels (validate_args would refuse them without CUDA/TE anyway).
        for name in ("apply_rope_fusion", "bias_swiglu_fusion", "bias_gelu_fusion", "masked_softmax_fusion",
                     "gradient_accumulation_fusion", "bias_dropout_fusion"):
            setattr(args, name, False)
        args.no_persist_layer_norm = True
        config = mlm.core_transformer_config_from_args(args)
        results.append({"args": {k: _plain(v) for k, v in vars(args).items()},
                        "config": {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}})
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
