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
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
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
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name != "manifest.json")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """8 iterations, a persistent save every 2 and a non-persistent one every iteration; export
    every 2nd persistent save, float32 (for tight logits), the script's own flag given too."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    train(tmp, "--save", tmp / "ckpt", "--save-interval", 2, "--non-persistent-save-interval", 1,
          "--non-persistent-ckpt-type", "global", "--export-dir", tmp / "exports", "--export-interval", 2,
          "--export-dtype", "float32", "--export-quant-cfg", "fp8-like")
    return tmp


def test_zero_edit_launch_exports_every_nth_persistent_save(uninterrupted):
    assert exports(uninterrupted / "exports") == [4, 8]
    assert (uninterrupted / "ckpt" / "non_persistent").is_dir()  # those saves happened, and did not count
    saved = read_common_state(uninterrupted / "ckpt" / "iter_0000008")["args"]
    assert saved.export_quant_cfg == "fp8-like"  # the script's own extra_args_provider still works
    assert saved.megatron_trt_ext_saves == 4 and saved.export_interval == 2
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
    assert exports(tmp_path / "exports") == [4]
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
