"""The server side of the wire, without vLLM: connect to every writer at once and hand each
arriving batch to one consumer (the caller's thread, since a model's `load_weights` is not meant
to be called from several threads)."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from typing import Callable

from . import wire



def _put(out: queue.Queue, item: tuple, stop: threading.Event) -> None:
    """Queue ``item`` unless the consumer has stopped (then a full queue must not block forever)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


def _read_writer(address: str, token: str, rank: int, timeout: float, out: queue.Queue,
                 acks: dict, stop: threading.Event) -> None:
    """One writer's stream into ``out``: ("batch", dict) items, then ("done", counts) or
    ("error", message). The connection stays open until the consumer has applied everything,
    then the ack is sent (``acks`` holds the open sockets)."""
    sock = None
    try:
        sock = socket.create_connection(wire.parse_address(address), timeout=timeout)
        acks[address] = sock
        wire.send_json(sock, wire.HELLO, 0, {"token": token, "rank": rank})
        frames = tensors = nbytes = 0
        while not stop.is_set():
            kind, seq, payload = wire.recv_frame(sock)
            if kind == wire.DATA:
                if seq != frames:
                    raise wire.WireError(f"frame {seq} arrived where frame {frames} was due")
                batch = wire.decode_batch(payload)
                count, size = wire.tensor_count_and_bytes(batch)
                frames, tensors, nbytes = frames + 1, tensors + count, nbytes + size
                _put(out, ("batch", address, batch), stop)
            elif kind == wire.END:
                problem = wire.check_end(json.loads(payload), frames, tensors, nbytes, address)
                if problem:
                    raise wire.WireError(problem)
                _put(out, ("done", address, {"frames": frames, "tensors": tensors, "bytes": nbytes}), stop)
                return
            elif kind == wire.ERROR:
                raise wire.WireError(f"writer {address} stopped: {json.loads(payload).get('error')}")
            else:
                raise wire.WireError(f"unexpected {wire.KIND_NAMES[kind]} frame from writer {address}")
    except BaseException as exc:  # reported to the consumer, which raises it
        message = f"{type(exc).__name__}: {exc}"
        _put(out, ("error", address, message if address in message else f"stream from writer {address} broke: "
                   f"{message}"), stop)


def receive(addresses: list, token: str, apply: Callable[[dict], None], rank: int = 0,
            timeout: float = 300.0) -> dict:
    """Stream every writer's batches into ``apply`` (called on this thread, one batch at a time)
    and acknowledge each writer once all of them are whole; raise `wire.WireError` naming the
    writer on the first broken stream. Returns the totals."""
    if not addresses:
        raise ValueError("a refit needs at least one writer address")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"writer addresses repeat: {addresses}")
    out: queue.Queue = queue.Queue(maxsize=4 * len(addresses))  # bounded: writers wait for apply
    acks: dict = {}
    stop = threading.Event()
    threads = [threading.Thread(target=_read_writer, args=(a, token, rank, timeout, out, acks, stop),
                                name=f"mte-serve-reader-{i}", daemon=True) for i, a in enumerate(addresses)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    totals = {"writers": len(addresses), "frames": 0, "tensors": 0, "bytes": 0}
    pending = set(addresses)
    try:
        while pending:
            try:
                kind, address, item = out.get(timeout=timeout)
            except queue.Empty:
                raise wire.WireError(f"no data from writers {sorted(pending)} for {timeout} s") from None
            if kind == "batch":
                apply(item)
            elif kind == "done":
                pending.discard(address)
                for key in ("frames", "tensors", "bytes"):
                    totals[key] += item[key]
            else:
                raise wire.WireError(item)
        for sock in acks.values():
            sock.sendall(wire.ACK)
        totals["seconds"] = time.perf_counter() - started
        return totals
    finally:
        stop.set()
        for sock in list(acks.values()):
            try:
                sock.close()
            except OSError:
                pass
