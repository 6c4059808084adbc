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
from .disk import pwrite_all, start_writeback

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


def _to_host(tensor):
    parts = getattr(tensor, "parts", None)
    if parts is None:
        return tensor.detach().cpu()
    from ..layouts import RowBlocks

    return RowBlocks([p.detach().cpu() if isinstance(p, torch.Tensor) else p for p in parts])


def sha256_of(tensor) -> str:
    digest = hashlib.sha256()
    for data in byte_blocks(tensor):
        digest.update(data)
    return digest.hexdigest()


def byte_blocks(tensor) -> list:
    """The bytes of a tensor, or of each block of a `layouts.RowBlocks` (zero blocks included),
    in file order."""
    parts = getattr(tensor, "parts", None)
    if parts is None:
        return [tensor_bytes(tensor)]
    return [tensor_bytes(p) if isinstance(p, torch.Tensor) else bytes(p.nbytes) for p in parts]


class SafetensorsFileWriter:
    """A planned safetensors file.

    Args:
        path: the file.
        specs: ordered list of (name, dtype, shape); the file stores them in this order.
        metadata: optional ``__metadata__`` string map.
        create: write the header and size the file now (one process does this); others pass
            False and only write tensors into the existing file.
        pool: a `write_pool.WritePool`: tensors are then written and hashed in its threads,
            and `close` waits for them. Without one, `write` does both before it returns.
    """

    def __init__(self, path: str, specs: list, metadata: Optional[dict] = None, create: bool = True,
                 pool=None):
        self.path = path
        self.pool = pool
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
        self._fd: Optional[int] = None
        self.checksums: dict = {}
        if create:
            with os.fdopen(open_new(path), "wb") as f:
                f.write(self._header)
                f.truncate(self.total_bytes)

    def write(self, name: str, tensor) -> Optional[str]:
        """Write one planned tensor (or `layouts.RowBlocks`); returns its sha256, or None when a
        pool writes it (then `close` returns it)."""
        if name not in self._layout:
            raise KeyError(f"{self.path}: tensor {name!r} is not in this file's plan")
        if name in self.checksums:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        dtype, shape, offset, nbytes = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {tensor.dtype}{tuple(tensor.shape)}, "
                             f"planned {dtype}{shape}")
        if self._fd is None:
            self._fd = open_existing(self.path)
        self.checksums[name] = None
        if self.pool is None:
            return self._write_blocks(name, tensor, self._data_start + offset, nbytes)
        if tensor.device.type != "cpu":
            # copied to the host here, in the stream order of the caller's thread: a writer thread's
            # own stream would not wait for the kernels that produced the tensor
            tensor = _to_host(tensor)
        self.pool.submit(self._write_blocks, name, tensor, self._data_start + offset, nbytes)
        return None

    def _write_blocks(self, name: str, tensor, start: int, nbytes: int) -> str:
        """Write and hash, block by block (in a writer thread when there is a pool). Bytes that
        another task of the unit hashes already are only written (`WritePool.claim_digest`)."""
        pool = self.pool
        entry, first = pool.claim_digest(tensor) if pool is not None else (None, True)
        digest = hashlib.sha256() if first else None
        value = None
        try:
            offset = start
            for data in byte_blocks(tensor):
                pwrite_all(self._fd, data, offset)
                if digest is not None:
                    digest.update(data)
                offset += len(data)
            if offset - start != nbytes:
                raise ValueError(f"{self.path}: tensor {name!r} produced {offset - start} bytes, planned {nbytes}")
            start_writeback(self._fd, start, nbytes)
            if digest is not None:
                value = digest.hexdigest()
        finally:
            if first and pool is not None:
                pool.publish_digest(entry, value)  # None after a failure: the others hash for themselves
        if value is None:
            value = pool.wait_digest(entry) or sha256_of(tensor)
        self.checksums[name] = value
        return value

    def close(self) -> dict:
        """Finish this process's writes and fsync them; returns {tensor: sha256} of those tensors."""
        if self.pool is not None:
            self.pool.wait()
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        return dict(self.checksums)

    def missing(self, written: set) -> list:
        """Planned tensors not in ``written`` (the union over all writing processes)."""
        return sorted(set(self._layout) - set(written))

    def abort(self) -> None:
        if self.pool is not None:
            self.pool.wait(raise_errors=False)  # never close a descriptor a writer thread still uses
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
