"""Async exports (the default under attach): snapshot semantics, busy policy, retention, and
failure isolation with real faults (a full tmpfs, SIGKILL of the worker)."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import ExportConfig, Exporter, attach
from megatron_trt_ext import manifest as mf
from tests.support.models import medium_llama, randomize, tiny_llama


def test_async_export_matches_sync_and_reports_stall(megatron_world, tmp_path):
    model = tiny_llama()
    randomize(model, seed=31)
    sync = Exporter(model, ExportConfig(output_dir=str(tmp_path / "sync"), vocab_size=120, mode="sync")).export(9)
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path / "async"), vocab_size=120, mode="async"))
    try:
        running = exporter.export(9)
        assert running.status == "running" and running.path == tmp_path / "async" / "iter_0000009"
        assert {"stall_s", "snapshot_s"} <= set(running.timings)
        done = exporter.wait()
    finally:
        exporter.close()
    assert done.ok and done.path == running.path
    assert {"stall_s", "snapshot_s", "gather_s", "convert_s", "write_s", "total_s"} <= set(done.timings)
    assert done.timings["stall_s"] <= done.timings["total_s"]
    manifest = json.loads((done.path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "stall_s" in manifest["timings"]
    for rel in ("hf/model.safetensors", "trtllm_checkpoint/rank0.safetensors"):
        assert (done.path / rel).read_bytes() == (sync.path / rel).read_bytes()


def test_async_export_is_the_model_at_the_save(megatron_world, tmp_path):
    """Training goes on right after export() returns; the export holds the weights of the save."""
    model = tiny_llama()
    randomize(model, seed=32)
    at_save = model.decoder.final_layernorm.weight.detach().clone()
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, mode="async",
                                            dtype="float32", formats=["hf"]))
    try:
        exporter.export(1)
        with torch.no_grad():  # the optimizer step that follows the save
            for p in model.parameters():
                p.add_(1.0)
        result = exporter.wait()
    finally:
        exporter.close()
    stored = load_file(str(result.path / "hf" / "model.safetensors"))
    assert torch.equal(stored["model.norm.weight"], at_save)


@pytest.mark.parametrize("policy", ["skip", "wait"])
def test_busy_policy(megatron_world, tmp_path, policy):
    """A save while the previous export runs is never dropped silently: ``wait`` exports both in
    order; ``skip`` queues it (a newer save may replace a queued one that has not started: that
    one is recorded as skipped). Either way the last save is exported. (test_faults.py holds the
    deterministic newest-wins case.)"""
    model = medium_llama()
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=4000, mode="async",
                                            busy_policy=policy))
    try:
        first = exporter.export(1)
        second = exporter.export(2)  # the first one is still being written
        last = exporter.wait()
    finally:
        exporter.close()
    assert first.status == "running" and second.status == "running"
    assert last.iteration == 2 and last.ok
    outcomes = {r.iteration: r.status for r in exporter.results if r.status != "running"}
    if policy == "wait":
        assert outcomes == {1: "complete", 2: "complete"}
    else:
        assert outcomes[2] == "complete" and outcomes[1] in ("complete", "skipped")
    assert [p.name for p in tmp_path.glob("iter_*")] and mf.latest_export(tmp_path).name == "iter_0000002"


def test_sigkill_of_the_worker_is_recorded_and_training_goes_on(megatron_world, tmp_path):
    model = medium_llama()
    handle = attach(model, ExportConfig(output_dir=str(tmp_path), vocab_size=4000))
    try:
        worker = handle.exporter._background.proc
        handle.on_checkpoint_saved(iteration=1)
        os.kill(worker.pid, signal.SIGKILL)
        failed = handle.wait()
        assert failed.status == "failed" and "died" in failed.error and "-9" in failed.error
        assert not (tmp_path / "iter_0000001").exists()
        manifest = json.loads((tmp_path / ".iter_0000001.failed" / "manifest.json").read_text())
        assert manifest["status"] == "failed" and "died" in manifest["error"]
        # the next save starts a fresh worker and exports normally
        assert handle.on_checkpoint_saved(iteration=2).status == "running"
        assert handle.wait().ok
        assert handle.exporter._background.proc.pid != worker.pid
    finally:
        handle.detach()
    assert mf.latest_export(tmp_path).name == "iter_0000002"


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_full_disk_fails_the_export_not_training(megatron_world, small_tmpfs, mode):
    model = medium_llama()  # ~20 MB of bf16 weights, the tmpfs holds 1 MB
    handle = attach(model, ExportConfig(output_dir=str(small_tmpfs), vocab_size=4000, mode=mode))
    try:
        result = handle.on_checkpoint_saved(iteration=5)
        result = handle.wait() if mode == "async" else result
    finally:
        handle.detach()
    assert result.status == "failed" and "No space left on device" in result.error
    assert not (small_tmpfs / "iter_0000005").exists()
    assert not list(small_tmpfs.glob("iter_*"))
    assert (small_tmpfs / ".iter_0000005.failed").is_dir()


def test_keep_last_never_removes_the_newest_nor_one_being_built(megatron_world, tmp_path):
    model = tiny_llama()
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, keep_last=2,
                                            formats=["hf"], mode="sync"))
    exporter.export(1)
    with mf.build_lock(tmp_path / "iter_0000001"):
        for it in (2, 3, 4):
            exporter.export(it)
        assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000001", "iter_0000003", "iter_0000004"]
    exporter.export(5)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000004", "iter_0000005"]
    assert mf.latest_export(tmp_path).name == "iter_0000005"


def test_a_worker_that_takes_the_slot_before_the_wake_keeps_timings_and_probe(megatron_world, tmp_path):
    """Bug 1: the trainer published the slot, then sent the save's timings and probe record in a
    separate message; a worker that took the slot first exported without them (manifest:
    ``verification: off``, no stall or snapshot time). Here every message the trainer sends is
    held back until the worker has started the export, so it always takes the slot first."""
    model = tiny_llama()
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, mode="async", formats=["hf"],
                                            verification={"num_sequences": 2, "seq_len": 8, "top_k": 4}))
    background = exporter._background
    held, send = [], background._send
    background._send = held.append
    try:
        assert exporter.export(3).status == "running"
        deadline = time.monotonic() + 60
        while background.running != 3:  # the worker finds the published slot on its own
            background.poll()
            assert time.monotonic() < deadline, "the worker never started the export"
            time.sleep(0.01)
        background._send = send
        for message in held:  # too late for the export that already started
            send(message)
        done = exporter.wait()
    finally:
        background._send = send
        exporter.close()
    assert done.ok
    manifest = mf.read_manifest(done.path)
    assert manifest["verification"]["status"] == "recorded"
    assert (done.path / "verification.safetensors").is_file()
    assert {"stall_s", "snapshot_s", "probe_s", "snapshot_bytes"} <= set(manifest["timings"])
    assert manifest["timings"]["total_s"] >= manifest["timings"]["stall_s"]


class FakeCudart:
    """Stands in for `torch.cuda.cudart()`: counts page-locked host ranges."""

    def __init__(self):
        self.registered: dict = {}
        self.unregistered: list = []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.registered[ptr] = nbytes
        return 0

    def cudaHostUnregister(self, ptr):
        assert ptr in self.registered, "unregistering a range that was never registered"
        self.unregistered.append(ptr)
        return 0


def test_pinned_snapshot_buffers_are_unregistered_at_close(megatron_world, tmp_path, monkeypatch):
    """On CUDA machines the snapshot buffers are page-locked (cudaHostRegister) so the
    device-to-host copies are asynchronous; closing the exporter (detach) must unregister every
    range it registered, or each attach/detach leaks page-locked host memory."""
    from megatron_trt_ext.background import BackgroundExporter

    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    exporter = Exporter(tiny_llama(), ExportConfig(output_dir=str(tmp_path), vocab_size=120, mode="sync"))
    with monkeypatch.context() as cuda:  # a CUDA machine, while the buffers are allocated
        cuda.setattr(torch.cuda, "is_available", lambda: True)
        cuda.setattr(torch.cuda, "Stream", lambda *args, **kwargs: object())
        background = BackgroundExporter(exporter)
    try:
        assert cudart.registered and not cudart.unregistered
    finally:
        background.close()
    assert sorted(cudart.unregistered) == sorted(cudart.registered)
