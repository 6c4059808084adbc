"""The async path's shared vocabulary: the snapshot slot table that the trainer (`background`) and
its export worker (`worker`) both read and write, and the messages they send each other.

Both sides import this module and neither imports the other's, so the protocol is written once.

A slot is everything one save needs: shared buffers (one per local slice an export reads), a
shared byte buffer holding the save's metadata (`SaveMeta`: timings, the verification probe
record), and a lock; the table's shared header holds each slot's state, iteration, metadata size
and storage generation. The trainer writes a slot only while it holds the slot's lock and marks
it `SlotState.PENDING` last, after the tensors *and* the metadata are in place, so a worker that
finds a pending slot finds the whole save in it (no message can arrive too late). Messages only
nudge the worker (`Wake`) or hand it new shared storage (`SlotStorage`), and report back.

How many slots hold storage at once (each one a copy of the rank's share of the weights in host
memory): one from attach; two once a save comes while an export runs (one exported, one queued);
up to `MAX_SLOTS` only while saves come before the workers have started any export (each early
save is queued in a slot of its own). Slots beyond `STEADY_SLOTS` are given back once empty.
"""

from __future__ import annotations

import enum
import pickle
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

MAX_SLOTS = 4     # saves that can wait, each in its own slot, for workers that are still starting
STEADY_SLOTS = 2  # kept once allocated: the export that runs and the one save queued behind it
NUM_SLOTS = MAX_SLOTS  # rows of the shared header (storage is allocated only for slots in use)
META_BYTES = 64 << 10  # a slot's first metadata capacity (the default probe record is ~13 KB); grows on demand

# columns of the shared header, one row per slot
_STATE, _ITERATION, _META_SIZE, _GENERATION = range(4)


class SlotState(enum.IntEnum):
    EMPTY = 0    # nothing to export (free, or its save was exported, superseded or given up)
    PENDING = 1  # a whole save, published for the worker
    TAKEN = 2    # the worker exports from it and holds its lock


@dataclass
class SaveMeta:
    """What the worker needs of one save besides its tensors: the trainer's timings (stall,
    snapshot, probe, ``submitted_unix``) and the verification probe record (rank 0, else None)."""

    timings: dict
    probe: Optional[Any] = None


# ---------------------------------------------------------------------- trainer -> worker
@dataclass(frozen=True)
class Wake:
    """A slot was published: look now (an idle worker also looks every second)."""


@dataclass(frozen=True)
class SlotStorage:
    """New shared storage of a slot (its first buffers, or a larger metadata buffer), sent before
    the slot is published; the worker ignores a slot whose generation it has not received yet.
    ``buffers`` None: the trainer gave the slot's storage back (the worker drops its handles)."""

    slot: int
    generation: int
    buffers: Optional[dict]
    meta: Optional[torch.Tensor]


@dataclass(frozen=True)
class Stop:
    """Finish nothing more and exit."""


# ---------------------------------------------------------------------- worker -> trainer
@dataclass(frozen=True)
class Started:
    iteration: int


@dataclass(frozen=True)
class Done:
    result: Any  # the final ExportResult (complete or failed)


@dataclass(frozen=True)
class Superseded:
    """A pending save that a newer one overtook before its export started: it never will."""

    old: int
    new: int


@dataclass(frozen=True)
class Broken:
    """The worker cannot go on (it could not start, or its process group is torn down)."""

    reason: str


def allocate_buffers(needs: list, dtypes: dict) -> dict:
    """One shared-memory buffer per local slice an export reads."""
    return {(name, offset, shape): torch.empty(shape, dtype=dtypes[name]).share_memory_()
            for name, offset, shape in needs}


def _shared_bytes(size: int) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8).share_memory_()


class SlotTable:
    """The slots of one rank. The trainer creates it (slot 0's storage at once, the others the
    first time a save needs them) and the worker receives a copy when it starts; storage made
    later reaches the worker as `SlotStorage`. ``locks`` are replaced for every worker
    generation (a killed worker may die holding one)."""

    def __init__(self, needs: list, dtypes: dict):
        self.needs, self.dtypes = needs, dtypes
        self.header = torch.zeros(NUM_SLOTS, 4, dtype=torch.int64).share_memory_()
        self.buffers: list = [allocate_buffers(needs, dtypes)] + [None] * (NUM_SLOTS - 1)
        self.meta: list = [_shared_bytes(META_BYTES)] + [None] * (NUM_SLOTS - 1)
        self.generation = [0] * NUM_SLOTS  # of the storage this side holds, per slot
        self.locks: list = []

    # ------------------------------------------------------------------ either side
    def state(self, slot: int) -> SlotState:
        return SlotState(int(self.header[slot, _STATE]))

    def set_state(self, slot: int, state: SlotState) -> None:
        self.header[slot, _STATE] = int(state)

    def iteration(self, slot: int) -> int:
        return int(self.header[slot, _ITERATION])

    def slots_in(self, state: SlotState) -> list:
        return [slot for slot in range(NUM_SLOTS) if self.state(slot) == state]

    def ready(self, slot: int) -> bool:
        """This side holds the storage the slot's contents were written to."""
        return self.buffers[slot] is not None and self.generation[slot] == int(self.header[slot, _GENERATION])

    # ------------------------------------------------------------------ the trainer
    def has_room(self) -> bool:
        """A slot holds no save (allocated or not): a new save needs to replace none."""
        return bool(self.slots_in(SlotState.EMPTY))

    def allocated(self) -> int:
        return sum(b is not None for b in self.buffers)

    def lock_free(self, timeout_s: float, replace: bool = False) -> int:
        """Lock a slot for a new save: an empty slot with storage first, then one without (its
        storage is made on first use), never a pending save while an empty slot is left. With
        ``replace``, a pending save's slot is taken when no empty slot can be locked (the caller
        records that save as replaced). The worker holds at most one lock at a time; the snapshot
        thread of the previous save may hold another for as long as its copies take."""
        deadline = time.monotonic() + timeout_s
        while True:
            empty = [s for s in range(NUM_SLOTS) if self.state(s) == SlotState.EMPTY]
            order = sorted(empty, key=lambda s: self.buffers[s] is None)
            if replace:  # the newest pending save first: the one closest to the save replacing it
                order += sorted(self.slots_in(SlotState.PENDING), key=self.iteration, reverse=True)
            for slot in order:
                if self.locks[slot].acquire(block=False):
                    if self.state(slot) == SlotState.EMPTY or (replace and self.state(slot) == SlotState.PENDING):
                        return slot
                    self.locks[slot].release()  # taken or filled meanwhile
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not lock a snapshot slot within {timeout_s:.0f} s")
            time.sleep(0.001)

    def empty_pending(self, keep: int) -> list:
        """Empty the slots of queued saves that a newer save replaces, but for ``keep`` and the one
        the worker holds (it exports it, or is about to); returns their iterations."""
        replaced = []
        for slot in self.slots_in(SlotState.PENDING):
            if slot == keep or not self.locks[slot].acquire(block=False):
                continue
            try:
                if self.state(slot) == SlotState.PENDING:
                    self.set_state(slot, SlotState.EMPTY)
                    replaced.append(self.iteration(slot))
            finally:
                self.locks[slot].release()
        return sorted(replaced)

    def free_extra(self, keep: int) -> list:
        """Give back the storage of empty slots until ``keep`` slots have storage; returns
        (buffers, message) per slot: the buffers to unpin, the message that makes the worker drop
        its handles too."""
        freed = []
        for slot in reversed(range(NUM_SLOTS)):
            if self.allocated() <= keep:
                break
            if self.buffers[slot] is None or not self.locks[slot].acquire(block=False):
                continue
            try:
                if self.state(slot) == SlotState.EMPTY:
                    buffers, self.buffers[slot], self.meta[slot] = self.buffers[slot], None, None
                    self.generation[slot] += 1
                    self.header[slot, _GENERATION] = self.generation[slot]
                    freed.append((buffers, SlotStorage(slot, self.generation[slot], None, None)))
            finally:
                self.locks[slot].release()
        return freed

    def ensure_buffers(self, slot: int) -> Optional[SlotStorage]:
        """Allocate the slot's storage the first time it is used (slot lock held); returns the
        message that hands it to the worker, or None when it already exists."""
        if self.buffers[slot] is not None:
            return None
        self.buffers[slot] = allocate_buffers(self.needs, self.dtypes)
        self.meta[slot] = _shared_bytes(META_BYTES)
        return self._new_generation(slot)

    def write_meta(self, slot: int, iteration: int, meta: SaveMeta) -> Optional[SlotStorage]:
        """Store the save's iteration and metadata in the slot (slot lock held, before it is
        marked pending). Returns the message for the worker when the metadata outgrew the slot's
        byte buffer (send it before publishing), else None."""
        data = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
        message = None
        if len(data) > self.meta[slot].numel():
            self.meta[slot] = _shared_bytes(max(2 * self.meta[slot].numel(), len(data)))
            message = self._new_generation(slot)
        self.meta[slot][:len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.header[slot, _META_SIZE] = len(data)
        self.header[slot, _ITERATION] = iteration
        return message

    def _new_generation(self, slot: int) -> SlotStorage:
        self.generation[slot] += 1
        self.header[slot, _GENERATION] = self.generation[slot]
        return SlotStorage(slot, self.generation[slot], self.buffers[slot], self.meta[slot])

    # ------------------------------------------------------------------ the worker
    def receive(self, storage: SlotStorage) -> None:
        self.buffers[storage.slot], self.meta[storage.slot] = storage.buffers, storage.meta
        self.generation[storage.slot] = storage.generation

    def holds_pending(self, slot: int, at_least: int = -1) -> bool:
        """The slot holds a published save of iteration >= ``at_least`` whose storage this side has."""
        return self.state(slot) == SlotState.PENDING and self.ready(slot) and self.iteration(slot) >= at_least

    def oldest_pending(self, at_least: int = -1) -> Optional[tuple]:
        """(slot, iteration) of the oldest save that `holds_pending` finds, or None."""
        found = [(self.iteration(slot), slot) for slot in range(NUM_SLOTS) if self.holds_pending(slot, at_least)]
        if not found:
            return None
        iteration, slot = min(found)
        return slot, iteration

    def newest_pending(self, at_least: int = -1) -> Optional[tuple]:
        """(slot, iteration) of the newest save that `holds_pending` finds, or None."""
        found = [(self.iteration(slot), slot) for slot in range(NUM_SLOTS) if self.holds_pending(slot, at_least)]
        if not found:
            return None
        iteration, slot = max(found)
        return slot, iteration

    def read_meta(self, slot: int) -> SaveMeta:
        """The save's metadata (slot lock held). Written by this job's own trainer process."""
        size = int(self.header[slot, _META_SIZE])
        return pickle.loads(self.meta[slot][:size].numpy().tobytes())
