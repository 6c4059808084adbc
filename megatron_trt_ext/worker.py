"""The export worker: a process of its own per training rank (spawned, never forked from the
trainer), so conversion and writing neither hold the trainer's GIL nor can crash it.

The workers of all ranks form their own gloo world for the transfers, on a TCP store that rank
0's worker serves at an address and port its trainer chose. They rendezvous explicitly, never
through launcher variables they inherit (torchrun's agent store, SLURM, ``mp.spawn``).

Each worker reads snapshots from the trainer's shared slots (`slots.SlotTable`; the worker knows
the trainer only through that table and the messages of `slots`, never its module). Queued saves
are exported oldest first (the trainer decides which queued saves a newer one replaces, and
empties their slots). Before each export the workers agree on the iteration: each proposes the
oldest save it holds, all take the largest proposal, and a worker whose trainer has not published
that save yet waits for it (bounded), so all ranks export the same save; an older save that the
agreed one overtook is reported as skipped.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from .engines.runner import launch_after_export
from .errors import ExportError
from .gather import Comm
from .plan import LocalPiece
from .result import ExportResult
from .slots import Broken, Done, SlotState, SlotStorage, SlotTable, Started, Stop, Superseded, Wake

# Launcher variables that would redirect the workers' rendezvous (torchrun makes every
# init_process_group a client of its agent's store when this is set).
_LAUNCHER_VARIABLES = ("TORCHELASTIC_USE_AGENT_STORE",)


class Stopped(Exception):
    """The trainer asked the worker to stop (or is gone)."""


class Worker:
    def __init__(self, conn, job, slots: SlotTable, heartbeat):
        self.conn, self.job, self.slots, self.heartbeat = conn, job, slots, heartbeat
        self.comm = None

    # ------------------------------------------------------------------ the trainer's messages
    def beat(self) -> None:
        self.heartbeat[0] = time.time()

    def handle(self, msg) -> None:
        match msg:
            case Stop():
                raise Stopped()
            case SlotStorage():
                self.slots.receive(msg)
            case Wake():
                pass  # the loop looks at the slots right after draining

    def drain(self, timeout: float) -> None:
        """Handle what the trainer sent within ``timeout`` seconds."""
        try:
            if self.conn.poll(timeout):
                while True:
                    self.handle(self.conn.recv())
                    if not self.conn.poll():
                        break
        except (EOFError, OSError):
            raise Stopped() from None

    # ------------------------------------------------------------------ slots
    def hold(self, at_least: int):
        """Lock the slot with the oldest save >= ``at_least``; waits for the trainer (bounded).
        Returns (slot, iteration) with that slot's lock held."""
        slots = self.slots
        deadline = time.monotonic() + self.job.config.timeout_s
        while True:
            found = slots.oldest_pending(at_least)
            if found is not None:
                slot = found[0]
                if slots.locks[slot].acquire(timeout=self.job.config.timeout_s):
                    if slots.holds_pending(slot, at_least):
                        return slot, slots.iteration(slot)
                    slots.locks[slot].release()  # overwritten meanwhile: look again
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
                self.slots.locks[slot].release()
                slot, iteration = self.hold(target)

    def supersede_older(self, taken: int, iteration: int) -> None:
        """A pending save older than the one being exported will never be: report it. Normally
        there is none (exports go oldest first); one appears when ranks saw different queues (a
        rank had not published a save yet when the others proposed it)."""
        slots = self.slots
        for slot in slots.slots_in(SlotState.PENDING):
            if slot == taken or not slots.locks[slot].acquire(block=False):
                continue
            try:
                if slots.state(slot) == SlotState.PENDING and slots.iteration(slot) < iteration:
                    slots.set_state(slot, SlotState.EMPTY)
                    self.conn.send(Superseded(slots.iteration(slot), iteration))
            finally:
                slots.locks[slot].release()

    # ------------------------------------------------------------------ exports
    def export_next(self) -> bool:
        """Export the oldest published save, if any (collective with the other workers)."""
        slots = self.slots
        found = slots.oldest_pending()
        if found is None:
            return False
        slot, iteration = self.hold(found[1])
        try:
            slot, iteration = self.agree(slot, iteration)
        except BaseException:
            slots.locks[slot].release()
            raise
        try:
            slots.set_state(slot, SlotState.TAKEN)
            self.supersede_older(slot, iteration)
            self.conn.send(Started(iteration))
            meta = slots.read_meta(slot)  # written before the slot was published: always this save's
            local: dict = {}
            for (name, offset, shape), buf in slots.buffers[slot].items():
                local.setdefault(name, []).append(LocalPiece(offset, shape, buf, True))
            timings = dict(meta.timings)
            try:
                result = self.job.run(self.comm, local, iteration, timings, on_progress=self.beat,
                                      verification=meta.probe)
            except ExportError as exc:
                result = getattr(exc, "result", None) or ExportResult(
                    iteration, None, "failed", list(self.job.config.formats), timings, 0, str(exc))
            except Exception as exc:  # noqa: BLE001
                text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                result = ExportResult(iteration, None, "failed", list(self.job.config.formats), timings, 0, text)
            slots.set_state(slot, SlotState.EMPTY)
        finally:
            slots.locks[slot].release()
        self.conn.send(Done(result))
        self.beat()
        launch_after_export(self.job.config, self.job.rank, result)
        sys.stdout.flush()
        if self.comm.broken:  # the world is torn down: the trainer starts fresh workers at the next save
            self.conn.send(Broken("its process group was torn down after the failed export of iteration "
                                  f"{iteration}; fresh workers start at the next save"))
            raise Stopped()
        return True


def _join_world(job, addr: str, port: int):
    for name in _LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    store = None
    if job.world_size > 1:
        timeout = timedelta(seconds=job.config.timeout_s)
        store = dist.TCPStore(addr, port, job.world_size, is_master=job.rank == 0, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=job.rank, world_size=job.world_size, timeout=timeout)
    return Comm(job.config.timeout_s, torch.device("cpu"), own_world=True, store=store)


def worker_main(conn, job, slots: SlotTable, heartbeat, addr: str, port: int) -> None:
    """Serve export requests from the trainer until told to stop."""
    torch.set_num_threads(1)  # leave the cores to training; the work here is mostly copies and I/O
    worker = Worker(conn, job, slots, heartbeat)
    try:
        worker.beat()
        worker.comm = _join_world(job, addr, port)
        if job.quant is not None and job.quant.algo is not None:
            import modelopt.torch.export.quant_utils  # noqa: F401  (seconds to import: not on the first export)
        worker.beat()
    except BaseException as exc:  # noqa: BLE001
        try:
            conn.send(Broken(f"could not start: {type(exc).__name__}: {exc}"))
        except OSError:
            pass
        return
    try:
        while True:
            worker.drain(1.0)
            while worker.export_next():
                pass
    except Stopped:
        return
    except BaseException as exc:  # noqa: BLE001 - e.g. the agreement broke: a peer is gone
        try:
            conn.send(Broken(f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
