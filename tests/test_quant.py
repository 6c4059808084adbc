"""Quantized exports with ModelOpt: exported weights and scales against ModelOpt's fake-quantized
model, training-state invariance, configs, and errors at attach."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import ConfigError, ExportConfig, Exporter, attach
from megatron_trt_ext.layouts import qkv_interleaved_to_split
from tests.support.models import megatron_logits, randomize, tiny_llama

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is the quantization engine (extra 'quant')")
transformers = pytest.importorskip("transformers", reason="transformers builds the reference model")

VOCAB = 120
# Algorithms some engine loads from a Hugging Face checkpoint (int8_sq is a TensorRT-LLM checkpoint only:
# tests/test_quant_modelopt.py compares it, and every format, with ModelOpt's own exporters).
HF_ALGOS = ["fp8", "int4_awq", "w4a8_awq"]
CALIB = {"num_samples": 8, "seq_len": 32, "batch_size": 4}


def quant_model():
    """Sizes that the 128-wide AWQ groups divide (also per inference-TP-2 rank)."""
    model = tiny_llama(hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, num_query_groups=2)
    randomize(model, seed=51)
    return model


def quant_config(tmp_path, algo, **kw):
    return ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB, dtype="float32", mode="sync",
                        quantization={"algorithm": algo, "kv_cache": "fp8", "calibration": CALIB}, **kw)


def load_dir(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def quant_step(algo: str, tensors: dict, module: str, reference: torch.Tensor) -> torch.Tensor:
    """One quantization step at each element (the grid's spacing there)."""
    s = tensors[f"{module}.weight_scale"]
    if algo in ("fp8", "w4a8_awq"):  # E4M3 spacing in the scaled domain: 2**-3 of the binade (subnormal 2**-9)
        s = s if algo == "fp8" else tensors[f"{module}.weight_scale_2"]
        binade = torch.floor(torch.log2((reference.abs() / s).clamp_min(2.0 ** -6)))
        return 2.0 ** (binade - 3) * s * 1.0001
    if algo == "int8_sq":
        return s[:, None].expand_as(reference) * 1.0001
    group = reference.shape[1] // s.shape[1]
    return s.repeat_interleave(group, dim=1) * 1.0001


def assert_same_grid(algo, tensors, module, got, reference, what):
    """Equal, except where float32 rounding put an element on the other side of a rounding
    boundary: ModelOpt's fake quantizer computes x * (maxbound / amax) while its export (used
    here) computes x / (amax / maxbound). Such elements must be rare and exactly one step away."""
    diff = (got - reference).abs()
    off = diff > 1e-6 * reference.abs() + 1e-9
    assert off.float().mean() < 2e-3, f"{what}: {int(off.sum())} of {off.numel()} elements differ"
    if off.any():
        step = quant_step(algo, tensors, module, torch.maximum(got.abs(), reference.abs()))
        assert bool((diff[off] <= step[off]).all()), f"{what}: a difference larger than one quantization step"


def dequantize(algo: str, tensors: dict, module: str) -> torch.Tensor:
    """Exported weight and scales -> float weight, by the format's definition."""
    w, s = tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"]
    if algo == "fp8":
        return w.float() * s
    if algo == "int8_sq":
        return w.float() * s[:, None]
    if algo == "w4a8_awq":  # int4 blocks, then the FP8 grid of the per-tensor scale (the kernel's dtype)
        s2 = tensors[f"{module}.weight_scale_2"]
        blocks = dequantize("int4_awq", tensors, module)
        return (blocks / s2).to(torch.float8_e4m3fn).float() * s2
    # int4 packed two per byte along the output dim: low nibble = even row, high nibble = odd row
    low = (w.to(torch.int16) & 0x0F)
    high = (w.to(torch.int16) >> 4) & 0x0F
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    q = torch.stack([low, high], dim=1).reshape(-1, w.shape[1]).float()
    group = q.shape[1] // s.shape[1]
    return q * s.repeat_interleave(group, dim=1)


LINEARS = {  # Megatron linear -> HF modules it becomes
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}


def fake_quant_parts(replica, layer, linear, info):
    module = replica.decoder.layers[layer].get_submodule(linear)
    with torch.no_grad():
        fq = module.weight_quantizer(module.weight)
    if linear.endswith("linear_qkv"):
        return qkv_interleaved_to_split(fq, info.num_attention_heads, info.num_query_groups, info.head_dim)
    if linear.endswith("linear_fc1"):
        return fq.chunk(2)
    return (fq,)


@pytest.fixture
def calibrated(megatron_world):
    """ModelOpt's own calibration of a copy of the model, on the batches the export used: its
    fake-quantized replica is the reference."""
    from tests.support.oracle import modelopt_fake_quant

    return modelopt_fake_quant


@pytest.mark.parametrize("algo", HF_ALGOS)
def test_exported_weights_are_modelopts_fake_quantized_weights(megatron_world, tmp_path, calibrated, algo):
    model = quant_model()
    exporter = Exporter(model, quant_config(tmp_path, algo))
    result = exporter.export(1)
    hf = load_dir(result.path / "hf")
    replica = calibrated(model, exporter)
    info = exporter.info
    plain = load_dir(Exporter(model, ExportConfig(output_dir=str(tmp_path / "plain"), vocab_size=VOCAB,
                                                  dtype="float32", mode="sync", formats=["hf"])).export(1).path / "hf")
    norms = {"self_attention.linear_qkv": "input_layernorm", "mlp.linear_fc1": "post_attention_layernorm"}
    for layer in range(info.num_layers):
        for linear, modules in LINEARS.items():
            for module, reference in zip(modules, fake_quant_parts(replica, layer, linear, info)):
                name = f"model.layers.{layer}.{module}"
                assert_same_grid(algo, hf, name, dequantize(algo, hf, name), reference.float().detach(),
                                 f"{algo} {name}")
            source = replica.decoder.layers[layer].get_submodule(linear)
            pqs = getattr(source.input_quantizer, "_pre_quant_scale", None)
            if pqs is not None and linear in norms:  # AWQ: folded into the norm before it (ModelOpt's layout)
                norm = f"model.layers.{layer}.{norms[linear]}.weight"
                torch.testing.assert_close(hf[norm], plain[norm] * pqs.float())
                assert f"model.layers.{layer}.{modules[0]}.pre_quant_scale" not in hf
            elif pqs is not None:
                torch.testing.assert_close(hf[f"model.layers.{layer}.{modules[0]}.pre_quant_scale"], pqs.float())
            if source.input_quantizer.is_enabled:
                maxbound = 127.0 if algo == "int8_sq" else 448.0
                torch.testing.assert_close(hf[f"model.layers.{layer}.{modules[0]}.input_scale"],
                                           (source.input_quantizer.amax.float() / maxbound).reshape(()))
        # (k_scale / v_scale: against ModelOpt's KV quantizers in test_quant_modelopt.py)
        assert f"model.layers.{layer}.self_attn.k_proj.k_scale" in hf
    # unquantized modules are bit-equal to the unquantized export
    names = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    if algo == "fp8":
        names.append("model.layers.0.input_layernorm.weight")
    for name in names:
        assert torch.equal(hf[name], plain[name]), name


@pytest.mark.parametrize("algo", HF_ALGOS)
def test_dequantized_export_reproduces_fake_quant_logits(megatron_world, tmp_path, calibrated, tokens, algo):
    """Logits of the exported weights (dequantized, with their pre-quant scales) against ModelOpt's
    fake-quantized model with weight quantization only. Activation scales are compared exactly
    with ModelOpt's calibrated amax in the test above; emulating FP8/INT8 activations in a second
    implementation would add rounding-boundary flips of up to one FP8 step (12.5%) that say
    nothing about the exported values."""
    model = quant_model()
    exporter = Exporter(model, quant_config(tmp_path, algo, formats=["hf"]))
    path = exporter.export(1).path / "hf"
    replica = calibrated(model, exporter)
    for name, module in replica.named_modules():
        if name.endswith("input_quantizer"):
            module.disable()  # the pre-quant scale still applies, as in the deployed kernels
    want = megatron_logits(replica, tokens)[..., :VOCAB]

    tensors = load_dir(path)
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config")
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config),
                                                        dtype=torch.float32)
    state = {}
    for name in hf.state_dict():
        module = name[: -len(".weight")]
        state[name] = dequantize(algo, tensors, module) if f"{module}.weight_scale" in tensors else tensors[name]
    hf.load_state_dict(state)
    for name, module in hf.named_modules():
        pqs = tensors.get(f"{name}.pre_quant_scale")
        if isinstance(module, torch.nn.Linear) and pqs is not None:
            module.register_forward_pre_hook(lambda m, args, pqs=pqs: (args[0] * pqs,))
    with torch.no_grad():
        got = hf(tokens).logits
    rel = ((got - want).abs().max() / want.abs().max()).item()
    # float32 differences between two implementations (1e-6, see test_hf_logits) plus the rare
    # weight elements one grid step away (test above): bounded well below one weight step's effect.
    assert rel < 1e-3, f"{algo}: max |diff| / logit scale = {rel:.2e}"


def _state(model, optimizer):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()},
            {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
             for k, v in optimizer.state_dict()["state"].items()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            [(n, m.training) for n, m in model.named_modules()],
            {n: b.detach().clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("algo", ["fp8", "int4_awq", "mxfp8"])
def test_calibration_leaves_training_state_bit_identical(megatron_world, tmp_path, algo):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    model = quant_model()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    toks = torch.randint(0, VOCAB, (2, 16))
    loss = model(toks, torch.arange(16).unsqueeze(0).expand(2, 16), attention_mask=None, labels=toks).mean()
    loss.backward()
    optimizer.step()
    before = _state(model, optimizer)
    rng_before = (torch.get_rng_state(), random.getstate(),
                  {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()})
    handle = attach(model, quant_config(tmp_path, algo, formats=["hf"]))
    try:
        assert handle.on_checkpoint_saved(iteration=1).ok
    finally:
        handle.detach()
    after = _state(model, optimizer)
    for name, value in before[0].items():
        assert torch.equal(value, after[0][name]), f"parameter {name} changed"
    for name, grad in before[1].items():
        assert torch.equal(grad, after[1][name]), f"gradient {name} changed"
    for key, value in before[2].items():
        for k, v in value.items():
            assert torch.equal(v, after[2][key][k]) if torch.is_tensor(v) else v == after[2][key][k]
    assert before[3] == after[3], "module structure changed (quantizers left in the model?)"
    assert before[4] == after[4], "training mode changed"
    assert before[5].keys() == after[5].keys() and all(torch.equal(v, after[5][k]) for k, v in before[5].items())
    assert not any("quantizer" in n for n, _ in model.named_modules())
    assert torch.equal(rng_before[0], torch.get_rng_state()) and rng_before[1] == random.getstate()
    for k, v in get_cuda_rng_tracker().get_states().items():
        assert torch.equal(v, rng_before[2][k]), f"RNG tracker state {k} changed"


def test_trtllm_quantized_checkpoint_layout(megatron_world, tmp_path):
    model = quant_model()
    result = Exporter(model, quant_config(tmp_path, "int4_awq", inference_tp=2)).export(1)
    hf = load_dir(result.path / "hf")
    trt_cfg = json.loads((result.path / "trtllm_checkpoint" / "config.json").read_text())
    assert trt_cfg["quantization"] == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": "FP8", "group_size": 128,
                                       "has_zero_point": False, "pre_quant_scale": True,
                                       "exclude_modules": ["lm_head"]}
    hf_quant = json.loads((result.path / "hf" / "hf_quant_config.json").read_text())
    assert hf_quant["producer"]["name"] == "modelopt" and hf_quant["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert json.loads((result.path / "hf" / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    for rank in range(2):
        t = load_file(str(result.path / "trtllm_checkpoint" / f"rank{rank}.safetensors"))
        # the dense (row-parallel) weight: packed int4 [out/2, in/tp], block scales split on the input
        dense = dequantize("int4_awq", {"x.weight": t["transformer.layers.0.attention.dense.weight"],
                                        "x.weight_scale": t["transformer.layers.0.attention.dense.weights_scaling_factor"]}, "x")
        full = dequantize("int4_awq", hf, "model.layers.0.self_attn.o_proj")
        torch.testing.assert_close(dense, full.chunk(2, dim=1)[rank], rtol=0, atol=0)
        torch.testing.assert_close(t["transformer.layers.0.attention.dense.prequant_scaling_factor"],
                                   hf["model.layers.0.self_attn.o_proj.pre_quant_scale"].chunk(2)[rank])
        # the fused qkv: q, k, v rows of this rank, each dequantized with its own block scales
        qkv = dequantize("int4_awq", {"x.weight": t["transformer.layers.0.attention.qkv.weight"],
                                      "x.weight_scale": t["transformer.layers.0.attention.qkv.weights_scaling_factor"]}, "x")
        parts = [dequantize("int4_awq", hf, f"model.layers.0.self_attn.{p}_proj").chunk(2)[rank] for p in "qkv"]
        torch.testing.assert_close(qkv, torch.cat(parts), rtol=0, atol=0)
        assert t["transformer.layers.0.attention.kv_cache_scaling_factor"].item() == pytest.approx(max(
            hf["model.layers.0.self_attn.k_proj.k_scale"].item(), hf["model.layers.0.self_attn.v_proj.v_scale"].item()))
        assert t["lm_head.weight"].dtype == torch.float32  # excluded: unquantized


@pytest.mark.parametrize("quantization,fragment", [
    ({"algorithm": "fp9"}, "quantization.algorithm: unknown 'fp9'"),
    ({"algorithm": "fp8", "kv_cache": "int2"}, "kv_cache"),
    ({"algorithm": "fp8", "calibration": {"num_samples": 0}}, "num_samples"),
    ({"algorithm": "fp8", "calibration": {"source": "jsonl"}}, "needs both 'jsonl'"),
    ({"algorithm": "fp8", "smoothquant_alpha": 0.7}, "only used by algorithm int8_sq"),
    ({"algorithm": "fp8", "calibrate": {}}, "unknown option"),
])
def test_bad_quantization_recipes_are_named(quantization, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ExportConfig(quantization=quantization)


@pytest.mark.parametrize("build,kwargs,fragment", [
    (lambda: tiny_llama(), {"inference_tp": 1}, "has 64 inputs, not a multiple of the group size 128"),
    (lambda: quant_model(), {"inference_tp": 4}, "each rank holds 64 inputs of model.layers.0.self_attn.o_proj"),
])
def test_awq_group_size_is_checked_at_attach(megatron_world, tmp_path, build, kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Exporter(build(), quant_config(tmp_path, "int4_awq", **kwargs))


def test_iterator_calibration_needs_data_at_attach(megatron_world, tmp_path):
    cfg = ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB, quantization={
        "algorithm": "fp8", "calibration": {"source": "iterator"}})
    with pytest.raises(ConfigError, match="calibration_data="):
        Exporter(quant_model(), cfg)
    batches = [torch.randint(0, VOCAB, (2, 16)) for _ in range(3)]
    result = Exporter(quant_model(), cfg, calibration_data=lambda: iter(batches)).export(1)
    assert result.ok


def test_jsonl_calibration_with_a_tokenizer(megatron_world, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    gen = torch.Generator().manual_seed(3)
    lines = [json.dumps({"text": " ".join(words[int(i)] for i in torch.randint(0, 100, (40,), generator=gen))})
             for _ in range(6)]
    (tmp_path / "calib.jsonl").write_text("\n".join(lines) + "\n")
    cfg = ExportConfig(output_dir=str(tmp_path / "out"), vocab_size=VOCAB, mode="sync", quantization={
        "algorithm": "fp8", "calibration": {"source": "jsonl", "jsonl": str(tmp_path / "calib.jsonl"),
                                            "tokenizer": str(tmp_path / "tok"), "num_samples": 4, "seq_len": 32}})
    from megatron_trt_ext.quant.calibrate import calibration_batches

    batches = calibration_batches(cfg.quantization.calibration, None, VOCAB, torch.device("cpu"))
    assert [tuple(b.shape) for b in batches] == [(4, 32)]
    assert int(batches[0].max()) <= 100 and int(batches[0].min()) >= 1  # real token ids, no <unk>
    assert Exporter(quant_model(), cfg).export(1).ok


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _decode_nvfp4(packed, block_scale, scale_2):
    """Two E2M1 codes per byte (low nibble first, along the input dim), FP8 scales per 16."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    values = E2M1[codes & 0x7] * torch.where(codes & 0x8 > 0, -1.0, 1.0)
    return values * (block_scale.float() * scale_2).repeat_interleave(16, dim=1)


def test_nvfp4_weight_numerics_on_cpu():
    """NVFP4's weight format: packed codes and FP8 block scales,
    decoded independently here, give the same weights as ModelOpt's own NVFP4 dequantizer, and
    TensorRT-LLM's row split of a linear quantizes to the row split of the HF tensors."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    from megatron_trt_ext.quant.numerics import LinearQuantizer, split_scale
    from megatron_trt_ext.quant.spec import ALGORITHMS

    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    q = LinearQuantizer(weight, {"input_amax": torch.tensor([3.0])}).quantize_part(weight, ALGORITHMS["nvfp4"])
    packed = q.quantized()
    block, scale_2 = q.scales["weight_scale"][0], q.scales["weight_scale_2"][0]
    assert packed.dtype == torch.uint8 and packed.shape == (64, 64)
    assert block.dtype == torch.float8_e4m3fn and block.shape == (64, 8)
    decoded = _decode_nvfp4(packed, block, scale_2)
    oracle = NVFP4QTensor((64, 128), torch.float32, packed).dequantize(
        dtype=torch.float32, scale=block, double_scale=scale_2, block_sizes={-1: 16})
    torch.testing.assert_close(decoded, oracle, rtol=0, atol=0)
    # within half a step of the largest code's spacing (2.0 between 4 and 6) of each block
    assert bool(((decoded - weight).abs() <= (block.float() * scale_2).repeat_interleave(16, dim=1) + 1e-6).all())
    for rank in range(2):
        half = q.quantized(weight.chunk(2, dim=1)[rank],
                           {k: (split_scale(v, kind, "row", 2, rank), kind) for k, (v, kind) in q.scales.items()})
        assert torch.equal(half, packed.chunk(2, dim=1)[rank])


@pytest.mark.parametrize("quantization", [
    {"algorithm": "fp8", "overrides": [{"layers": [0, 1], "algorithm": "none"}]},
    {"algorithm": "none", "overrides": [{"modules": "*.no_such_module", "algorithm": "fp8"}]},
    {"algorithm": "fp8", "exclude": ["lm_head", "*"]},
])
def test_a_recipe_that_quantizes_nothing_is_refused_at_attach(megatron_world, tmp_path, quantization):
    """Overrides/exclusions leaving every linear unquantized (and no KV cache) would write a quantized
    config with ``quant_algo: null`` and every linear ignored, which vLLM refuses to load: named at
    attach, with the rules to fix (issue 19)."""
    cfg = ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB, mode="sync", formats=["hf"],
                       quantization={**quantization, "calibration": CALIB})
    with pytest.raises(ConfigError, match=r"quantizes no linear.*(overrides|exclude)"):
        Exporter(quant_model(), cfg)
    # with a quantized KV cache the export still quantizes something: accepted as before
    Exporter(quant_model(), ExportConfig(output_dir=str(tmp_path / "kv"), vocab_size=VOCAB, mode="sync",
                                         formats=["hf"], quantization={**quantization, "kv_cache": "fp8",
                                                                       "calibration": CALIB}))
