"""Async exports: the trainer copies its shards into shared host memory (the only stall) and a
worker process does the rest.

Snapshot slots (`slots.SlotTable`: a slot holds one save's tensors and metadata, with a lock;
the messages both sides exchange are the dataclasses of `slots`). Slot 0 is allocated at attach; slot 1 only
the first time a save comes while the worker still exports from slot 0, so a save is never lost
to a busy worker: it is snapshotted into the free slot at once (training waits only for that
copy) and exported as soon as the running export ends. A newer save replaces an older one that
has not started yet (newest wins; the older one is recorded as skipped). The worker holds the
lock of the slot it exports from; the trainer writes into the slot it can lock, so neither ever
waits on the other for longer than one copy.

Decisions that involve several ranks (restart the workers, wait for them, whether a snapshot
worked everywhere) are taken together, with an all-gather on the trainers' control group, so
every rank does the same at every save. The workers of all ranks agree among themselves on which
iteration to export next (see `worker`).

Every wait is bounded: the worker beats a shared heartbeat while it makes progress; a worker
silent for longer than ``timeout_s`` while it has work (stopped, hung) is killed, its export is
recorded as failed, and fresh workers start at the next save.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from multiprocessing.connection import wait as wait_any
from typing import Optional

import torch

from . import manifest as mf
from .errors import ConfigError
from .plan import torch_dtype
from .publish import record_failure
from .result import ExportResult
from .slots import (NUM_SLOTS, Broken, Done, SaveMeta, SlotState, SlotTable, Started, Stop, Superseded,
                    Wake)
from .utils import free_port
from .worker import worker_main

logger = logging.getLogger("megatron_trt_ext")


class HostPins:
    """Page-locks host buffers on CUDA machines (so device-to-host copies are asynchronous) and
    unlocks exactly those again at `release`: page-locked memory is scarce and outlives nothing
    on its own (the registration lasts until it is undone, whoever holds the tensor)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._registered: list = []  # (data pointer, the buffer: kept alive while registered)

    def pin(self, buffers: dict) -> None:
        if not self.enabled:
            return
        cudart = torch.cuda.cudart()
        for buf in buffers.values():
            if buf.numel() and int(cudart.cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 0)) == 0:
                self._registered.append((buf.data_ptr(), buf))

    def release(self) -> None:
        """Unregister every range `pin` registered (idempotent)."""
        registered, self._registered = self._registered, []
        if registered:
            cudart = torch.cuda.cudart()
            for ptr, _ in registered:
                cudart.cudaHostUnregister(ptr)


class BackgroundExporter:
    """Owns the snapshot slots and the worker process of one rank."""

    def __init__(self, exporter):
        if mp.current_process().daemon:
            raise ConfigError("mode: async starts an export worker process, and this training process is a "
                              "daemonic multiprocessing child, which may not have children; use mode: sync "
                              "(or start training from a non-daemonic process)")
        self.exporter = exporter
        self.job = exporter.job
        self.comm = exporter.comm
        self.timeout_s = float(self.job.config.timeout_s)
        self._ctx = mp.get_context("spawn")
        self.slots = SlotTable(self.job.needed_pieces(), {u.name: torch_dtype(u.dtype) for u in self.job.units})
        self.snapshot_bytes = sum(b.numel() * b.element_size() for b in self.slots.buffers[0].values())
        self.heartbeat = torch.zeros(1, dtype=torch.float64).share_memory_()
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._pins = HostPins(self._stream is not None)
        self._pins.pin(self.slots.buffers[0])
        self.proc = None
        self.conn = None
        self.outstanding: dict = {}   # iteration -> (submitted unix time, stall seconds)
        self.running: Optional[int] = None  # the iteration the worker said it started
        self.last: Optional[ExportResult] = None
        self.needs_restart = False
        self.gone = False
        self.gone_reason = None
        self._clobbered = None
        self._serve_due: set = set()  # pending saves due for a refit (a newer save replacing one inherits it)
        self._event = None
        self._start_worker()

    # ------------------------------------------------------------------ worker lifecycle
    def _start_worker(self) -> None:
        """Collective: every rank starts its worker; the workers rendezvous on a store that
        rank 0's worker serves, whatever launcher environment they inherit."""
        endpoint = (os.environ.get("MASTER_ADDR") or socket.gethostname(), free_port()) if self.comm.rank == 0 else None
        addr, port = self.comm.all_gather_object(endpoint)[0]
        # A killed worker may have died holding a slot's lock: every generation gets new locks.
        self.slots.locks = [self._ctx.Lock() for _ in range(NUM_SLOTS)]
        for slot in self.slots.slots_in(SlotState.TAKEN):  # its export died with the old worker
            self.slots.set_state(slot, SlotState.EMPTY)
        parent, child = self._ctx.Pipe()
        self.heartbeat[0] = time.time()
        self.proc = self._ctx.Process(
            target=worker_main, daemon=True, name=f"megatron-trt-ext-worker-{self.comm.rank}",
            args=(child, self.job, self.slots, self.heartbeat, addr, port))
        self.proc.start()
        child.close()
        self.conn = parent
        self.needs_restart = False
        self.gone = False
        self.running = None
        if self.slots.slots_in(SlotState.PENDING):
            self._send(Wake())  # a save that the previous worker never started (its metadata is in the slot)

    def _stop_worker(self, grace_s: float = 5.0) -> None:
        """Ask the worker to stop; kill it when it does not within ``grace_s`` (bounded)."""
        if self.proc is None:
            return
        self._send(Stop())
        self.proc.join(grace_s)
        if self.proc.is_alive():
            self.proc.kill()  # SIGKILL also ends a stopped (SIGSTOP) process
            self.proc.join(5)
        self.conn.close()
        self.proc = None

    def _send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (OSError, BrokenPipeError, ValueError):
            pass  # a dead worker: its sentinel tells the rest

    # ------------------------------------------------------------------ results
    def _record(self, result: ExportResult) -> ExportResult:
        self.outstanding.pop(result.iteration, None)
        self.last = result
        self.exporter.record(result)
        if result.status == "failed":
            logger.error("async export of iteration %d failed, training continues: %s",
                         result.iteration, result.error)
        elif result.status == "skipped":
            logger.warning("export of iteration %d skipped: %s", result.iteration, result.error)
        return result

    def _handle(self, msg) -> None:
        match msg:
            case Started(iteration):
                self.running = iteration
            case Done(result):
                self.running = None
                if result.iteration in self.outstanding:
                    submitted, stall = self.outstanding[result.iteration]
                    result.timings["stall_s"] = stall
                    # the export's own time (what its bandwidth is measured on), then the time since
                    # the save, which also counts waiting for the worker (its start-up, an export ahead)
                    result.timings.setdefault("export_s", result.timings.get("total_s"))
                    result.timings["total_s"] = time.time() - submitted
                self._record(result)  # a broken process group comes as Broken next: then the worker restarts
            case Superseded(old, new):
                if old in self.outstanding:
                    self._skipped(old, new)
            case Broken(reason):
                self._worker_gone(f"export worker of rank {self.comm.rank} stopped: {reason}")

    def _skipped(self, old: int, new: int) -> None:
        stall = self.outstanding[old][1]
        self._record(ExportResult(old, None, "skipped", list(self.job.config.formats), {"stall_s": stall}, 0,
                                  f"replaced by the newer save of iteration {new} before its export started "
                                  "(busy_policy=skip: newest wins)"))

    def _worker_gone(self, error: str) -> None:
        """The worker died, was killed or gave up: its running export failed (recorded by rank 0,
        which owns the directory); saves not yet started stay in their slots for the next worker."""
        self.needs_restart = True
        self.gone = True
        self.gone_reason = error
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        iteration, self.running = self.running, None
        logger.error("%s", error)
        if iteration is None or iteration not in self.outstanding:
            return
        self._fail(iteration, f"{error} during iteration {iteration}")

    def _fail(self, iteration: int, error: str) -> None:
        path = None
        if self.comm.rank == 0:
            path = record_failure(self.job.root, iteration, self.job.manifest_base(iteration), error)
        stall = self.outstanding.get(iteration, (0, 0.0))[1]
        self._record(ExportResult(iteration, path, "failed", list(self.job.config.formats), {"stall_s": stall}, 0,
                                  error))

    def _drain(self, block_s: float) -> bool:
        """Handle the worker's messages for up to ``block_s``; False when it is gone."""
        if self.proc is None or self.gone:
            return False
        ready = wait_any([self.conn, self.proc.sentinel], timeout=block_s)
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            pass
        if self.gone:
            return False
        if self.proc.sentinel in ready or not self.proc.is_alive():
            self.proc.join(5)
            self._worker_gone(f"export worker of rank {self.comm.rank} died (exit code {self.proc.exitcode})")
            return False
        return True

    def _silent_for(self) -> float:
        return time.time() - float(self.heartbeat[0])

    def _check_hung(self) -> None:
        """A worker that has work and shows no progress for timeout_s (+ grace) is killed."""
        limit = self.timeout_s + self.comm.grace_s
        if self.outstanding and not self.gone and self.proc is not None and self._silent_for() > limit:
            self._worker_gone(f"export worker of rank {self.comm.rank} made no progress for "
                              f"{self._silent_for():.0f} s (hung or stopped; timeout_s={self.timeout_s:.0f}); "
                              "killed")

    def poll(self) -> None:
        self._drain(0)

    def wait(self) -> Optional[ExportResult]:
        """Until every submitted save is exported, failed or skipped. Bounded: a worker that shows
        no progress for ``timeout_s`` (plus a short grace) while it has work is killed, and what it
        had not exported is recorded as failed."""
        while self.outstanding:
            if not self._drain(0.5):
                for iteration in sorted(self.outstanding):  # nobody is left to export them
                    self._fail(iteration, f"{self.gone_reason or 'the export worker is gone'}; the save of "
                                          f"iteration {iteration} was not exported")
                for slot in self.slots.slots_in(SlotState.PENDING):
                    self.slots.set_state(slot, SlotState.EMPTY)
                break
            self._check_hung()
        return self.last

    # ------------------------------------------------------------------ the trigger
    def submit(self, iteration: int, serve: bool = True) -> ExportResult:
        t_submit, t0 = time.time(), time.perf_counter()
        self.poll()
        self._check_hung()
        config = self.job.config
        states = self.comm.all_gather_object((self.needs_restart or self.gone, bool(self.outstanding)))
        if config.busy_policy == "wait" and any(busy for _, busy in states):
            self.wait()
            states = self.comm.all_gather_object((self.needs_restart or self.gone, False))
        if any(restart for restart, _ in states):
            self._stop_worker()
            self._start_worker()
        error = None
        try:
            s0 = time.perf_counter()
            slot, probe, probe_s = self._snapshot(iteration)
            snapshot_s = time.perf_counter() - s0
        except Exception as exc:  # noqa: BLE001 - agreed below: every rank gives this save up
            slot, snapshot_s = None, 0.0
            error = f"snapshot on rank {self.comm.rank} failed: {type(exc).__name__}: {exc}"
        failures = self.comm.agree(error)
        stall = time.perf_counter() - t0
        if self._clobbered is not None and self._clobbered in self.outstanding:
            serve = serve or self._clobbered in self._serve_due  # its refit is not lost with it
            self._skipped(self._clobbered, iteration)  # its slot now holds this save (or garbage)
        self._serve_due = {i for i in self._serve_due if i in self.outstanding} | ({iteration} if serve else set())
        if failures:
            if slot is not None:
                self._release(slot, publish=False)
            message = f"export of iteration {iteration} failed on rank {failures[0][0]}: {failures[0][1]}"
            self.outstanding[iteration] = (t_submit, stall)
            self._fail(iteration, message)
            return self.last
        self.outstanding[iteration] = (t_submit, stall)
        timings = {"stall_s": stall, "snapshot_s": snapshot_s, "probe_s": probe_s,
                   "snapshot_bytes": self.snapshot_bytes, "submitted_unix": t_submit, "serve_due": serve}
        self._release(slot, publish=True, iteration=iteration, meta=SaveMeta(timings, probe))
        # (the exporter shows it as its last result until the final one arrives)
        return ExportResult(iteration, self.job.root / mf.export_dir_name(iteration), "running",
                            list(config.formats), {"stall_s": stall, "snapshot_s": snapshot_s})

    def _snapshot(self, iteration: int) -> tuple:
        """Copy this rank's slices into a free slot; returns (slot, probe record, probe seconds),
        the slot still locked (`_release` publishes it). A pending save whose slot this overwrites
        is left in ``_clobbered``."""
        self._clobbered = None
        source = self.exporter.take_source()  # the probe, then (quantized exports) a calibrated replica
        slots = self.slots
        slot = slots.lock_free(self.timeout_s)
        try:
            if slots.state(slot) == SlotState.PENDING:
                self._clobbered = slots.iteration(slot)
            slots.set_state(slot, SlotState.EMPTY)
            storage = slots.ensure_buffers(slot)  # the second slot, the first time a save finds the worker busy
            if storage is not None:
                self._pins.pin(storage.buffers)
                self._send(storage)
            self._copy(source.local, slots.buffers[slot])
            return slot, source.probe, source.probe_s
        except BaseException:
            slots.locks[slot].release()
            raise
        finally:
            del source

    def _copy(self, live: dict, buffers: dict) -> None:
        by_key = {(name, p.offset, tuple(p.tensor.shape)): p.tensor for name, pieces in live.items() for p in pieces}
        self._event = None
        if self._stream is None:
            with torch.no_grad():
                for key, buf in buffers.items():
                    buf.copy_(by_key[key].detach())
            return
        # GPU: copies on a side stream after the work that produced the weights; later work on the
        # training stream (the optimizer step) waits for the copies, the host thread does not.
        current = torch.cuda.current_stream()
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream), torch.no_grad():
            for key, buf in buffers.items():
                source = by_key[key].detach()
                source.record_stream(self._stream)  # a calibration replica's memory must outlive the copy
                buf.copy_(source, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record(self._stream)
        current.wait_stream(self._stream)

    def _release(self, slot: int, publish: bool, iteration: Optional[int] = None,
                 meta: Optional[SaveMeta] = None) -> None:
        """Unlock the slot; when ``publish``, first store the save's metadata in it, then mark it
        pending (on GPU once the side-stream copies are done, without blocking the trainer) and
        wake the worker. Whatever the worker finds pending is whole: tensors and metadata."""
        event, lock, slots = self._event, self.slots.locks[slot], self.slots
        if publish:
            storage = slots.write_meta(slot, iteration, meta)
            if storage is not None:  # a larger metadata buffer: the worker has it before the slot is pending
                self._send(storage)

        def finish():
            if event is not None:
                event.synchronize()
            if publish:
                slots.set_state(slot, SlotState.PENDING)
            lock.release()
            if publish:
                self._send(Wake())

        if event is None or not publish:
            finish()
        else:
            threading.Thread(target=finish, daemon=True, name="megatron-trt-ext-snapshot").start()

    def close(self) -> None:
        """Finish every submitted export (bounded, see `wait`), then stop the worker."""
        try:
            self.wait()
        finally:
            self._stop_worker()
            if self._event is not None:  # no copy may still write into a range being unpinned
                self._event.synchronize()
            self._pins.release()
