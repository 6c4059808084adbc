"""Refit over vLLM's own NCCL weight transfer (``serve: {transport: nccl}``), for a GPU server the
trainer's GPUs can reach (NVLink, InfiniBand). Imported only when that transport is chosen.

**Written against vLLM 0.32's documented API and not yet run on a GPU** (docs/serving.md).

vLLM's built-in ``nccl`` backend (`vllm.distributed.weight_transfer.nccl_engine`) has one sender:
group rank 0 broadcasts, the server's workers sit at ranks 1..N (``rank_offset`` 1), and each
round's update info declares every tensor (names, dtype names, shapes) in the order they will be
broadcast, before the first one is sent. Our export's tensors come from many writer ranks, so:

* every writer rank streams over the host transport as for ``tcp`` (`writer.TensorWriter`), but
  to training rank 0 instead of the server (one reader);
* rank 0 relays: it reads every writer at once (`reader.receive`), puts the tensors back into the
  declared order (`InOrder`: the export's plan, ``out_specs["hf"]``, which every rank knows before
  the export starts), copies each to its GPU and broadcasts it into the server's group;
* the HTTP steps are those of the host transport (`client`), with the NCCL rendezvous at
  ``/init_weight_transfer_engine`` (once per server and process; the group is kept between
  refits) and the update info at ``/update_weights``, which runs while rank 0 broadcasts.

What a failure leaves: before the broadcast, as for ``tcp``. A failure during it leaves the
server's workers inside an NCCL collective that will not complete: the server stays paused and
its HTTP steps may not answer; it needs a restart (the record says "unknown"). This is vLLM's own
behaviour for a broken NCCL transfer.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Optional

import torch

from ..errors import ConfigError
from . import reader, wire
from .client import INCOMPLETE, RefitError, RefitResult, VLLMServer

TRANSPORT = BACKEND = "nccl"
_GROUPS: dict = {}  # server url -> (communicator, server world size): one rendezvous per server


def check_available(source: str = "serve.transport") -> None:
    """At attach: the trainer side can join an NCCL group (CUDA, and vLLM's trainer helpers)."""
    if not torch.cuda.is_available():
        raise ConfigError(f"{source}: \"nccl\" needs CUDA on the training ranks (rank 0 broadcasts from its GPU) "
                          "and none is available here; use transport: \"tcp\" (sockets, works on CPU and across nodes)")
    try:
        import vllm.distributed.weight_transfer.nccl_common  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{source}: \"nccl\" joins the server's NCCL group with vLLM's trainer-side helpers, and "
                          f"vLLM does not import here ({exc}); install it in the training environment "
                          "(pip install -e .[serve]) or use transport: \"tcp\"") from None


def server_backend(server: VLLMServer) -> Optional[str]:
    """The weight-transfer backend the server was started with (``/server_info``, a dev-mode
    endpoint), or None when it does not say."""
    try:
        info = server.call("GET", "/server_info?config_format=json")
    except ConnectionError:
        return None
    config = info.get("vllm_config") if isinstance(info, dict) else None
    transfer = config.get("weight_transfer_config") if isinstance(config, dict) else None
    backend = transfer.get("backend") if isinstance(transfer, dict) else None
    return str(backend) if backend else None


def check_backend(server: VLLMServer, want: str = BACKEND) -> None:
    """A server started with another backend is refused before anything changes on it."""
    found = server_backend(server)
    if found is not None and found != want:
        raise ConfigError(f"serve.transport \"nccl\": the server at {server.url} was started with weight-transfer "
                          f"backend {found!r}; start it with --weight-transfer-config '{{\"backend\": \"nccl\"}}' "
                          f"or use transport: \"tcp\" with the \"megatron_trt_ext\" backend")


def dtype_name(dtype: torch.dtype) -> str:
    """vLLM's worker rebuilds dtypes with ``getattr(torch, name)``."""
    name = str(dtype).split(".")[-1]
    if getattr(torch, name, None) != dtype:
        raise ValueError(f"{dtype} has no torch attribute name vLLM can read back")
    return name


def update_info(specs: Iterable) -> dict:
    """The ``update_info`` of one round: ``specs`` is (hf_name, dtype, shape) in broadcast order
    (the export's ``out_specs["hf"]``)."""
    names, dtypes, shapes = [], [], []
    seen = set()
    for name, dtype, shape in specs:
        if name in seen:
            raise ValueError(f"{name!r} is declared twice: the broadcast order would be ambiguous")
        seen.add(name)
        names.append(name)
        dtypes.append(dtype_name(dtype))
        shapes.append([int(d) for d in shape])
    if not names:
        raise ValueError("nothing to broadcast: the export declares no HF tensor")
    return {"names": names, "dtype_names": dtypes, "shapes": shapes}


def init_info(master_address: str, master_port: int, server_world_size: int) -> tuple:
    """(the workers' init info for ``/init_weight_transfer_engine``, the trainer's rendezvous):
    one sender at rank 0, the server's workers after it; one tensor per broadcast (unpacked)."""
    if server_world_size < 1:
        raise ValueError(f"the server reports {server_world_size} workers")
    world = 1 + int(server_world_size)
    worker = {"master_address": master_address, "master_port": int(master_port), "rank_offset": 1,
              "world_size": world, "packed": False}
    return worker, {"master_address": master_address, "master_port": int(master_port), "world_size": world}


class InOrder:
    """Tensors arrive from many writers interleaved; the broadcast must follow the declaration.
    ``add`` returns what is now due, in order; early arrivals wait here (bounded in practice: the
    writers convert the plan's units in the same order, a few frames apart)."""

    def __init__(self, specs: Iterable):
        self.specs = [(n, d, tuple(int(x) for x in s)) for n, d, s in specs]
        self.index = {n: i for i, (n, _, _) in enumerate(self.specs)}
        self.next = 0
        self.held: dict = {}
        self.held_bytes = self.peak_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> list:
        i = self.index.get(name)
        if i is None:
            raise ValueError(f"{name!r} arrived but the export's plan does not declare it")
        _, dtype, shape = self.specs[i]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name!r} arrived as {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
        if i < self.next or name in self.held:
            raise ValueError(f"{name!r} arrived twice")
        if i > self.next:  # early: held until the tensors before it have gone
            self.held[name] = tensor
            self.held_bytes += tensor.numel() * tensor.element_size()
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
            return []
        due = [(name, tensor)]
        self.next += 1
        while self.next < len(self.specs) and self.specs[self.next][0] in self.held:
            name = self.specs[self.next][0]
            tensor = self.held.pop(name)
            self.held_bytes -= tensor.numel() * tensor.element_size()
            due.append((name, tensor))
            self.next += 1
        return due

    def missing(self) -> list:
        return [n for n, _, _ in self.specs[self.next:]]


def relay(addresses: list, token: str, order: InOrder, send: Callable, timeout: float) -> dict:
    """Read every writer (as the server would over ``tcp``) and ``send`` each tensor when due."""

    def apply(batch: dict) -> None:
        for name, tensor in batch.items():
            for due in order.add(name, tensor):
                send(*due)

    totals = reader.receive(addresses, token, apply, rank=0, timeout=timeout)
    if order.missing():
        raise ValueError(f"the writers ended without {len(order.missing())} declared tensors, first "
                         f"{order.missing()[0]!r}")
    return totals


def _beside(server: VLLMServer, path: str, body: dict) -> tuple:
    """POST ``path`` in a thread of its own: the server's side of an NCCL rendezvous or broadcast
    blocks until this side joins. Returns (thread, failures) for `_joined`."""
    failure: list = []

    def run():
        try:
            server.call("POST", path, body, server.stream_timeout)
        except ConnectionError as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"mte-serve-nccl{path.replace('/', '-')}", daemon=True)
    thread.start()
    return thread, failure


def _joined(server: VLLMServer, thread: threading.Thread, failure: list, path: str) -> None:
    """The call `_beside` started has returned, successfully; else its error (or a timeout) is raised."""
    thread.join(server.stream_timeout)
    if failure:
        raise failure[0]
    if thread.is_alive():
        raise ConnectionError(f"{path} did not return within {server.stream_timeout} s")


def _group(server: VLLMServer, host: str, port: int):
    """The trainer end of the server's NCCL group: joined once per server (both sides rendezvous
    at once, so the HTTP call runs beside the trainer's join)."""
    cached = _GROUPS.get(server.url)
    if cached is not None:
        return cached
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    workers = server.world_size()
    worker_info, trainer_info = init_info(host, port, workers)
    thread, failure = _beside(server, "/init_weight_transfer_engine", {"init_info": worker_info})
    group = trainer_init(trainer_info, rank=0)
    _joined(server, thread, failure, "/init_weight_transfer_engine")
    _GROUPS[server.url] = (group, workers)
    return _GROUPS[server.url]


def refit(server: VLLMServer, addresses: list, token: str, version: str, specs: list, *,
          master_address: Optional[str] = None, master_port: int = 0, on_stream_error=None) -> RefitResult:
    """Rank 0: the steps of `VLLMServer.refit` with the stream relayed into NCCL broadcasts."""
    from ..utils import free_port

    version, steps, started = str(version), {}, time.perf_counter()
    try:  # a bad plan fails here, before the server is touched
        info = update_info(specs)
    except ValueError as exc:
        raise RefitError(f"refit of {server.url} to version {version} failed at update_info: {exc}; the server "
                         "was not changed", "update_info", server.url, "unknown") from None
    try:
        check_backend(server)
    except ConfigError as exc:
        raise RefitError(f"refit of {server.url} to version {version} failed at server_info: {exc}; the server "
                         "was not changed", "server_info", server.url, "unknown") from None
    step, previous, paused = "weight_info", "?", False
    # the rendezvous store is opened here, on rank 0: its address as the server's workers reach it
    host = master_address or wire.local_address_towards(server.host, server.port)
    device = torch.device("cuda", torch.cuda.current_device())

    def timed(name, fn, *args):
        nonlocal step
        step, t0 = name, time.perf_counter()
        out = fn(*args)
        steps[name] = round(time.perf_counter() - t0, 4)
        return out

    try:
        previous = str(timed("weight_info", server.call, "GET", "/weight_info").get("weight_version"))
        timed("pause", server.call, "POST", "/pause?mode=keep")
        paused = True
        timed("mark_incomplete", server.set_version,
              f"{INCOMPLETE}: refit to {version} under way (last complete: {previous})")
        group, _ = timed("init_weight_transfer_engine", _group, server, host, master_port or free_port())
        timed("start_weight_update", server.call, "POST", "/start_weight_update")
        def send(name, tensor):
            if failure:
                raise ConnectionError(f"/update_weights failed while {name!r} was due: {failure[0]}")
            group.broadcast(tensor.to(device).contiguous(), src=0, stream=torch.cuda.current_stream())

        step, t0 = "update_weights", time.perf_counter()
        thread, failure = _beside(server, "/update_weights", {"update_info": info})
        try:
            totals = relay(addresses, token, InOrder(specs), send, server.stream_timeout)
        except (ValueError, OSError, RuntimeError) as exc:
            _GROUPS.pop(server.url, None)  # the group is mid-collective: never reused
            raise ConnectionError(f"relay into NCCL broke: {exc}") from None
        torch.cuda.current_stream().synchronize()
        _joined(server, thread, failure, "/update_weights")
        steps["update_weights"] = round(time.perf_counter() - t0, 4)
        timed("finish_weight_update", server.call, "POST", "/finish_weight_update", {"weight_version": version})
        timed("resume", server.call, "POST", "/resume")
    except Exception as exc:  # noqa: BLE001 - HTTP, the relay or NCCL itself: one failed refit
        cause = on_stream_error() if on_stream_error else None
        raise server._failed(step, exc, cause, version, previous, paused) from None
    result = RefitResult(version=version, previous=previous, seconds=time.perf_counter() - started,
                         writers=len(addresses), steps=steps)
    result.tensors, result.bytes = totals["tensors"], totals["bytes"]
    return result


def refit_tensors(url: str, tensors: list, version, *, timeout: float = 30.0, stream_timeout: float = 600.0,
                  master_address: Optional[str] = None) -> RefitResult:
    """One refit from this process alone over NCCL (``tensors``: (hf_name, tensor) pairs, in the
    order they are broadcast), as `client.refit` is for ``tcp``."""
    from .client import new_token
    from .writer import TensorWriter

    check_available()
    server = VLLMServer(url, timeout=timeout, stream_timeout=stream_timeout)
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors]
    token = new_token()
    writer = TensorWriter(iter(tensors), str(version), token, readers=1, bind="127.0.0.1",
                          connect_timeout=stream_timeout, io_timeout=stream_timeout).start()
    try:
        return refit(server, [writer.address()], token, str(version), specs, master_address=master_address,
                     on_stream_error=lambda: writer.error)
    finally:
        writer.close()
