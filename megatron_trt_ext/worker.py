"""The export worker: a process of its own per training rank (spawned, never forked from the
trainer), so conversion and writing neither hold the trainer's GIL nor can crash it.

The workers of all ranks form their own gloo world for the transfers, on a TCP store that rank
0's worker serves at an address and port its trainer chose. They rendezvous explicitly, never
through launcher variables they inherit (torchrun's agent store, SLURM, ``mp.spawn``).

Each worker reads snapshots from the trainer's shared slots (see `background`). Before each
export the workers agree on the iteration: each proposes the newest save it holds; a worker
whose trainer has not published the newest proposal yet waits for it (bounded), so all ranks
export the same save, and an older save that a newer one overtook is reported as skipped.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

# Launcher variables that would redirect the workers' rendezvous (torchrun makes every
# init_process_group a client of its agent's store when this is set).
_LAUNCHER_VARIABLES = ("TORCHELASTIC_USE_AGENT_STORE",)


class Stop(Exception):
    """The trainer asked the worker to stop (or is gone)."""


class Worker:
    def __init__(self, conn, job, buffers, headers, locks, heartbeat):
        self.conn, self.job, self.buffers = conn, job, list(buffers)
        self.headers, self.locks, self.heartbeat = headers, locks, heartbeat
        self.timings: dict = {}
        self.probes: dict = {}  # iteration -> the trainer's verification probe record (rank 0)
        self.comm = None
        self.last_done = -1

    # ------------------------------------------------------------------ the trainer's messages
    def beat(self) -> None:
        self.heartbeat[0] = time.time()

    def handle(self, msg) -> None:
        if msg[0] == "stop":
            raise Stop()
        if msg[0] == "slot":
            self.buffers[msg[1]] = msg[2]
        elif msg[0] == "wake" and len(msg) > 1:
            self.timings[msg[1]] = msg[2]
            self.probes[msg[1]] = msg[3]

    def drain(self, timeout: float) -> None:
        """Handle what the trainer sent within ``timeout`` seconds."""
        try:
            if self.conn.poll(timeout):
                while True:
                    self.handle(self.conn.recv())
                    if not self.conn.poll():
                        break
        except (EOFError, OSError):
            raise Stop() from None

    # ------------------------------------------------------------------ slots
    def pending(self):
        """(slot, iteration) of the newest published save, or None."""
        from .background import NUM_SLOTS, PENDING

        best = None
        for slot in range(NUM_SLOTS):
            if int(self.headers[slot, 0]) == PENDING and self.buffers[slot] is not None:
                iteration = int(self.headers[slot, 1])
                if best is None or iteration > best[1]:
                    best = (slot, iteration)
        return best

    def hold(self, at_least: int):
        """Lock the slot with the newest save >= ``at_least``; waits for the trainer (bounded).
        Returns (slot, iteration) with that slot's lock held."""
        from .background import PENDING

        deadline = time.monotonic() + self.job.config.timeout_s
        while True:
            found = self.pending()
            if found is not None and found[1] >= at_least:
                slot = found[0]
                if self.locks[slot].acquire(timeout=self.job.config.timeout_s):
                    if int(self.headers[slot, 0]) == PENDING and int(self.headers[slot, 1]) >= at_least:
                        return slot, int(self.headers[slot, 1])
                    self.locks[slot].release()  # overwritten meanwhile: look again
            if time.monotonic() > deadline:
                raise RuntimeError(f"no snapshot of iteration >= {at_least} arrived from the trainer within "
                                   f"{self.job.config.timeout_s} s")
            self.beat()
            self.drain(0.01)

    def agree(self, slot: int, iteration: int) -> tuple:
        """All workers settle on one iteration; returns (slot, iteration), that slot held."""
        while True:
            proposals = self.comm.all_gather_object(iteration)
            target = max(proposals)
            if all(p == target for p in proposals):
                return slot, iteration
            if iteration < target:
                self.locks[slot].release()
                slot, iteration = self.hold(target)

    def supersede_older(self, taken: int, iteration: int) -> None:
        """A pending save older than the one being exported will never be: report it."""
        from .background import EMPTY, NUM_SLOTS, PENDING

        for slot in range(NUM_SLOTS):
            if slot == taken or not self.locks[slot].acquire(block=False):
                continue
            try:
                if int(self.headers[slot, 0]) == PENDING and int(self.headers[slot, 1]) < iteration:
                    self.headers[slot, 0] = EMPTY
                    self.conn.send(("superseded", int(self.headers[slot, 1]), iteration))
            finally:
                self.locks[slot].release()

    # ------------------------------------------------------------------ exports
    def export_next(self) -> bool:
        """Export the newest published save, if any (collective with the other workers)."""
        from .background import EMPTY, TAKEN
        from .errors import ExportError
        from .job import ExportResult
        from .plan import LocalPiece

        found = self.pending()
        if found is None:
            return False
        slot, iteration = self.hold(found[1])
        try:
            slot, iteration = self.agree(slot, iteration)
        except BaseException:
            self.locks[slot].release()
            raise
        try:
            self.headers[slot, 0] = TAKEN
            self.supersede_older(slot, iteration)
            self.conn.send(("started", iteration))
            self.drain(0)  # the wake message carrying this save's timings
            local: dict = {}
            for (name, offset, shape), buf in self.buffers[slot].items():
                local.setdefault(name, []).append(LocalPiece(offset, shape, buf, True))
            timings = dict(self.timings.pop(iteration, {}))
            probe = self.probes.pop(iteration, None)
            try:
                result = self.job.run(self.comm, local, iteration, timings, on_progress=self.beat,
                                      verification=probe)
            except ExportError as exc:
                result = getattr(exc, "result", None) or ExportResult(
                    iteration, None, "failed", list(self.job.config.formats), timings, 0, str(exc))
            except Exception as exc:  # noqa: BLE001
                text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                result = ExportResult(iteration, None, "failed", list(self.job.config.formats), timings, 0, text)
            self.headers[slot, 0] = EMPTY
        finally:
            self.locks[slot].release()
        self.conn.send(("done", result))
        self.beat()
        from .engines.runner import launch_after_export

        launch_after_export(self.job.config, self.job.rank, result)
        sys.stdout.flush()
        for old in [i for i in self.timings if i < iteration]:
            del self.timings[old]
        for old in [i for i in self.probes if i < iteration]:
            del self.probes[old]
        if self.comm.broken:  # the world is torn down: the trainer starts fresh workers at the next save
            self.conn.send(("broken", "its process group was torn down after the failed export of iteration "
                                      f"{iteration}; fresh workers start at the next save"))
            raise Stop()
        return True


def _join_world(job, addr: str, port: int):
    import torch
    import torch.distributed as dist
    from datetime import timedelta

    from .gather import Comm

    for name in _LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    store = None
    if job.world_size > 1:
        timeout = timedelta(seconds=job.config.timeout_s)
        store = dist.TCPStore(addr, port, job.world_size, is_master=job.rank == 0, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=job.rank, world_size=job.world_size, timeout=timeout)
    return Comm(job.config.timeout_s, torch.device("cpu"), own_world=True, store=store)


def worker_main(conn, job, buffers, headers, locks, heartbeat, addr: str, port: int) -> None:
    """Serve export requests from the trainer until told to stop."""
    import torch

    torch.set_num_threads(1)  # leave the cores to training; the work here is mostly copies and I/O
    worker = Worker(conn, job, buffers, headers, locks, heartbeat)
    try:
        worker.beat()
        worker.comm = _join_world(job, addr, port)
        if job.quant is not None and job.quant.algo is not None:
            import modelopt.torch.export.quant_utils  # noqa: F401  (seconds to import: not on the first export)
        worker.beat()
    except BaseException as exc:  # noqa: BLE001
        try:
            conn.send(("broken", f"could not start: {type(exc).__name__}: {exc}"))
        except OSError:
            pass
        return
    try:
        while True:
            worker.drain(1.0)
            while worker.export_next():
                pass
    except Stop:
        return
    except BaseException as exc:  # noqa: BLE001 - e.g. the agreement broke: a peer is gone
        try:
            conn.send(("broken", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
