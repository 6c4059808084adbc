"""The training side of a live refit: drive a stock vLLM OpenAI server's weight-transfer endpoints
(mounted with ``VLLM_SERVER_DEV_MODE=1`` and ``--weight-transfer-config '{"backend":
"megatron_trt_ext"}'``) while writer ranks stream the tensors (`writer.TensorWriter`).

One refit, in order (every HTTP call with a timeout):

1. ``GET /weight_info``: the version served now (named in errors);
2. ``POST /pause?mode=keep``: requests wait in the queue, none runs on half-updated weights;
3. ``POST /update_weight_version``: "incomplete: refit to V ..." while the update runs, so a
   refit cut short by anything (even this process dying) leaves a server that says so;
4. ``POST /init_weight_transfer_engine``, ``/start_weight_update``;
5. ``POST /update_weights`` with the writers' addresses: the server's workers connect to every
   writer at once and apply batches as they arrive;
6. ``POST /finish_weight_update`` with the version V (vLLM sets it only when the update is whole);
7. ``POST /resume``.

Failure policy: never a mix. Before step 2 nothing has changed and the server keeps serving its last
complete version. From step 2 on, a failure leaves the server **paused, saying so**: ``/is_paused``
is true and ``/weight_info`` reads "incomplete: refit to V failed at STEP ..." (set best-effort; it
already says "incomplete" since step 3). Weights are applied as they stream, so after a broken
stream some layers hold new weights; the server must not answer until the next complete refit,
which completes every layer and resumes it. `RefitError` names the step, the server and that state.

Standard library only (urllib), so the training side needs nothing new.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .writer import DEFAULT_FRAME_BYTES, TensorWriter

INCOMPLETE = "incomplete"


class RefitError(RuntimeError):
    """A refit failed. ``step`` is the endpoint (or "stream"), ``server`` the URL, ``state`` what the
    server was left doing: "serving VERSION" (untouched), "paused" or "unknown" (unreachable)."""

    def __init__(self, message: str, step: str, server: str, state: str):
        super().__init__(message)
        self.step, self.server, self.state = step, server, state


@dataclass
class RefitResult:
    version: str
    previous: str
    seconds: float
    tensors: int = 0
    bytes: int = 0
    writers: int = 0
    steps: dict = field(default_factory=dict)  # seconds per step


class VLLMServer:
    """The HTTP control plane of one vLLM OpenAI server (``url`` like http://HOST:PORT)."""

    def __init__(self, url: str, timeout: float = 30.0, stream_timeout: float = 600.0):
        self.url = url.rstrip("/")
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"serve url {url!r} is not http://HOST:PORT")
        self.host = parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.timeout = timeout
        self.stream_timeout = stream_timeout

    def call(self, method: str, path: str, body: Optional[dict] = None, timeout: Optional[float] = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                text = response.read().decode() or "{}"
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ConnectionError(f"HTTP {exc.code} from {method} {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConnectionError(f"{method} {path} got no answer: {reason}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {"text": text}

    def weight_version(self) -> str:
        return str(self.call("GET", "/weight_info").get("weight_version"))

    def is_paused(self) -> bool:
        return bool(self.call("GET", "/is_paused").get("is_paused"))

    def world_size(self) -> int:
        """How many workers will connect to each writer (one per inference rank, DP included)."""
        return int(self.call("GET", "/get_world_size").get("world_size", 1))

    def set_version(self, version: str, timeout: Optional[float] = None) -> None:
        self.call("POST", "/update_weight_version", {"new_version": str(version)}, timeout)

    # ------------------------------------------------------------------ one refit
    def refit(self, writers: list, token: str, version: str, on_stream_error=None) -> RefitResult:
        """Run steps 1-7 (module docstring) with writers already listening at ``writers``.
        ``on_stream_error()`` may return the writers' own failure, named in the error."""
        version, steps, started = str(version), {}, time.perf_counter()
        step, previous, paused = "weight_info", "?", False

        def timed(name, method, path, body=None, timeout=None):
            nonlocal step
            step, t0 = name, time.perf_counter()
            answer = self.call(method, path, body, timeout)
            steps[name] = round(time.perf_counter() - t0, 4)
            return answer

        try:
            previous = str(timed("weight_info", "GET", "/weight_info").get("weight_version"))
            timed("pause", "POST", "/pause?mode=keep")
            paused = True
            timed("mark_incomplete", "POST", "/update_weight_version",
                  {"new_version": f"{INCOMPLETE}: refit to {version} under way (last complete: {previous})"})
            timed("init_weight_transfer_engine", "POST", "/init_weight_transfer_engine",
                  {"init_info": {"timeout": self.stream_timeout}})
            try:
                timed("start_weight_update", "POST", "/start_weight_update")
            except ConnectionError:
                # an earlier refit died between start and finish: close it (paused, so harmless:
                # the full update below overwrites every layer) and start again
                self.call("POST", "/finish_weight_update", {})
                timed("start_weight_update", "POST", "/start_weight_update")
            info = {"writers": list(writers), "token": token, "version": version, "timeout": self.stream_timeout}
            timed("update_weights", "POST", "/update_weights", {"update_info": info}, self.stream_timeout)
            timed("finish_weight_update", "POST", "/finish_weight_update", {"weight_version": version})
            timed("resume", "POST", "/resume")
        except ConnectionError as exc:
            cause = on_stream_error() if on_stream_error else None
            raise self._failed(step, exc, cause, version, previous, paused) from None
        return RefitResult(version=version, previous=previous, seconds=time.perf_counter() - started,
                           writers=len(writers), steps=steps)

    def _failed(self, step, exc, cause, version, previous, paused) -> RefitError:
        why = f"{exc}" + (f" (writer: {cause})" if cause else "")
        if not paused:
            state = f"serving {previous}" if step != "weight_info" else "unknown"
            return RefitError(f"refit of {self.url} to version {version} failed at {step}: {why}; the server "
                              f"was not changed", step, self.url, state)
        try:  # say so on the server (it already reads "incomplete ... under way" since step 3)
            self.set_version(f"{INCOMPLETE}: refit to {version} failed at {step}; paused "
                             f"(last complete: {previous})", timeout=min(self.timeout, 10.0))
            state = "paused"
        except ConnectionError:
            state = "unknown"
        where = "left paused" if state == "paused" else "unreachable (if it comes back it is paused)"
        return RefitError(f"refit of {self.url} to version {version} failed at {step}: {why}; the server is "
                          f"{where} and will not answer until a complete refit", step, self.url, state)


def new_token() -> str:
    """A per-refit secret: writers serve only connections that present it."""
    return secrets.token_hex(16)


def refit(url: str, tensors: Iterable, version, *, timeout: float = 30.0, stream_timeout: float = 600.0,
          advertise: Optional[str] = None, frame_bytes: int = DEFAULT_FRAME_BYTES) -> RefitResult:
    """One refit from this process alone: ``tensors`` (an iterable of (hf_name, tensor), HF names and
    dtypes as the HF export writes them) streamed into the server at ``url``, which then serves
    ``version``. Raises `RefitError` (see the module docstring for the state it leaves).

    Many writer ranks: make one `new_token()`, start a `TensorWriter(tensors, version, token,
    readers=server.world_size())` on each rank, gather their ``address(towards=(server.host,
    server.port))``, call `VLLMServer.refit(addresses, token, version)` on one rank, then
    ``wait()`` on every writer."""
    server = VLLMServer(url, timeout=timeout, stream_timeout=stream_timeout)
    try:
        readers = server.world_size()
    except ConnectionError as exc:
        raise RefitError(f"refit of {server.url} to version {version} failed at get_world_size: {exc}; the "
                         f"server was not changed", "get_world_size", server.url, "unknown") from None
    token = new_token()
    writer = TensorWriter(tensors, str(version), token, readers=readers, advertise=advertise,
                          frame_bytes=frame_bytes, connect_timeout=stream_timeout, io_timeout=stream_timeout)
    writer.start()
    try:
        result = server.refit([writer.address(towards=(server.host, server.port))], token, str(version),
                              on_stream_error=lambda: writer.error)
        stats = writer.wait(stream_timeout)
    finally:
        writer.close()
    result.tensors, result.bytes = stats["tensors"], stats["bytes"]
    return result
