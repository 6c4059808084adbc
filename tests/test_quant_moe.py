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
from safetensors.torch import load_file

from megatron_trt_ext import ConfigError, ExportConfig, Exporter
from tests.support import families as fam
from tests.support.models import randomize, tiny_llama

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is the oracle (extra 'quant')")
pytest.importorskip("transformers", reason="transformers runs ModelOpt's HF export")

from tests.test_moe_families import live_routing, mla_builds_here  # noqa: E402
from tests.test_quant_modelopt import (CALIB, assert_same_tensors, load_dir, ours_and_modelopts_hf,  # noqa: E402
                                 shared_fp8_scales)

MODELS = {
    "qwen3_moe": lambda: fam.tiny_qwen3_moe(),
    # TensorRT-LLM's Qwen3-MoE engine makes every layer MoE
    "qwen3_moe_every_layer": lambda: fam.tiny_qwen3_moe(num_layers=2, moe_layer_freq=1),
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

    from tests.support.oracle import modelopt_fake_quant

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


# ---------------------------------------------------------------- TensorRT-LLM checkpoints
@pytest.mark.parametrize("tp", [1, 2])
def test_mixtral_fp8_trtllm_checkpoint_equals_modelopts(megatron_world, tmp_path, tp):
    """Per-tensor FP8: bit-equal to ModelOpt's export_tensorrt_llm_checkpoint of the same Megatron
    model calibrated by ModelOpt (stacked experts [E, ...], weight scales [E, 1], one input scale
    per layer and linear, routers float32 and listed in exclude_modules), at expert TP 1 and 2."""
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    from tests.support.oracle import modelopt_fake_quant
    from tests.test_quant_modelopt import assert_same_tensors

    model = build("mixtral")
    exporter = Exporter(model, ExportConfig(
        output_dir=str(tmp_path / "ours"), dtype="bfloat16", mode="sync", formats=["trtllm_checkpoint"],
        inference_tp=tp, inference_moe_tp=tp, verification={"enabled": False},
        quantization={"algorithm": "fp8", "calibration": CALIB}))
    ours = exporter.export(1).path / "trtllm_checkpoint"
    export_tensorrt_llm_checkpoint(modelopt_fake_quant(model, exporter), "llama", torch.bfloat16,
                                   str(tmp_path / "modelopt"), inference_tensor_parallel=tp)
    mine_cfg = json.loads((ours / "config.json").read_text())["quantization"]
    their_cfg = json.loads((tmp_path / "modelopt" / "config.json").read_text())["quantization"]
    assert sorted(mine_cfg.pop("exclude_modules")) == sorted(their_cfg.pop("exclude_modules"))
    assert mine_cfg == their_cfg
    vocab = ("vocab_embedding", "lm_head")  # laid out differently (ModelOpt's parallel embedding); unquantized
    for rank in range(tp):
        mine = {k: v for k, v in load_file(str(ours / f"rank{rank}.safetensors")).items()
                if not any(x in k for x in vocab)}
        theirs = {k: v for k, v in load_file(str(tmp_path / "modelopt" / f"rank{rank}.safetensors")).items()
                  if not any(x in k for x in vocab)}
        assert_same_tensors(mine, theirs, f"mixtral fp8 TP{tp} rank {rank}")
        assert mine["transformer.layers.0.mlp.fc.weights_scaling_factor"].shape == (4, 1)


EXPERT_NAMES = {  # family: (HF experts prefix in a layer, gate, up, down)
    "mixtral": ("block_sparse_moe.experts", "w1", "w3", "w2"),
    "qwen3_moe_every_layer": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
}
TRT_SCALES = {"weight_scale": "weights_scaling_factor", "weight_scale_2": "weights_scaling_factor_2"}


@pytest.mark.parametrize("name,algo,moe_tp,moe_ep", [
    ("mixtral", "nvfp4", 1, 1), ("mixtral", "fp8_pc_pt", 2, 1),
    ("qwen3_moe_every_layer", "nvfp4", 2, 2), ("qwen3_moe_every_layer", "fp8", 1, 2)])
def test_moe_trtllm_experts_are_the_hf_experts_stacked(megatron_world, tmp_path, name, algo, moe_tp, moe_ep):
    """Per-channel and per-block formats (and EP layouts, which ModelOpt does not export): each
    inference rank's stacked experts are, byte for byte, the experts of the HF export written in
    the same export: fc[e] = [up; gate] of expert e, rows split over the expert-TP ranks, proj[e]
    its down projection, inputs split; their scales stacked along the experts, the layer's one
    input scale as it is. (ModelOpt 0.47's TensorRT-LLM export of Megatron MoE is no oracle for
    these formats: it swaps the fc weight's halves to [up; gate] but not their per-row scales, so
    its fc dequantizes up to 44% off the float weights here; per-tensor FP8 is compared with it
    above.)"""
    import torch

    model = build(name)
    tp = moe_tp * moe_ep
    path = Exporter(model, ExportConfig(
        output_dir=str(tmp_path), dtype="bfloat16", mode="sync", formats=["hf", "trtllm_checkpoint"],
        inference_tp=tp, inference_moe_tp=moe_tp, inference_moe_ep=moe_ep, verification={"enabled": False},
        quantization={"algorithm": algo, "calibration": CALIB})).export(1).path
    hf = load_dir(path / "hf")
    prefix, gate, up, down = EXPERT_NAMES[name]
    layers = sorted({int(n.split(".")[2]) for n in hf if f".{prefix}." in n})
    experts = model.config.num_moe_experts
    per_rank = experts // moe_ep

    def same(a, b, what):
        a, b = (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in (a, b))
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), what

    for rank in range(tp):
        trt = load_file(str(path / "trtllm_checkpoint" / f"rank{rank}.safetensors"))
        tp_rank, ep_rank = rank // moe_ep, rank % moe_ep
        for layer in layers:
            t = f"transformer.layers.{layer}.mlp"
            for i, e in enumerate(range(ep_rank * per_rank, (ep_rank + 1) * per_rank)):
                h = f"model.layers.{layer}.{prefix}.{e}"
                for key in ("weight", "weight_scale", "weight_scale_2"):
                    if f"{h}.{gate}.{key}" not in hf:
                        continue
                    trt_key = "per_channel_scale" if algo == "fp8_pc_pt" and key == "weight_scale" else \
                        TRT_SCALES.get(key, key)
                    g, u, d = (hf[f"{h}.{x}.{key}"] for x in (gate, up, down))
                    if g.dim() == 0 or g.numel() == 1:  # per-tensor: the expert's gate/up share it
                        same(g, u, f"{h} gate/up {key}")
                        fc, proj = g, d
                    else:
                        fc = torch.cat([u.chunk(moe_tp, 0)[tp_rank], g.chunk(moe_tp, 0)[tp_rank]])
                        proj = d.chunk(moe_tp, 1)[tp_rank] if d.dim() > 1 else d
                    same(trt[f"{t}.fc.{trt_key}"][i].reshape(fc.shape), fc, f"rank {rank} {t}.fc.{trt_key}[{i}]")
                    same(trt[f"{t}.proj.{trt_key}"][i].reshape(proj.shape), proj,
                         f"rank {rank} {t}.proj.{trt_key}[{i}]")
            if f"model.layers.{layer}.{prefix}.0.{gate}.input_scale" in hf:  # one per layer and linear
                for which, x in (("fc", gate), ("proj", down)):
                    same(trt[f"{t}.{which}.activation_scaling_factor"],
                         hf[f"model.layers.{layer}.{prefix}.0.{x}.input_scale"].reshape(1), f"{t}.{which} input")


def test_quantized_moe_refusals(megatron_world, tmp_path):
    model = build("mixtral")
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
