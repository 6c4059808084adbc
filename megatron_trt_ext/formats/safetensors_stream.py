"""A safetensors file written one tensor at a time.

The header (names, dtypes, shapes, byte offsets) is known before any data exists because the plan
is computed on shape-only tensors first; so the file is laid out once and each tensor is written
at its offset as it arrives. Memory stays at one tensor, whatever the file size. The result is a
standard safetensors file (readable by `safetensors.safe_open`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch

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


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


class SafetensorsFileWriter:
    """Write tensors of a fixed layout into ``path``, in any order.

    Args:
        path: file to create.
        specs: ordered list of (name, dtype, shape); the file stores them in this order.
        metadata: optional ``__metadata__`` string map.
    """

    def __init__(self, path: str, specs: list, metadata: Optional[dict] = None):
        self.path = path
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout = {}
        offset = 0
        for name, dtype, shape in specs:
            if name in self._layout:
                raise ValueError(f"{path}: tensor {name!r} planned twice")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": st_dtype(dtype), "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (dtype, tuple(shape), offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)  # keep data 8-byte aligned, as safetensors does
        self._data_start = 8 + len(raw)
        self.total_bytes = self._data_start + offset
        self._file = open(path, "wb")
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)
        self._file.truncate(self.total_bytes)
        self.checksums: dict = {}

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
        self._file.seek(self._data_start + offset)
        self._file.write(data)
        digest = hashlib.sha256(data).hexdigest()
        self.checksums[name] = digest
        return digest

    def close(self) -> None:
        missing = sorted(set(self._layout) - set(self.checksums))
        if missing:
            self._file.close()
            raise ValueError(f"{self.path}: {len(missing)} planned tensors never written, e.g. {missing[:4]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()

    @property
    def layout(self) -> dict:
        return self._layout
