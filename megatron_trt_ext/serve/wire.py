"""The host transport between writer ranks and a vLLM server: frames over TCP.

Both ends live here so they cannot drift apart. One connection carries one writer's share of one
refit:

* the reader (a vLLM worker) connects and sends a hello frame (JSON: the refit's token, its rank),
  so a stray or stale connection can never feed weights into a server;
* the writer answers with data frames, each a batch of tensors serialized as safetensors bytes
  (HF names, the dtypes and shapes the HF export would write), and ends with an end frame (JSON:
  how many frames, tensors and bytes it sent), or an error frame (JSON: why it stopped);
* the reader checks the counts, so a stream cut between frames is never taken for a whole one.

A frame is a fixed header (magic, kind, sequence number, payload length) and its payload. Safetensors
is the payload format because every consumer already reads it and its header carries names, dtypes
and shapes; a frame's own metadata holds the refit version and the frame's tensor count.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Iterable, Iterator, Optional

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MAGIC = b"MTE1"
HEADER = struct.Struct(">4sBIQ")  # magic, kind, sequence number, payload length
HELLO, DATA, END, ERROR = 1, 2, 3, 4
KIND_NAMES = {HELLO: "hello", DATA: "data", END: "end", ERROR: "error"}
ACK = b"\x06"  # the reader's last byte: every batch arrived whole and was applied
MAX_PAYLOAD = 1 << 40  # a header claiming more is corruption, not a frame


class WireError(RuntimeError):
    """The stream broke or carried something that is not our protocol."""


def send_frame(sock: socket.socket, kind: int, seq: int, payload: bytes) -> None:
    sock.sendall(HEADER.pack(MAGIC, kind, seq, len(payload)))
    if payload:
        sock.sendall(payload)


def send_json(sock: socket.socket, kind: int, seq: int, obj: dict) -> None:
    send_frame(sock, kind, seq, json.dumps(obj).encode())


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError(f"connection closed after {got} of {n} bytes of {what}")
        got += k
    return buf


def recv_frame(sock: socket.socket) -> tuple:
    """(kind, seq, payload) of the next frame; WireError on a cut stream or a foreign one."""
    magic, kind, seq, length = HEADER.unpack(_recv_exact(sock, HEADER.size, "a frame header"))
    if magic != MAGIC or kind not in KIND_NAMES or length > MAX_PAYLOAD:
        raise WireError(f"not a megatron_trt_ext frame (magic {bytes(magic)!r}, kind {kind})")
    return kind, seq, bytes(_recv_exact(sock, length, f"{KIND_NAMES[kind]} frame {seq}"))


def encode_batch(tensors: list, version: str) -> bytes:
    """Safetensors bytes of one batch of (name, tensor) pairs (moved to host, made contiguous)."""
    names = [name for name, _ in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"a batch names a tensor twice: {sorted(n for n in names if names.count(n) > 1)[:3]}")
    # clone() so that views of one storage (tied weights, fused halves) serialize independently
    host = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors}
    return st_save(host, metadata={"version": str(version), "count": str(len(host))})


def decode_batch(payload: bytes) -> dict:
    return st_load(payload)


def batches(items: Iterable, max_bytes: int) -> Iterator[list]:
    """Group (name, tensor) pairs into batches of about ``max_bytes`` (one frame each); a tensor
    larger than that is a batch of its own."""
    batch, size = [], 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if batch and size + nbytes > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append((name, tensor))
        size += nbytes
    if batch:
        yield batch


def parse_address(address: str) -> tuple:
    """'host:port' (or '[v6]:port') -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"writer address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def local_address_towards(host: str, port: int) -> str:
    """The address of this host's interface that routes to ``host`` (what a server there can
    connect back to). A UDP connect sends nothing; it only asks the kernel for the route."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port or 9))
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def tensor_count_and_bytes(batch: dict) -> tuple:
    return len(batch), sum(t.numel() * t.element_size() for t in batch.values())


def check_end(end: dict, frames: int, tensors: int, nbytes: int, writer: str) -> Optional[str]:
    """Why an end frame disagrees with what arrived, or None when the stream is whole."""
    want = (end.get("frames"), end.get("tensors"), end.get("bytes"))
    if want != (frames, tensors, nbytes):
        return (f"writer {writer} said it sent {want[0]} frames / {want[1]} tensors / {want[2]} bytes, "
                f"{frames} / {tensors} / {nbytes} arrived")
    return None
