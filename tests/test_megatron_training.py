"""Megatron-LM's own training loop (megatron.training, shipped in megatron-core >= 0.18's wheel)
with exports switched on by the launcher, as its users run it: an unmodified training script
(tests/scripts/tiny_pretrain.py has the shape of pretrain_gpt.py, with its own
extra_args_provider), single process and torchrun (TP2, PP2), resume, checkpoint formats,
non-persistent saves, and offline exports of the saved checkpoints.

Every run is a subprocess through tests/scripts/cpu_launch.py (the CPU shim, then
`python -m megatron_trt_ext.launch`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import importlib.util  # noqa: E402

if importlib.util.find_spec("megatron.training") is None:  # looked up, not imported: runs in subprocesses
    pytest.skip("Megatron-LM's training loop (megatron.training) ships in megatron-core >= 0.18's wheel: "
                "scripts/test-mcore-latest runs these", allow_module_level=True)

from megatron_trt_ext import manifest as mf  # noqa: E402
from megatron_trt_ext.offline import read_common_state  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ROOT = Path(__file__).resolve().parent.parent


def _env():
    # MTE_FAKE_TENSORBOARD: where the tensorboard package is missing, Megatron-LM's writer is a
    # recording stand-in (tests/scripts/fake_tensorboard.py); with it installed, the real one.
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "MTE_FAKE_TENSORBOARD": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def train(tmp: Path, *flags, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run tiny_pretrain.py through the launcher; returns the finished process (checked)."""
    script = [str(SCRIPTS / "cpu_launch.py"), str(SCRIPTS / "tiny_pretrain.py"), *map(str, flags)]
    if nproc == 1:
        from megatron_trt_ext.utils import free_port

        env = {**_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}
        cmd = [sys.executable, *script]
    else:
        env = _env()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *script]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(tmp))
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    return done


def exports(root: Path) -> list:
    return [int(p.name[len("iter_"):]) for p in mf.complete_exports(root)]


def compare_logits(checkpoint: Path, iteration: int, hf_dir: Path) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPTS / "compare_logits.py"), str(checkpoint), str(iteration),
                           str(hf_dir)], capture_output=True, text=True, timeout=300, env=_env())
    rows = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert rows, done.stderr[-4000:]
    return json.loads(rows[0][len("RESULT "):])


def offline_export(checkpoint: Path, out: Path, *flags, nproc: int = 1) -> dict:
    entry = [str(SCRIPTS / "cpu_cli.py"), "export", str(checkpoint), "--output-dir", str(out), *map(str, flags)]
    cmd = ([sys.executable, *entry] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *entry])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def same_files(a: Path, b: Path) -> None:
    """Byte-equal exports; the probe's reference logits (computed by the loading layout's forward
    pass) equal to float32 rounding."""
    skip = ("manifest.json", "verification.safetensors")
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name not in skip)
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name not in skip)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    from safetensors.torch import load_file
    import torch

    ref, got = load_file(str(a / skip[1])), load_file(str(b / skip[1]))
    assert torch.equal(ref["tokens"], got["tokens"]) and torch.equal(ref["topk_ids"], got["topk_ids"])
    torch.testing.assert_close(got["topk_values"], ref["topk_values"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """8 iterations, a persistent save every 2 and a non-persistent one every iteration; export
    every 2nd persistent save, float32 (for tight logits), the script's own flag given too."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    done = train(tmp, "--save", tmp / "ckpt", "--save-interval", 2, "--non-persistent-save-interval", 1,
                 "--non-persistent-ckpt-type", "global", "--export-dir", tmp / "exports", "--export-interval", 2,
                 "--export-dtype", "float32", "--export-quant-cfg", "fp8-like", "--tensorboard-dir", tmp / "tb")
    (tmp / "output.log").write_text(done.stdout + done.stderr)
    return tmp


def tensorboard_scalars(log_dir: Path) -> dict:
    """{tag: {step: value}} written by Megatron-LM's TensorBoard writer: its event files, or the
    recording stand-in's JSON lines where tensorboard is not installed."""
    out: dict = {}
    recorded = log_dir / "scalars.jsonl"
    if recorded.exists():
        for line in recorded.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["tag"], {})[row["step"]] = row["value"]
        return out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    for tag in events.Tags()["scalars"]:
        out[tag] = {e.step: e.value for e in events.Scalars(tag)}
    return out


def test_export_metrics_reach_the_training_log_and_megatron_lms_tensorboard(uninterrupted):
    scalars = tensorboard_scalars(uninterrupted / "tb")
    assert "lm loss" in scalars  # Megatron-LM's own writer, which the export scalars join
    assert scalars["export/ok"] == {4: 1.0, 8: 1.0}  # at the exports' iterations (8: known at exit)
    for iteration in (4, 8):
        manifest = mf.read_manifest(uninterrupted / "exports" / f"iter_{iteration:07d}")
        assert scalars["export/bytes"][iteration] == manifest["bytes_written"]
        seconds = scalars["export/seconds"][iteration]  # the export's own time (bandwidth is on it)
        assert 0 < scalars["export/stall_s"][iteration] <= scalars["export/seconds_since_save"][iteration]
        assert 0 < seconds <= scalars["export/seconds_since_save"][iteration]
        assert scalars["export/throughput_MBps"][iteration] == pytest.approx(
            manifest["bytes_written"] / 1e6 / seconds, rel=1e-4)
    log = (uninterrupted / "output.log").read_text()
    for iteration in (4, 8):
        assert f"export iteration {iteration}: complete, stall" in log


def test_zero_edit_launch_exports_every_nth_persistent_save(uninterrupted):
    assert exports(uninterrupted / "exports") == [4, 8]
    assert (uninterrupted / "ckpt" / "non_persistent").is_dir()  # those saves happened, and did not count
    saved = read_common_state(uninterrupted / "ckpt" / "iter_0000008")["args"]
    assert saved.export_quant_cfg == "fp8-like"  # the script's own extra_args_provider still works
    assert saved.megatron_trt_ext == {"saves_seen": 4} and saved.export_interval == 2  # the count, in the checkpoint
    for iteration in (4, 8):
        assert mf.verify_export(uninterrupted / "exports" / f"iter_{iteration:07d}") == []


def test_exported_logits_equal_the_saved_checkpoint_eod_included(uninterrupted):
    result = compare_logits(uninterrupted / "ckpt", 8, uninterrupted / "exports" / "iter_0000008" / "hf")
    assert result["vocab"] == 100 and result["padded_vocab"] == 128  # NullTokenizer ids 0..99, EOD = 99
    assert result["max_abs"] / result["scale"] < 1e-5, result


def test_resume_exports_at_the_iterations_of_the_uninterrupted_run(uninterrupted, tmp_path):
    first = ["--save", tmp_path / "ckpt", "--save-interval", 2, "--export-dir", tmp_path / "exports",
             "--export-interval", 2, "--export-dtype", "float32"]
    train(tmp_path, *first, "--exit-interval", 6)  # the job ends early (e.g. its time is up)
    assert exports(tmp_path / "exports") == [4]  # after an odd count of saves (2, 4, 6)
    train(tmp_path, *first, "--load", tmp_path / "ckpt")
    assert exports(tmp_path / "exports") == exports(uninterrupted / "exports") == [4, 8]


def test_offline_export_of_a_saved_checkpoint_equals_the_live_export(uninterrupted, tmp_path):
    live = uninterrupted / "exports" / "iter_0000008"
    result = offline_export(uninterrupted / "ckpt", tmp_path / "one", "--dtype", "float32")
    assert result["status"] == "complete" and result["iteration"] == 8
    same_files(live, tmp_path / "one" / "iter_0000008")
    result = offline_export(uninterrupted / "ckpt", tmp_path / "two", "--dtype", "float32", "--iteration", 4,
                            nproc=2)  # loaded at TP2 by two ranks
    same_files(uninterrupted / "exports" / "iter_0000004", tmp_path / "two" / "iter_0000004")


def test_torch_format_checkpoints_export_and_offline_refuses_them_clearly(tmp_path):
    # sync: with a save every iteration an async export of 1 would be overtaken by 2 (newest wins)
    train(tmp_path, "--save", tmp_path / "ckpt", "--save-interval", 1, "--train-iters", 2, "--ckpt-format", "torch",
          "--export-dir", tmp_path / "exports", "--export-interval", 1, "--export-mode", "sync")
    assert exports(tmp_path / "exports") == [1, 2]
    done = subprocess.run([sys.executable, str(SCRIPTS / "cpu_cli.py"), "export", str(tmp_path / "ckpt"),
                           "--output-dir", str(tmp_path / "off")], capture_output=True, text=True, timeout=120,
                          env=_env())
    assert done.returncode == 2 and "torch_dist" in done.stderr and "--ckpt-convert-format" in done.stderr


@pytest.mark.parametrize("layout", [("--tensor-model-parallel-size", 2), ("--pipeline-model-parallel-size", 2)],
                         ids=["tp2", "pp2"])
def test_torchrun_async_exports_from_parallel_training(tmp_path, layout):
    train(tmp_path, *layout, "--train-iters", 4, "--save", tmp_path / "ckpt", "--save-interval", 2,
          "--export-dir", tmp_path / "exports", "--export-interval", 1, "--export-dtype", "float32", nproc=2)
    assert exports(tmp_path / "exports") == [2, 4]
    manifest = mf.read_manifest(tmp_path / "exports" / "iter_0000004")
    assert manifest["mode"] == "async" and manifest["source"]["world_size"] == 2
    result = compare_logits(tmp_path / "ckpt", 4, tmp_path / "exports" / "iter_0000004" / "hf")
    assert result["max_abs"] / result["scale"] < 1e-5, result
    # the probe ran inside Megatron-LM's save, through its schedule for PP2, and the export passes
    assert manifest["verification"]["status"] == "recorded", manifest["verification"]
    from megatron_trt_ext.verification.check import verify

    report = verify(tmp_path / "exports" / "iter_0000004", record=False)
    assert report.passed, report.lines()
