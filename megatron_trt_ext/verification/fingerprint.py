"""Exact weight fingerprints: recorded at export from each Megatron source tensor, recomputed by
`verify` from the HF tensors read back through the family's inverse table (`arch.inverse`).

A fingerprint of a tensor ``T`` (viewed as a matrix: dim 0 by everything else) is two float64
vectors, ``T @ c`` (one number per row) and ``r @ T`` (one per column), where ``r`` and ``c`` are
pseudo-random vectors seeded by the tensor's name, so verify can rebuild them. A swapped pair of
rows changes two row entries, swapped columns two column entries, a transposed square matrix or a
wrong split nearly all of them, a wrong scale every entry it touches; the entry that moved says
where. Rows + columns numbers per tensor: a few MB for a model of billions of parameters.

The vectors are computed on the tensor as exported (after the cast to the export dtype), in
float64, in fixed row blocks, so identical bytes give identical numbers up to the order in which
the BLAS library sums one row (a relative 1e-12 of the row's absolute sum is allowed; one bf16
ulp of one element moves an entry by ~1e-4 of it). Quantized tensors are compared after
dequantization within the format's rounding (`compare`).

Unquantized exports record most tensors more cheaply and just as exactly: a tensor of two or
more dimensions gets `BlockHashes` of its bytes as exported, in Megatron's layout, one 64-bit
hash per block of whole rows (about `HASH_BLOCK_BYTES`). Version 3 hashes are *prefix* hashes
(`PREFIX`): block k's is the XXH3-128 of the tensor's bytes up to the end of block k (its low 64
bits). Where the tensor an HF file holds is the unit's very bytes (most units), that is the
state of the write's own checksum (`checksum.ALGORITHM`, the same XXH3-128) at each block's end:
the fingerprint then costs no pass of its own over the bytes (`BlockHashes.follow`). An HF tensor
that is a run of the unit's rows (the gate and up halves of a gated fc1) gives the hashes of that
run the same way: the hashes start again at each such run (`Hashes.starts`, `_Job`). Read back
through the inverse table, the same bytes give the same hashes; a flipped bit, a swapped row or
column, a wrong split, transpose or scale changes the hash of the first block it touches and of
every block after it, so the first differing block says which rows. Version 2 files hold an
XXH3-64 of each block on its own (`BLOCKS`) and verify as before. The vectors cost ~0.9 CPU s per
GiB (the float64 conversion and two matrix-vector products), most of an export's CPU time; the
hashes ~0.05 where they need a pass of their own. Vectors stay where the read-back is not bit for
bit: quantized exports (dequantized within their rounding) and 1-D tensors (TensorRT-LLM stores
some norms as w + 1). The row ranges of a unit several ranks write are runs of their own, joined
at publish (`merge_ranges`). Files of version 1 hold vectors only and verify as before.
"""

from __future__ import annotations

import json
import re
import threading
import time
import zlib
from typing import Optional

import torch
import xxhash

from ..arch.convert import canonical_name, find_transform
from ..arch.spec import Drop, Vocab

FILE_NAME = "fingerprints.safetensors"
VERSION = 3
HASH_BLOCK_BYTES = 1 << 20  # as the write pass's chunks (`safetensors_stream.CHUNK_BYTES`)
PREFIX = "xxh3_128_prefix"  # version 3: the XXH3-128 of the bytes up to each block's end, low 64 bits
BLOCKS = "xxh3_64"  # version 2: the XXH3-64 of each block alone
_LOW64 = (1 << 64) - 1
_BLOCK = 1 << 16  # elements converted to float64 at a time: 512 KiB, cache-resident (3x faster than 8 MiB)
EXACT_REL = 1e-12
# a bound on the rms rounding error of a quantized weight relative to its values, per HF
# quant_algo; `compare` allows SIGMAS of it per entry and, for round-to-nearest formats, a gain off
# by SIGMAS of its average over the entries. AWQ clips weights on purpose (its search shrinks the
# range where that lowers the output error): a systematic gain, so no gain check, a looser bound.
QUANT_REL = {"FP8": 2 ** -4, "FP8_PER_CHANNEL_PER_TOKEN": 2 ** -4, "fp8_pb_wo": 2 ** -4, "MXFP8": 2 ** -4,
             "W8A8_SQ_PER_CHANNEL": 0.02, "NVFP4": 0.2, "W4A16_NVFP4": 0.2}
CLIPPING = {"W4A16_AWQ": 0.3, "W4A8_AWQ": 0.3}
DEFAULT_QUANT_REL = 0.3
SIGMAS = 4.0


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    return tensor.reshape(tensor.shape[0], -1)


def _vectors(name: str, rows: int, cols: int) -> tuple:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(rows, dtype=torch.float64, generator=gen), torch.randn(cols, dtype=torch.float64, generator=gen)


class Accumulator:
    """`fingerprint` of a tensor fed in row order, a chunk of rows at a time: the writer thread
    computes it in the same pass over the bytes as the finite check, the checksum and the write
    (`formats.safetensors_stream`). Chunks of a multiple of `step` rows give the very blocks
    `fingerprint` uses, so the same numbers. ``cast``: each block is cast to it first (a unit
    recorded in the export dtype from its source values, without a whole-tensor copy).
    ``rows``: (first, stop) of a tensor of ``shape`` that several ranks write by row ranges; it
    is fed those rows only and gives their row entries and their part of the column sums
    (`merge_ranges` joins the parts)."""

    def __init__(self, name: str, shape, cast: Optional[torch.dtype] = None, rows: Optional[tuple] = None):
        shape = tuple(shape)
        total = shape[0] if shape else 1
        self.cols = int(torch.Size(shape).numel()) // max(total, 1) if shape else 1
        self.r, self.c = _vectors(name, total, self.cols)
        if rows is not None:
            self.r = self.r[rows[0]:rows[1]]
        self.rows = self.r.numel()
        self.by_row = torch.empty(self.rows, dtype=torch.float64)
        self.by_col = torch.zeros(self.cols, dtype=torch.float64)
        self.step = max(1, _BLOCK // max(self.cols, 1))
        self.cast, self.done_rows, self.seconds = cast, 0, 0.0

    def update(self, chunk: torch.Tensor) -> None:
        """The next rows, as a [rows, cols] matrix."""
        t0 = time.perf_counter()
        i0, n = self.done_rows, chunk.shape[0]
        for j in range(0, n, self.step):
            block = chunk[j:j + self.step]
            if self.cast is not None:
                block = block.to(self.cast)
            block = block.to(torch.float64)
            a, b = i0 + j, i0 + j + block.shape[0]
            self.by_row[a:b] = block @ self.c
            self.by_col += self.r[a:b] @ block
        self.done_rows += n
        self.seconds += time.perf_counter() - t0

    @staticmethod
    def can_follow(checksum_algorithm: str) -> bool:
        """Vectors never come off a checksum (`BlockHashes.can_follow`)."""
        return False

    def result(self) -> tuple:
        if self.done_rows != self.rows:
            raise RuntimeError(f"fingerprint fed {self.done_rows} of {self.rows} rows")
        return self.by_row, self.by_col


class Hashes:
    """A recorded `BlockHashes` result: ``digests`` (int64 view of each block's 64-bit hash),
    the ``dtype`` whose bytes were hashed, the tensor's ``shape``, the ``algorithm`` (`PREFIX`
    or `BLOCKS`) and ``starts``: the rows where a run of blocks begins (`PREFIX` hashes start
    again from nothing at each; (0,): one run, the whole tensor)."""

    __slots__ = ("digests", "dtype", "shape", "algorithm", "starts")

    def __init__(self, digests: torch.Tensor, dtype: torch.dtype, shape: tuple, algorithm: str = PREFIX,
                 starts: tuple = (0,)):
        self.digests, self.dtype, self.shape, self.algorithm = digests, dtype, tuple(shape), algorithm
        self.starts = tuple(int(r) for r in starts)


def block_rows(cols: int, dtype: torch.dtype) -> int:
    """Rows per hashed block of a [rows, cols] tensor of ``dtype``."""
    return max(1, HASH_BLOCK_BYTES // max(1, cols * dtype.itemsize))


class BlockHashes:
    """The exact fingerprint of a tensor fed in row order (the interface of `Accumulator`, so
    the write pass computes either): a 64-bit hash of each block of `step` rows of its bytes,
    after ``cast`` when given (a block at a time), by ``algorithm`` (module docstring). Chunks of
    a multiple of `step` rows (the last one: what is left) give the blocks of `block_hashes`.
    `follow` takes the hashes from a checksum state that is fed the same bytes instead."""

    def __init__(self, shape, dtype: torch.dtype, cast: Optional[torch.dtype] = None, algorithm: str = PREFIX):
        if algorithm not in (PREFIX, BLOCKS):
            raise ValueError(f"unknown block hash {algorithm!r} (known: {PREFIX}, {BLOCKS})")
        self.shape = tuple(shape)
        self.rows = self.shape[0] if self.shape else 1
        cols = int(torch.Size(self.shape).numel()) // max(self.rows, 1) if self.shape else 1
        self.dtype = cast or dtype
        self.step = block_rows(cols, self.dtype)
        self.row_bytes = cols * self.dtype.itemsize
        self.cast, self.algorithm, self.done_rows, self.seconds = cast, algorithm, 0, 0.0
        self._state = xxhash.xxh3_128() if algorithm == PREFIX else None
        self.digests: list = []

    def update(self, chunk: torch.Tensor) -> None:
        """The next rows, as a [rows, cols] matrix."""
        t0 = time.perf_counter()
        n = chunk.shape[0]
        for j in range(0, n, self.step):
            block = chunk[j:j + self.step]
            if self.cast is not None:
                block = block.to(self.cast)
            data = memoryview(block.contiguous().reshape(-1).view(torch.uint8).numpy())
            if self._state is not None:
                self._state.update(data)
                self.digests.append(self._state.intdigest() & _LOW64)
            else:
                self.digests.append(xxhash.xxh3_64_intdigest(data))
        self.done_rows += n
        self.seconds += time.perf_counter() - t0

    def can_follow(self, checksum_algorithm: str) -> bool:
        """Whether a write's checksum state of ``checksum_algorithm``, fed this tensor's bytes as
        they are (no cast), gives these hashes (`follow`)."""
        return self.algorithm == PREFIX and self.cast is None and checksum_algorithm == "xxh3_128"

    def follow(self, digest, data) -> None:
        """Feed ``data`` (the next whole rows' bytes) to ``digest`` (a write's XXH3-128 state
        that has had exactly the rows before them) a block at a time, taking each block's hash
        from its state: the checksum and the fingerprint in one pass."""
        t0 = time.perf_counter()
        view = memoryview(data).cast("B")
        block = self.step * self.row_bytes
        for j in range(0, len(view), block):
            digest.update(view[j:j + block])
            self.digests.append(digest.intdigest() & _LOW64)
        self.done_rows += len(view) // self.row_bytes
        self.seconds += time.perf_counter() - t0

    def result(self) -> Hashes:
        if self.done_rows != self.rows:
            raise RuntimeError(f"fingerprint fed {self.done_rows} of {self.rows} rows")
        import numpy as np

        digests = torch.from_numpy(np.array(self.digests, dtype=np.uint64).view(np.int64))
        return Hashes(digests, self.dtype, self.shape, self.algorithm)


def hashed(tensor: torch.Tensor, quantized: bool) -> bool:
    """Whether a unit's fingerprint is `BlockHashes` (else vectors): module docstring. A unit
    on a GPU keeps the vectors, computed there (hashes would read its bytes to the host twice)."""
    return not quantized and tensor.dim() >= 2 and tensor.device.type == "cpu"


def block_hashes(tensor: torch.Tensor, algorithm: str = PREFIX, starts: tuple = (0,)) -> Hashes:
    """The `BlockHashes` of a whole tensor (unlike the vectors, they do not depend on its name),
    one run of blocks from each row of ``starts`` (`Hashes`)."""
    m = _matrix(tensor.detach())
    if algorithm == BLOCKS and tuple(starts) != (0,):
        raise ValueError(f"{BLOCKS} hashes have one run of blocks (starts {starts})")
    digests = []
    for a, b in zip(starts, (*starts[1:], m.shape[0])):
        acc = BlockHashes((b - a, *tensor.shape[1:]), tensor.dtype, algorithm=algorithm)
        acc.update(m[a:b])
        digests.append(acc.result().digests)
    return Hashes(torch.cat(digests), tensor.dtype, tensor.shape, algorithm, starts)


def _blocks(recorded: Hashes) -> list:
    """(first row, stop) of each block of a `Hashes`, in digest order."""
    rows = recorded.shape[0] if recorded.shape else 1
    step = block_rows(int(torch.Size(recorded.shape[1:]).numel()), recorded.dtype)
    starts = recorded.starts
    return [(r, min(r + step, b)) for a, b in zip(starts, (*starts[1:], rows)) for r in range(a, b, step)]


def fingerprint(name: str, tensor: torch.Tensor) -> tuple:
    """(T @ c, r @ T) of ``tensor`` in float64, ``r``/``c`` seeded by ``name`` (module docstring)."""
    acc = Accumulator(name, tensor.shape)
    acc.update(_matrix(tensor.detach()))
    return acc.result()


def _magnitudes(name: str, tensor: torch.Tensor, weights_sq: bool) -> tuple:
    """(|T| @ |c|, |r| @ |T|), or with ``weights_sq`` sqrt((T*T) @ (c*c)) and its column twin:
    the scale of each entry's summation error, or of its rounding noise."""
    m = _matrix(tensor.detach()).to(torch.float64)
    r, c = _vectors(name, *m.shape)
    if weights_sq:
        sq = m * m
        return (sq @ (c * c)).sqrt(), ((r * r) @ sq).sqrt()
    a = m.abs()
    return a @ c.abs(), r.abs() @ a


class Recorder:
    """The fingerprints of the units one rank writes in one export.

    ``entries``: {canonical Megatron name: (by_row, by_col)} or a string saying why that unit has
    none (AWQ pre-quant scales folded into norms change both the norm and the linear).

    With a ``pool`` (`formats.write_pool.WritePool`) the fingerprints are computed in its writer
    threads: in the write of the output tensor that holds the unit's very bytes (most units: the
    HF tensor is the unit as cast), else as a task of their own when the unit's writes are all
    submitted. ``entries`` is then complete once the pool's writes are waited for."""

    def __init__(self, spec, ctx, dtype: torch.dtype, quant=None, keep_source: frozenset = frozenset(),
                 pool=None):
        self.spec, self.ctx, self.dtype, self.quant, self.keep_source = spec, ctx, dtype, quant, keep_source
        self.pool = pool
        self.entries: dict = {}

    def add(self, name: str, tensor, timings: Optional[dict] = None) -> None:
        """Record one unit (the full tensor the writer assembled). ``timings``: gets ``fingerprint_s``
        (with a pool: the writer threads' time)."""
        t0 = time.perf_counter()
        prepared = self._prepare(name, tensor)
        if prepared is not None:
            canonical, tensor, cast = prepared
            if self.pool is not None and tensor.device.type == "cpu":
                self.pool.want_fingerprint(tensor, _Job(self, canonical, tensor, cast, timings))
            else:  # a device tensor: read in this thread, in the stream order of its kernels
                _Job(self, canonical, tensor, cast, None).run()
        if timings is not None:
            timings["fingerprint_s"] = timings.get("fingerprint_s", 0.0) + time.perf_counter() - t0

    def add_rows(self, name: str, tensor: torch.Tensor, rows: tuple, total_rows: int,
                 timings: Optional[dict] = None) -> None:
        """Record rows ``rows`` = (first, stop) of a unit several ranks write by row ranges
        (`row_split`; ``tensor``: those rows, as exported), under `checksum.range_key` (joined at
        publish: `merge_ranges`): their block hashes, runs of their own (as `add`), or, where a
        unit gets vectors, their row entries and their part of the column sums. ``total_rows``:
        the rows of the whole tensor the HF file holds (a vocabulary table's real rows, as
        `vocab_rows`); the pseudo-random vectors depend on it."""
        from ..checksum import range_key

        t0 = time.perf_counter()
        canonical = canonical_name(self.spec, name)
        transform, _ = find_transform(self.spec, canonical)
        first, stop = rows[0], min(rows[1], total_rows)
        if stop > first and transform is not None and not isinstance(transform, Drop) and tensor.is_floating_point():
            part = tensor[: stop - first]
            job = _Job(self, canonical, part, None, timings, key=range_key(canonical, first, stop),
                       rows=(first, stop), shape=(total_rows, *tensor.shape[1:]))
            if self.pool is not None and part.device.type == "cpu":
                self.pool.want_fingerprint(part, job)
            else:
                job.run()
        if timings is not None:
            timings["fingerprint_s"] = timings.get("fingerprint_s", 0.0) + time.perf_counter() - t0

    def _prepare(self, name: str, tensor):
        """(canonical name, the tensor to fingerprint, dtype to cast it to or None), or None when
        the unit has no fingerprint (then maybe a reason in ``entries``)."""
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.device.type == "meta":
            return None
        canonical = canonical_name(self.spec, name)
        transform, _ = find_transform(self.spec, canonical)
        if transform is None or isinstance(transform, Drop):
            return None
        quant = self.quant
        if quant is not None and (name in quant.fold_targets or name in quant.folded_linears):
            self.entries[canonical] = "an AWQ pre-quant scale is folded into it"
            return None
        # what the HF file holds of a unit converted from its source values: cast to the export dtype
        cast = self.dtype if tensor.dtype != self.dtype and not self._hf_keeps_source(name, transform) else None
        return canonical, vocab_rows(self.spec, self.ctx, canonical, tensor), cast

    def _hf_keeps_source(self, name: str, transform) -> bool:
        """The HF tensor of a unit converted from its source values keeps them: the family keeps
        it in float32 (`ArchSpec.keep_fp32`, DeepSeek's router); else it is cast to the export
        dtype (a router kept in float32 only for TensorRT-LLM)."""
        dst = getattr(transform, "dst", "")
        return name in self.keep_source and isinstance(dst, str) and \
            any(re.search(p, dst) for p in self.spec.keep_fp32)


class _Job:
    """One unit's fingerprint waiting in the write pool (`formats.write_pool.WritePool`).

    A write whose tensor is the unit's very memory takes it whole (`claim`: `accumulator` and
    `finish` in its pass over the bytes). With `PREFIX` block hashes a write of a run of the
    unit's rows takes those rows (the halves of a gated fc1 are two HF tensors, each a run of the
    unit's rows): each run is one run of blocks (`Hashes.starts`), hashed by the write's own
    checksum state (`BlockHashes.follow`). `run`, at the unit's end, computes what no write took
    (the whole unit, or the rows between the runs that writes took); the last part to finish
    stores the unit's entry. Identity of memory, not the conversion, decides what a write
    takes, so a wrong conversion cannot change what is recorded."""

    def __init__(self, recorder: Recorder, name: str, tensor: torch.Tensor, cast, timings,
                 key: Optional[str] = None, rows: Optional[tuple] = None, shape: Optional[tuple] = None):
        self.recorder, self.name, self.tensor, self.cast, self.timings = recorder, name, tensor, cast, timings
        # a row range (`Recorder.add_rows`): its entries key, and for vectors its rows and the
        # whole tensor's shape (block hashes of a range are a run of their own: `merge_ranges`)
        self.key, self.rows, self.shape = key or name, rows, shape
        self.taken = False  # a write took the whole fingerprint (`accumulator`/`finish`)
        # runs of rows (`PREFIX` hashes of a tensor on the host, no cast): first row -> digests
        self.by_runs = cast is None and tensor.is_contiguous() and hashed(tensor, recorder.quant is not None)
        self._lock = threading.Lock()
        self._claimed: list = []   # (first, stop) of the runs writes took
        self._runs: dict = {}      # first row -> digests of a finished run
        self._open = 1             # runs still being hashed, and the unit's end (`run`)
        self._seconds = 0.0

    # ------------------------------------------------------------------ taken by a write
    def claim(self, tensor):
        """What a write of ``tensor`` computes of this fingerprint in its pass: this job (the
        whole of it, `accumulator`/`finish`), a `_Run` of rows, or None."""
        mine = self.tensor
        if self.taken or not isinstance(tensor, torch.Tensor) or tensor.dtype != mine.dtype \
                or tensor.device != mine.device:
            return None
        if not self.by_runs:
            if _same_memory(tensor, mine):
                self.taken = True
                return self
            return None
        rows = _rows_of(tensor, mine)
        with self._lock:
            if rows is None or any(a < rows[1] and rows[0] < b for a, b in self._claimed):
                return None
            self._claimed.append(rows)
            self._open += 1
        return _Run(self, *rows)

    def accumulator(self):
        if self.rows is None:
            if hashed(self.tensor, self.recorder.quant is not None):
                return BlockHashes(self.tensor.shape, self.tensor.dtype, self.cast)
            return Accumulator(self.name, self.tensor.shape, self.cast)
        return Accumulator(self.name, self.shape, self.cast, rows=self.rows)

    def finish(self, acc: Accumulator) -> None:
        self.recorder.entries[self.key] = acc.result()
        self.tensor = None
        if self.timings is not None:
            self.timings["fingerprint_s"] = self.timings.get("fingerprint_s", 0.0) + acc.seconds

    # ------------------------------------------------------------------ the unit's end
    def run(self) -> None:
        """At the unit's end: compute what no write took."""
        if self.taken:
            return
        if not self.by_runs:
            acc = self.accumulator()
            acc.update(_matrix(self.tensor.detach()))
            self.finish(acc)
            return
        with self._lock:
            claimed = sorted(self._claimed)
        at, gaps = 0, []
        for a, b in claimed + [(self.tensor.shape[0], self.tensor.shape[0])]:
            if a > at:
                gaps.append((at, a))
            at = max(at, b)
        m = _matrix(self.tensor.detach())
        for a, b in gaps:
            acc = BlockHashes((b - a, *self.tensor.shape[1:]), self.tensor.dtype)
            acc.update(m[a:b])
            self._done(a, acc)
        self._close()

    def _done(self, first: int, acc: BlockHashes) -> None:
        """Rows from ``first`` on hashed, a run of blocks of their own."""
        with self._lock:
            self._runs[first] = acc.result().digests
            self._seconds += acc.seconds

    def _close(self) -> None:
        """A run or the unit's end is done; the last one stores the unit's entry."""
        with self._lock:
            self._open -= 1
            if self._open:
                return
        starts = tuple(sorted(self._runs))  # none: a tensor of no rows
        digests = torch.cat([self._runs[a] for a in starts]) if starts else torch.empty(0, dtype=torch.int64)
        self.recorder.entries[self.key] = Hashes(digests, self.tensor.dtype, self.tensor.shape, PREFIX, starts or (0,))
        self.tensor = None
        if self.timings is not None:
            self.timings["fingerprint_s"] = self.timings.get("fingerprint_s", 0.0) + self._seconds


class _Run:
    """Rows ``first:stop`` of a `_Job`'s unit that one write hashes in its pass (`_Job.claim`)."""

    def __init__(self, job: _Job, first: int, stop: int):
        self.job, self.first, self.stop = job, first, stop

    def accumulator(self) -> BlockHashes:
        return BlockHashes((self.stop - self.first, *self.job.tensor.shape[1:]), self.job.tensor.dtype)

    def finish(self, acc: BlockHashes) -> None:
        self.job._done(self.first, acc)
        self.job._close()


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _rows_of(tensor: torch.Tensor, whole: torch.Tensor) -> Optional[tuple]:
    """(first, stop) when ``tensor`` is the memory of rows first:stop of the contiguous
    ``whole`` (same dtype), else None."""
    if whole.dim() < 2 or tensor.dim() != whole.dim() or tuple(tensor.shape[1:]) != tuple(whole.shape[1:]) \
            or not tensor.is_contiguous() or tensor.shape[0] == 0:
        return None
    row_bytes = whole.stride(0) * whole.element_size()
    offset = tensor.data_ptr() - whole.data_ptr()
    if offset < 0 or offset % row_bytes:
        return None
    first = offset // row_bytes
    stop = first + tensor.shape[0]
    return (first, stop) if stop <= whole.shape[0] else None


def vocab_rows(spec, ctx, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A vocabulary table without Megatron's padding rows (the HF export does not hold them)."""
    transform, _ = find_transform(spec, name)
    return tensor[: ctx.vocab_size] if isinstance(transform, Vocab) else tensor


def merge_ranges(entries: dict) -> dict:
    """Entries of units written by row ranges (keys `checksum.range_key`) joined into one per
    unit. Block hashes: each range's runs, moved to its first row, one after the other (the
    hashes of a run do not depend on where it lies). Vectors (each an `Accumulator` of ``rows``):
    row entries side by side, column sums added in row order, which differs from one pass over
    the whole tensor only in the order of float64 additions, far inside `EXACT_REL` of the
    magnitudes `compare` allows. Other entries pass."""
    from .. import checksum

    out, parts = {}, {}
    for key, value in entries.items():
        name, rows = checksum.parse_key(key)
        if rows is None:
            out[key] = value
        else:
            parts.setdefault(name, []).append((rows, value))
    for name, ranges in parts.items():
        ranges.sort(key=lambda part: part[0])
        reason = next((v for _, v in ranges if isinstance(v, str)), None)
        if reason is not None:
            out[name] = reason
            continue
        gap = checksum.rows_problem([rows for rows, _ in ranges], ranges[-1][0][1])  # a lost tail: `compare`'s shape
        if gap:
            raise ValueError(f"fingerprint of {name!r} by row ranges: {gap}")
        hashes = [v for _, v in ranges if isinstance(v, Hashes)]
        if hashes:
            if len(hashes) != len(ranges) or len({(h.dtype, h.shape[1:], h.algorithm) for h in hashes}) != 1:
                raise ValueError(f"fingerprint of {name!r} by row ranges: ranges recorded in different kinds")
            starts = tuple(first + s for (first, _), h in ranges for s in h.starts)
            out[name] = Hashes(torch.cat([h.digests for h in hashes]), hashes[0].dtype,
                               (ranges[-1][0][1], *hashes[0].shape[1:]), hashes[0].algorithm, starts)
            continue
        by_col = ranges[0][1][1].clone()
        for _, (_, cols) in ranges[1:]:
            by_col += cols
        out[name] = (torch.cat([rows_part for _, (rows_part, _) in ranges]), by_col)
    return out


def save(entries: dict) -> tuple:
    """(safetensors bytes, {tensor: checksum}, skipped {name: why}) of every rank's entries
    (those of row ranges joined first: `merge_ranges`)."""
    from safetensors.torch import save

    from .. import checksum
    from ..formats.safetensors_stream import tensor_bytes

    tensors, skipped, hashes = {}, {}, {}
    for name, value in sorted(merge_ranges(entries).items()):
        if isinstance(value, str):
            skipped[name] = value
        elif isinstance(value, Hashes):
            tensors[f"{name}::{value.algorithm}"] = value.digests
            hashes[name] = [str(value.dtype).replace("torch.", ""), list(value.shape)] + \
                ([list(value.starts)] if value.starts != (0,) else [])
        else:
            tensors[f"{name}::rows"], tensors[f"{name}::cols"] = value
    sums = {k: checksum.hexdigest([tensor_bytes(v)]) for k, v in tensors.items()}
    # one metadata key: safetensors writes a map of several in no fixed order, and the file must
    # be the same bytes from any layout of the same model
    layout = {"version": VERSION, "hash_block_bytes": HASH_BLOCK_BYTES, "hashed": hashes}
    return save(tensors, metadata={"fingerprints": json.dumps(layout, sort_keys=True)}), sums, skipped


def load(path) -> dict:
    """{Megatron name: (by_row, by_col) or `Hashes`} of a fingerprints file (version 1, 2 or 3)."""
    from safetensors import safe_open

    out: dict = {}
    with safe_open(str(path), framework="pt") as f:
        layout = json.loads((f.metadata() or {}).get("fingerprints", "{}"))  # version 1: {"version": "1"}
        version = int(layout.get("version", 1))
        if version > VERSION:
            raise ValueError(f"{path}: fingerprints of version {version}; this megatron-trt-ext reads up to "
                             f"{VERSION} (upgrade it to verify this export)")
        block = int(layout.get("hash_block_bytes", HASH_BLOCK_BYTES))
        if block != HASH_BLOCK_BYTES:
            raise ValueError(f"{path}: hashed in blocks of {block} bytes; this version hashes {HASH_BLOCK_BYTES}")
        hashed_meta = layout.get("hashed", {})
        for key in f.keys():
            name, _, which = key.rpartition("::")
            value = f.get_tensor(key)
            if which in (PREFIX, BLOCKS):
                dtype, shape, *starts = hashed_meta[name]
                out[name] = Hashes(value, getattr(torch, dtype), tuple(shape), which, *starts)
            elif which not in ("rows", "cols"):
                raise ValueError(f"{path}: fingerprint {key!r} of a kind this version does not know")
            else:
                out.setdefault(name, [None, None])[0 if which == "rows" else 1] = value
    return {k: v if isinstance(v, Hashes) else tuple(v) for k, v in out.items()}


def quant_bound(algos) -> tuple:
    """(quant_rel, gain checked) for a tensor built from linears of these quant_algos; (None,
    False) for none: exact."""
    if not algos:
        return None, False
    rel = max(QUANT_REL.get(a, CLIPPING.get(a, DEFAULT_QUANT_REL)) for a in algos)
    return rel, all(a in QUANT_REL for a in algos)


def compare(name: str, recorded, tensor: torch.Tensor, quant_rel: Optional[float] = None,
            check_gain: bool = True) -> Optional[str]:
    """None when ``tensor`` (read back) has the recorded fingerprint (vectors or `Hashes`), else what differs.

    ``quant_rel``: the tensor was dequantized; each entry may differ by SIGMAS x quant_rel of its
    rounding-noise scale, and the tensor's gain (the least-squares factor between the recorded
    and the recomputed entries) by SIGMAS x quant_rel / sqrt(entries)."""
    if isinstance(recorded, Hashes):
        return _compare_hashes(recorded, tensor)
    rows, cols = recorded
    if tuple(_matrix(tensor).shape) != (rows.numel(), cols.numel()):
        return f"shape {tuple(tensor.shape)} does not give the recorded {rows.numel()} rows x {cols.numel()} columns"
    got_rows, got_cols = fingerprint(name, tensor)
    if quant_rel is None:
        mag_rows, mag_cols = _magnitudes(name, tensor, weights_sq=False)
        tol_rows, tol_cols = EXACT_REL * mag_rows + 1e-300, EXACT_REL * mag_cols + 1e-300
    else:
        mag_rows, mag_cols = _magnitudes(name, tensor, weights_sq=True)
        tol_rows, tol_cols = SIGMAS * quant_rel * mag_rows + 1e-30, SIGMAS * quant_rel * mag_cols + 1e-30
    for label, want, got, tol in (("row", rows, got_rows, tol_rows), ("column", cols, got_cols, tol_cols)):
        problem = entries_differ(label, want, got, tol)
        if problem:
            return problem
        if quant_rel is not None and check_gain and want.numel() > 1:
            energy = float((got * got).sum())
            gain = float((want * got).sum()) / energy if energy > 0 else 1.0
            limit = SIGMAS * quant_rel / want.numel() ** 0.5
            if abs(gain - 1.0) > limit:
                return f"scaled by {gain:.4f} against the exported values (allowed 1 +- {limit:.2g}): a wrong scale"
    return None


def entries_differ(label: str, want: torch.Tensor, got: torch.Tensor, tol: torch.Tensor, beyond: str = "") -> str:
    """What differs between recorded (``want``) and recomputed (``got``) row or column entries by
    more than ``tol``, naming the first; "" when none does. ``beyond``: the allowance, in words."""
    bad = ((want - got).abs() > tol).nonzero().flatten()
    if not bad.numel():
        return ""
    i = int(bad[0])
    return (f"{bad.numel()} {label}(s) differ from the exported values{beyond}, first {label} {i} "
            f"(projection {float(got[i]):.6g}, recorded {float(want[i]):.6g}, allowed diff {float(tol[i]):.2g})")


def _compare_hashes(recorded: Hashes, tensor: torch.Tensor) -> Optional[str]:
    """`compare` of a `BlockHashes` record: the read-back tensor in the recorded dtype (a reader
    that returns float32 for values stored in the export dtype converts exactly), block by block."""
    if tuple(tensor.shape) != recorded.shape:
        return f"shape {tuple(tensor.shape)}, recorded {recorded.shape}"
    blocks = _blocks(recorded)
    if len(blocks) != recorded.digests.numel():
        return f"{recorded.digests.numel()} row blocks recorded, {len(blocks)} in its shape and runs"
    got = block_hashes(tensor.detach().cpu().to(recorded.dtype), recorded.algorithm, recorded.starts).digests
    bad = (got != recorded.digests).nonzero().flatten()
    if not bad.numel():
        return None
    first, stop = blocks[int(bad[0])]
    where = f"first rows {first}:{stop}"
    size = f"blocks of {block_rows(int(torch.Size(recorded.shape[1:]).numel()), recorded.dtype)} rows"
    if recorded.algorithm == PREFIX:  # a prefix hash differs from the first bad block to its run's end
        return (f"the exported bytes differ from row block {int(bad[0])} of {got.numel()} on, {where} "
                f"(exact hash of the bytes up to each block, {size})")
    return (f"{bad.numel()} of {got.numel()} row blocks differ from the exported bytes, {where} "
            f"(exact hash of each block, {size})")
