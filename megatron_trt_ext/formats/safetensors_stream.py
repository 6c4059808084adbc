"""A safetensors file laid out in advance and written one tensor at a time, by any process.

The header (names, dtypes, shapes, byte offsets) is known before any data exists, because the
plan is computed on shape-only tensors first. So one process creates the file (header, then the
full size), and every process that owns some tensors opens it and writes them at their offsets,
in any order. Memory stays at one tensor, and several ranks can fill one file without talking to
each other. The result is a standard safetensors file (readable by `safetensors.safe_open`).
Several ranks can also fill one tensor, a range of rows each (``write(..., rows=(first, stop))``,
for the large units the plan splits, `plan.SplitPolicy`): rows are contiguous in the file, so a
range is one positional write at its own offset, with a checksum of its own
(`checksum.range_key`). The creating rank sizes the file before any other opens it (the export
agrees on the files' creation before any writes), so no writer truncates or extends it.

Each tensor is written in one pass over its bytes, in chunks of about `CHUNK_BYTES` (whole rows):
per chunk the NaN/Inf check, the unit's verification fingerprint where this tensor holds the
unit's bytes (its block hashes taken from the checksum's state, `fingerprint.BlockHashes.follow`),
the checksum and the ``pwrite``, while the chunk is in the CPU cache. A strided
tensor is made contiguous a chunk at a time, never whole.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .. import checksum
from ..finite import check_finite
from ..safe_fs import open_existing, open_new
from .disk import pwrite_all, start_writeback

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# Bytes per chunk of the write pass: small enough that the check, the fingerprint and the hash
# read it from the cache after the first touch, large enough that per-chunk overheads vanish.
CHUNK_BYTES = 1 << 20
_ZEROS = memoryview(bytes(CHUNK_BYTES))


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


def checksum_of(tensor) -> str:
    """The checksum (`checksum.ALGORITHM`) of a tensor's or `layouts.RowBlocks`' bytes."""
    return checksum.hexdigest(data for _, data in chunks(tensor))


def byte_blocks(tensor) -> list:
    """The bytes of a tensor, or of each block of a `layouts.RowBlocks` (zero blocks included),
    in file order."""
    parts = getattr(tensor, "parts", None)
    if parts is None:
        return [tensor_bytes(tensor)]
    return [tensor_bytes(p) if isinstance(p, torch.Tensor) else bytes(p.nbytes) for p in parts]


def chunks(tensor, rows_multiple: int = 1):
    """``(rows, bytes)`` of a host tensor (or each block of a `layouts.RowBlocks`) in file order,
    about `CHUNK_BYTES` at a time: ``rows`` a contiguous [n, ...] tensor of whole rows (None for
    the zeros of a `layouts.ZeroRows`), ``bytes`` its memory. Chunks hold a multiple of
    ``rows_multiple`` rows (the last one: what is left)."""
    parts = getattr(tensor, "parts", None)
    for part in ([tensor] if parts is None else parts):
        if not isinstance(part, torch.Tensor):  # ZeroRows
            left = part.nbytes
            while left:
                n = min(left, CHUNK_BYTES)
                yield None, _ZEROS[:n]
                left -= n
            continue
        t = part.detach()
        if t.dim() == 0:
            t = t.reshape(1)
        if t.numel() == 0:
            continue
        row_bytes = t[0].numel() * t.element_size()
        step = max(1, CHUNK_BYTES // row_bytes // rows_multiple) * rows_multiple
        for i in range(0, t.shape[0], step):
            rows = t[i:i + step].contiguous()
            yield rows, memoryview(rows.reshape(-1).view(torch.uint8).numpy())


class SafetensorsFileWriter:
    """A planned safetensors file.

    Args:
        path: the file.
        specs: ordered list of (name, dtype, shape); the file stores them in this order.
        metadata: optional ``__metadata__`` string map.
        create: write the header and size the file now (one process does this); others pass
            False and only write tensors into the existing file.
        pool: a `write_pool.WritePool`: tensors are then checked (when the pool says so),
            fingerprinted, hashed and written in its threads, and `close` waits for them.
            Without one, `write` hashes and writes before it returns.
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
        self._rows: dict = {}  # tensor -> row ranges this process wrote (a whole tensor: all its rows)
        if create:
            with os.fdopen(open_new(path), "wb") as f:
                f.write(self._header)
                f.truncate(self.total_bytes)

    def write(self, name: str, tensor, rows: Optional[tuple] = None) -> Optional[str]:
        """Write one planned tensor (or `layouts.RowBlocks`); returns its checksum, or None when
        a pool writes it (then `close` returns it). ``rows``: ``tensor`` is rows (first, stop)
        of the planned tensor (other processes may write the other rows); its checksum is then
        listed under `checksum.range_key`."""
        if name not in self._layout:
            raise KeyError(f"{self.path}: tensor {name!r} is not in this file's plan")
        dtype, shape, offset, nbytes = self._layout[name]
        key, planned = name, shape
        whole = (0, shape[0] if shape else 1)
        if rows is not None:
            first, stop = rows
            if not shape or not 0 <= first < stop <= shape[0]:
                raise ValueError(f"{self.path}: rows {first}:{stop} of tensor {name!r} lie outside its shape {shape}")
            row_bytes = nbytes // shape[0]
            offset, nbytes = offset + first * row_bytes, (stop - first) * row_bytes
            key, planned = checksum.range_key(name, first, stop), (stop - first, *shape[1:])
        done = self._rows.setdefault(name, [])
        span = rows or whole
        if any(a < span[1] and span[0] < b for a, b in done):
            raise ValueError(f"{self.path}: tensor {name!r} written twice" +
                             (f" (rows {span[0]}:{span[1]})" if rows is not None else ""))
        if tensor.dtype != dtype or tuple(tensor.shape) != planned:
            raise ValueError(f"{self.path}: tensor {key!r} is {tensor.dtype}{tuple(tensor.shape)}, "
                             f"planned {dtype}{planned}")
        done.append(span)
        if self._fd is None:
            self._fd = open_existing(self.path)
        self.checksums[key] = None
        name = key
        if self.pool is None:
            return self._write_chunks(name, tensor, self._data_start + offset, nbytes)
        if tensor.device.type != "cpu":
            # copied to the host here, in the stream order of the caller's thread: a writer thread's
            # own stream would not wait for the kernels that produced the tensor
            tensor = _to_host(tensor)
        # decided here, in submit order: the first write of some bytes hashes and checks them
        entry, first = self.pool.claim_digest(tensor)
        job = self.pool.take_fingerprint(tensor)
        self.pool.submit(self._write_chunks, name, tensor, self._data_start + offset, nbytes, entry, first, job)
        return None

    def _write_chunks(self, name: str, tensor, start: int, nbytes: int, entry=None, first: bool = True,
                      job=None) -> str:
        """Check, fingerprint, hash and write, chunk by chunk (in a writer thread when there is
        a pool). Bytes that another write of the unit hashes already are only written
        (`WritePool.claim_digest`); ``job``: the unit's fingerprint computed in this pass."""
        pool = self.pool
        digest = checksum.new() if first else None
        check = first and pool is not None and pool.check_finite
        acc = job.accumulator() if job is not None else None
        # the fingerprint's block hashes read off the checksum's own state: one hash pass, not two
        follow = acc is not None and digest is not None and acc.can_follow(checksum.ALGORITHM)
        value = None
        try:
            if tensor.device.type != "cpu":  # no pool: this thread, the caller's stream order
                tensor = _to_host(tensor)
            offset = start
            for rows, data in chunks(tensor, acc.step if acc is not None else 1):
                if check and rows is not None:
                    check_finite(name, rows)
                if acc is not None and not follow:
                    acc.update(rows.reshape(rows.shape[0], -1))
                pwrite_all(self._fd, data, offset)
                if follow:
                    acc.follow(digest, data)
                elif digest is not None:
                    digest.update(data)
                offset += len(data)
            if offset - start != nbytes:
                raise ValueError(f"{self.path}: tensor {name!r} produced {offset - start} bytes, planned {nbytes}")
            start_writeback(self._fd, start, nbytes)
            if digest is not None:
                value = digest.hexdigest()
            if acc is not None:
                job.finish(acc)
        finally:
            if first and pool is not None:
                pool.publish_digest(entry, value)  # None after a failure: the others hash for themselves
        if value is None:
            value = pool.wait_digest(entry) or checksum_of(tensor)
        self.checksums[name] = value
        return value

    def close(self) -> dict:
        """Finish this process's writes and fsync them (one fsync per file, after all its
        writes); returns {tensor: checksum} of those tensors."""
        if self.pool is not None:
            self.pool.wait()
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        return dict(self.checksums)

    def missing(self, written: set) -> list:
        """Planned tensors not in ``written`` (the union over all writing processes' checksum
        keys; a tensor written by rows counts when its ranges cover it exactly once)."""
        ranges: dict = {}
        for key in written:
            name, rows = checksum.parse_key(key)
            ranges.setdefault(name, []).append(rows)
        out = []
        for name, (_, shape, _, _) in self._layout.items():
            parts = ranges.get(name)
            by_rows = parts is not None and parts != [None]
            if parts is None or (by_rows and (None in parts or not shape or checksum.rows_problem(parts, shape[0]))):
                out.append(name)
        return sorted(out)

    def abort(self) -> None:
        if self.pool is not None:
            self.pool.wait(raise_errors=False)  # never close a descriptor a writer thread still uses
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
