"""FP8-trained models (Transformer Engine FP8 parameters): the E4M3 bytes and scales are exported
as trained, without dequantizing and quantizing again. Built on TE's format contract
(`tests.support.fp8` stands in for TE's tensor subclasses, which do not install here):
the oracle is the trained data itself, and the logits of the dequantized export against the
FP8-trained model's."""

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import ConfigError, ExportConfig, Exporter
from megatron_trt_ext.layouts import qkv_interleaved_to_split
from megatron_trt_ext.plan import LocalPiece
from tests.support.fp8 import fp8_model
from tests.support.models import megatron_logits, randomize, tiny_llama

pytest.importorskip("modelopt.torch.quantization", reason="quantized exports need nvidia-modelopt")
transformers = pytest.importorskip("transformers", reason="transformers loads the dequantized export")

CALIB = {"num_samples": 4, "seq_len": 16, "batch_size": 4}
# GQA with 64-wide heads (per-tensor scales); MHA with 128-wide heads, so that each q/k/v row run of
# the fused weight is whole 128-row blocks (block scales)
SHAPES = {False: (4, 2, 64), True: (2, 2, 128)}


def trained(blockwise: bool):
    heads, groups, head_dim = SHAPES[blockwise]
    model = tiny_llama(hidden_size=256, ffn_hidden_size=512, num_attention_heads=heads, num_query_groups=groups,
                       kv_channels=head_dim)
    randomize(model, seed=41)
    return fp8_model(model, blockwise=blockwise)


def raw(weight) -> torch.Tensor:
    return getattr(weight, "_data", None) if hasattr(weight, "_data") else weight._rowwise_data


def hf_parts(layer, blockwise: bool = False) -> dict:
    """HF module -> the trained E4M3 bytes of one layer's linears."""
    qkv = layer.self_attention.linear_qkv.weight
    q, k, v = qkv_interleaved_to_split(raw(qkv), *SHAPES[blockwise])
    gate, up = raw(layer.mlp.linear_fc1.weight).chunk(2)
    return {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v,
            "self_attn.o_proj": raw(layer.self_attention.linear_proj.weight),
            "mlp.gate_proj": gate, "mlp.up_proj": up, "mlp.down_proj": raw(layer.mlp.linear_fc2.weight)}


def export(model, tmp_path, algorithm, formats=("hf",)):
    cfg = ExportConfig(output_dir=str(tmp_path), dtype="float32", mode="sync", formats=list(formats),
                       verification={"enabled": False},
                       quantization={"algorithm": algorithm, "kv_cache": "fp8", "calibration": CALIB})
    return Exporter(model, cfg).export(1).path


def assert_logits_of_the_trained_model(model, path):
    from megatron_trt_ext.quant.dequant import load_dequantized

    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    want = megatron_logits(model, tokens)
    with torch.no_grad():
        got = load_dequantized(path / "hf")(tokens).logits
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 1e-5, rel  # the same FP8 values and scales: float32 rounding only


@pytest.mark.parametrize("algorithm", ["fp8", "fp8_pc_pt", "fp8_pb_wo"])
def test_per_tensor_fp8_weights_keep_their_bytes(megatron_world, tmp_path, algorithm):
    model = trained(blockwise=False)
    formats = ("hf",) if algorithm == "fp8_pb_wo" else ("hf", "trtllm_checkpoint")
    path = export(model, tmp_path, algorithm, formats)
    hf = load_file(str(path / "hf" / "model.safetensors"))
    for index, layer in enumerate(model.decoder.layers):
        for module, data in hf_parts(layer).items():
            name = f"model.layers.{index}.{module}"
            assert torch.equal(hf[name + ".weight"].view(torch.uint8), data), f"{algorithm} {name}: bytes changed"
        trained_scale = layer.self_attention.linear_qkv.weight._scale_inv  # one per fused linear
        for p in "qkv":
            scale = hf[f"model.layers.{index}.self_attn.{p}_proj.weight_scale"]
            assert bool((scale == trained_scale).all()), (algorithm, p, scale.flatten()[:2], trained_scale)
    if "trtllm_checkpoint" in formats:
        trt = load_file(str(path / "trtllm_checkpoint" / "rank0.safetensors"))
        fused = raw(model.decoder.layers[0].self_attention.linear_qkv.weight)
        q, k, v = qkv_interleaved_to_split(fused, *SHAPES[False])
        assert torch.equal(trt["transformer.layers.0.attention.qkv.weight"].view(torch.uint8), torch.cat([q, k, v]))
    assert_logits_of_the_trained_model(model, path)


def test_block_fp8_weights_keep_their_bytes_and_blocks(megatron_world, tmp_path):
    model = trained(blockwise=True)
    path = export(model, tmp_path, "fp8_pb_wo")
    hf = load_file(str(path / "hf" / "model.safetensors"))
    layer = model.decoder.layers[1]
    for module, data in hf_parts(layer, blockwise=True).items():
        assert torch.equal(hf[f"model.layers.1.{module}.weight"].view(torch.uint8), data), module
    blocks = layer.self_attention.linear_proj.weight._rowwise_scale_inv[:, :2]  # GEMM padding trimmed
    assert torch.equal(hf["model.layers.1.self_attn.o_proj.weight_scale"], blocks.reshape(2, 1, 2, 1))
    assert not (hf["model.layers.1.mlp.down_proj.weight_scale"] < 0).any()  # no padding value leaked
    assert_logits_of_the_trained_model(model, path)


def test_other_formats_start_from_the_trained_values(megatron_world, tmp_path):
    """nvfp4 from FP8 weights: quantized from their dequantized values (there are no FP8 bytes to
    keep), the same as from a model holding those values as ordinary weights."""
    model = trained(blockwise=False)
    heads, groups, head_dim = SHAPES[False]
    plain = tiny_llama(hidden_size=256, ffn_hidden_size=512, num_attention_heads=heads, num_query_groups=groups,
                       kv_channels=head_dim)
    plain.load_state_dict(model.state_dict())
    ours = load_file(str(export(model, tmp_path / "fp8", "nvfp4") / "hf" / "model.safetensors"))
    want = load_file(str(export(plain, tmp_path / "plain", "nvfp4") / "hf" / "model.safetensors"))
    assert ours.keys() == want.keys()
    for name in want:
        assert torch.equal(ours[name].view(torch.uint8) if ours[name].dtype == torch.float8_e4m3fn else ours[name],
                           want[name].view(torch.uint8) if want[name].dtype == torch.float8_e4m3fn else want[name]), name


def test_shards_off_the_128_column_grid_are_refused():
    from megatron_trt_ext.quant.fp8_source import native_pieces

    weight = torch.nn.Parameter(torch.zeros(128, 96))
    weight._data, weight._scale_inv = torch.zeros(128, 96, dtype=torch.uint8), torch.ones(1)
    local = {"decoder.layers.0.self_attention.linear_proj.weight": [LocalPiece((0, 96), (128, 192), weight, True)]}
    with pytest.raises(ConfigError, match=r"inputs \[96, 192\) of 192, not on the 128-column grid"):
        native_pieces(local, [], lambda n: True)


def test_shards_with_their_own_scales_share_the_largest(megatron_world):
    """Two tensor-parallel row shards trained with different per-tensor scales, into one
    per-tensor FP8 weight: the larger scale's shard keeps its bytes, the other is requantized
    to it (within half an E4M3 step of its values); per-channel keeps both exactly."""
    from megatron_trt_ext.quant.fp8_source import dequantize
    from megatron_trt_ext.quant.numerics import LinearQuantizer
    from megatron_trt_ext.quant.spec import ALGORITHMS

    gen = torch.Generator().manual_seed(8)
    data = (torch.randn(256, 128, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    scale = torch.cat([torch.full((128, 1), 0.01), torch.full((128, 1), 0.04)])
    q = LinearQuantizer(data, {"input_amax": torch.tensor([1.0])}, native_scale=scale)
    tensor = q.quantize_part(data, ALGORITHMS["fp8"], scale)
    assert float(tensor.scales["weight_scale"][0]) == pytest.approx(0.04)
    assert torch.equal(tensor.weight[128:], data[128:])
    values = tensor.weight.view(torch.float8_e4m3fn).float() * 0.04
    original = dequantize(data, scale)
    step = 2.0 ** (torch.floor(torch.log2(original[:128].abs().clamp_min(2 ** -6) / 0.04)) - 3) * 0.04
    assert bool(((values[:128] - original[:128]).abs() <= step / 2 + 1e-9).all())
    channel = q.quantize_part(data, ALGORITHMS["fp8_pc_pt"], scale)
    assert torch.equal(channel.weight, data) and torch.equal(channel.scales["weight_scale"][0], scale[:, 0])
