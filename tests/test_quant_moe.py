"""Quantized mixture-of-experts exports against ModelOpt's unified HF export of the same model:
per-expert weight scales (gate/up of one expert share theirs), shared experts quantized like
experts, routers unquantized and listed by name in exclude_modules / ignore (vLLM and SGLang
otherwise load the router as quantized).

The experts' input scales are one per layer and linear (ModelOpt syncs them over the experts)
and equal ModelOpt's calibration of the Megatron model (its SequentialMLP quantizers). ModelOpt's
HF path for transformers' fused experts measures larger down-projection inputs on the same
tokens, so its expert input scales are not the reference."""

import json

import pytest

from megatron_trt_ext import ConfigError, ExportConfig, Exporter
from megatron_trt_ext.testing import families as fam
from megatron_trt_ext.testing.models import randomize, tiny_llama

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is the oracle (extra 'quant')")
pytest.importorskip("transformers", reason="transformers runs ModelOpt's HF export")

from test_moe_families import live_routing, mla_builds_here  # noqa: E402
from test_quant_modelopt import (CALIB, assert_same_tensors, load_dir, ours_and_modelopts_hf,  # noqa: E402
                                 shared_fp8_scales)

MODELS = {
    "qwen3_moe": lambda: fam.tiny_qwen3_moe(),
    "mixtral": lambda: tiny_llama(moe=True),
    "deepseek_v3": lambda: fam.tiny_deepseek(q_lora_rank=32, v_head_dim=16),  # NVFP4 groups of 16 divide every input
}
CASES = [("qwen3_moe", "fp8"), ("qwen3_moe", "nvfp4"), ("qwen3_moe", "w4a16_nvfp4"), ("mixtral", "fp8"),
         ("deepseek_v3", "fp8"), ("deepseek_v3", "nvfp4")]


def build(name):
    if name.startswith("deepseek"):
        mla_builds_here()
    model = MODELS[name]()
    randomize(model, seed=77, scale=0.1)
    live_routing(model, 77)
    return model


@pytest.mark.parametrize("name,algo", CASES)
def test_moe_hf_checkpoint_equals_modelopts(megatron_world, tmp_path, name, algo):
    model = build(name)
    kv = "none" if name.startswith("deepseek") else "fp8"
    ours, theirs, exporter = ours_and_modelopts_hf(model, tmp_path, algo, kv)

    mine, want = load_dir(ours), load_dir(theirs)
    expert_inputs = {n for n in want if ".experts." in n and n.endswith("input_scale")}
    assert_expert_inputs_are_modelopts_megatron(model, exporter, algo, {n: mine[n] for n in expert_inputs})
    want = {n: t for n, t in want.items() if n not in expert_inputs}
    mine = {n: t for n, t in mine.items() if n not in expert_inputs}
    differ = shared_fp8_scales(mine, want)  # dense per-tensor FP8 parts share their linear's scale
    assert_same_tensors({k: v for k, v in mine.items() if k not in differ},
                        {k: v for k, v in want.items() if k not in differ}, f"{name} {algo}",
                        close=("input_scale", "k_scale", "v_scale"))
    ours_q = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
    assert ours_q == json.loads((theirs / "hf_quant_config.json").read_text())["quantization"]
    assert (json.loads((ours / "config.json").read_text())["quantization_config"]
            == json.loads((theirs / "config.json").read_text())["quantization_config"])
    routers = [m for m in ours_q["exclude_modules"] if m.endswith(".gate")]
    moe_layers = {n.split(".")[2] for n in mine if ".experts." in n}
    assert len(routers) == len(moe_layers) > 0  # one explicit entry per MoE layer


def assert_expert_inputs_are_modelopts_megatron(model, exporter, algo, scales: dict):
    import re

    from megatron_trt_ext.testing.oracle import modelopt_fake_quant

    replica = modelopt_fake_quant(model, exporter)
    divisor = {"fp8": 448.0, "nvfp4": 6 * 448.0}.get(algo)
    if divisor is None:  # weight-only: no input scales
        assert not scales
        return
    assert scales
    for name, value in scales.items():
        layer, expert, which = re.search(r"layers\.(\d+)\..*experts\.(\d+)\.(\w+)\.input_scale", name).groups()
        linear = "linear_fc2" if which in ("down_proj", "w2") else "linear_fc1"
        module = replica.decoder.layers[int(layer)].mlp.experts.local_experts[int(expert)].get_submodule(linear)
        assert float(value) == pytest.approx(float(module.input_quantizer.amax) / divisor, rel=1e-6), name


def test_quantized_moe_refusals(megatron_world, tmp_path):
    model = build("mixtral")
    with pytest.raises(ConfigError, match="Hugging Face checkpoints only"):
        Exporter(model, ExportConfig(output_dir=str(tmp_path), formats=["hf", "trtllm_checkpoint"],
                                     quantization={"algorithm": "fp8", "calibration": CALIB}))
    with pytest.raises(ConfigError, match="SmoothQuant/AWQ exports of mixture-of-experts"):
        Exporter(model, ExportConfig(output_dir=str(tmp_path), formats=["hf"],
                                     quantization={"algorithm": "int4_awq", "calibration": CALIB}))


def test_verify_passes_on_a_quantized_moe_export(megatron_world, tmp_path):
    """`verify` dequantizes the export and lets transformers load it the way it loads the hub's
    checkpoints (its Qwen3-MoE keeps the experts fused): the probe's logits agree."""
    from megatron_trt_ext.verification.check import verify

    model = build("qwen3_moe")
    result = Exporter(model, ExportConfig(output_dir=str(tmp_path), formats=["hf"], dtype="bfloat16", mode="sync",
                                          quantization={"algorithm": "fp8", "calibration": CALIB})).export(1)
    report = verify(result.path)
    assert report.passed, report.lines()
