"""A safetensors file laid out in advance and written one tensor at a time, by any process.

The header (names, dtypes, shapes, byte offsets) is known before any data exists, because the
plan is computed on shape-only tensors first. So one process creates the file (header, then the
full size), and every process that owns some tensors opens it and writes them at their offsets,
in any order. Memory stays at one tensor, and several ranks can fill one file without talking to
each other. The result is a standard safetensors file (readable by `safetensors.safe_open`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch

from ..safe_fs import open_existing, open_new

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def nbytes_of(dtype: torch.dtype, shape) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


class SafetensorsFileWriter:
    """A planned safetensors file.

    Args:
        path: the file.
        specs: ordered list of (name, dtype, shape); the file stores them in this order.
        metadata: optional ``__metadata__`` string map.
        create: write the header and size the file now (one process does this); others pass
            False and only write tensors into the existing file.
    """

    def __init__(self, path: str, specs: list, metadata: Optional[dict] = None, create: bool = True):
        self.path = path
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout = {}
        offset = 0
        for name, dtype, shape in specs:
            if name in self._layout:
                raise ValueError(f"{path}: tensor {name!r} planned twice")
            nbytes = nbytes_of(dtype, shape)
            header[name] = {"dtype": st_dtype(dtype), "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (dtype, tuple(shape), offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)  # keep data 8-byte aligned, as safetensors does
        self._header = len(raw).to_bytes(8, "little") + raw
        self._data_start = len(self._header)
        self.total_bytes = self._data_start + offset
        self._file = None
        self.checksums: dict = {}
        if create:
            with os.fdopen(open_new(path), "wb") as f:
                f.write(self._header)
                f.truncate(self.total_bytes)

    def write(self, name: str, tensor: torch.Tensor) -> str:
        """Write one planned tensor; returns its sha256."""
        if name not in self._layout:
            raise KeyError(f"{self.path}: tensor {name!r} is not in this file's plan")
        if name in self.checksums:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        dtype, shape, offset, nbytes = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {tensor.dtype}{tuple(tensor.shape)}, "
                             f"planned {dtype}{shape}")
        data = tensor_bytes(tensor)
        if self._file is None:
            self._file = os.fdopen(open_existing(self.path), "r+b")
        self._file.seek(self._data_start + offset)
        self._file.write(data)
        digest = hashlib.sha256(data).hexdigest()
        self.checksums[name] = digest
        return digest

    def close(self) -> dict:
        """Flush and fsync what this process wrote; returns {tensor: sha256} of those tensors."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        return dict(self.checksums)

    def missing(self, written: set) -> list:
        """Planned tensors not in ``written`` (the union over all writing processes)."""
        return sorted(set(self._layout) - set(written))

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
