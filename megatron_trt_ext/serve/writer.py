"""One writer rank's side of a refit: listen, let the server's workers connect, stream tensors.

Writers listen and the server connects to them (its addresses go in `/update_weights`), so any
number of writer ranks stream at once without the server having to know the training job's
layout, and a server with several workers (inference TP > 1) simply has each worker connect to
every writer: each receives full HF tensors and vLLM's loaders keep their own shard. The tensors are
produced lazily while they are sent, so a writer holds about one frame, never the model.

A refit that fails on the driving rank (the server died after answering, a step failed) is called
off at every writer (`call_off`): a hello frame with the refit's token and the reason, so a writer
waiting for server workers that will never come, or stuck on a stalled server, stops at once
instead of at its timeout.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

from . import wire

DEFAULT_FRAME_BYTES = 64 << 20


class TensorWriter:
    """Serve one stream of (hf_name, tensor) pairs to ``readers`` connections (one per server
    worker) that present ``token``. `start` returns at once; `wait` returns the stream's counts or
    raises why it failed."""

    def __init__(self, tensors: Iterable, version: str, token: str, readers: int = 1,
                 bind: str = "0.0.0.0", advertise: Optional[str] = None, port: int = 0,
                 frame_bytes: int = DEFAULT_FRAME_BYTES, connect_timeout: float = 120.0,
                 io_timeout: float = 300.0):
        self._tensors = tensors
        self.version = str(version)
        self.token = token
        self.readers = readers
        self.frame_bytes = frame_bytes
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self._listener = socket.create_server((bind, port), backlog=max(8, readers))
        self._port = self._listener.getsockname()[1]  # kept: the listener closes before the last messages
        self._advertise = advertise
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._called_off: Optional[str] = None  # why the driving rank called the refit off
        self._conns: list = []
        self.stats: dict = {}

    def address(self, towards: Optional[tuple] = None) -> str:
        """'host:port' a server can reach: ``advertise`` if given, else the interface that routes
        to ``towards`` (the server's host, port)."""
        port = self._port
        host = self._advertise or wire.local_address_towards(*(towards or ("127.0.0.1", 0)))
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> "TensorWriter":
        self._thread = threading.Thread(target=self._run, name="mte-serve-writer", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: Optional[float] = None) -> dict:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"writer {self.address()} still streaming after {timeout} s")
        if self._error is not None:
            raise self._error
        return self.stats

    @property
    def running(self) -> bool:
        """Started and still streaming (or waiting for the server's workers to connect)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> Optional[BaseException]:
        return self._error

    def close(self) -> None:
        """Stop listening. shutdown() first: on Linux that wakes an accept() blocked in another
        thread, which close() alone leaves waiting until its timeout."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass

    def _hello(self, conn) -> dict:
        try:
            kind, _, payload = wire.recv_frame(conn)
            return json.loads(payload) if kind == wire.HELLO else {}
        except (OSError, ValueError, wire.WireError):
            return {}

    def _call_off(self, reason: str) -> None:
        """Stop streaming now: connections are shut, so a blocked send or wait returns."""
        self._called_off = str(reason)
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _watch(self) -> None:
        """While streaming, the listener still takes a call-off (nothing else connects then)."""
        while self.running:
            try:
                self._listener.settimeout(0.5)
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:  # closed: the stream is over
                return
            with conn:
                conn.settimeout(5.0)
                hello = self._hello(conn)
            if hello.get("token") == self.token and "call_off" in hello:
                self._call_off(hello["call_off"])
                return

    # ------------------------------------------------------------------ the streaming thread
    def _accept(self) -> list:
        """The readers that presented this refit's token (others are told why and dropped)."""
        conns = []
        deadline = time.monotonic() + self.connect_timeout
        while len(conns) < self.readers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(conns)} of {self.readers} server workers connected to writer "
                                   f"{self.address()} within {self.connect_timeout} s")
            self._listener.settimeout(left)
            conn, peer = self._listener.accept()
            conn.settimeout(self.io_timeout)
            hello = self._hello(conn)
            if not hello:
                conn.close()
                continue
            if hello.get("token") == self.token and "call_off" in hello:
                conn.close()
                self._called_off = str(hello["call_off"])
                raise wire.WireError(f"writer {self.address()}: the refit was called off: {self._called_off}")
            if hello.get("token") != self.token:
                try:  # a stray peer may be gone already: it must not end this writer
                    wire.send_json(conn, wire.ERROR, 0, {"error": "wrong or stale refit token"})
                except OSError:
                    pass
                conn.close()
                continue
            conns.append(conn)
            self._conns.append(conn)
        return conns

    def _run(self) -> None:
        conns: list = []
        started = time.perf_counter()
        frames = tensors = nbytes = 0
        try:
            conns = self._accept()
            threading.Thread(target=self._watch, name="mte-serve-writer-watch", daemon=True).start()
            for batch in wire.batches(self._tensors, self.frame_bytes):
                payload = wire.encode_batch(batch, self.version)
                for conn in conns:
                    wire.send_frame(conn, wire.DATA, frames, payload)
                frames += 1
                tensors += len(batch)
                nbytes += sum(t.numel() * t.element_size() for _, t in batch)
            end = {"frames": frames, "tensors": tensors, "bytes": nbytes}
            for conn in conns:
                wire.send_json(conn, wire.END, frames, end)
                # the reader acknowledges once it has checked the counts and applied every batch,
                # so a failure on its side is not taken for success here
                try:
                    ack = conn.recv(1)
                except OSError:  # reset: the reader gave up
                    ack = b""
                if ack != wire.ACK:
                    raise wire.WireError(f"a server worker closed writer {self.address()}'s stream "
                                         "without acknowledging it (see the server's log)")
            self.stats = {**end, "seconds": time.perf_counter() - started}
        except BaseException as exc:  # recorded for wait(); the reader is told when it can be
            if self._called_off is not None:  # whatever broke next, this is why
                exc = wire.WireError(f"writer {self.address()}: the refit was called off: {self._called_off}")
            elif isinstance(exc, OSError) and conns:  # reset while sending: the reader gave up first
                exc = wire.WireError(f"a server worker closed writer {self.address()}'s stream without "
                                     f"acknowledging it ({type(exc).__name__}: {exc}; see the server's log)")
            self._error = exc
            for conn in conns:
                try:
                    wire.send_json(conn, wire.ERROR, frames, {"error": f"{type(exc).__name__}: {exc}"})
                except OSError:
                    pass
        finally:
            for conn in conns:
                conn.close()
            self.close()


def call_off(addresses: list, token: str, reason: str, timeout: float = 5.0) -> None:
    """Tell every writer at ``addresses`` that this refit (``token``) is off, and why. Best effort
    and in parallel: a writer that cannot be reached ends at its own timeout as before."""

    def one(address: str) -> None:
        try:
            with socket.create_connection(wire.parse_address(address), timeout=timeout) as sock:
                wire.send_json(sock, wire.HELLO, 0, {"token": token, "call_off": str(reason)[:2000]})
        except (OSError, ValueError):
            pass

    if addresses:
        with ThreadPoolExecutor(max_workers=min(16, len(addresses))) as pool:
            list(pool.map(one, addresses))
