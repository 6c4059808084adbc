"""Early saves (issue 21): saves that come while the export workers are still starting are queued,
each in its own snapshot slot, and exported oldest first; ``busy_policy: skip`` replaces a queued
save only with a newer one that comes while an export is running (newest wins), and says so.

The workers here start, and each export runs, only when the test opens a gate (a file in the
directory named by ``MTE_TEST_GATES``), so "still starting" and "running" last exactly as long as
each case needs, whatever the machine's speed.
"""

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import ExportConfig, attach
from megatron_trt_ext import background as background_mod
from megatron_trt_ext import manifest as mf
from megatron_trt_ext import slots as slots_mod
from megatron_trt_ext.worker import worker_main
from tests.support.distributed import run_ranks
from tests.support.models import randomize, tiny_llama

# Worker processes and slot bookkeeping: nothing here depends on the megatron-core version beyond
# what test_async covers on both; pinned version only (the CI time budget).
pytestmark = pytest.mark.heavy

GATES = "MTE_TEST_GATES"
GATE_LIMIT_S = 120  # a gate nobody opens lets the worker go on after this (nothing waits forever)


def _await_gate(path: Path) -> None:
    deadline = time.monotonic() + GATE_LIMIT_S
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def gated_worker_main(conn, job, slots, heartbeat, addr, port):
    """The real worker (in its own spawned process), started once ``start`` exists; the export of
    iteration N runs once ``export-N`` (or ``export-all``) exists."""
    gates = Path(os.environ[GATES])
    _await_gate(gates / "start")
    run = job.run

    def held_run(comm, local, iteration, *args, **kwargs):
        deadline = time.monotonic() + GATE_LIMIT_S
        while not ((gates / f"export-{iteration}").exists() or (gates / "export-all").exists()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return run(comm, local, iteration, *args, **kwargs)

    job.run = held_run
    worker_main(conn, job, slots, heartbeat, addr, port)


def gate_workers(gates: Path) -> None:
    """Every export worker started after this call waits for the test's gates."""
    gates.mkdir(exist_ok=True)
    os.environ[GATES] = str(gates)
    background_mod.worker_main = gated_worker_main


@pytest.fixture
def gates(tmp_path, monkeypatch):
    monkeypatch.setenv(GATES, str(tmp_path / "gates"))
    monkeypatch.setattr(background_mod, "worker_main", gated_worker_main)
    (tmp_path / "gates").mkdir()
    return tmp_path / "gates"


def wait_started(background, iteration, timeout=60):
    deadline = time.monotonic() + timeout
    while background.running != iteration:
        background.poll()
        assert time.monotonic() < deadline, f"the worker never started iteration {iteration}"
        time.sleep(0.01)


def outcomes(exporter) -> dict:
    return {r.iteration: r.status for r in exporter.results if r.status != "running"}


def save(handle, model, iteration, weights):
    """A training step (the norm changes), then the save; remembers the weights of the save."""
    with torch.no_grad():
        model.decoder.final_layernorm.weight.add_(1.0)
    weights[iteration] = model.decoder.final_layernorm.weight.detach().clone()
    result = handle.on_checkpoint_saved(iteration=iteration)
    assert result.status == "running", (iteration, result.error)


@pytest.mark.parametrize("policy", ["skip", "wait"])
def test_saves_while_the_workers_start_are_queued_and_all_exported(megatron_world, tmp_path, gates, policy):
    """The user's case: saves 2 iterations apart right after attach, before the workers are up.
    Each is snapshotted into its own slot at once (no save waits for the starting workers, not
    even under ``wait``), none is dropped, and each export holds the weights of its own save."""
    model = tiny_llama()
    randomize(model, seed=5)
    handle = attach(model, ExportConfig(output_dir=str(tmp_path / "out"), vocab_size=120, formats=["hf"],
                                        dtype="float32", busy_policy=policy, timeout_s=60))
    safety = threading.Timer(30, lambda: (gates / "start").touch())  # the old code waited for the workers
    safety.start()
    weights = {}
    try:
        for iteration in (2, 4, 6, 8):
            save(handle, model, iteration, weights)
        assert not (gates / "start").exists(), "a save waited for the starting workers"
        assert outcomes(handle.exporter) == {}  # nothing replaced while the workers start
        (gates / "export-all").touch()
        (gates / "start").touch()
        handle.wait()
    finally:
        safety.cancel()
        (gates / "start").touch()
        (gates / "export-all").touch()
        handle.detach()
    assert outcomes(handle.exporter) == {2: "complete", 4: "complete", 6: "complete", 8: "complete"}
    for iteration, weight in weights.items():
        stored = load_file(str(tmp_path / "out" / f"iter_{iteration:07d}" / "hf" / "model.safetensors"))
        assert torch.equal(stored["model.norm.weight"], weight), iteration
    assert mf.latest_export(tmp_path / "out").name == "iter_0000008"


def test_a_save_behind_a_running_export_replaces_the_queued_ones_and_says_so(megatron_world, tmp_path, gates,
                                                                              caplog):
    """The rule of ``skip``: a save that comes while an export is running replaces every save
    still queued (newest wins); saves queued while nothing ran are not replaced by each other."""
    model = tiny_llama()
    handle = attach(model, ExportConfig(output_dir=str(tmp_path / "out"), vocab_size=120, formats=["hf"],
                                        dtype="float32", timeout_s=60))
    background, weights = handle.exporter._background, {}
    caplog.set_level(logging.WARNING, logger="megatron_trt_ext")
    try:
        save(handle, model, 2, weights)
        save(handle, model, 4, weights)   # queued while the workers start: kept
        (gates / "start").touch()
        wait_started(background, 2)       # the export of 2 runs (held at its gate) ...
        save(handle, model, 6, weights)   # ... so 6 replaces the queued 4
        save(handle, model, 8, weights)   # and 8 replaces 6
        assert outcomes(handle.exporter) == {4: "skipped", 6: "skipped"}
        (gates / "export-all").touch()
        handle.wait()
    finally:
        (gates / "start").touch()
        (gates / "export-all").touch()
        handle.detach()
    assert outcomes(handle.exporter) == {2: "complete", 4: "skipped", 6: "skipped", 8: "complete"}
    log = caplog.text
    assert "export of iteration 4 skipped: replaced by the newer save of iteration 6" in log
    assert "export of iteration 6 skipped: replaced by the newer save of iteration 8" in log
    stored = load_file(str(tmp_path / "out" / "iter_0000008" / "hf" / "model.safetensors"))
    assert torch.equal(stored["model.norm.weight"], weights[8])


def test_more_early_saves_than_slots_wait_for_the_first_export_to_start(megatron_world, tmp_path, gates):
    """Memory stays bounded: at most MAX_SLOTS saves wait for starting workers; the next one waits
    (bounded) until an export runs, and is then queued behind it (newest wins). The extra slots
    are given back once empty."""
    model = tiny_llama()
    handle = attach(model, ExportConfig(output_dir=str(tmp_path / "out"), vocab_size=120, formats=["hf"],
                                        dtype="float32", timeout_s=60))
    background, weights = handle.exporter._background, {}
    early = [2 * (i + 1) for i in range(slots_mod.MAX_SLOTS)]
    opener = threading.Timer(1.0, lambda: (gates / "start").touch())
    try:
        for iteration in early:
            save(handle, model, iteration, weights)
        assert not (gates / "start").exists()
        opener.start()
        last = early[-1] + 2
        save(handle, model, last, weights)  # no slot left: waits until the first export starts
        assert (gates / "start").exists()
        wait_started(background, early[0])
        (gates / "export-all").touch()
        handle.wait()
        allocated = sum(b is not None for b in background.slots.buffers)
    finally:
        opener.cancel()
        (gates / "start").touch()
        (gates / "export-all").touch()
        handle.detach()
    expected = {early[0]: "complete", last: "complete", **{i: "skipped" for i in early[1:]}}
    assert outcomes(handle.exporter) == expected
    assert allocated <= 2


def test_slot_choice_never_replaces_a_queued_save_while_an_empty_slot_is_left():
    """The table alone (no processes): a new save takes an empty slot before any queued one, the
    worker finds the oldest queued save first, and storage beyond the steady two is given back."""
    import multiprocessing as mp

    from megatron_trt_ext.slots import STEADY_SLOTS, SaveMeta, SlotState, SlotTable

    table = SlotTable([("w", (0,), (3,))], {"w": torch.float32})
    table.locks = [mp.get_context("spawn").Lock() for _ in range(slots_mod.MAX_SLOTS)]
    for iteration in range(1, slots_mod.MAX_SLOTS + 1):
        slot = table.lock_free(1.0)
        assert table.state(slot) == SlotState.EMPTY, iteration
        table.ensure_buffers(slot)
        table.write_meta(slot, iteration, SaveMeta({}))
        table.set_state(slot, SlotState.PENDING)
        table.locks[slot].release()
    assert table.oldest_pending() == (0, 1) and not table.has_room()
    with pytest.raises(RuntimeError, match="could not lock a snapshot slot"):
        table.lock_free(0.05)  # full: only ``replace`` may take a queued save's slot
    newest = table.lock_free(1.0, replace=True)
    assert table.iteration(newest) == slots_mod.MAX_SLOTS
    table.locks[newest].release()
    assert table.empty_pending(keep=newest) == list(range(1, slots_mod.MAX_SLOTS))
    freed = table.free_extra(STEADY_SLOTS)
    assert len(freed) == slots_mod.MAX_SLOTS - STEADY_SLOTS and all(m.buffers is None for _, m in freed)
    assert table.allocated() == STEADY_SLOTS and table.buffers[newest] is not None


# ---------------------------------------------------------------------- two ranks
def early_saves_on_rank(rank: int, world_size: int, gates: str, out: str) -> dict:
    """TP2: saves 2 and 4 while the workers start, 6 and 8 while the export of 2 runs."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from tests.support.workers import build

    ps.initialize_model_parallel(2)
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=not torch.cuda.is_available())
    model = build("llama", tp=2)[0]
    gate_workers(Path(gates))
    handle = attach(model, ExportConfig(output_dir=out, vocab_size=120, formats=["hf"], dtype="float32",
                                        timeout_s=60))
    background, weights = handle.exporter._background, {}
    try:
        save(handle, model, 2, weights)
        save(handle, model, 4, weights)
        dist.barrier()
        if rank == 0:
            (Path(gates) / "start").touch()
        wait_started(background, 2)
        dist.barrier()
        save(handle, model, 6, weights)
        save(handle, model, 8, weights)
        dist.barrier()
        if rank == 0:
            (Path(gates) / "export-all").touch()
        handle.wait()
    finally:
        (Path(gates) / "start").touch()
        (Path(gates) / "export-all").touch()
        handle.detach()
    return outcomes(handle.exporter)


@pytest.mark.heavy
def test_two_ranks_agree_on_early_and_replaced_saves(tmp_path):
    outcome = run_ranks(2, "tests.test_early_saves:early_saves_on_rank", timeout_s=240,
                        gates=str(tmp_path / "gates"), out=str(tmp_path / "out"))
    for rank, (status, value) in outcome.items():
        assert status == "ok", f"rank {rank}: {status} {value}"
        assert value == {2: "complete", 4: "skipped", 6: "skipped", 8: "complete"}, f"rank {rank}: {value}"
    assert sorted(p.name for p in (tmp_path / "out").glob("iter_*")) == ["iter_0000002", "iter_0000008"]
