"""Quantized exports against ModelOpt's own exporters, tensor for tensor.

* TensorRT-LLM checkpoints: ModelOpt's ``export_tensorrt_llm_checkpoint`` of the same Megatron
  model, calibrated by ModelOpt itself (``mtq.quantize`` with the recipe's config on the same
  batches), for every recipe ModelOpt exports to that format, at inference TP 1 and 2.
* Hugging Face checkpoints: ModelOpt's ``export_hf_checkpoint`` of the transformers model that
  our unquantized float32 export loads as, calibrated by ModelOpt on the same batches (ModelOpt's
  Megatron exporter crashes on or drops fp8_pb_wo, fp8_pc_pt, mxfp8 and AWQ). Its KV-cache
  quantizers measure K after RoPE in the HF attention: the oracle for k_scale / v_scale.

Weights and weight scales must be bit-equal. Activation and KV-cache scales measured by two
float32 implementations of the same forward (Megatron's, transformers') agree to rounding.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import ConfigError, ExportConfig, Exporter
from tests.support.models import randomize, tiny_gpt, tiny_llama
from tests.support.oracle import modelopt_fake_quant

mtq = pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is the oracle (extra 'quant')")
transformers = pytest.importorskip("transformers", reason="transformers runs ModelOpt's HF export")

CALIB = {"num_samples": 8, "seq_len": 32, "batch_size": 4}


def llama_128():
    """Every HF linear's dims are multiples of 128 (k/v: 2 groups x 64), for the 128x128 FP8 blocks
    and the AWQ groups, also per inference-TP-2 rank."""
    model = tiny_llama(hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                       kv_channels=64)
    randomize(model, seed=23)
    return model


def gpt_256():
    """GPT-2: Conv1D HF linears and one fused c_attn (MHA); every linear's dims are multiples of 128."""
    model = tiny_gpt(hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=4, tied=False)
    randomize(model, seed=29)
    return model


MODELS = {"llama": llama_128, "gpt": gpt_256}  # ModelOpt decoder type -> model


def load_dir(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def batches_for(exporter) -> list:
    from tests.support.oracle import calibration_tokens

    return calibration_tokens(exporter)


def modelopt_cfg(algo: str, kv: str = "none") -> dict:
    from tests.support.oracle import modelopt_config

    return modelopt_config(algo, kv)


def assert_same_tensors(ours: dict, theirs: dict, what: str, skip=(), close=()):
    assert set(ours) == set(theirs), (f"{what}: only ours {sorted(set(ours) - set(theirs))[:6]}, "
                                      f"only ModelOpt's {sorted(set(theirs) - set(ours))[:6]}")
    for name in sorted(theirs):
        if any(s in name for s in skip):
            continue
        a, b = ours[name], theirs[name]
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), \
            f"{what} {name}: ours {a.dtype} {tuple(a.shape)}, ModelOpt's {b.dtype} {tuple(b.shape)}"
        if any(c in name for c in close):  # activation / KV statistics of two forward implementations
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=0,
                                       msg=f"{what} {name}: ours {a.flatten()[:4].tolist()}, ModelOpt's "
                                           f"{b.flatten()[:4].tolist()}")
        elif a.dtype in (torch.float8_e4m3fn, torch.uint8, torch.int8):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{what} {name}: bytes differ"
        else:
            assert torch.equal(a, b), f"{what} {name}: values differ"


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def shared_fp8_scales(ours: dict, theirs: dict) -> set:
    """Per-tensor FP8 parts of one Megatron linear (q/k/v, a dense MLP's gate/up) share one weight
    scale here (Megatron fuses them; TensorRT-LLM and ModelOpt's Megatron exporter need it), where
    ModelOpt's HF path gives each its own: ours is the largest of ModelOpt's, and the weights
    follow it. Checks that, and returns the names whose bytes therefore differ."""
    differ = set()
    for name in theirs:
        for group in FUSED:
            if not name.endswith(f".{group[0]}.weight_scale") or theirs[name].numel() != 1 or ".experts." in name:
                continue
            prefix = name[: -len(f"{group[0]}.weight_scale")]
            if ours[name].dtype != torch.float32 or f"{prefix}{group[0]}.input_scale" not in theirs:
                continue  # not per-tensor FP8
            parts = [prefix + p for p in group]
            largest = max(theirs[p + ".weight_scale"] for p in parts)
            for part in parts:
                assert torch.equal(ours[part + ".weight_scale"], largest), part
                differ |= {part + ".weight", part + ".weight_scale"}
    return differ


# ---------------------------------------------------------------- TensorRT-LLM checkpoints
TRT_CASES = [("llama", a, tp) for a, tp in [
    ("fp8", 1), ("int8_sq", 1), ("int4_awq", 1), ("w4a8_awq", 1), ("fp8_pc_pt", 1), ("nvfp4", 1),
    ("int4_awq", 2), ("fp8_pc_pt", 2), ("nvfp4", 2), ("int8_sq", 2)]] + [
    # GPT-2: Conv1D storage and the fused c_attn (per-row scales split with its q/k/v rows)
    ("gpt", a, tp) for a, tp in [("fp8", 1), ("fp8_pc_pt", 1), ("w4a8_awq", 1), ("nvfp4", 1),
                                 ("int8_sq", 2), ("int4_awq", 2)]]


@pytest.mark.parametrize("decoder,algo,tp", TRT_CASES)
def test_trtllm_checkpoint_equals_modelopts_export(megatron_world, tmp_path, decoder, algo, tp):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    model = MODELS[decoder]()
    cfg = ExportConfig(output_dir=str(tmp_path / "ours"), dtype="bfloat16", mode="sync", inference_tp=tp,
                       formats=["trtllm_checkpoint"], verification={"enabled": False},
                       quantization={"algorithm": algo, "calibration": CALIB})
    exporter = Exporter(model, cfg)
    ours = exporter.export(1).path / "trtllm_checkpoint"
    oracle = modelopt_fake_quant(model, exporter)
    export_tensorrt_llm_checkpoint(oracle, decoder, torch.bfloat16, str(tmp_path / "modelopt"),
                                   inference_tensor_parallel=tp)
    theirs_cfg = json.loads((tmp_path / "modelopt" / "config.json").read_text())["quantization"]
    ours_cfg = json.loads((ours / "config.json").read_text())["quantization"]
    assert ours_cfg == theirs_cfg
    for rank in range(tp):
        # the embedding tables are laid out differently (ModelOpt pads the vocabulary and splits
        # the positions for its parallel embedding); they are unquantized and compared with the
        # HF export elsewhere
        vocab = ("vocab_embedding", "lm_head", "position_embedding")
        mine = {k: v for k, v in load_file(str(ours / f"rank{rank}.safetensors")).items()
                if not any(v in k for v in vocab)}
        theirs = {k: v for k, v in load_file(str(tmp_path / "modelopt" / f"rank{rank}.safetensors")).items()
                  if not any(v in k for v in vocab)}
        assert_same_tensors(mine, theirs, f"{decoder} {algo} TP{tp} rank {rank}")
    if algo in ("int4_awq", "w4a8_awq"):  # what TensorRT-LLM repacks for its int4 kernels
        assert mine["transformer.layers.0.mlp.fc.weight"].dtype == torch.int8
    if algo in ("int8_sq", "int4_awq"):  # TensorRT-LLM declares it in the checkpoint dtype
        assert mine["transformer.layers.0.mlp.fc.prequant_scaling_factor"].dtype == torch.bfloat16


def test_gpt2_kv_cache_scale_equals_modelopts_hf_kv_quantizers(megatron_world, tmp_path):
    """GPT-2's fused c_attn carries the K and V statistics: the layer's kv_cache_scaling_factor is
    the larger of ModelOpt's K and V amax / 448, as its quantizers measure them in transformers'
    GPT2Attention (ModelOpt's TensorRT-LLM exporter writes no KV scale for a Megatron GPT)."""
    model = gpt_256()
    plain = Exporter(model, ExportConfig(output_dir=str(tmp_path / "plain"), dtype="float32", mode="sync",
                                         formats=["hf"], verification={"enabled": False})).export(1).path / "hf"
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path / "ours"), dtype="bfloat16", mode="sync",
                                            formats=["trtllm_checkpoint"], verification={"enabled": False},
                                            quantization={"algorithm": "fp8", "kv_cache": "fp8",
                                                          "calibration": CALIB}))
    out = exporter.export(1).path / "trtllm_checkpoint"
    ours = load_file(str(out / "rank0.safetensors"))
    assert json.loads((out / "config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32).eval()

    def loop(m):
        with torch.no_grad():
            for tokens in batches_for(exporter):
                m(tokens)
    hf = mtq.quantize(hf, modelopt_cfg("fp8", "fp8"), loop)
    for i, block in enumerate(hf.transformer.h):
        expected = torch.maximum(block.attn.k_bmm_quantizer.amax, block.attn.v_bmm_quantizer.amax).float() / 448
        torch.testing.assert_close(ours[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"],
                                   expected.reshape(1), rtol=1e-5, atol=0)


def test_quantized_gpt2_hf_checkpoint_is_refused_at_attach(megatron_world, tmp_path):
    cfg = ExportConfig(output_dir=str(tmp_path), formats=["hf", "trtllm_checkpoint"],
                       quantization={"algorithm": "fp8", "calibration": CALIB})
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel.*write formats: \[trtllm_checkpoint\]"):
        Exporter(gpt_256(), cfg)


# ---------------------------------------------------------------- Hugging Face checkpoints
def modelopt_hf(float_dir: Path, algo: str, kv: str, batches: list, out: Path) -> Path:
    """ModelOpt's unified HF export of the transformers model our float export loads as."""
    from modelopt.torch.export import export_hf_checkpoint

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()

    def loop(m):
        with torch.no_grad():
            for tokens in batches:
                m(tokens)
    hf = mtq.quantize(hf, modelopt_cfg(algo, kv), loop)
    export_hf_checkpoint(hf, export_dir=str(out))
    return out


HF_CASES = [("fp8_pb_wo", "none"), ("fp8_pc_pt", "fp8"), ("mxfp8", "none"), ("w4a16_nvfp4", "none"),
            ("nvfp4", "nvfp4"), ("nvfp4", "fp8")]


def ours_and_modelopts_hf(model, tmp_path, algo: str, kv: str) -> tuple:
    """(our quantized HF export, ModelOpt's export of the same model, our exporter), float32."""
    common = dict(dtype="float32", mode="sync", formats=["hf"], verification={"enabled": False})
    plain = Exporter(model, ExportConfig(output_dir=str(tmp_path / "plain"), **common)).export(1).path / "hf"
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path / "ours"), **common, quantization={
        "algorithm": algo, "kv_cache": kv, "calibration": CALIB}))
    ours = exporter.export(1).path / "hf"
    return ours, modelopt_hf(plain, algo, kv, batches_for(exporter), tmp_path / "modelopt"), exporter


@pytest.mark.parametrize("algo,kv", HF_CASES)
def test_hf_checkpoint_equals_modelopts_hf_export(megatron_world, tmp_path, algo, kv):
    ours, theirs, _ = ours_and_modelopts_hf(llama_128(), tmp_path, algo, kv)

    assert_same_tensors(load_dir(ours), load_dir(theirs), f"{algo} kv={kv}",
                        close=("input_scale", "k_scale", "v_scale"))
    ours_q = json.loads((ours / "hf_quant_config.json").read_text())
    theirs_q = json.loads((theirs / "hf_quant_config.json").read_text())
    assert ours_q["quantization"] == theirs_q["quantization"]
    assert (json.loads((ours / "config.json").read_text())["quantization_config"]
            == json.loads((theirs / "config.json").read_text())["quantization_config"])


@pytest.mark.parametrize("algo,kv", [("fp8", "fp8"), ("nvfp4", "none")])
def test_nemotron_h_calibrated_export_equals_modelopts_hf_export(megatron_world, tmp_path, algo, kv):
    """Nemotron-H calibrated on this CPU: Megatron's Mamba forward with mamba_ssm's SSD scan replaced
    by transformers' PyTorch reference (test-only, `testing.families.allow_mamba_build`); ModelOpt
    calibrates the transformers Nemotron-H our float export loads as, on the same batches. Weights
    and weight scales equal ModelOpt's; input scales (the mixers' in_proj, whose statistics belong
    to the whole concatenated linear, and out_proj included) and KV scales agree to rounding."""
    pytest.importorskip("megatron.core.models.hybrid.hybrid_model",
                        reason="HybridModel arrived in megatron-core 0.19 (scripts/test-mcore-latest runs this)")
    from tests.support.families import tiny_nemotron_h

    model = tiny_nemotron_h("M*-M")
    randomize(model, seed=31)
    ours, theirs, _ = ours_and_modelopts_hf(model, tmp_path, algo, kv)
    mine, their = load_dir(ours), load_dir(theirs)
    differ = shared_fp8_scales(mine, their)  # q/k/v: one FP8 weight scale (Megatron's fused QKV)
    assert_same_tensors({k: v for k, v in mine.items() if k not in differ},
                        {k: v for k, v in their.items() if k not in differ}, f"nemotron_h {algo} kv={kv}",
                        close=("input_scale", "k_scale", "v_scale"))
    assert "backbone.layers.0.mixer.in_proj.input_scale" in mine and "backbone.layers.3.mixer.out_proj.input_scale" \
        in mine
    if kv != "none":
        assert "backbone.layers.1.mixer.k_proj.k_scale" in mine
    ours_q = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
    theirs_q = json.loads((theirs / "hf_quant_config.json").read_text())["quantization"]
    # ModelOpt 0.47 under transformers 5 appends a name sentinel to each excluded module
    theirs_q["exclude_modules"] = sorted(n.split(".\x00")[0] for n in theirs_q["exclude_modules"])
    assert ours_q == theirs_q


def mcore_at_least_0_19() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        from megatron.core.package_info import __version__ as mcore
    except ImportError:
        try:
            mcore = version("megatron-core")
        except PackageNotFoundError:
            mcore = "0"
    if tuple(int(x) for x in mcore.split(".")[:2]) < (0, 19):
        pytest.skip(f"ModelOpt 0.47's Megatron HF exporter needs megatron-core >= 0.19 (NameError HybridModel on "
                    f"{mcore}); scripts/test-mcore-latest runs this")


@pytest.mark.parametrize("algo", ["fp8", "nvfp4", "w4a16_nvfp4"])
def test_hf_checkpoint_equals_modelopts_megatron_export(megatron_world, tmp_path, algo):
    """The formats ModelOpt's own Megatron HF exporter (export_mcore_gpt_to_hf) writes, from the
    Megatron model ModelOpt calibrated: bit-equal tensors (its per-tensor scalars are shaped [1]
    where its HF exporter and we write []) and the same hf_quant_config.json. The model holds
    bfloat16 weights, as trained models do: this exporter quantizes weights after casting them to
    the export dtype, where we (and ModelOpt's other exporters) quantize the weights as they are."""
    mcore_at_least_0_19()
    from modelopt.torch.export import export_mcore_gpt_to_hf

    model = llama_128().bfloat16()
    common = dict(mode="sync", formats=["hf"], verification={"enabled": False})
    plain = Exporter(model, ExportConfig(output_dir=str(tmp_path / "plain"), dtype="bfloat16", **common)).export(1)
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path / "ours"), dtype="bfloat16", **common,
                                            quantization={"algorithm": algo, "calibration": CALIB}))
    ours = exporter.export(1).path / "hf"
    export_mcore_gpt_to_hf(modelopt_fake_quant(model, exporter), str(plain.path / "hf"),
                           export_dir=str(tmp_path / "modelopt"), dtype=torch.bfloat16)
    theirs = load_dir(tmp_path / "modelopt")
    mine = load_dir(ours)
    scalars = {n for n, t in theirs.items() if n.endswith("_scale") and tuple(t.shape) == (1,)}
    mine = {n: t.reshape(1) if n in scalars else t for n, t in mine.items()}
    fp8 = {n for n, t in theirs.items() if t.dtype == torch.float8_e4m3fn}
    # FP8 weights: this exporter divides by the (shared, bit-equal) scale in bfloat16, its
    # TensorRT-LLM exporter (bit-equal to ours above) in float32; bfloat16's rounding moves the
    # elements near an E4M3 rounding boundary to the neighbouring code (a few percent of them
    # here), never further
    for name in fp8:
        codes = (mine[name].view(torch.uint8).int() - theirs[name].view(torch.uint8).int()).abs()
        assert int(codes.max()) <= 1, name
    assert_same_tensors({n: t for n, t in mine.items() if n not in fp8},
                        {n: t for n, t in theirs.items() if n not in fp8}, f"{algo} (Megatron)")
    assert (json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
            == json.loads((tmp_path / "modelopt" / "hf_quant_config.json").read_text())["quantization"])


def test_awq_hf_layout_is_modelopts(megatron_world, tmp_path):
    """int4_awq's HF checkpoint (loaded by TensorRT-LLM's PyTorch backend, which reads no pre-quant
    scale on fused q/k/v or gate/up): the scales of the linears after a norm are folded into the
    norm, as ModelOpt's HF export lays them out; o_proj/down_proj keep theirs, in the checkpoint
    dtype. The values follow from our TensorRT-LLM checkpoint, which equals ModelOpt's (above)."""
    model = llama_128()
    common = dict(mode="sync", verification={"enabled": False})
    plain = Exporter(model, ExportConfig(output_dir=str(tmp_path / "plain"), dtype="float32", formats=["hf"],
                                         **common)).export(1).path / "hf"
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path / "ours"), dtype="bfloat16",
                                            formats=["hf", "trtllm_checkpoint"], **common,
                                            quantization={"algorithm": "int4_awq", "calibration": CALIB}))
    path = exporter.export(1).path
    ours, trt = load_dir(path / "hf"), load_file(str(path / "trtllm_checkpoint" / "rank0.safetensors"))
    theirs = load_dir(modelopt_hf(plain, "int4_awq", "none", batches_for(exporter), tmp_path / "modelopt"))
    # ModelOpt's model is float32, ours bfloat16: same tensors and shapes; packed weights and
    # scales in the same dtypes; the remaining pre-quant scales in the checkpoint dtype
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for name, tensor in theirs.items():
        if name.endswith(("proj.weight", "weight_scale")):
            assert ours[name].dtype == tensor.dtype, name
        elif name.endswith("pre_quant_scale"):
            assert ours[name].dtype == torch.bfloat16, name
    assert not any(n.endswith(("q_proj.pre_quant_scale", "gate_proj.pre_quant_scale")) for n in ours)
    floats = load_dir(plain)
    for layer in range(2):
        p = f"model.layers.{layer}."
        for norm, linear in (("input_layernorm", "attention.qkv"), ("post_attention_layernorm", "mlp.fc")):
            folded = floats[p + norm + ".weight"] * trt[f"transformer.layers.{layer}.{linear}.prequant_scaling_factor"]
            torch.testing.assert_close(ours[p + norm + ".weight"].float(), folded.float(), rtol=2 ** -7, atol=0)
        for module, linear in (("self_attn.o_proj", "attention.dense"), ("mlp.down_proj", "mlp.proj")):
            assert torch.equal(ours[p + module + ".pre_quant_scale"],
                               trt[f"transformer.layers.{layer}.{linear}.prequant_scaling_factor"])


def test_mixed_precision_equals_modelopts_hf_export(megatron_world, tmp_path):
    """fp8 attention, nvfp4 MLP, layer 0 unquantized, FP8 KV cache, against ModelOpt's HF export with
    the same choices per module: MIXED_PRECISION with the same quantized_layers."""
    model = llama_128()
    common = dict(dtype="float32", mode="sync", formats=["hf"], verification={"enabled": False})
    plain = Exporter(model, ExportConfig(output_dir=str(tmp_path / "plain"), **common)).export(1).path / "hf"
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path / "ours"), **common, quantization={
        "algorithm": "fp8", "kv_cache": "fp8", "calibration": CALIB,
        "overrides": [{"layers": [0], "algorithm": "none"}, {"modules": "*.mlp.*", "algorithm": "nvfp4"}]}))
    ours_dir = exporter.export(1).path / "hf"

    from modelopt.torch.export import export_hf_checkpoint

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32).eval()
    nvfp4 = [e for e in mtq.NVFP4_DEFAULT_CFG["quant_cfg"] if e.get("quantizer_name") in
             ("*weight_quantizer", "*input_quantizer")]
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(mtq.FP8_KV_CFG["quant_cfg"]) + [
        {**copy.deepcopy(e), "quantizer_name": "*mlp*" + e["quantizer_name"][1:]} for e in nvfp4] + [
        {"quantizer_name": "*layers.0.*_proj*", "enable": False}]

    def loop(m):
        with torch.no_grad():
            for tokens in batches_for(exporter):
                m(tokens)
    export_hf_checkpoint(mtq.quantize(hf, cfg, loop), export_dir=str(tmp_path / "modelopt"))
    theirs_dir = tmp_path / "modelopt"

    ours_q = json.loads((ours_dir / "hf_quant_config.json").read_text())["quantization"]
    theirs_q = json.loads((theirs_dir / "hf_quant_config.json").read_text())["quantization"]
    assert ours_q["quant_algo"] == "MIXED_PRECISION" and ours_q == theirs_q

    def groups_by_targets(path):  # the groups' numbering follows module order; their content is what counts
        qc = json.loads((path / "config.json").read_text())["quantization_config"]
        groups = qc.pop("config_groups")
        return qc, sorted(json.dumps(g, sort_keys=True) for g in groups.values())
    assert groups_by_targets(ours_dir) == groups_by_targets(theirs_dir)
    ours, theirs = load_dir(ours_dir), load_dir(theirs_dir)
    differ = shared_fp8_scales(ours, theirs)
    assert differ, "the fp8 attention of layer 1 shares its scale"
    assert_same_tensors({k: v for k, v in ours.items() if k not in differ},
                        {k: v for k, v in theirs.items() if k not in differ}, "mixed",
                        close=("input_scale", "k_scale", "v_scale"))
    for name in differ:
        assert (ours[name].dtype, ours[name].shape) == (theirs[name].dtype, theirs[name].shape)


# ---------------------------------------------------------------- recipe x format
@pytest.mark.parametrize("quantization,formats,fragment", [
    ({"algorithm": "int8_sq"}, ["hf"], "no engine loads INT8 SmoothQuant from a Hugging Face checkpoint"),
    ({"algorithm": "fp8_pb_wo"}, ["trtllm_checkpoint"], "write formats: \\[hf\\]"),
    ({"algorithm": "mxfp8"}, ["hf", "trtllm_checkpoint"], "no MXFP8"),
    ({"algorithm": "w4a16_nvfp4"}, ["trtllm_checkpoint"], "no W4A16_NVFP4"),
    ({"algorithm": "nvfp4", "kv_cache": "nvfp4"}, ["trtllm_checkpoint"], "NVFP4 KV cache"),
    ({"algorithm": "fp8", "overrides": [{"modules": "*.mlp.*", "algorithm": "nvfp4"}]}, ["trtllm_checkpoint"],
     "MIXED_PRECISION"),
])
def test_recipes_no_engine_loads_are_refused_when_loaded(quantization, formats, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ExportConfig(formats=formats, quantization={**quantization, "calibration": CALIB})


@pytest.mark.parametrize("overrides,fragment", [
    ([{"modules": "*.mlp.*", "algorithm": "int4_awq"}], "cannot be mixed"),
    ([{"modules": "*.mlp.*", "algorithm": "mxfp8"}], "cannot be mixed"),
    ([{"layers": ["0"], "algorithm": "none"}], "decoder layer indices"),
    ([{"module": "*", "algorithm": "none"}], "unknown option"),
])
def test_bad_mixed_precision_rules_are_named(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ExportConfig(quantization={"algorithm": "fp8", "overrides": overrides})


def test_fused_parts_must_agree(megatron_world, tmp_path):
    cfg = ExportConfig(output_dir=str(tmp_path), formats=["hf"], quantization={
        "algorithm": "fp8", "exclude": ["lm_head", "*.k_proj"], "calibration": CALIB})
    with pytest.raises(ConfigError, match="parts of one Megatron linear"):
        Exporter(llama_128(), cfg)


def test_block_sizes_are_checked_per_linear_at_attach(megatron_world, tmp_path):
    model = tiny_llama(hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, num_query_groups=2)
    cfg = ExportConfig(output_dir=str(tmp_path), formats=["hf"], quantization={"algorithm": "fp8_pb_wo"})
    with pytest.raises(ConfigError, match="k_proj has 64 outputs, not a multiple of the block size 128"):
        Exporter(model, cfg)
