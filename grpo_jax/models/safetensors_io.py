"""Minimal safetensors reader/writer over numpy memory maps (bfloat16 included).

The `safetensors` numpy API cannot represent bfloat16, and its JAX API would materialise every
tensor on the default device. This reader memory-maps each tensor (via `ml_dtypes` for bf16),
so a loader can slice out one device's shard without reading the rest of the file.

Format: an 8-byte little-endian header length N, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data;
offsets count from the end of the header.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file and tensor."""


class SafetensorsFile:
    """Lazy, memory-mapped access to the tensors of one `.safetensors` file."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise SafetensorsError(f"{path}: truncated file (no header)")
                (n,) = struct.unpack("<Q", raw)
                size = os.fstat(f.fileno()).st_size
                if n > size - 8:
                    raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt header ({e})") from e
        self._data_start = 8 + n
        self._file_size = size
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name):
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map (no copy until sliced or cast)."""
        entry = self._entries[name]
        if entry["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or self._data_start + end > self._file_size:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} data is corrupt or truncated (offsets {begin}..{end}, "
                f"expected {expected} bytes for shape {shape} {entry['dtype']}, file has "
                f"{self._file_size - self._data_start} data bytes)")
        if expected == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)


def write_safetensors(path: str, tensors: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes tensors (name -> (shape, dtype)) calling `produce(name)` for each one's data in turn,
    so only one tensor is in host memory at a time."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (shape, dtype) in tensors.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dtype) in tensors.items():
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise SafetensorsError(f"tensor {name!r}: produced shape {array.shape}, declared {shape}")
            f.write(array.tobytes())
    os.replace(tmp, path)  # a crash mid-write never leaves a half-written checkpoint file


def open_checkpoint(directory: str) -> dict[str, SafetensorsFile]:
    """Maps every tensor name of an HF checkpoint directory (single file or sharded) to its file."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index_path):
        with open(index_path) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise SafetensorsError(f"{index_path}: not a valid safetensors index ({e})") from e
        files = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(directory, shard)
            if not os.path.exists(shard_path):
                raise SafetensorsError(f"{index_path} lists {shard!r}, which does not exist")
            files[shard] = SafetensorsFile(shard_path)
        return {name: files[shard] for name, shard in weight_map.items()}
    if os.path.exists(single):
        f = SafetensorsFile(single)
        return {name: f for name in f.keys()}
    raise SafetensorsError(
        f"{directory}: no model.safetensors or model.safetensors.index.json "
        "(only safetensors checkpoints are supported)")


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Groups tensor names, in order, into shards of at most `max_shard_bytes` (one tensor may exceed it)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards
