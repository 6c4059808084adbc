"""The newer families, single rank: the HF export gives the Megatron model's logits under
transformers (float32), the TensorRT-LLM checkpoint has the family's layout, and what TensorRT-LLM
cannot hold is refused at attach. (Multi-rank sources: test_distributed.py.)"""

import json
import zlib

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import ConfigError, ExportConfig, Exporter
from tests.support import families as fam
from tests.support.models import megatron_logits, randomize, tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers is the HF oracle (extra 'test')")

VOCAB = 120


def _needs(attribute, owner, why):
    """Skip (with the reason) when this megatron-core lacks something a variant needs."""
    import importlib

    module_name, _, cls = owner.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), cls)
    except (ImportError, AttributeError):
        pytest.skip(f"megatron-core {_version()} has no {owner}: {why}")
    if attribute and attribute not in getattr(target, "__dataclass_fields__", {}) and not hasattr(target, attribute):
        pytest.skip(f"megatron-core {_version()} has no {owner}.{attribute}: {why}")


def _version():
    import megatron.core

    return getattr(megatron.core, "__version__", "?")


def hybrid_only():
    _needs(None, "megatron.core.models.hybrid.hybrid_model.HybridModel",
           "HybridModel arrived in megatron-core 0.19 (scripts/test-mcore-latest runs these)")


def mup_only():
    _needs("use_mup", "megatron.core.transformer.TransformerConfig",
           "Gemma's embedding scale is MuP's embedding multiplier (megatron-core >= 0.19)")


VARIANTS = {
    # name: (builder, HF architecture, requirement check or None)
    "qwen3": (lambda: fam.tiny_qwen3(), "Qwen3ForCausalLM", None),
    "qwen3_tied_mha": (lambda: fam.tiny_qwen3(tied=True, num_query_groups=8), "Qwen3ForCausalLM", None),
    "nemotron": (lambda: fam.tiny_nemotron(), "NemotronForCausalLM", None),
    "nemotron_biases": (lambda: fam.tiny_nemotron(add_bias_linear=True), "NemotronForCausalLM", None),
    "starcoder2": (lambda: fam.tiny_starcoder2(), "Starcoder2ForCausalLM", None),
    "starcoder2_window5": (lambda: fam.tiny_starcoder2(window=5), "Starcoder2ForCausalLM", None),
    "starcoder2_exact_gelu": (lambda: fam.tiny_starcoder2(activation_func=torch.nn.functional.gelu),
                              "Starcoder2ForCausalLM", None),
    "gemma": (lambda: fam.tiny_gemma(), "GemmaForCausalLM", mup_only),
    "hybrid_llama": (lambda: fam.tiny_hybrid("*-*-"), "LlamaForCausalLM", hybrid_only),
    "hybrid_qwen3": (lambda: fam.tiny_hybrid("*-*-", qk_layernorm=True, kv_channels=16), "Qwen3ForCausalLM",
                     hybrid_only),
    # Megatron's Mamba forward on CPU: its SSD scan is transformers' reference of mamba_ssm's
    # kernel (test-only, `testing.families.allow_mamba_build`); everything else is Megatron's code
    "nemotron_h": (lambda: fam.tiny_nemotron_h("M*-M"), "NemotronHForCausalLM", hybrid_only),
}


def export(model, tmp_path, **kw):
    cfg = dict(output_dir=str(tmp_path), formats=["hf"], dtype="float32", vocab_size=VOCAB)
    cfg.update(kw)
    return Exporter(model, ExportConfig(**cfg)).export(iteration=1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_export_matches_megatron_logits(megatron_world, tmp_path, variant):
    build, architecture, requirement = VARIANTS[variant]
    if requirement:
        requirement()
    model = build()
    randomize(model, seed=zlib.crc32(variant.encode()) % 1000)
    result = export(model, tmp_path)
    config = json.loads((result.path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["vocab_size"] == VOCAB
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(result.path / "hf"), dtype=torch.float32).eval()
    # longer than the 5-token window, so a dropped or off-by-one window changes the logits
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(5))
    want = megatron_logits(model, tokens)[..., :VOCAB]
    with torch.no_grad():
        got = hf(tokens).logits
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 1e-4, f"{variant}: max |diff| / logit scale = {rel:.2e}"


def test_sliding_window_is_the_hf_window(megatron_world, tmp_path):
    """window_size=(W-1, 0) attends to W tokens: HF's sliding_window W (checked by the logits
    above); the window really matters on these sequences."""
    model = fam.tiny_starcoder2(window=5)
    randomize(model, seed=8)
    full = fam.tiny_starcoder2()
    full.load_state_dict(model.state_dict())
    tokens = torch.randint(0, VOCAB, (1, 19), generator=torch.Generator().manual_seed(2))
    assert (megatron_logits(model, tokens) - megatron_logits(full, tokens)).abs().max() > 1e-3
    config = json.loads((export(model, tmp_path).path / "hf" / "config.json").read_text())
    assert config["sliding_window"] == 5


def test_hybrid_pairs_export_the_bytes_of_the_equivalent_gpt_model(megatron_world, tmp_path):
    """GPT layer i = hybrid layers 2i (attention) and 2i+1 (MLP): a *-*- HybridModel with a
    GPTModel's weights exports identical files (HF and TensorRT-LLM TP2)."""
    hybrid_only()
    gpt = tiny_llama()
    randomize(gpt, seed=21)
    hybrid = fam.tiny_hybrid("*-*-")
    source = gpt.state_dict()
    renamed = {}
    for name in hybrid.state_dict():
        if name.startswith("decoder.layers."):
            _, _, index, rest = name.split(".", 3)
            renamed[name] = source[f"decoder.layers.{int(index) // 2}.{rest}"]
        else:
            renamed[name] = source[name.replace("decoder.final_norm.", "decoder.final_layernorm.")]
    hybrid.load_state_dict(renamed)
    targets = dict(formats=["hf", "trtllm_checkpoint"], inference_tp=2, dtype="bfloat16")
    a = export(gpt, tmp_path / "gpt", **targets).path
    b = export(hybrid, tmp_path / "hybrid", **targets).path
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "manifest.json")
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def trt_tensors(result):
    return load_file(str(result.path / "trtllm_checkpoint" / "rank0.safetensors"))


def test_qwen3_trtllm_checkpoint_carries_the_qk_norms(megatron_world, tmp_path):
    model = fam.tiny_qwen3()
    randomize(model, seed=4)
    result = export(model, tmp_path, formats=["hf", "trtllm_checkpoint"])
    config = json.loads((result.path / "trtllm_checkpoint" / "config.json").read_text())
    assert (config["architecture"], config["qwen_type"], config["head_size"]) == ("Qwen3ForCausalLM", "qwen3", 16)
    trt, hf = trt_tensors(result), load_file(str(result.path / "hf" / "model.safetensors"))
    for layer in range(2):
        for which in ("q", "k"):
            assert torch.equal(trt[f"transformer.layers.{layer}.attention.{which}_layernorm.weight"],
                               hf[f"model.layers.{layer}.self_attn.{which}_norm.weight"])


def test_nemotron_trtllm_norms_carry_the_plus_one(megatron_world, tmp_path):
    """TensorRT-LLM's LayerNorm is plain: the zero-centred weight w is written as 1 + w there,
    as is, in HF (whose Nemotron norm adds the one itself)."""
    model = fam.tiny_nemotron()
    randomize(model, seed=6)
    result = export(model, tmp_path, formats=["hf", "trtllm_checkpoint"])
    trt, hf = trt_tensors(result), load_file(str(result.path / "hf" / "model.safetensors"))
    config = json.loads((result.path / "trtllm_checkpoint" / "config.json").read_text())
    assert (config["gpt_variant"], config["rotary_pct"], config["hidden_act"]) == ("nemotron", 0.5, "squared-relu")
    w = model.decoder.layers[0].input_layernorm.weight.detach()
    assert torch.equal(hf["model.layers.0.input_layernorm.weight"], w)
    assert torch.equal(trt["transformer.layers.0.input_layernorm.weight"], w + 1)
    assert torch.equal(trt["transformer.layers.0.input_layernorm.bias"], hf["model.layers.0.input_layernorm.bias"])
    assert torch.equal(trt["transformer.ln_f.weight"], model.decoder.final_layernorm.weight.detach() + 1)
    assert torch.equal(trt["transformer.layers.1.mlp.fc.weight"], hf["model.layers.1.mlp.up_proj.weight"])


def test_trtllm_formats_are_refused_where_tensorrt_llm_has_no_such_model(megatron_world, tmp_path):
    with pytest.raises(ConfigError, match="sliding-window.*formats: \\[hf\\]"):
        Exporter(fam.tiny_starcoder2(window=5), ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB))
    assert Exporter(fam.tiny_starcoder2(), ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB))


def random_nemotron_h(seed=0):
    hybrid_only()
    return fam.random_nemotron_h(VOCAB, seed)


def test_nemotron_h_round_trip_equals_the_hf_model(megatron_world, tmp_path):
    """Megatron's Mamba forward needs CUDA kernels, so on CPU the mapping is checked by a round
    trip: random HF Nemotron-H -> Megatron (test loader) -> export -> every tensor equal to HF's,
    and the reloaded HF model computes the original's logits (transformers' torch fallback)."""
    model, hf = random_nemotron_h(seed=3)
    result = export(model, tmp_path)
    config = json.loads((result.path / "hf" / "config.json").read_text())
    assert config["hybrid_override_pattern"] == "M*-M" and config["mamba_num_heads"] == 8
    exported = load_file(str(result.path / "hf" / "model.safetensors"))
    original = {k.replace("model.", "backbone.", 1): v for k, v in hf.state_dict().items()}
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        assert torch.equal(exported[name], value), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(result.path / "hf"), dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(reloaded(tokens).logits, hf(tokens).logits, rtol=0, atol=1e-5)


def test_nemotron_h_refuses_the_tensorrt_llm_formats(megatron_world, tmp_path):
    hybrid_only()
    with pytest.raises(ConfigError, match="no Nemotron-H engine.*formats: \\[hf\\]"):
        Exporter(fam.tiny_nemotron_h("M*-M"), ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB))


@pytest.mark.parametrize("algo", ["fp8_pc_pt", "mxfp8", "w4a16_nvfp4"])
def test_nemotron_h_weight_only_exports_equal_modelopts(megatron_world, tmp_path, algo):
    """Weight-only recipes need no forward pass, so Nemotron-H quantizes on CPU: every tensor equals
    ModelOpt's `export_hf_checkpoint` of the transformers Nemotron-H holding the same weights. The
    mixers' in_proj (its scales over the whole concatenation of Megatron's z/x/B/C/dt components,
    e.g. NVFP4's weight_scale_2) and out_proj, attention and MLP linears are quantized; conv1d, the
    SSM parameters, norms, embeddings and lm_head are not, and the unquantized modules are listed."""
    mtq = pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is the oracle")
    from modelopt.torch.export import export_hf_checkpoint

    from tests.support.oracle import modelopt_config

    model, hf = random_nemotron_h(seed=3)
    path = Exporter(model, ExportConfig(output_dir=str(tmp_path / "ours"), formats=["hf"], dtype="float32",
                                        vocab_size=VOCAB, verification={"enabled": False},
                                        quantization={"algorithm": algo})).export(1).path / "hf"
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))

    def loop(m):
        with torch.no_grad():
            m(tokens)
    export_hf_checkpoint(mtq.quantize(hf, modelopt_config(algo), loop), export_dir=str(tmp_path / "modelopt"))
    ours = load_file(str(path / "model.safetensors"))
    theirs = load_file(str(tmp_path / "modelopt" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert (ours[name].dtype, ours[name].shape) == (value.dtype, value.shape), name
        assert torch.equal(ours[name].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), name
    assert ours["backbone.layers.0.mixer.in_proj.weight"].dtype != torch.float32
    assert ours["backbone.layers.0.mixer.conv1d.weight"].dtype == torch.float32
    ours_q = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    theirs_q = json.loads((tmp_path / "modelopt" / "hf_quant_config.json").read_text())["quantization"]
    # ModelOpt 0.47 under transformers 5 appends a name sentinel to each excluded module
    # ("lm_head.\x00backbone.pt_name_sentinel"): the modules are what is compared
    theirs_q["exclude_modules"] = sorted(n.split(".\x00")[0] for n in theirs_q["exclude_modules"])
    assert ours_q == theirs_q


@pytest.mark.parametrize("algorithm", ["int4_awq", "w4a8_awq"])  # (int8_sq: TensorRT-LLM only, refused already)
def test_nemotron_h_smoothquant_and_awq_are_refused_at_attach(megatron_world, tmp_path, algorithm):
    hybrid_only()
    cfg = ExportConfig(output_dir=str(tmp_path), formats=["hf"], vocab_size=VOCAB,
                       quantization={"algorithm": algorithm})
    with pytest.raises(ConfigError, match="SmoothQuant/AWQ exports of Mamba hybrids are not supported"):
        Exporter(fam.tiny_nemotron_h("M*-M"), cfg)


@pytest.mark.parametrize("quantization", [{"algorithm": "fp8"}, {"algorithm": "fp8_pc_pt", "kv_cache": "fp8"}])
def test_calibrating_mamba_without_its_kernels_is_refused_at_attach(megatron_world, tmp_path, monkeypatch,
                                                                    quantization):
    """Calibration runs the forward pass; without mamba_ssm (here: the test's reference scan
    taken away) that fails at attach, naming the kernel and the recipes that need no forward."""
    hybrid_only()
    model = fam.tiny_nemotron_h("M*-M")
    from megatron.core.ssm import mamba_mixer

    monkeypatch.setattr(mamba_mixer, "mamba_chunk_scan_combined", None)
    cfg = ExportConfig(output_dir=str(tmp_path), formats=["hf"], vocab_size=VOCAB, quantization=quantization)
    with pytest.raises(ConfigError, match="need mamba_chunk_scan_combined.*use a weight-only recipe"):
        Exporter(model, cfg)
    weight_only = ExportConfig(output_dir=str(tmp_path), formats=["hf"], vocab_size=VOCAB,
                               quantization={"algorithm": "fp8_pc_pt"})
    assert Exporter(model, weight_only).export(1).status == "complete"


QUANT_VARIANTS = ["qwen3", "nemotron", "starcoder2", "gemma", "hybrid_llama"]


@pytest.mark.parametrize("algo", ["fp8", "fp8_pc_pt"])
@pytest.mark.parametrize("variant", QUANT_VARIANTS)
def test_quantized_exports_of_each_family(megatron_world, tmp_path, variant, algo):
    """The exported weights, dequantized with their scales (and pre-quant scales), give the logits
    of ModelOpt's fake-quantized model of the same family (weight quantization; activation and KV
    scales are ModelOpt's calibrated amax, checked in test_quant.py); norms, q/k norms, embeddings
    and lm_head stay unquantized and equal the unquantized export."""
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is the quantization engine")
    build, _, requirement = VARIANTS[variant]
    if requirement:
        requirement()
    from megatron_trt_ext.quant.dequant import load_dequantized
    from tests.support.oracle import modelopt_fake_quant

    model = build()
    randomize(model, seed=zlib.crc32(variant.encode()) % 1000)
    quant = {"algorithm": algo, "kv_cache": "fp8", "calibration": {"num_samples": 8, "seq_len": 24, "batch_size": 4}}
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), formats=["hf"], dtype="float32",
                                            vocab_size=VOCAB, quantization=quant))
    path = exporter.export(1).path / "hf"
    replica = modelopt_fake_quant(model, exporter, weight_only=True)
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(5))
    want = megatron_logits(replica, tokens)[..., :VOCAB]
    with torch.no_grad():
        got = load_dequantized(path)(tokens).logits
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 1e-3, f"{variant} {algo}: max |diff| / logit scale = {rel:.2e}"
    tensors = load_file(str(path / "model.safetensors"))
    plain = load_file(str(export(model, tmp_path / "plain").path / "hf" / "model.safetensors"))
    quantized = {n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale")}
    assert quantized and all(".layers." in m for m in quantized)
    for name, value in plain.items():
        if name[: -len(".weight")] not in quantized and not name.endswith(("_scale", "pre_quant_scale")):
            assert torch.equal(tensors[name], value), name


def test_starcoder2_and_gemma_trtllm_layouts(megatron_world, tmp_path):
    """Starcoder2 into TensorRT-LLM's GPT layout (fused per-rank qkv with biases, mlp.fc/proj);
    Gemma into the LLaMA layout with the zero-centred norms offset by one."""
    model = fam.tiny_starcoder2()
    randomize(model, seed=12)
    result = export(model, tmp_path / "sc", formats=["hf", "trtllm_checkpoint"], inference_tp=2)
    hf = load_file(str(result.path / "hf" / "model.safetensors"))
    config = json.loads((result.path / "trtllm_checkpoint" / "config.json").read_text())
    assert (config["architecture"], config["gpt_variant"], config["bias"]) == ("Starcoder2ForCausalLM", "starcoder2", True)
    for rank in range(2):
        t = load_file(str(result.path / "trtllm_checkpoint" / f"rank{rank}.safetensors"))
        qkv_bias = torch.cat([hf[f"model.layers.1.self_attn.{p}_proj.bias"].chunk(2)[rank] for p in "qkv"])
        assert torch.equal(t["transformer.layers.1.attention.qkv.bias"], qkv_bias.to(t["transformer.layers.1.attention.qkv.bias"].dtype))
        assert torch.equal(t["transformer.layers.1.mlp.fc.weight"], hf["model.layers.1.mlp.c_fc.weight"].chunk(2)[rank])
        assert torch.equal(t["transformer.layers.1.mlp.proj.bias"], hf["model.layers.1.mlp.c_proj.bias"])
    mup_only()
    model = fam.tiny_gemma()
    randomize(model, seed=13)
    result = export(model, tmp_path / "gemma", formats=["hf", "trtllm_checkpoint"])
    t = trt_tensors(result)
    w = model.decoder.layers[0].input_layernorm.weight.detach()
    assert torch.equal(t["transformer.layers.0.input_layernorm.weight"], w + 1)
    assert torch.equal(t["transformer.vocab_embedding.weight"], model.embedding.word_embeddings.weight[:VOCAB])


def test_quantized_tensorrt_llm_checkpoint_of_a_new_family(megatron_world, tmp_path):
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is the quantization engine")
    model = fam.tiny_nemotron()
    randomize(model, seed=14)
    quant = {"algorithm": "fp8", "kv_cache": "fp8", "calibration": {"num_samples": 4, "seq_len": 16, "batch_size": 4}}
    result = export(model, tmp_path, formats=["hf", "trtllm_checkpoint"], inference_tp=2, quantization=quant)
    hf = load_file(str(result.path / "hf" / "model.safetensors"))
    for rank in range(2):
        t = load_file(str(result.path / "trtllm_checkpoint" / f"rank{rank}.safetensors"))
        fc = t["transformer.layers.0.mlp.fc.weight"]
        assert fc.dtype == torch.float8_e4m3fn
        assert torch.equal(fc.view(torch.uint8), hf["model.layers.0.mlp.up_proj.weight"].chunk(2)[rank].view(torch.uint8))
        assert t["transformer.layers.0.mlp.fc.weights_scaling_factor"].item() == pytest.approx(
            hf["model.layers.0.mlp.up_proj.weight_scale"].item())
        assert torch.equal(t["transformer.layers.0.input_layernorm.weight"],
                           model.decoder.layers[0].input_layernorm.weight.detach() + 1)
