"""Async exports: the trainer copies its shards into shared host memory (the only stall) and a
worker process does the rest.

Snapshot slots (`slots.SlotTable`: a slot holds one save's tensors and metadata, with a lock;
the messages both sides exchange are the dataclasses of `slots`). The worker starts at attach and
slot 0 is allocated then; a save is snapshotted at once into an empty slot (training waits only
for that copy), never over a queued save while an empty slot is left, and the worker exports the
queued saves oldest first. So saves that come while the workers are still starting (their first
seconds) each wait in a slot of their own, up to `slots.MAX_SLOTS`; one more waits (bounded)
until the first export starts. Under ``busy_policy: skip`` a save that comes while an export is
running replaces every queued save that has not started (newest wins; each replaced one is
recorded as skipped, naming the save that replaced it); ``wait`` waits for the running export
instead. Slots beyond `slots.STEADY_SLOTS` are given back once empty. The worker holds the lock of
the slot it exports from; the trainer writes into a slot it can lock, so neither ever waits on the
other for longer than one copy.

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
from .slots import (MAX_SLOTS, NUM_SLOTS, STEADY_SLOTS, Broken, Done, SaveMeta, SlotState, SlotTable, Started,
                    Stop, Superseded, Wake)
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

    def unpin(self, buffers: dict) -> None:
        """Unregister the ranges of these buffers (a slot whose storage is given back)."""
        ptrs = {buf.data_ptr() for buf in buffers.values()}
        mine = [(ptr, buf) for ptr, buf in self._registered if ptr in ptrs]
        if mine:
            self._registered = [entry for entry in self._registered if entry[0] not in ptrs]
            cudart = torch.cuda.cudart()
            for ptr, _ in mine:
                cudart.cudaHostUnregister(ptr)

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
        self._replaced: list = []  # queued saves the current save replaces (recorded once it is taken)
        self._serve_due: set = set()  # pending saves due for a refit (a newer save replacing one inherits it)
        self._event = None
        self._publisher: Optional[threading.Thread] = None  # marks the last save pending once its copies are done
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
        self._trim()
        return self.last

    # ------------------------------------------------------------------ the trigger
    def _state(self) -> list:
        """Collective: every rank's (needs fresh workers, an export runs, an empty slot is left)."""
        if self._publisher is not None:  # the last save's copies (GPU), issued a training step ago
            self._publisher.join(self.timeout_s)
        exporting = self.running is not None or bool(self.slots.slots_in(SlotState.TAKEN))
        return self.comm.all_gather_object((self.needs_restart or self.gone, exporting, self.slots.has_room()))

    def _await_room(self, iteration: int, states: list) -> list:
        """More early saves than slots: every slot of a rank holds a save waiting for workers that
        have not started an export yet. Waits (collectively, at most ``timeout_s``) until an
        export runs somewhere (this save then queues behind it) or a slot is empty everywhere."""
        deadline = time.monotonic() + self.timeout_s
        if not any(s[0] or s[1] for s in states) and not all(s[2] for s in states):
            logger.warning("save of iteration %d: all %d snapshot slots hold saves waiting for the export workers "
                           "to start; waiting (at most timeout_s=%.0f s) until the first export starts",
                           iteration, MAX_SLOTS, self.timeout_s)
        while not any(s[0] or s[1] for s in states) and not all(s[2] for s in states):
            if time.monotonic() > deadline:
                break
            while time.monotonic() < deadline and self._drain(0.05):
                self._check_hung()
                if self.running is not None or self.slots.slots_in(SlotState.TAKEN) or self.slots.has_room():
                    break
            states = self._state()
        return states

    def submit(self, iteration: int, serve: bool = True) -> ExportResult:
        t_submit, t0 = time.time(), time.perf_counter()
        self.poll()
        self._check_hung()
        config = self.job.config
        self._trim()
        states = self._state()
        if any(restart for restart, _, _ in states):
            self._stop_worker()
            self._start_worker()
            states = self._state()
        states = self._await_room(iteration, states)
        running = any(exporting for _, exporting, _ in states)
        if config.busy_policy == "wait" and (running or not all(room for _, _, room in states)):
            self.wait()  # a queued save never holds up a save; a running export does
            running = False
        # skip: a save behind a running export replaces the queued ones (newest wins); a save
        # that finds no export running is queued beside them (the workers are still starting).
        replace = running or not all(room for _, _, room in states)
        error = None
        try:
            s0 = time.perf_counter()
            slot, probe, probe_s = self._snapshot(iteration, replace)
            snapshot_s = time.perf_counter() - s0
        except Exception as exc:  # noqa: BLE001 - agreed below: every rank gives this save up
            slot, snapshot_s = None, 0.0
            error = f"snapshot on rank {self.comm.rank} failed: {type(exc).__name__}: {exc}"
        failures = self.comm.agree(error)
        stall = time.perf_counter() - t0
        if running and not failures:  # the queued saves that the worker has not taken
            self._replaced += self.slots.empty_pending(keep=slot)
        for old in self._replaced:
            if old in self.outstanding:
                serve = serve or old in self._serve_due  # its refit is not lost with it
                self._skipped(old, iteration)  # its slot now holds this save (or garbage), or is empty
        self._replaced = []
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
        self._trim()  # the slots of the saves this one replaced (CPU; on GPU at the next save)
        # (the exporter shows it as its last result until the final one arrives)
        return ExportResult(iteration, self.job.root / mf.export_dir_name(iteration), "running",
                            list(config.formats), {"stall_s": stall, "snapshot_s": snapshot_s})

    def _trim(self) -> None:
        """Give back the storage of empty slots beyond `STEADY_SLOTS` (made for early saves), so
        host memory returns to at most two copies once the workers have caught up."""
        if self.slots.allocated() > STEADY_SLOTS and (self._event is None or self._event.query()):
            for buffers, message in self.slots.free_extra(STEADY_SLOTS):  # (no copy may write into them)
                self._pins.unpin(buffers)
                self._send(message)

    def _snapshot(self, iteration: int, replace: bool) -> tuple:
        """Copy this rank's slices into an empty slot (with ``replace``, a queued save's slot when
        no empty one is left: that save is left in ``_replaced``); returns (slot, probe record,
        probe seconds), the slot still locked (`_release` publishes it)."""
        source = self.exporter.take_source()  # the probe, then (quantized exports) a calibrated replica
        slots = self.slots
        slot = slots.lock_free(self.timeout_s, replace=replace)
        try:
            if slots.state(slot) == SlotState.PENDING:
                self._replaced.append(slots.iteration(slot))
            slots.set_state(slot, SlotState.EMPTY)
            storage = slots.ensure_buffers(slot)  # made the first time a save needs one more slot
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
            self._publisher = threading.Thread(target=finish, daemon=True, name="megatron-trt-ext-snapshot")
            self._publisher.start()

    def close(self) -> None:
        """Finish every submitted export (bounded, see `wait`), then stop the worker."""
        try:
            self.wait()
        finally:
            self._stop_worker()
            if self._event is not None:  # no copy may still write into a range being unpinned
                self._event.synchronize()
            self._pins.release()
