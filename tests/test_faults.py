"""Fault injection: every failure is recorded, nothing hangs, nothing half-written looks complete.

Each case asserts what issue #8 asks of it: training goes on, no ``iter_*`` is incomplete or
mixed, ``latest`` names a complete export, the failure is recorded, and nothing waits past its
bound. (Disk full and SIGKILL of the worker live in test_async.py; a lost or failing rank in a
multi-rank export in test_distributed.py.)
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron_trt_ext import ConfigError, ExportConfig, ExportError, Exporter, attach
from megatron_trt_ext import manifest as mf
from tests.support.models import medium_llama, randomize, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def assert_root_is_consistent(root: Path):
    """Every iter_* verifies against its manifest; `latest` names a complete export."""
    for export in sorted(root.glob("iter_*")):
        assert mf.verify_export(export) == [], export
    latest = mf.read_latest(root)
    if (root / "latest").exists():
        assert latest is not None and mf.read_manifest(latest)["status"] == "complete"


def wait_started(exporter, iteration, timeout=60):
    """Until the worker reports that it started exporting ``iteration``."""
    deadline = time.monotonic() + timeout
    background = exporter._background
    while background.running != iteration:
        background.poll()
        assert time.monotonic() < deadline, f"the worker never started iteration {iteration}"
        time.sleep(0.01)


# ---------------------------------------------------------------------- 1. launchers
def _launch(tmp_path, *launcher):
    out = tmp_path / "exports"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    t0 = time.monotonic()
    done = subprocess.run([*launcher, str(SCRIPTS / "launched_export.py"), str(out)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(ROOT))
    elapsed = time.monotonic() - t0
    files = sorted(tmp_path.glob("exports.rank*.json"))
    assert done.returncode == 0 and len(files) == 2, (done.stdout[-2000:], done.stderr[-4000:])
    rows = [json.loads(f.read_text()) for f in files]
    return out, rows, elapsed


@pytest.mark.heavy
@pytest.mark.parametrize("launcher", [
    ["-m", "torch.distributed.run", "--nproc-per-node", "2"],          # torchrun
    ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
], ids=["torchrun", "standalone"])
def test_async_export_under_a_launcher_completes(tmp_path, launcher):
    """torchrun makes every init_process_group a client of its agent's store
    (TORCHELASTIC_USE_AGENT_STORE); the workers inherit that and must rendezvous on their own."""
    out, rows, elapsed = _launch(tmp_path, sys.executable, *launcher)
    for row in rows:
        assert row["agent_store"] == "True"  # the launcher's environment was really there
        assert row["statuses"] == ["complete", "complete"], row["errors"]
    assert sorted(p.name for p in out.glob("iter_*")) == ["iter_0000010", "iter_0000020"]
    assert_root_is_consistent(out)
    assert elapsed < 240


# ---------------------------------------------------------------------- 2. failures are recorded
def test_output_dir_replaced_by_a_file_fails_visibly(megatron_world, tmp_path, caplog):
    model = tiny_llama()
    out = tmp_path / "exports"
    handle = attach(model, ExportConfig(output_dir=str(out), vocab_size=120, mode="sync", formats=["hf"]))
    try:
        assert handle.on_checkpoint_saved(iteration=1).ok
        os.rename(out, tmp_path / "moved")
        out.write_text("not a directory")
        result = handle.on_checkpoint_saved(iteration=2)
        assert result.status == "failed" and result.iteration == 2  # never the old "complete"
        assert "iteration 2" in result.error and "rank 0" in result.error
        assert result.path is None  # nothing can be written under a file
        assert "could not be recorded" in caplog.text
        with pytest.raises(ExportError, match="iteration 3 failed on rank 0"):
            handle.exporter.export(3)
    finally:
        handle.detach()


def test_failure_while_recording_the_failure_is_still_raised(megatron_world, tmp_path, monkeypatch, caplog):
    model = tiny_llama()
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"]))
    from megatron_trt_ext.formats import hf as hf_mod
    from megatron_trt_ext import safe_fs

    def boom(self, name, tensor):
        raise OSError(28, "No space left on device")

    def no_room(path, data, fsync=True):
        raise OSError(28, "No space left on device (for the record too)")

    monkeypatch.setattr(hf_mod.HFWriter, "write", boom)
    monkeypatch.setattr(safe_fs, "write_atomic", no_room)
    with pytest.raises(ExportError, match="iteration 4 failed on rank 0.*No space left"):
        exporter.export(4)
    assert exporter.last_result.status == "failed" and exporter.last_result.iteration == 4
    assert "could not be recorded" in caplog.text
    assert not list(tmp_path.glob("iter_*")) and not list(tmp_path.glob(".iter_0000004.partial"))


def test_an_unexpected_error_is_recorded_not_swallowed(megatron_world, tmp_path, monkeypatch):
    """Anything, not only the export's own errors, becomes a failed result and a record."""
    model = tiny_llama()
    handle = attach(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, mode="sync", formats=["hf"]))
    try:
        assert handle.on_checkpoint_saved(iteration=1).ok

        def explode(*args, **kwargs):
            raise MemoryError("injected")

        monkeypatch.setattr(handle.exporter, "take_source", explode)
        result = handle.on_checkpoint_saved(iteration=2)
    finally:
        handle.detach()
    assert result.status == "failed" and result.iteration == 2 and "MemoryError" in result.error
    assert result.path.is_dir()
    assert mf.read_manifest(result.path)["status"] == "failed"
    assert mf.latest_export(tmp_path).name == "iter_0000001"


def test_leftovers_of_a_killed_run_are_cleaned_at_attach(megatron_world, tmp_path):
    """A killed trainer leaves .iter_N.partial (with its dead lock) and an interrupted retention
    leaves .iter_N.deleting: attach removes both, and later exports and retention work."""
    model = tiny_llama()
    cfg = dict(output_dir=str(tmp_path), vocab_size=120, formats=["hf"], keep_last=2)
    Exporter(model, ExportConfig(**cfg)).export(5)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".iter_0000006.partial" / "hf").mkdir(parents=True)
    (tmp_path / ".iter_0000006.lock").write_text(json.dumps(mf.owner_record(dead.pid)))
    (tmp_path / ".iter_0000006.deleting").mkdir()
    (tmp_path / ".iter_0000006.deleting" / "junk").write_bytes(b"x" * 100)
    (tmp_path / ".iter_0000003.partial").mkdir()  # no lock at all
    exporter = Exporter(model, ExportConfig(**cfg))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["iter_0000005", "latest"], names
    for it in (7, 8, 9):
        assert exporter.export(it).ok
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000008", "iter_0000009"]
    assert_root_is_consistent(tmp_path)


def test_a_partial_held_by_a_live_process_is_left_alone(megatron_world, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".iter_0000006.partial").mkdir()
        (tmp_path / ".iter_0000006.lock").write_text(json.dumps(mf.owner_record(holder.pid)))
        exporter = Exporter(tiny_llama(), ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"]))
        assert (tmp_path / ".iter_0000006.partial").is_dir()
        # and that iteration cannot be exported by a second writer: it fails, naming the holder
        with pytest.raises(ExportError, match=f"pid {holder.pid}"):
            exporter.export(6)
        assert (tmp_path / ".iter_0000006.partial").is_dir() and not (tmp_path / "iter_0000006").exists()
        assert exporter.export(7).ok
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------- 3. bounded waits
@pytest.mark.heavy
def test_a_stopped_worker_never_hangs_training(megatron_world, tmp_path):
    """SIGSTOP the worker mid-export: wait() returns within timeout_s (+ grace), the export is
    failed and recorded, the next save gets a fresh worker, detach is bounded too."""
    model = medium_llama()
    handle = attach(model, ExportConfig(output_dir=str(tmp_path), vocab_size=4000, timeout_s=4))
    try:
        handle.on_checkpoint_saved(iteration=1)
        wait_started(handle.exporter, 1)
        stopped = handle.exporter._background.proc
        os.kill(stopped.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        result = handle.wait()
        assert time.monotonic() - t0 < 4 + 10 + 5
        assert result.status == "failed" and "no progress" in result.error
        assert not stopped.is_alive()
        assert mf.read_manifest(tmp_path / ".iter_0000001.failed")["status"] == "failed"
        assert handle.on_checkpoint_saved(iteration=2).status == "running"
        assert handle.wait().ok
        # a worker stopped while idle: detach does not wait for it past its grace
        os.kill(handle.exporter._background.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
    finally:
        handle.detach()
    assert time.monotonic() - t0 < 15
    assert mf.latest_export(tmp_path).name == "iter_0000002"
    assert_root_is_consistent(tmp_path)


@pytest.mark.heavy
def test_interpreter_exit_is_bounded_with_a_stopped_worker(tmp_path):
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
from examples.cpu_shim import stub_triton_only_modules
stub_triton_only_modules()
from tests.support.models import init_single_process, tiny_llama
from megatron_trt_ext import ExportConfig, attach
init_single_process()
model = tiny_llama(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                   ffn_hidden_size=1024, vocab_size=4096)
handle = attach(model, ExportConfig(output_dir={str(tmp_path)!r}, vocab_size=4000, timeout_s=3))
handle.on_checkpoint_saved(iteration=1)
background = handle.exporter._background
while background.running != 1:
    background.poll(); time.sleep(0.01)
os.kill(background.proc.pid, signal.SIGSTOP)
print("STOPPED", background.proc.pid, flush=True)
"""  # the script ends without detach: atexit must close the exporter within its bound
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert "STOPPED" in done.stdout, done.stderr[-3000:]
    pid = int(done.stdout.split("STOPPED")[1].split()[0])
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    assert elapsed < 60
    assert mf.read_manifest(tmp_path / ".iter_0000001.failed")["status"] == "failed"


# ---------------------------------------------------------------------- 4. the last save is exported
def test_saves_during_a_running_export_are_queued_newest_wins(megatron_world, tmp_path):
    """busy_policy skip: a save while an export runs is snapshotted at once and exported as soon as
    the running export ends; a newer save replaces a queued one. The last save is never lost."""
    model = medium_llama()
    randomize(model, seed=3)
    handle = attach(model, ExportConfig(output_dir=str(tmp_path), vocab_size=4000, formats=["hf"],
                                        dtype="float32", timeout_s=60))
    weights = {}
    try:
        for iteration in (1, 2, 3):
            with torch.no_grad():
                model.decoder.final_layernorm.weight.add_(1.0)
            weights[iteration] = model.decoder.final_layernorm.weight.detach().clone()
            assert handle.on_checkpoint_saved(iteration=iteration).status == "running"
            if iteration == 1:  # hold the first export in the middle, deterministically
                wait_started(handle.exporter, 1)
                worker = handle.exporter._background.proc
                os.kill(worker.pid, signal.SIGSTOP)
        os.kill(worker.pid, signal.SIGCONT)
    finally:
        handle.detach()  # waits for the queued save too
    by_iteration = {r.iteration: r.status for r in handle.exporter.results if r.status != "running"}
    assert by_iteration == {1: "complete", 2: "skipped", 3: "complete"}
    from safetensors.torch import load_file

    for iteration in (1, 3):  # each export holds the weights of its own save
        stored = load_file(str(tmp_path / f"iter_{iteration:07d}" / "hf" / "model.safetensors"))
        assert torch.equal(stored["model.norm.weight"], weights[iteration])
    assert mf.latest_export(tmp_path).name == "iter_0000003"


# ---------------------------------------------------------------------- 5. one writer, atomic replacement
@pytest.mark.heavy
def test_two_writers_never_publish_a_mix(tmp_path):
    """Two processes export different weights as the same iteration into one root, five rounds:
    the loser fails naming the lock, and iter_0000100 always verifies and holds one writer's
    weights."""
    script = f"""
import sys, json
sys.path.insert(0, {str(ROOT)!r})
from examples.cpu_shim import stub_triton_only_modules
stub_triton_only_modules()
from tests.support.models import init_single_process, randomize, tiny_llama
from megatron_trt_ext import ExportConfig, Exporter
init_single_process()
model = tiny_llama(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                   ffn_hidden_size=1024, vocab_size=4096)
randomize(model, seed=int(sys.argv[1]))
exporter = Exporter(model, ExportConfig(output_dir={str(tmp_path)!r}, vocab_size=4000, formats=["hf"]))
print("READY", flush=True)
sys.stdin.readline()
outcome = []
for _ in range(5):
    try:
        outcome.append(exporter.export(100).status)
    except Exception as exc:
        outcome.append(str(exc))
print("OUTCOME " + json.dumps(outcome), flush=True)
"""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(seed)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for p in procs:
        assert p.stdout.readline().startswith("READY")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outcomes = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        line = [x for x in out.splitlines() if x.startswith("OUTCOME ")]
        assert line, err[-3000:]
        outcomes += json.loads(line[0][len("OUTCOME "):])
    for outcome in outcomes:
        assert outcome == "complete" or ("another process is exporting it" in outcome and "pid" in outcome), outcome
    assert mf.verify_export(tmp_path / "iter_0000100") == []
    assert_root_is_consistent(tmp_path)


def test_reexport_never_leaves_a_window_without_a_manifest(megatron_world, tmp_path):
    """A resumed run re-saves iteration 5 repeatedly while a reader polls: iter_0000005 and
    `latest` always name a directory with its manifest."""
    model = tiny_llama()
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"]))
    exporter.export(5)
    misses, checks, stop = [], [0], threading.Event()

    def poll():
        while not stop.is_set():
            checks[0] += 1
            if not (tmp_path / "iter_0000005" / "manifest.json").is_file():
                misses.append("iter")
            latest = (tmp_path / "latest").read_text().strip()
            if not (tmp_path / latest / "manifest.json").is_file():
                misses.append("latest")
    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for seed in range(8):
            randomize(model, seed=seed)
            assert exporter.export(5).ok
    finally:
        stop.set()
        reader.join()
    assert checks[0] > 100 and misses == []
    stored = mf.read_manifest(tmp_path / "iter_0000005")
    assert stored["status"] == "complete" and mf.verify_export(tmp_path / "iter_0000005") == []


def test_reexport_never_deletes_an_export_a_build_is_reading(megatron_world, tmp_path):
    model = tiny_llama()
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"]))
    first = exporter.export(5)
    before = (first.path / "hf" / "model.safetensors").read_bytes()
    randomize(model, seed=4)
    with mf.build_lock(first.path):
        with pytest.raises(ExportError, match="live build process is reading it"):
            exporter.export(5)
        assert (first.path / "hf" / "model.safetensors").read_bytes() == before
    assert mf.read_manifest(tmp_path / ".iter_0000005.failed")["status"] == "failed"
    assert exporter.export(5).ok  # once the build is done, the re-export replaces it
    assert (first.path / "hf" / "model.safetensors").read_bytes() != before


# ---------------------------------------------------------------------- 6. symlinks
def test_nothing_is_written_through_planted_symlinks(megatron_world, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    root = tmp_path / "exports"
    root.mkdir()
    planted = {
        "latest": outside / "precious",
        ".iter_0000001.partial": outside,
        ".iter_0000001.failed": outside,
        ".iter_0000001.lock": outside / "precious",
        "iter_0000002": outside,
        f".latest.tmp-{os.getpid()}": outside / "precious",
    }
    for name, target in planted.items():
        os.symlink(target, root / name)
    exporter = Exporter(tiny_llama(), ExportConfig(output_dir=str(root), vocab_size=120, formats=["hf"]))
    for iteration in (1, 2, 3):
        assert exporter.export(iteration).ok
    with mf.build_lock(root / "iter_0000003"):
        pass
    Exporter(tiny_llama(), ExportConfig(output_dir=str(root), vocab_size=120, formats=["hf"], keep_last=1)).export(4)
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    assert (outside / "precious").read_text() == "keep me"
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000004"]
    assert not any(p.is_symlink() for p in root.iterdir())
    assert_root_is_consistent(root)


# ---------------------------------------------------------------------- 7. bad values at attach
@pytest.mark.parametrize("text,words", [
    ("quantization: {algorithm: fp8, calibration: {seed: abc}}\n", ["calibration.seed", "'abc'"]),
    ("quantization: {algorithm: fp8, calibration: {num_samples: 1000000000000}}\n", ["num_samples", "100000"]),
    ("quantization: {algorithm: fp8, calibration: {source: jsonl, jsonl: /no/such.jsonl, tokenizer: /no/tok}}\n",
     ["calibration.jsonl", "/no/such.jsonl"]),
    ("timeout_s: 1000000000000000000000\n", ["timeout_s", "between 1 and"]),
    ("dtype: bfloat16\ndtype: float16\n", ["line 2", "'dtype' appears twice"]),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     ["line 1", "anchors"]),
])
def test_bad_recipe_values_fail_at_load_naming_key_and_file(tmp_path, text, words):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as err:
        ExportConfig.from_yaml(recipe)
    message = str(err.value)
    assert str(recipe) in message and len(message) < 1000
    for word in words:
        assert word in message


def test_check_finite_catches_values_that_overflow_at_the_cast(megatron_world, tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.decoder.final_layernorm.weight[3] = 70000.0  # finite in float32, inf in float16
    assert Exporter(model, ExportConfig(output_dir=str(tmp_path / "bf16"), vocab_size=120,
                                        dtype="bfloat16")).export(1).ok
    with pytest.raises(ExportError, match="model.norm.weight.*NaN or Inf"):
        Exporter(model, ExportConfig(output_dir=str(tmp_path / "fp16"), vocab_size=120, dtype="float16")).export(1)
    assert not list((tmp_path / "fp16").glob("iter_*"))
