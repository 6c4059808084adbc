"""`verify`'s "trtllm weights" check (issue 20, item 2): trtllm_checkpoint/ read back through the
inverse TensorRT-LLM layouts and the family's inverse table, compared with the fingerprints
recorded at export. A correct export passes for every family that writes TensorRT-LLM, at the
TP/PP/EP layouts tests/test_trtllm_checkpoint.py writes; wrong rank files (rows swapped in one
rank's qkv, a wrong split between ranks, a replicated copy that differs, a scale on the wrong
linear), with the manifest's checksums rewritten, fail naming the tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_trt_ext import checksum
from megatron_trt_ext import manifest as mf
from megatron_trt_ext.formats.safetensors_stream import tensor_bytes
from megatron_trt_ext.verification.check import verify
from tests.support import corrupt
from tests.support.models import randomize, tiny_gpt, tiny_llama
from tests.test_verify import export

CHECK = "trtllm weights"
BOTH = ["hf", "trtllm_checkpoint"]


def check(report, name=CHECK):
    return next(c for c in report.data["checks"] if c["name"] == name)


def _mcore_019():
    from megatron.core.transformer import TransformerConfig

    return hasattr(TransformerConfig, "use_mup")


def _cases():
    from tests.support import families as fam

    return {
        # name: (model builder, export keywords)
        "llama_gqa_tp2": (lambda: tiny_llama(num_query_groups=2), dict(inference_tp=2)),
        "llama_mqa_kv_dup_tp2": (lambda: tiny_llama(num_query_groups=1), dict(inference_tp=2)),
        "llama_gqa_kv_dup_tp4": (lambda: tiny_llama(num_query_groups=2), dict(inference_tp=4)),
        "llama_tied_tp2_pp2": (lambda: tiny_llama(tied=True), dict(inference_tp=2, inference_pp=2)),
        "gpt_tp2_pp2": (lambda: tiny_gpt(), dict(inference_tp=2, inference_pp=2)),
        "gpt_untied_fp32_tp2": (lambda: tiny_gpt(tied=False), dict(inference_tp=2, dtype="float32")),
        "mixtral_moe_tp2": (lambda: tiny_llama(moe=True), dict(inference_tp=2)),
        "mixtral_moe_ep2": (lambda: tiny_llama(moe=True), dict(inference_tp=2, inference_moe_ep=2)),
        "mixtral_ep2_tp2_pp2": (lambda: tiny_llama(moe=True), dict(inference_tp=4, inference_pp=2, inference_moe_ep=2)),
        "qwen3_tp2": (fam.tiny_qwen3, dict(inference_tp=2)),
        "qwen3_moe_ep2": (lambda: fam.tiny_qwen3_moe(num_layers=2, moe_layer_freq=1),
                          dict(inference_tp=2, inference_moe_ep=2)),
        "nemotron_tp2": (fam.tiny_nemotron, dict(inference_tp=2)),
        "starcoder2_tp2": (fam.tiny_starcoder2, dict(inference_tp=2)),
        "gemma_tp2": (fam.tiny_gemma, dict(inference_tp=2)),
    }


def good_export(case, tmp_path, seed=23, **extra):
    make, kw = _cases()[case]
    if case.startswith("gemma") and not _mcore_019():
        pytest.skip("Gemma's embedding scale is MuP's multiplier (megatron-core >= 0.19; scripts/test-mcore-latest)")
    model = make()
    randomize(model, seed=seed)
    result = export(model, tmp_path, formats=BOTH, verification={"enabled": False}, **{**kw, **extra})
    report = verify(result.path, record=False)
    assert report.passed, report.lines()
    return result.path, report


def rewrite_rank(path, rank, edit) -> None:
    """Apply ``edit`` to one rank file's tensors, then rewrite its checksums in the manifest (with
    the algorithm the manifest names), as a converter bug would leave them."""
    key = f"trtllm_checkpoint/rank{rank}.safetensors"
    tensors = load_file(str(path / key))
    edit(tensors)
    save_file(tensors, str(path / key))
    manifest = mf.read_manifest(path)
    algorithm, _ = checksum.read_entry(manifest["files"][key])
    manifest["files"][key] = checksum.entry(
        {name: checksum.hexdigest([tensor_bytes(t)], algorithm) for name, t in tensors.items()}, algorithm)
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert not mf.verify_export(path)  # only what the tensors mean is wrong


def fails_naming(path, *needles):
    report = verify(path, record=False)
    detail = check(report)
    assert detail["ok"] is False and not report.passed, report.lines()
    assert check(report, "weights")["ok"] is True  # hf/ is untouched
    for needle in needles:
        assert needle in detail["detail"], (needle, detail["detail"])
    return detail["detail"]


def swap_rows(tensors, name, i, j):
    t = tensors[name].clone()
    t[[i, j]] = t[[j, i]]
    tensors[name] = t


# ---------------------------------------------------------------------- correct exports
@pytest.mark.parametrize("case", sorted(_cases()))
def test_a_correct_trtllm_export_passes_exactly(megatron_world, tmp_path, case):
    path, report = good_export(case, tmp_path)
    detail = check(report)
    assert detail["ok"] is True, report.lines()
    weights = mf.read_manifest(path)["fingerprints"]["tensors"]
    assert detail["detail"].startswith(f"{weights} Megatron tensors rebuilt from trtllm_checkpoint/")
    assert "exactly" in detail["detail"]
    # zero-centred norms (TensorRT-LLM stores w + 1): the only values compared within a rounding
    assert ("stored as w + 1" in detail["detail"]) == case.startswith(("nemotron", "gemma"))


def test_old_exports_without_fingerprints_verify_as_before(megatron_world, tmp_path):
    path, _ = good_export("llama_gqa_tp2", tmp_path)
    corrupt.drop_fingerprints(path)
    report = verify(path, record=False)
    assert report.passed, report.lines()
    assert check(report)["ok"] is None and "no fingerprints recorded" in check(report)["detail"]


# ---------------------------------------------------------------------- wrong rank files
def test_a_missing_rank_file_fails_naming_it(megatron_world, tmp_path):
    path, _ = good_export("llama_gqa_tp2", tmp_path)
    (path / "trtllm_checkpoint/rank1.safetensors").unlink()
    manifest = mf.read_manifest(path)
    manifest["files"].pop("trtllm_checkpoint/rank1.safetensors")  # as a writer that never wrote it would leave it
    (path / "manifest.json").write_text(json.dumps(manifest))
    fails_naming(path, "cannot be read back", "rank1.safetensors")


@pytest.mark.parametrize("case,rank", [("llama_gqa_tp2", 1), ("gpt_tp2_pp2", 2), ("qwen3_tp2", 0)])
def test_swapped_rows_in_one_ranks_qkv_fail_naming_it(megatron_world, tmp_path, case, rank):
    path, _ = good_export(case, tmp_path)
    rewrite_rank(path, rank, lambda t: swap_rows(t, "transformer.layers.0.attention.qkv.weight", 1, 2))
    layer = 0 if rank < 2 else 1  # the second stage's local layer 0
    fails_naming(path, f"decoder.layers.{layer}.self_attention.linear_qkv.weight", "row",
                 "transformer.layers.0.attention.qkv.weight")


def test_ranks_with_their_columns_swapped_fail(megatron_world, tmp_path):
    """A wrong split between ranks: rank 0 holds rank 1's slice of mlp.fc and the reverse."""
    path, _ = good_export("llama_gqa_tp2", tmp_path)
    name = "transformer.layers.1.mlp.fc.weight"
    slices = [load_file(str(path / f"trtllm_checkpoint/rank{r}.safetensors"))[name] for r in (0, 1)]
    for rank in (0, 1):
        rewrite_rank(path, rank, lambda t, rank=rank: t.update({name: slices[1 - rank]}))
    fails_naming(path, "decoder.layers.1.mlp.linear_fc1.weight", name)


def test_a_replicated_copy_that_differs_on_one_rank_fails(megatron_world, tmp_path):
    path, _ = good_export("llama_gqa_tp2", tmp_path)
    name = "transformer.layers.0.post_layernorm.weight"
    rewrite_rank(path, 1, lambda t: swap_rows(t, name, 0, 5))
    fails_naming(path, "decoder.layers.0.mlp.linear_fc1.layer_norm_weight", name, "TP rank 1's copy differs")


def test_a_repeated_kv_head_that_differs_fails(megatron_world, tmp_path):
    """MQA at TP 2: each rank holds the one KV head; rank 1's k rows swapped."""
    path, _ = good_export("llama_mqa_kv_dup_tp2", tmp_path)
    q_rows = 8 * 8 // 2  # tiny_llama: 8 heads of 8 (hidden 64), half per rank
    rewrite_rank(path, 1, lambda t: swap_rows(t, "transformer.layers.1.attention.qkv.weight", q_rows, q_rows + 1))
    fails_naming(path, "decoder.layers.1.self_attention.linear_qkv.weight", "k head 0", "TP rank 1's copy differs")


@pytest.mark.parametrize("case", ["mixtral_moe_ep2", "qwen3_moe_ep2"])
def test_experts_on_the_wrong_ep_rank_fail(megatron_world, tmp_path, case):
    path, _ = good_export(case, tmp_path)
    name = "transformer.layers.1.mlp.proj.weight"
    stacks = [load_file(str(path / f"trtllm_checkpoint/rank{r}.safetensors"))[name] for r in (0, 1)]
    for rank in (0, 1):
        rewrite_rank(path, rank, lambda t, rank=rank: t.update({name: stacks[1 - rank]}))
    detail = fails_naming(path, "decoder.layers.1.mlp.experts", "linear_fc2", name)
    assert detail.count("linear_fc2") >= 2  # every expert of both ranks


def test_up_and_gate_halves_swapped_in_one_expert_fail(megatron_world, tmp_path):
    path, _ = good_export("mixtral_moe_tp2", tmp_path)
    name = "transformer.layers.0.mlp.fc.weight"

    def swap_halves(tensors):
        t = tensors[name].clone()
        up, gate = t[1].chunk(2, dim=0)
        t[1] = torch.cat([gate, up])
        tensors[name] = t

    rewrite_rank(path, 0, swap_halves)
    fails_naming(path, "decoder.layers.0.mlp.experts.experts.1.linear_fc1.weight", name)


def test_a_wrong_lm_head_split_and_its_tied_copy_fail(megatron_world, tmp_path):
    path, _ = good_export("llama_tied_tp2_pp2", tmp_path)
    rewrite_rank(path, 3, lambda t: swap_rows(t, "lm_head.weight", 0, 7))  # the last stage's rank 1
    fails_naming(path, "embedding.word_embeddings.weight (from the tied lm_head copy)", "lm_head.weight")


def test_a_zero_centred_norm_off_by_more_than_its_rounding_fails(megatron_world, tmp_path):
    path, _ = good_export("nemotron_tp2", tmp_path)
    name = "transformer.layers.0.input_layernorm.weight"
    for rank in (0, 1):
        rewrite_rank(path, rank, lambda t: swap_rows(t, name, 2, 9))
    fails_naming(path, "decoder.layers.0.", "layer_norm_weight", "beyond the torch.bfloat16 rounding of w + 1", name)


# ---------------------------------------------------------------------- quantized
def quantized_export(tmp_path, algorithm, tp=2, formats=BOTH, build=None, extra=None):
    pytest.importorskip("modelopt.torch.quantization", reason="quantized exports need nvidia-modelopt")
    model = (build or (lambda: tiny_llama(hidden_size=256, ffn_hidden_size=512)))()
    randomize(model, seed=64)
    result = export(model, tmp_path, dtype="bfloat16", formats=formats, verification={"enabled": False},
                    inference_tp=tp, quantization={"algorithm": algorithm,
                                                   "calibration": {"num_samples": 8, "seq_len": 32, "batch_size": 4}},
                    **(extra or {}))
    report = verify(result.path, record=False)
    assert report.passed, report.lines()
    assert check(report)["ok"] is True, report.lines()
    assert "within the quantization rounding" in check(report)["detail"], report.lines()
    return result.path


@pytest.mark.parametrize("algorithm,build", [
    ("int8_sq", tiny_llama),  # INT8 SmoothQuant is written for TensorRT-LLM only (no HF engine loads it)
    ("fp8", lambda: tiny_gpt(tied=False))])  # quantized GPT-2 likewise: Conv1D transposes, fused c_attn
def test_trtllm_only_quantized_exports_are_checked(megatron_world, tmp_path, algorithm, build):
    path = quantized_export(tmp_path, algorithm, formats=["trtllm_checkpoint"], build=build)
    name = "transformer.layers.1.attention.qkv.weight"

    def swap(tensors):  # rows 1 and 2 of rank 0's q rows, with their per-row scales where they have them
        for key in [k for k in tensors if k.startswith(name[:-len("weight")])]:
            if tensors[key].dim() >= 1 and tensors[key].shape[0] == tensors[name].shape[0]:
                swap_rows(tensors, key, 1, 2)

    rewrite_rank(path, 0, swap)
    report = verify(path, record=False)
    assert check(report)["ok"] is False and "no hf/" in check(report, "weights")["detail"], report.lines()
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in check(report)["detail"]


# 4-bit packing and block scales split over ranks; int4 is stored int8 for TensorRT-LLM (AWQ's
# calibration makes that case ~10 s: the only one reading int4 back from a rank file)
@pytest.mark.parametrize("algorithm", ["nvfp4", "int4_awq"])
def test_quantized_rows_swapped_in_one_rank_fail(megatron_world, tmp_path, algorithm):
    path = quantized_export(tmp_path, algorithm)
    name = "transformer.layers.0.mlp.proj.weight"  # row-parallel: each rank holds half the inputs

    def swap(tensors):
        swap_rows(tensors, name, 3, 100)  # packed 4-bit rows hold pairs of weight rows: still a swap
        for key in [k for k in tensors if k.startswith(name[:-len("weight")]) and k != name]:
            if tensors[key].dim() >= 1 and tensors[key].shape[0] == tensors[name].shape[0]:
                swap_rows(tensors, key, 3, 100)  # per-row scales move with their rows

    rewrite_rank(path, 1, swap)
    fails_naming(path, "decoder.layers.0.mlp.linear_fc2.weight", "row", name)


def test_fp8_a_scale_on_the_wrong_linear_fails(megatron_world, tmp_path):
    path = quantized_export(tmp_path, "fp8")
    rank0 = load_file(str(path / "trtllm_checkpoint/rank0.safetensors"))
    scales = {n: float(t) for n, t in rank0.items() if n.endswith(".weights_scaling_factor")}
    src, dst = max(((a, b) for a in sorted(scales) for b in sorted(scales) if ".layers.0." in b),
                   key=lambda p: abs(scales[p[0]] / scales[p[1]] - 1))
    assert abs(scales[src] / scales[dst] - 1) > 0.05
    for rank in (0, 1):  # on both ranks, as a converter would misplace it
        rewrite_rank(path, rank, lambda t: t.update({dst: t[src].clone()}))
    megatron = {"attention.qkv": "linear_qkv", "attention.dense": "linear_proj", "mlp.fc": "linear_fc1",
                "mlp.gate": "linear_fc1", "mlp.proj": "linear_fc2"}[dst.split(".", 3)[3].rsplit(".", 1)[0]]
    fails_naming(path, f"decoder.layers.0.self_attention.{megatron}" if "attention" in dst else
                 f"decoder.layers.0.mlp.{megatron}", dst.rsplit(".", 1)[0])


def test_fp8_per_channel_scales_in_the_wrong_rows_fail(megatron_world, tmp_path):
    path = quantized_export(tmp_path, "fp8_pc_pt")
    name = "transformer.layers.1.attention.qkv.per_channel_scale"
    rewrite_rank(path, 0, lambda t: t.update({name: t[name].roll(1, 0)}))  # the weights stay where they are
    fails_naming(path, "decoder.layers.1.self_attention.linear_qkv.weight", "row")


def test_fp8_expert_scales_swapped_fail(megatron_world, tmp_path):
    """Stacked experts: rank 0 (EP rank 0) holds experts 0 and 1 with a per-tensor scale each ([E, 1])."""
    path = quantized_export(tmp_path, "fp8", build=lambda: tiny_llama(moe=True),
                            extra=dict(inference_moe_ep=2))
    name = "transformer.layers.0.mlp.fc.weights_scaling_factor"
    scales = load_file(str(path / "trtllm_checkpoint/rank0.safetensors"))[name]
    assert scales.shape == (2, 1) and abs(float(scales[0] / scales[1]) - 1) > 0.02
    rewrite_rank(path, 0, lambda t: swap_rows(t, name, 0, 1))
    detail = fails_naming(path, "decoder.layers.0.mlp.experts.experts.0.linear_fc1.weight",
                          "decoder.layers.0.mlp.experts.experts.1.linear_fc1.weight", "transformer.layers.0.mlp.fc.weight")
    assert "experts.2." not in detail  # EP rank 1's experts are untouched


# ---------------------------------------------------------------------- the inverse layouts alone
def _hf_shape(name: str, info, vocab: int, inter: int) -> tuple:
    """The HF shape of one tensor of a tiny model (LLaMA/Mixtral [out, in], GPT-2 Conv1D [in, out])."""
    h, q, kv = info.hidden_size, info.num_attention_heads * info.head_dim, info.num_query_groups * info.head_dim
    bias = name.endswith(".bias")
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (inter, h),
              "up_proj": (inter, h), "down_proj": (h, inter), "w1": (inter, h), "w3": (inter, h), "w2": (h, inter),
              "c_attn": (h, 3 * h), "attn.c_proj": (h, h), "c_fc": (h, inter), "mlp.c_proj": (inter, h),
              "embed_tokens": (vocab, h), "wte": (vocab, h), "lm_head": (vocab, h), "wpe": (16, h),
              "block_sparse_moe.gate": (info.num_experts, h)}
    key = next((k for k in shapes if f"{k}." in name or name.startswith(k)), None)
    if key is None:  # norms
        return (h,)
    out, inp = shapes[key]
    if bias:  # [out]: Conv1D stores [in, out]
        return (inp,) if key in ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj") else (out,)
    return out, inp


@pytest.mark.parametrize("layout,tp,pp,kv_heads,moe_ep,tied", [
    ("llama", 4, 2, 2, 1, False), ("llama", 2, 2, 1, 1, True), ("gpt", 2, 2, 4, 1, False),
    ("mixtral", 4, 1, 2, 2, False), ("mixtral", 2, 1, 2, 1, False), ("gemma", 2, 1, 2, 1, True)])
def test_every_trtllm_layout_reads_back_into_the_hf_tensors_it_was_made_from(tmp_path, layout, tp, pp, kv_heads,
                                                                            moe_ep, tied):
    """HF -> TensorRT-LLM rank files (`TrtllmConverter`) -> HF (`TrtllmAsHF`): bit for bit, but
    the ``+1`` norms (within the bf16 rounding of w + 1); no Megatron model involved."""
    from types import SimpleNamespace

    from megatron_trt_ext.formats.trtllm import TrtllmConverter
    from megatron_trt_ext.formats.trtllm_layouts import LAYOUTS
    from megatron_trt_ext.verification.trtllm_read import TrtllmAsHF

    info = SimpleNamespace(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=kv_heads, head_dim=8,
                           num_experts=4, tied_embeddings=tied)
    table, vocab, inter = LAYOUTS[layout], 61, 48
    names = [n for n in table["global"] if not (tied and n == "lm_head.weight")]
    for layer in range(info.num_layers):
        suffixes = list(table["layer"])
        if "experts" in table:
            suffixes += [f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(4) for w in ("w1", "w2", "w3")]
        names += [f"{table['layer_prefix']}{layer}.{s}" for s in suffixes]
    gen = torch.Generator().manual_seed(5)
    hf = {n: torch.randn(_hf_shape(n, info, vocab, inter), generator=gen).to(torch.bfloat16) for n in names}
    converter = TrtllmConverter({"layout": layout}, info, tp, pp, torch.bfloat16, moe_ep=moe_ep)
    ranks = {r: {} for r in range(tp * pp)}
    for name, tensor in hf.items():
        for rank, trt_name, t in converter.feed(name, tensor):
            ranks[rank][trt_name] = (t.materialize() if hasattr(t, "materialize") else t).contiguous().clone()
    converter.finish()
    for rank, tensors in ranks.items():
        save_file(tensors, str(tmp_path / f"rank{rank}.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16", "quantization": {"quant_algo": None},
                                                      "mapping": {"tp_size": tp, "pp_size": pp, "moe_ep_size": moe_ep,
                                                                  "moe_tp_size": tp // moe_ep}}))
    readers = [TrtllmAsHF(tmp_path, {"layout": layout}, info, vocab, torch.bfloat16)]
    if tied:  # the embedding once more, from the lm_head copy of the last stage
        readers.append(TrtllmAsHF(tmp_path, {"layout": layout}, info, vocab, torch.bfloat16, tied_head=True))
    for name, want in hf.items():
        for reader in readers if "embed" in name or "wte" in name else readers[:1]:
            reader.reset()
            got = reader[name]
            if reader.rounded:  # zero-centred norms: w + 1 was rounded to bfloat16
                assert layout == "gemma" and "norm" in name
                assert ((got - want.float()).abs() <= 2 ** -8 * (want.float().abs() + 1)).all(), name
            else:
                assert got.dtype == want.dtype and torch.equal(got, want), name
