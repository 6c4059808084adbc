"""Async exports: the trainer copies its shards into shared host memory (the only stall) and a
worker process does the rest.

Decisions that involve several ranks (skip or wait when the last export still runs, restart the
workers after a failure) are taken together, with one all-gather on the trainers' control group,
so every rank does the same thing at every save.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from multiprocessing.connection import wait as wait_any
from typing import Optional

import torch

from . import manifest as mf
from .job import ExportResult, torch_dtype

logger = logging.getLogger("megatron_trt_ext")


class BackgroundExporter:
    """Owns the snapshot buffers and the worker process of one rank."""

    def __init__(self, exporter):
        if mp.current_process().daemon:
            from .errors import ConfigError

            raise ConfigError("mode: async starts an export worker process, and this training process is a "
                              "daemonic multiprocessing child, which may not have children; use mode: sync "
                              "(or start training from a non-daemonic process)")
        self.exporter = exporter
        self.job = exporter.job
        self.comm = exporter.comm
        dtypes = {u.name: torch_dtype(u.dtype) for u in self.job.units}
        # One shared-memory buffer per local slice an export reads: allocated once, reused.
        self.buffers = {(name, offset, shape): torch.empty(shape, dtype=dtypes[name]).share_memory_()
                        for name, offset, shape in self.job.needed_pieces()}
        self.snapshot_bytes = sum(b.numel() * b.element_size() for b in self.buffers.values())
        self._pin()
        self.proc = None
        self.conn = None
        self.pending: Optional[tuple] = None
        self.needs_restart = False
        self._start_worker()

    # ------------------------------------------------------------------ worker lifecycle
    def _pin(self) -> None:
        """Page-lock the shared buffers on CUDA machines, so device-to-host copies are async."""
        self._stream = None
        if not torch.cuda.is_available():
            return
        cudart = torch.cuda.cudart()
        for buf in self.buffers.values():
            if buf.numel():
                cudart.cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 0)
        self._stream = torch.cuda.Stream()

    def _start_worker(self) -> None:
        """Collective: every rank starts its worker; the workers rendezvous on rank 0's port."""
        from .utils import free_port

        port = free_port() if self.comm.rank == 0 else None
        port = self.comm.all_gather_object(port)[0]
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        from .worker import worker_main

        self.proc = ctx.Process(target=worker_main, args=(child, self.job, self.buffers, addr, port),
                                daemon=True, name=f"megatron-trt-ext-worker-{self.comm.rank}")
        self.proc.start()
        child.close()
        self.conn = parent
        self.needs_restart = False

    def _stop_worker(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.is_alive():
                self.conn.send(("stop",))
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        self.proc = None

    def _recv(self, block: bool) -> Optional[tuple]:
        """Next message from the worker; ("died", exitcode) when it is gone."""
        ready = wait_any([self.conn, self.proc.sentinel], timeout=None if block else 0)
        if not ready:
            return None
        if self.conn in ready:
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                pass
        self.proc.join(5)
        return ("died", self.proc.exitcode)

    # ------------------------------------------------------------------ results
    def _finish(self, msg) -> ExportResult:
        iteration, submitted = self.pending
        self.pending = None
        root = self.job.root
        if msg[0] == "done":
            result = msg[1]
            if result.path is None:
                result.path = root / f".{mf.export_dir_name(iteration)}.failed"
        else:  # the worker is gone or never started: record it here (rank 0 owns the directory)
            if msg[0] == "broken":
                error = f"export worker of rank {self.comm.rank} could not start: {msg[1]}"
            else:
                error = (f"export worker of rank {self.comm.rank} died (exit code {msg[1]}) "
                         f"during iteration {iteration}")
            path = root / f".{mf.export_dir_name(iteration)}.failed"
            if self.comm.rank == 0:
                tmp = root / f".{mf.export_dir_name(iteration)}.partial"
                path = mf.mark_failed(tmp, root, iteration, {**self.job.manifest_base(iteration)}, error)
            result = ExportResult(iteration, path, "failed", list(self.job.config.formats),
                                  {"stall_s": submitted[1]}, 0, error)
        result.timings["total_s"] = time.time() - submitted[0]
        if not result.ok:
            self.needs_restart = True  # its process group may be broken: start afresh next time
            logger.error("async export of iteration %d failed, training continues: %s", iteration, result.error)
        self.exporter._record(result)
        return result

    def poll(self) -> Optional[ExportResult]:
        if self.pending is None:
            return None
        msg = self._recv(block=False)
        return self._finish(msg) if msg is not None else None

    def wait(self) -> Optional[ExportResult]:
        if self.pending is None:
            return None
        return self._finish(self._recv(block=True))

    # ------------------------------------------------------------------ the trigger
    def submit(self, iteration: int) -> ExportResult:
        t_submit, t0 = time.time(), time.perf_counter()
        self.poll()
        alive = self.proc is not None and self.proc.is_alive()
        states = self.comm.all_gather_object((self.pending is not None, self.needs_restart or not alive))
        config = self.job.config
        if any(busy for busy, _ in states):
            if config.busy_policy == "skip":
                logger.warning("export at iteration %d skipped: the previous export is still running "
                               "(busy_policy=skip)", iteration)
                result = ExportResult(iteration, self.job.root / mf.export_dir_name(iteration), "skipped",
                                      list(config.formats), {"stall_s": time.perf_counter() - t0})
                self.exporter._record(result)
                return result
            self.wait()
            states = self.comm.all_gather_object((False, self.needs_restart or not self.proc.is_alive()))
        if any(restart for _, restart in states):
            self._stop_worker()
            self._start_worker()
        s0 = time.perf_counter()
        self._snapshot()
        snapshot_s = time.perf_counter() - s0
        stall = time.perf_counter() - t0
        timings = {"stall_s": stall, "snapshot_s": snapshot_s, "snapshot_bytes": self.snapshot_bytes,
                   "submitted_unix": t_submit}
        self.pending = (iteration, (t_submit, stall))
        self._send_when_copied(("export", iteration, timings))
        running = ExportResult(iteration, self.job.root / mf.export_dir_name(iteration), "running",
                               list(config.formats), {"stall_s": stall, "snapshot_s": snapshot_s})
        self.exporter.last_result = running  # replaced by the final result when it arrives
        return running

    def _snapshot(self) -> None:
        live, replica = self.exporter._source()  # quantized exports: a calibrated replica
        by_key = {(name, p.offset, tuple(p.tensor.shape)): p.tensor for name, pieces in live.items() for p in pieces}
        del replica
        if self._stream is None:
            with torch.no_grad():
                for key, buf in self.buffers.items():
                    buf.copy_(by_key[key].detach())
            self._event = None
            return
        # GPU: copies on a side stream after the work that produced the weights; later work on the
        # training stream (the optimizer step) waits for the copies, the host thread does not.
        current = torch.cuda.current_stream()
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream), torch.no_grad():
            for key, buf in self.buffers.items():
                source = by_key[key].detach()
                source.record_stream(self._stream)  # a calibration replica's memory must outlive the copy
                buf.copy_(source, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record(self._stream)
        current.wait_stream(self._stream)

    def _send_when_copied(self, msg) -> None:
        if self._event is None:
            self.conn.send(msg)
            return
        event, conn = self._event, self.conn

        def send():
            event.synchronize()
            conn.send(msg)
        threading.Thread(target=send, daemon=True).start()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._stop_worker()
