"""The benchmark tools themselves: the GPU-check script's CPU dry run, the scale simulator."""

import json

import pytest

from bench.scale_shapes import Layout, by_position, deepseek_v3_671b, llama3_405b, rank_locals
from megatron_trt_ext.plan import describe, expert_group, group_ranks, plan_units


def test_gpu_checks_dry_run_writes_its_json(megatron_world, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real checks, not the dry run")
    from bench import gpu_checks

    out = tmp_path / "results.json"
    assert gpu_checks.main(["--only", "stall", "--out", str(out), "--rounds", "1", "--dir", str(tmp_path)]) == 0
    results = json.loads(out.read_text())
    assert results["dry_run"] is True and "CPU" in results["device"]
    stall = results["checks"]["stall"]
    assert stall["ok"] and len(stall["figures"]["stall_s"]) == 1 and stall["stall_over_copy"] > 0


@pytest.mark.parametrize("model,layout", [
    (llama3_405b, Layout(tp=8, pp=2, dp=2)),
    (deepseek_v3_671b, Layout(tp=2, pp=2, dp=8, ep=8, etp=1)),
])
def test_simulated_layouts_cover_every_tensor_exactly_once(model, layout):
    tensors, info = model()
    if "experts" in info:  # a few layers suffice: the plan checks coverage per unit
        tensors = [t for t in tensors if t.layer < 5]
        info = {**info, "layers": 5}
    index = by_position(tensors, info, layout)
    descriptions = [describe(rank_locals(index, layout, rank)) for rank in range(layout.world)]
    classes = group_ranks(descriptions)
    assert len(classes) < layout.world  # replicas are gathered once
    units = plan_units(classes, group_key=expert_group)  # raises on a missing or doubled slice
    assert sorted(u.name for u in units) == sorted(t.name for t in tensors)
    assert {u.shape for u in units if u.name.endswith("output_layer.weight")} == {
        next(t.shape for t in tensors if t.name == "output_layer.weight")}


def test_gpu_quant_and_family_checks_dry_run(megatron_world, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("modelopt.torch.quantization", reason="the check quantizes with ModelOpt")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real checks, not the dry run")
    from bench import gpu_checks

    out = tmp_path / "results.json"
    assert gpu_checks.main(["--only", "quant_nvfp4_mxfp8,fp8_trained_te,families", "--out", str(out), "--dir",
                            str(tmp_path)]) == 0
    checks = json.loads(out.read_text())["checks"]
    assert checks["families"]["llama"]["holds"]  # the dry run exports and compares llama only
    assert set(checks["quant_nvfp4_mxfp8"]) >= {"llama/nvfp4", "llama/mxfp8", "moe/nvfp4", "moe/mxfp8"}
    assert all(checks["quant_nvfp4_mxfp8"][k]["ok"] for k in ("llama/nvfp4", "moe/mxfp8"))


def test_refit_bench_table_and_loopback_reference(capsys):
    """bench/refit.py without vLLM: its loopback reference copies every byte, its table shows the
    ratios the docs quote, and without vLLM it says where to run it."""
    from bench import refit

    assert refit.loopback_copy(3 << 20, chunk=1 << 20) > 0
    fig = {"model": "m", "params": 2e6, "refit_export_run_s": 0.5, "refit_client_s": 0.25, "export_restart_s": 60.0,
           "export_write_s": 1.0, "stop_s": 0.5, "restart_s": 58.5, "vllm_reload_s": 0.2, "refit_bytes": 10e6,
           "refit_stream_s": 0.2, "loopback_s": 0.01, "gap_refit_vs_fresh": 0.0}
    row = refit.table([fig]).splitlines()[2]
    assert "| 0.50 s" in row and "60.0 s (1.0 + 0.5 + 58.5)" in row and "| 50 " in row and "| 1000 " in row
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert refit.main(["--models", "tiny"]) == 2 and ".venv-vllm" in capsys.readouterr().out


def test_gpu_vllm_quantized_dry_run_exports_and_skips_vllm(megatron_world, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("modelopt.torch.quantization", reason="the check quantizes with ModelOpt")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real checks, not the dry run")
    from bench import gpu_checks

    out = tmp_path / "results.json"
    assert gpu_checks.main(["--only", "vllm_quantized", "--out", str(out), "--dir", str(tmp_path)]) == 0
    check = json.loads(out.read_text())["checks"]["vllm_quantized"]
    assert set(check) >= {"fp8", "nvfp4", "mxfp8", "fp8_pb_wo"}
    assert all(check[f]["vllm"] == "skipped: needs a GPU" and check[f]["export_s"] > 0
               for f in ("fp8", "nvfp4", "mxfp8", "fp8_pb_wo"))
