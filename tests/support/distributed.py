"""Run a function on N local gloo ranks (spawned processes) and collect each rank's outcome.

For tests and benchmarks: the training layouts (TP, PP, virtual PP, DP, EP) on one CPU machine.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import time
import traceback

from .models import free_port


def _entry(rank: int, world_size: int, port: int, target: str, kwargs: dict, results,
           cpu_shim: bool = True) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from examples.cpu_shim import install, stub_triton_only_modules

        stub_triton_only_modules()
        if cpu_shim:
            install()
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
        out = fn(rank=rank, world_size=world_size, **kwargs)
        results.put((rank, "ok", out))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(world_size: int, target: str, timeout_s: float = 300, cpu_shim: bool = True, **kwargs) -> dict:
    """Run ``module:function(rank=, world_size=, **kwargs)`` on each rank.

    ``cpu_shim=False``: without `examples.cpu_shim.install` (code that must work on CPU as it is).

    Returns {rank: ("ok", value) | ("error", text) | ("lost", exit code)}. Ranks still running
    after ``timeout_s`` are killed and reported as ("hung", None).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, target, kwargs, results, cpu_shim))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict = {}
    deadline = time.monotonic() + timeout_s
    while len(outcome) < world_size and time.monotonic() < deadline:
        try:
            rank, status, value = results.get(timeout=0.5)
            outcome[rank] = (status, value)
        except queue.Empty:
            if all(not p.is_alive() for p in procs):
                # drain what is left, then mark silent deaths
                while True:
                    try:
                        rank, status, value = results.get(timeout=0.5)
                        outcome[rank] = (status, value)
                    except queue.Empty:
                        break
                break
    for rank, p in enumerate(procs):
        p.join(timeout=max(0.0, deadline - time.monotonic()) if rank not in outcome else 10)
        if p.is_alive():
            p.kill()
            p.join()
            outcome.setdefault(rank, ("hung", None))
        outcome.setdefault(rank, ("lost", p.exitcode))
    return outcome
