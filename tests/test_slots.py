"""The async path's slot table and protocol (`slots`), on one process: a second view of the table
stands in for the worker (the same shared header, its own storage handles)."""

import ast
import copy
from pathlib import Path

import torch

from megatron_trt_ext.slots import META_BYTES, SaveMeta, SlotState, SlotStorage, SlotTable
from megatron_trt_ext.verification.probe import ProbeRecord

ROOT = Path(__file__).resolve().parent.parent
NEEDS = [("w", (0, 0), (4, 3)), ("b", (0,), (5,))]
DTYPES = {"w": torch.float32, "b": torch.bfloat16}


def worker_view(table: SlotTable) -> SlotTable:
    """What the worker holds: the shared header itself, its own list of storage handles."""
    view = copy.copy(table)
    view.buffers, view.meta, view.generation = list(table.buffers), list(table.meta), list(table.generation)
    return view


def publish(table: SlotTable, slot: int, iteration: int, meta: SaveMeta):
    storage = table.write_meta(slot, iteration, meta)
    table.set_state(slot, SlotState.PENDING)
    return storage


def test_the_save_metadata_is_read_from_the_slot():
    table = SlotTable(NEEDS, DTYPES)
    worker = worker_view(table)
    probe = ProbeRecord(meta={"status": "recorded"}, data=bytes(range(256)) * 8, sha256={"tokens": "ab"})
    assert publish(table, 0, 7, SaveMeta({"stall_s": 1.5, "submitted_unix": 3.0}, probe)) is None
    assert worker.newest_pending() == (0, 7)
    meta = worker.read_meta(0)
    assert meta.timings == {"stall_s": 1.5, "submitted_unix": 3.0}
    assert meta.probe == probe


def test_metadata_larger_than_the_slot_counts_only_once_the_worker_has_its_storage():
    """A probe record over the slot's byte buffer gets a new shared buffer, handed to the worker
    (`SlotStorage`) before the slot is published; a worker that has not received it yet does not
    take the slot (it would read the old buffer)."""
    table = SlotTable(NEEDS, DTYPES)
    worker = worker_view(table)
    big = ProbeRecord(meta={"status": "recorded"}, data=b"\x07" * (2 * META_BYTES))
    storage = publish(table, 0, 9, SaveMeta({"stall_s": 2.0}, big))
    assert isinstance(storage, SlotStorage) and storage.slot == 0 and storage.meta.numel() >= 2 * META_BYTES
    assert worker.newest_pending() is None and not worker.holds_pending(0)
    worker.receive(storage)
    assert worker.newest_pending() == (0, 9)
    assert worker.read_meta(0).probe.data == big.data


def test_the_second_slot_is_made_on_first_use_and_the_newest_save_wins():
    table = SlotTable(NEEDS, DTYPES)
    worker = worker_view(table)
    assert table.buffers[1] is None
    storage = table.ensure_buffers(1)
    assert {k: (b.shape, b.dtype) for k, b in storage.buffers.items()} == {
        ("w", (0, 0), (4, 3)): (torch.Size([4, 3]), torch.float32), ("b", (0,), (5,)): (torch.Size([5]), torch.bfloat16)}
    assert table.ensure_buffers(1) is None  # made once
    publish(table, 0, 4, SaveMeta({}))
    publish(table, 1, 5, SaveMeta({}))
    assert worker.newest_pending() == (0, 4)  # slot 1's storage has not reached the worker yet
    worker.receive(storage)
    assert worker.newest_pending() == (1, 5)
    assert worker.newest_pending(at_least=6) is None
    table.set_state(1, SlotState.TAKEN)
    assert worker.newest_pending() == (0, 4) and worker.slots_in(SlotState.TAKEN) == [1]


def imported_modules(path: Path) -> set:
    """Every package module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            names.update({node.module} if node.module else {a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_trt_ext."):
            names.add(node.module.split(".", 1)[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("megatron_trt_ext."))
    return {name.split(".")[0] for name in names}


def test_the_worker_never_imports_the_trainer_side():
    """No cycle: the trainer side (`background`) starts the worker; the worker and the protocol
    know the trainer only through `slots`."""
    package = ROOT / "megatron_trt_ext"
    assert "slots" in imported_modules(package / "worker.py")
    assert "background" not in imported_modules(package / "worker.py")
    assert not {"background", "worker"} & imported_modules(package / "slots.py")
