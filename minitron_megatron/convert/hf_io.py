"""Sharded safetensors checkpoints in the Hugging Face layout: slice reads and streamed writes.

Reading uses `safe_open(...).get_slice`, so a rank materialises only the rows or
columns it asks for (safetensors maps the file; nothing else is read). Writing
keeps at most `max_shard_bytes` of tensors before flushing a file, and names
files only at the end, when their number is known.
"""

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFReader:
    """The tensors of a HF checkpoint directory (single file or sharded with an index).

    Files are opened per read and closed right after: safetensors maps them, and mapped
    pages count as resident memory until unmapped, so a reader that kept its files open
    would end up holding the whole checkpoint even though each read is a slice.
    """

    def __init__(self, hf_dir) -> None:
        self.dir = Path(hf_dir)
        if (self.dir / INDEX).is_file():
            self.weight_map: Dict[str, str] = json.loads((self.dir / INDEX).read_text())["weight_map"]
        elif (self.dir / SINGLE).is_file():
            with self._open(SINGLE) as handle:
                self.weight_map = {name: SINGLE for name in handle.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: neither {INDEX} nor {SINGLE} (safetensors weights are needed)")

    def _open(self, file: str):
        from safetensors import safe_open

        return safe_open(str(self.dir / file), framework="pt")

    def names(self) -> List[str]:
        return list(self.weight_map)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Every tensor's shape, from the file headers only (one open per file)."""
        out = {}
        for file in sorted(set(self.weight_map.values())):
            with self._open(file) as handle:
                out.update({n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()
                            if self.weight_map.get(n) == file})
        return out

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of tensor `name`; nothing else is read."""
        index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
        with self._open(self.weight_map[name]) as handle:
            return handle.get_slice(name)[index]


class ShardWriter:
    """Streams tensors into safetensors files of at most ~max_shard_bytes each."""

    def __init__(self, out_dir, prefix: str, max_shard_bytes: int) -> None:
        self.dir, self.prefix, self.max_bytes = Path(out_dir), prefix, max_shard_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: List[Tuple[str, List[str], int]] = []
        """(file name, tensor names, bytes) of every file written so far."""

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"{self.prefix}-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.dir / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0


def finalize_shards(out_dir, files: List[Tuple[str, List[str], int]]) -> Dict[str, str]:
    """Rename every rank's files to model-0000i-of-0000N.safetensors and write the index."""
    out_dir = Path(out_dir)
    total = len(files)
    weight_map, total_bytes = {}, 0
    for i, (name, tensors, size) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(out_dir / name, out_dir / final)
        weight_map.update({t: final for t in tensors})
        total_bytes += size
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def read_config(hf_dir) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(str(path))
    return json.loads(path.read_text())


def optional_json(path) -> Optional[dict]:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None
