"""Sharded safetensors checkpoints in the Hugging Face layout: slice reads and streamed writes.

Reading uses `safe_open(...).get_slice`, so a rank materialises only the rows or
columns it asks for (safetensors maps the file; only the pages touched are read). Writing
streams each tensor into its file as it is produced, and names files only at the
end, when their number is known.
"""

import json
import math
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
        """Rows (dim 0) or columns (dim 1) [start, stop) of tensor `name`.

        safetensors 0.8 returns the slice as a view of the whole tensor in the mapped file:
        copy it where it must live and drop it (a kept view pins the mapping, and Megatron's
        checkpoint writer would clone it at save time). Only the pages touched are read.
        """
        index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
        with self._open(self.weight_map[name]) as handle:
            return handle.get_slice(name)[index]

    def missing_files(self) -> List[str]:
        """Files the index names that are not there."""
        return sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})


class StateDictReader:
    """HFReader's interface over tensors already in memory: a transformers model's state dict
    (a GGUF import, dequantised by transformers itself).

    Tied weights appear twice in a state dict (Llama's lm_head.weight is embed_tokens.weight)
    but once in a HF checkpoint; like `save_pretrained`, the first name of a storage wins.
    """

    def __init__(self, state_dict: Dict[str, torch.Tensor]) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}
        seen = set()
        for name, tensor in state_dict.items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key not in seen:
                seen.add(key)
                self.tensors[name] = tensor

    def names(self) -> List[str]:
        return list(self.tensors)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.tensors.items()}

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        tensor = self.tensors[name]
        return tensor[start:stop] if dim == 0 else tensor[:, start:stop]

    def missing_files(self) -> List[str]:
        return []


_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class StreamingShardWriter:
    """Writes tensors straight into safetensors files as they arrive: nothing is buffered.

    Why not `safetensors.torch.save_file`: it takes a dict of every tensor of a file, so a
    5 GB shard costs 5 GB of memory on top of the model. The safetensors layout (u64
    header size, JSON header with byte offsets, then the raw bytes in offset order) needs
    only names, dtypes and shapes up front, which an export knows before it gathers
    anything; `layout` lists them in the order `add` will be called.
    """

    def __init__(self, out_dir, prefix: str, max_shard_bytes: int,
                 layout: List[Tuple[str, Tuple[int, ...], torch.dtype]]) -> None:
        self.dir, self.prefix = Path(out_dir), prefix
        self.plan = _group(layout, max_shard_bytes)  # [[(name, shape, dtype, bytes)] per file]
        self.files: List[Tuple[str, List[str], int]] = []
        """(file name, tensor names, bytes) of every file written."""
        self._file, self._handle, self._position = -1, None, 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._handle is None or self._position == len(self.plan[self._file]):
            self._next_file()
        expected, shape, dtype, _ = self.plan[self._file][self._position]
        if (name, tuple(tensor.shape), tensor.dtype) != (expected, tuple(shape), dtype):
            raise AssertionError(f"export wrote {name} {tuple(tensor.shape)} {tensor.dtype}; layout says "
                                 f"{expected} {tuple(shape)} {dtype}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))  # the tensor's own bytes: no copy
        self._position += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._file + 1 != len(self.plan) or (self.plan and self._position != len(self.plan[-1])):
            raise AssertionError("export ended before writing every tensor of its layout")

    def _next_file(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._file, self._position = self._file + 1, 0
        entries = self.plan[self._file]
        name = f"{self.prefix}-{self._file:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor, shape, dtype, size in entries:
            header[tensor] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                              "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # 8-byte aligned data, as safetensors itself writes
        self._handle = open(self.dir / name, "wb")
        self._handle.write(len(text).to_bytes(8, "little") + text)
        self.files.append((name, [e[0] for e in entries], offset))


def _group(layout, max_bytes: int):
    files, current, size = [], [], 0
    for name, shape, dtype in layout:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if current and size + nbytes > max_bytes:
            files.append(current)
            current, size = [], 0
        current.append((name, tuple(shape), dtype, nbytes))
        size += nbytes
    return files + ([current] if current else [])


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
