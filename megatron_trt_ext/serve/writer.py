"""One writer rank's side of a refit: listen, let the server's workers connect, stream tensors.

Writers listen and the server connects to them (its addresses go in `/update_weights`), so any
number of writer ranks stream at once without the server having to know the training job's
layout, and a server with several workers (inference TP > 1) simply has each worker connect to
every writer: each receives full HF tensors and vLLM's loaders keep their own shard. The tensors are
produced lazily while they are sent, so a writer holds about one frame, never the model.
"""

from __future__ import annotations

import json
import socket
import threading
import time
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
        self._advertise = advertise
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.stats: dict = {}

    def address(self, towards: Optional[tuple] = None) -> str:
        """'host:port' a server can reach: ``advertise`` if given, else the interface that routes
        to ``towards`` (the server's host, port)."""
        port = self._listener.getsockname()[1]
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
        try:
            self._listener.close()
        except OSError:
            pass

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
            try:
                kind, _, payload = wire.recv_frame(conn)
                hello = json.loads(payload) if kind == wire.HELLO else {}
            except (OSError, ValueError, wire.WireError):
                conn.close()
                continue
            if hello.get("token") != self.token:
                wire.send_json(conn, wire.ERROR, 0, {"error": "wrong or stale refit token"})
                conn.close()
                continue
            conns.append(conn)
        return conns

    def _run(self) -> None:
        conns: list = []
        started = time.perf_counter()
        frames = tensors = nbytes = 0
        try:
            conns = self._accept()
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
            if isinstance(exc, OSError) and conns:  # reset while sending: the reader gave up first
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
