"""Engine builds: orchestration against a test double of tensorrt_llm (tests/fakes), which records
every call; the real TensorRT-LLM cannot be installed here (see test_build_gpu.py for the real one)."""

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_trt_ext import ConfigError, ExportConfig, Exporter, attach
from megatron_trt_ext import manifest as mf
from megatron_trt_ext.engines.options import BuildOptions
from megatron_trt_ext.engines.runner import build_export
from tests.support.models import randomize, tiny_llama

# Engine builds run in their own processes against a fake tensorrt_llm; nothing here depends on the
# megatron-core version beyond what test_exporter covers: pinned version only.
pytestmark = pytest.mark.heavy

FAKES = Path(__file__).resolve().parent / "fakes"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_trtllm(monkeypatch, tmp_path):
    """Put the test double on the path of this process and of every build subprocess."""
    log = tmp_path / "trtllm_calls.jsonl"
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKES), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_TRTLLM_LOG", str(log))
    monkeypatch.syspath_prepend(str(FAKES))

    def calls(kind=None):
        if not log.exists():
            return []
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        return [r for r in rows if kind is None or r["call"] == kind]
    return calls


@pytest.fixture
def export_tp2(megatron_world, tmp_path):
    model = tiny_llama()
    randomize(model, seed=41)
    cfg = ExportConfig(output_dir=str(tmp_path / "exports"), vocab_size=120, inference_tp=2, mode="sync")
    return Exporter(model, cfg).export(iteration=7).path


def test_builds_one_engine_per_rank_with_the_documented_calls(fake_trtllm, export_tp2):
    options = BuildOptions.from_dict({"max_batch_size": 4, "max_input_len": 64, "max_seq_len": 128,
                                      "max_num_tokens": 256, "devices": [0, 1],
                                      "plugins": {"gemm_plugin": "auto", "paged_kv_cache": True}})
    record = build_export(export_tp2, options)
    assert record["status"] == "complete" and record["ranks"] == 2
    assert record["tensorrt_llm_version"] == "1.2.0"
    engine_dir = export_tp2 / "trtllm_engine"
    assert sorted(p.name for p in engine_dir.iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]
    loads = sorted(fake_trtllm("from_checkpoint"), key=lambda r: r["rank"])
    assert [(r["rank"], r["architecture"], r["world_size"]) for r in loads] == [
        (0, "LlamaForCausalLM", 2), (1, "LlamaForCausalLM", 2)]
    assert all(r["tensors"] > 0 for r in loads)
    builds = fake_trtllm("build")
    assert {r["cuda_visible_devices"] for r in builds} == {"0", "1"}  # one device per rank
    for r in builds:
        assert r["build_config"] == {"max_batch_size": 4, "max_input_len": 64, "max_seq_len": 128,
                                     "max_num_tokens": 256, "max_beam_width": 1}
        assert r["plugins"] == {"gemm_plugin": "auto", "paged_kv_cache": True}
    manifest = mf.read_manifest(export_tp2)
    assert manifest["status"] == "complete" and manifest["build"]["status"] == "complete"
    assert not (export_tp2 / mf.BUILD_LOCK).exists() and not (export_tp2 / ".trtllm_engine.partial").exists()


def test_a_failing_rank_fails_the_build_and_leaves_no_engine(fake_trtllm, export_tp2, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_FAIL_RANK", "1")
    record = build_export(export_tp2, BuildOptions(devices=[0, 1]))
    assert record["status"] == "failed"
    assert "injected build failure on rank 1" in record["error"]["1"]
    assert not (export_tp2 / "trtllm_engine").exists()
    assert mf.read_manifest(export_tp2)["build"]["status"] == "failed"


def test_newer_tensorrt_llm_offers_the_hf_export_and_deploy_check(fake_trtllm, export_tp2, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.3.0")
    record = build_export(export_tp2, BuildOptions(deploy_check=True))
    assert record["status"] == "no_tensorrt_backend" and "HF export" in record["reason"]
    assert record["deploy_check"]["ok"] and record["deploy_check"]["generated"]
    assert fake_trtllm("LLM") == [dict(fake_trtllm("LLM")[0], model=str(export_tp2 / "hf"), tensor_parallel_size=2)]
    assert not (export_tp2 / "trtllm_engine").exists()


def test_missing_tensorrt_llm_is_skipped_with_the_command_to_run_later(export_tp2, fake_trtllm_absent,
                                                                        monkeypatch, tmp_path):
    record = build_export(export_tp2, BuildOptions(devices=[0]))
    assert record["status"] == "skipped" and "not installed" in record["reason"]
    assert mf.read_manifest(export_tp2)["build"]["status"] == "skipped"
    # the recorded command is exactly what builds it later, on a machine that has TensorRT-LLM
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKES), str(ROOT)]),
           "FAKE_TRTLLM_LOG": str(tmp_path / "later.jsonl")}
    done = subprocess.run(shlex.split(record["command"]), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert mf.read_manifest(export_tp2)["build"]["status"] == "complete"
    assert (export_tp2 / "trtllm_engine" / "rank0.engine").is_file()


@pytest.fixture
def fake_trtllm_absent():
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("a real tensorrt_llm is installed; this test covers machines without it")


def run_cli(*args, env_extra=None):
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "megatron_trt_ext.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)


def test_cli_refuses_bad_input_with_clear_errors(tmp_path):
    incomplete = tmp_path / "iter_0000001"
    incomplete.mkdir()
    done = run_cli("build", str(incomplete))
    assert done.returncode == 2 and "no complete manifest.json" in done.stderr
    done = run_cli("build", "--watch", str(tmp_path / "nope"))
    assert done.returncode == 2 and "--watch" in done.stderr and "not a directory" in done.stderr
    done = run_cli("build", str(incomplete), "--max-batch-size", "0")
    assert done.returncode == 2 and "max_batch_size" in done.stderr


def test_cli_watch_builds_each_new_complete_export(fake_trtllm, megatron_world, tmp_path):
    import os

    model = tiny_llama()
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path / "root"), vocab_size=120, mode="sync"))
    exporter.export(1)
    exporter.export(2)
    (tmp_path / "root" / ".iter_0000003.partial").mkdir()  # an export still being written
    done = run_cli("build", "--watch", str(tmp_path / "root"), "--once", "--devices", "0",
                   env_extra={"PYTHONPATH": os.environ["PYTHONPATH"]})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": complete") == 2
    for it in (1, 2):
        assert mf.read_manifest(tmp_path / "root" / f"iter_{it:07d}")["build"]["status"] == "complete"


def test_engine_build_runs_after_an_async_export_in_training(fake_trtllm, megatron_world, tmp_path):
    model = tiny_llama()
    cfg = ExportConfig(output_dir=str(tmp_path), vocab_size=120,
                       formats=["hf", "trtllm_checkpoint", "trtllm_engine"], build={"timeout": 300})
    handle = attach(model, cfg)
    try:
        handle.on_checkpoint_saved(iteration=3)
        result = handle.wait()
    finally:
        handle.detach()
    assert result.ok
    deadline = time.monotonic() + 120
    while "build" not in mf.read_manifest(result.path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert mf.read_manifest(result.path)["build"]["status"] == "complete"
    assert (result.path / "trtllm_engine" / "rank0.engine").is_file()


def test_build_devices_that_do_not_exist_fail_at_attach(megatron_world, tmp_path):
    import torch

    missing = torch.cuda.device_count() + 3
    cfg = ExportConfig(output_dir=str(tmp_path), formats=["trtllm_checkpoint", "trtllm_engine"],
                       build={"devices": [missing]})
    with pytest.raises(ConfigError, match=rf"devices: \[{missing}\] do not exist"):
        attach(tiny_llama(), cfg)


@pytest.mark.parametrize("build,fragment", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_input_len": 4096, "max_seq_len": 1024}, "exceeds max_seq_len"),
    ({"plugins": {"warp_drive": "auto"}}, "unknown plugin 'warp_drive'"),
    ({"plugins": {"gemm_plugin": "int3"}}, "gemm_plugin"),
    ({"devices": "0,1"}, "devices"),
    ({"tiemout": 5}, "unknown build option"),
])
def test_invalid_build_values_are_named(build, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ExportConfig(formats=["trtllm_checkpoint", "trtllm_engine"], build=build)


# ---------------------------------------------------------------------- which GPUs build
def _build_devices(fake_trtllm) -> set:
    return {r["cuda_visible_devices"] for r in fake_trtllm("build")}


def test_build_devices_are_indices_among_the_visible_gpus(fake_trtllm, export_tp2, monkeypatch):
    """``devices: [0, 1]`` under CUDA_VISIBLE_DEVICES=4,5,6,7 are physical GPUs 4 and 5: a child
    told CUDA_VISIBLE_DEVICES=0 would build on GPU 0, which this job was never given."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert build_export(export_tp2, BuildOptions(devices=[0, 1]))["status"] == "complete"
    assert _build_devices(fake_trtllm) == {"4", "5"}


@pytest.mark.parametrize("visible,expected", [(None, {"0", "1"}), ("4,5,6,7", {"4", "5"}),
                                              ("GPU-aaaa,GPU-bbbb", {"GPU-aaaa", "GPU-bbbb"})])
def test_all_visible_means_every_gpu_torch_sees(fake_trtllm, export_tp2, monkeypatch, visible, expected):
    """No ``devices``: the two ranks build side by side on the first two visible GPUs (torch sees
    four, or two), named as the user named them."""
    import torch

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible.split(",")) if visible else 4)
    assert build_export(export_tp2, BuildOptions())["status"] == "complete"
    assert _build_devices(fake_trtllm) == expected


def test_a_device_beyond_the_visible_ones_fails_the_build_saying_so(fake_trtllm, export_tp2, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    record = build_export(export_tp2, BuildOptions(devices=[1, 2]))
    assert record["status"] == "failed" and "CUDA_VISIBLE_DEVICES=4,5" in record["error"]
    assert fake_trtllm("build") == [] and not (export_tp2 / "trtllm_engine").exists()


# ---------------------------------------------------------------------- one in-training build at a time
def _wait_for_build(path, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while "build" not in mf.read_manifest(path) and time.monotonic() < deadline:
        time.sleep(0.2)
    return mf.read_manifest(path)["build"]


def test_an_export_that_lands_while_a_build_runs_is_recorded_not_built(fake_trtllm, megatron_world, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_BUILD_S", "15")
    cfg = ExportConfig(output_dir=str(tmp_path), vocab_size=120, mode="sync",
                       formats=["hf", "trtllm_checkpoint", "trtllm_engine"], build={"timeout": 300})
    exporter = Exporter(tiny_llama(), cfg)
    first = exporter.export(1)
    second = exporter.export(2)  # the first build is still running (15 s)
    skipped = mf.read_manifest(second.path).get("build")
    assert skipped is not None and skipped["status"] == "skipped", skipped
    assert "iter_0000001" in skipped["reason"] and "still running" in skipped["reason"]
    assert shlex.split(skipped["command"])[3] == str(second.path)  # what builds it later
    assert _wait_for_build(first.path)["status"] == "complete"
    monkeypatch.setenv("FAKE_TRTLLM_BUILD_S", "0")
    third = exporter.export(3)  # the build slot is free again
    assert _wait_for_build(third.path)["status"] == "complete"
    assert [r["rank"] for r in fake_trtllm("build")] == [0, 0]  # iterations 1 and 3, never 2
    assert not (second.path / "trtllm_engine").exists()
