"""The export's side of a live refit: the converted HF tensors of one export run, streamed into a
vLLM server while they are produced.

Every rank of the export is a writer (a rank that writes no unit sends an empty stream): each
starts a `TensorWriter` fed by `RefitSink.put`, the ranks all_gather their addresses, and rank 0
runs the HTTP steps (`VLLMServer.refit`) in a thread while the units are converted. ``put`` blocks
while the stream is full, so a rank holds about one frame beyond what the export holds anyway.

A refit never fails the export or training: every failure (a dead server, a broken stream, an
export that failed half-way, which aborts the stream so the server is never left serving a mix)
ends in the record `RefitSink.finish` returns on rank 0 (the manifest's ``serve`` key). Collectives
here run on every rank in the same order whatever happens, like the export's own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Optional

from .client import RefitError, VLLMServer, new_token
from .writer import TensorWriter, call_off

logger = logging.getLogger("megatron_trt_ext")

_END, _ABORT = object(), object()


class _Feed:
    """The iterable a `TensorWriter` streams: what ``put`` hands it, until ``close``/``abort``."""

    def __init__(self, depth: int = 4):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.reason = ""

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise RuntimeError(self.reason)
            yield item


class RefitSink:
    """One refit riding on one export run (construct and `finish` on every rank)."""

    def __init__(self, comm, rank: int, options, version: str, specs: Optional[list] = None):
        self.rank, self.options, self.version = rank, options, str(version)
        self.specs = specs  # (hf_name, dtype, shape) in plan order: the NCCL transport declares them
        nccl = getattr(options, "transport", "tcp") == "nccl"  # writers stream to rank 0, which broadcasts
        self.url = options.url
        self.started = time.perf_counter()
        self.error: Optional[str] = None
        self.result = None
        self.writer: Optional[TensorWriter] = None
        self.feed = _Feed()
        self._thread: Optional[threading.Thread] = None
        timeout = float(options.timeout_s)
        server = VLLMServer(options.url, timeout=min(timeout, 30.0), stream_timeout=timeout)
        readers, token, error = 0, None, None
        if rank == 0:
            try:
                readers, token = (1 if nccl else server.world_size()), new_token()
            except ConnectionError as exc:
                error = (f"refit of {server.url} to version {self.version} failed at get_world_size: {exc}; "
                         "the server was not changed")
        readers, token, error = comm.all_gather_object((readers, token, error))[0]
        address, local_error = None, None
        if error is None:
            try:
                self.writer = TensorWriter(self.feed, self.version, token, readers=readers,
                                           connect_timeout=timeout, io_timeout=timeout)
                address = self.writer.address(towards=(server.host, server.port))
                self.writer.start()
            except OSError as exc:
                local_error = f"rank {rank} could not listen for the server: {exc}"
        gathered = comm.all_gather_object((address, local_error))
        error = error or next((e for _, e in gathered if e), None)
        if error is not None:
            self._stop(error)
            return
        if rank == 0:
            addresses = [a for a, _ in gathered]
            self._thread = threading.Thread(target=self._drive, args=(server, addresses, token),
                                            name="mte-serve-refit", daemon=True)
            self._thread.start()

    def _drive(self, server: VLLMServer, addresses: list, token: str) -> None:
        try:
            cause = lambda: self.writer.error if self.writer else None  # noqa: E731
            if getattr(self.options, "transport", "tcp") == "nccl":
                from . import nccl

                self.result = nccl.refit(server, addresses, token, self.version, self.specs or [],
                                         on_stream_error=cause)
            else:
                self.result = server.refit(addresses, token, self.version, on_stream_error=cause)
        except RefitError as exc:
            self.error = str(exc)
            # this rank's writer stops at once, the other ranks' writers when told (`writer.call_off`)
            call_off(addresses, token, self.error)
            self.close(self.error)

    def _stop(self, error: str) -> None:
        self.error = self.error or error
        if self.writer is not None:
            self.writer.close()
        self.writer = None

    @property
    def live(self) -> bool:
        return self.writer is not None and self.writer.running

    def put(self, name: str, tensor) -> None:
        """Hand one converted tensor (HF name, as written) to the stream; dropped once it broke."""
        while self.live:
            try:
                self.feed.queue.put((name, tensor), timeout=0.2)
                return
            except queue.Full:
                continue

    def abort(self, reason: str) -> None:
        """The stream ends with an error frame: the server stays paused, never serving a mix."""
        self.feed.reason = reason
        self._push(_ABORT)

    def close(self, reason: str) -> None:
        """Give up without waiting (a collective broke): abort the stream if it has room, stop
        listening; a stream stuck on the server ends at its timeout."""
        self.feed.reason = reason
        try:
            self.feed.queue.put_nowait(_ABORT)
        except queue.Full:
            pass
        if self.writer is not None:
            self.writer.close()

    def _push(self, item) -> None:
        while self.live:
            try:
                self.feed.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self, comm, export_error: Optional[str] = None) -> Optional[dict]:
        """End the stream (aborted when the export failed), wait for it, and return the refit's
        record on rank 0 (None elsewhere). Logs one line on rank 0."""
        local = None
        if self.writer is not None:
            if export_error:
                self.abort(f"the export failed: {export_error}")
            else:
                self._push(_END)
            try:
                stats = self.writer.wait(float(self.options.timeout_s) + 30.0)
                local = (stats.get("bytes", 0), stats.get("tensors", 0), None)
            except BaseException as exc:  # noqa: BLE001 - recorded, never raised
                local = (0, 0, f"rank {self.rank}: {type(exc).__name__}: {exc}")
            finally:
                self.writer.close()
        if self._thread is not None:
            self._thread.join(float(self.options.timeout_s) + 60.0)
            if self._thread.is_alive():
                self.error = self.error or f"the server did not finish the refit within {self.options.timeout_s} s"
        gathered = comm.gather_object(local)
        if self.rank != 0:
            return None
        if self.error is None and export_error:
            self.error = f"the export failed, so the stream was aborted: {export_error}"
        if self.error is None:
            self.error = next((e for _, _, e in (g for g in gathered if g) if e), None)
        ok = self.error is None and self.result is not None
        record = {"status": "complete" if ok else "failed", "url": self.url, "version": self.version,
                  "seconds": round(time.perf_counter() - self.started, 4),
                  "bytes": sum(g[0] for g in gathered if g), "error": None if ok else self.error}
        if ok:
            logger.info("refit %s to iteration %s: %d bytes in %.3f s", self.url, self.version, record["bytes"],
                        record["seconds"])
        else:
            logger.error("refit of %s to iteration %s failed, training continues: %s", self.url, self.version,
                         self.error)
        return record
