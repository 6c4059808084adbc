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
