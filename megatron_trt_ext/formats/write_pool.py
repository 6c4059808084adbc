"""Writing, checking and hashing in background threads while the caller converts the next tensor.

Per tensor, an export casts, checks, fingerprints, hashes and writes. The cast happens where the
unit is assembled (`gather.exchange`); the rest is one pass over the tensor's bytes, chunk by
chunk, in these threads (`safetensors_stream`): each chunk is checked for NaN/Inf, fed to the
unit's verification fingerprint when this tensor holds the unit's bytes, hashed and written while
it is in the cache. ``pwrite``, the hash and the matrix products release the GIL, so threads overlap
them with the next unit's transfer and cast. Memory stays bounded: the caller announces each unit
with its size (`begin`), and a unit only starts while the units whose writes are still running
hold less than ``budget_bytes`` (or none run at all), so at most about one extra unit is alive at
a time.

Errors of background work (a full disk, a NaN found) are kept and raised at the next `submit` or
`wait`, so a failure surfaces in the unit that follows it at the latest, and never gets lost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch


def _load_malloc_trim():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    return fn


_malloc_trim = _load_malloc_trim()


def release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``; nothing elsewhere)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class _Unit:
    __slots__ = ("nbytes", "tasks", "sealed", "digests", "fingerprints")

    def __init__(self, nbytes: int):
        self.nbytes, self.tasks, self.sealed = nbytes, 0, False
        self.digests: dict = {}
        self.fingerprints: list = []  # fingerprint jobs of the unit (`verification.fingerprint._Job`)


class _Digest:
    """One tensor's checksum, computed by the first writer of its bytes, awaited by the others.
    It holds the tensor, so no other tensor of the unit can take its memory (and its key)."""

    __slots__ = ("tensor", "value", "done")

    def __init__(self, tensor):
        self.tensor, self.value, self.done = tensor, None, threading.Event()


class WritePool:
    """A few writer threads with a memory budget.

    Args:
        threads: writer threads (pwrite, checks, fingerprints and hashes run in them).
        budget_bytes: how many bytes of units whose writes are unfinished may be alive when the
            next unit starts; a unit always starts when nothing else is in flight.
        check_finite: the writes refuse tensors holding NaN or Inf (`finite`), checked on each
            chunk as it is written.
    """

    def __init__(self, threads: int = 2, budget_bytes: int = 0, check_finite: bool = False):
        self.budget_bytes = budget_bytes
        self.check_finite = check_finite
        self._executor = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="megatron-trt-ext-write")
        self._cond = threading.Condition()
        self._pending = 0   # tasks queued or running
        self._held = 0      # bytes of units not finished writing
        self._error: Optional[BaseException] = None
        self._unit = _Unit(0)
        self._unit.sealed = True

    # ------------------------------------------------------------------ units
    def begin(self, nbytes: int) -> None:
        """A new unit of ``nbytes`` starts: wait until earlier units leave room for it. Never
        raises (the caller's transfers must go on after a write failure).

        Before a unit larger than the budget (the vocabulary tables), once every earlier write
        is done, the C heap's free pages go back to the system: the smaller units before it
        leave freed blocks that malloc keeps (below its mmap threshold), and they would count
        on top of the largest tensor in the process's peak memory."""
        self.end()
        with self._cond:
            while self._held and self._held + nbytes > self.budget_bytes:
                self._cond.wait()
            drained = self._held == 0
            self._unit = _Unit(nbytes)
            self._held += nbytes
        if drained and nbytes > self.budget_bytes:
            release_free_heap()

    def end(self) -> None:
        """No more writes for the current unit: fingerprints no write took run as tasks of their
        own, and its bytes are freed once its tasks finish."""
        with self._cond:
            unit = self._unit
            if unit.sealed:
                return
            left, unit.fingerprints = unit.fingerprints, []
        if self._error is None:  # after a failure the export is lost: nothing more to compute
            for job in left:
                self._submit(unit, job.run)
        with self._cond:
            unit.sealed = True
            self._release_if_done(unit)

    def _release_if_done(self, unit: _Unit) -> None:
        if unit.sealed and unit.tasks == 0:
            unit.digests.clear()
            unit.fingerprints.clear()
            if unit.nbytes:
                self._held -= unit.nbytes
                unit.nbytes = 0
                self._cond.notify_all()

    # ------------------------------------------------------------------ tasks
    def submit(self, fn, *args) -> None:
        """Run ``fn(*args)`` in a writer thread, counted against the current unit."""
        self.raise_if_failed()
        self._submit(self._unit, fn, *args)

    def _submit(self, unit: _Unit, fn, *args) -> None:
        with self._cond:
            unit.tasks += 1
            self._pending += 1
        self._executor.submit(self._run, unit, fn, args)

    def _run(self, unit: _Unit, fn, args) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - kept, raised in the caller's thread
            with self._cond:
                self._error = self._error or exc
        finally:
            with self._cond:
                unit.tasks -= 1
                self._pending -= 1
                self._release_if_done(unit)
                self._cond.notify_all()

    @staticmethod
    def _key(tensor) -> tuple:
        """Same memory and layout (address, shape, strides, dtype, device): the same bytes."""
        return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)

    def claim_digest(self, tensor):
        """At submit, in the caller's thread: who hashes and checks ``tensor``. The same bytes
        often go to two files (an HF tensor and the identical TensorRT-LLM one at inference TP 1);
        they are hashed and checked once. Returns ``(entry, first)``: the first write submitted
        hashes and calls `publish_digest`, the others write only and take ``wait_digest(entry)``
        (FIFO: the first is always ahead of them). Within the current unit."""
        if not isinstance(tensor, torch.Tensor):
            return None, True
        key = self._key(tensor)
        with self._cond:
            entry = self._unit.digests.get(key)
            if entry is not None:
                return entry, False
            entry = self._unit.digests[key] = _Digest(tensor)
            return entry, True

    def want_fingerprint(self, tensor, job) -> None:
        """A unit's verification fingerprint of ``tensor`` (`verification.fingerprint._Job`):
        writes of its memory compute it, or runs of its rows, in their pass (`take_fingerprint`);
        what none took runs alone at `end`."""
        with self._cond:
            self._unit.fingerprints.append(job)

    def take_fingerprint(self, tensor):
        """At submit: what of the unit's fingerprints a write of ``tensor`` computes (its
        accumulator and finish), or None."""
        if not isinstance(tensor, torch.Tensor):
            return None
        with self._cond:
            for job in self._unit.fingerprints:
                part = job.claim(tensor)
                if part is not None:
                    return part
        return None

    @staticmethod
    def publish_digest(entry, value) -> None:
        if entry is not None:
            entry.value = value
            entry.done.set()

    @staticmethod
    def wait_digest(entry):
        """The first writer's checksum (None when it failed: then hash it yourself)."""
        entry.done.wait()
        return entry.value

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def wait(self, raise_errors: bool = True) -> None:
        """Until every submitted write is done; then raise the first failure, if any."""
        self.end()
        with self._cond:
            while self._pending:
                self._cond.wait()
        if raise_errors:
            self.raise_if_failed()

    def close(self) -> None:
        """Wait for the writes (errors were or will be raised by `wait`) and stop the threads."""
        self.wait(raise_errors=False)
        self._executor.shutdown(wait=True)
