"""Every family table both ways, on the live tiny models: Megatron -> HF -> Megatron gives the same
tensors bit for bit, and HF -> Megatron -> HF likewise (float32 and bfloat16), through the
package's own forward conversion (the exporter's `Conversion`) and the tables' inverses
(`arch.inverse.hf_to_megatron`). The vocabulary padding rows are not in an HF checkpoint: they are
compared as zeros, the real rows bit for bit. Then `importer.import_hf`: export(import(x)) == x."""

import dataclasses
import zlib

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import ExportConfig, ExportError, Exporter, layouts
from megatron_trt_ext.arch.convert import canonical_name, find_transform
from megatron_trt_ext.arch.inverse import hf_to_megatron, vocab_rows
from megatron_trt_ext.arch.spec import Context, Drop, Vocab
from megatron_trt_ext.conversion import Conversion
from megatron_trt_ext.plan import local_shards
from tests.support import families as fam
from tests.support.models import randomize, tiny_gpt, tiny_llama
from tests.test_families import hybrid_only, mup_only
from tests.test_moe_families import live_routing, mla_builds_here

VOCAB = 120

VARIANTS = {
    # name: (builder, requirement or None)
    "llama_gqa": (lambda: tiny_llama(), None),
    "llama_tied_mha": (lambda: tiny_llama(tied=True, num_query_groups=8), None),
    "llama_mqa_biases": (lambda: tiny_llama(num_query_groups=1, add_bias_linear=True, add_qkv_bias=True), None),
    "qwen2_qkv_bias": (lambda: tiny_llama(add_qkv_bias=True), None),
    "gpt_tied": (lambda: tiny_gpt(), None),
    "gpt_untied": (lambda: tiny_gpt(tied=False), None),
    "mixtral": (lambda: tiny_llama(moe=True), None),
    "qwen3": (lambda: fam.tiny_qwen3(), None),
    "qwen3_tied_mha": (lambda: fam.tiny_qwen3(tied=True, num_query_groups=8), None),
    "nemotron": (lambda: fam.tiny_nemotron(), None),
    "nemotron_untied_biases": (lambda: fam.tiny_nemotron(tied=False, add_bias_linear=True), None),
    "starcoder2": (lambda: fam.tiny_starcoder2(), None),
    "starcoder2_window_untied": (lambda: fam.tiny_starcoder2(window=5, tied=False), None),
    "gemma": (lambda: fam.tiny_gemma(), mup_only),
    "qwen3_moe_dense_first": (lambda: fam.tiny_qwen3_moe(), None),
    "qwen3_moe_every_layer_tied": (lambda: fam.tiny_qwen3_moe(moe_layer_freq=1, tied=True), None),
    "gpt_oss": (lambda: fam.tiny_gpt_oss(), None),
    "deepseek_v3": (lambda: fam.tiny_deepseek(), mla_builds_here),
    "deepseek_v3_mtp_tied": (lambda: fam.tiny_deepseek(mtp=1, tied=True), mla_builds_here),
    "hybrid_llama": (lambda: fam.tiny_hybrid("*-*-"), hybrid_only),
    "hybrid_qwen3_tied": (lambda: fam.tiny_hybrid("*-*-", qk_layernorm=True, kv_channels=16, tied=True), hybrid_only),
    "hybrid_qwen3_moe": (lambda: fam.tiny_hybrid("*E*E", qk_layernorm=True, kv_channels=16, num_moe_experts=4,
                                                 moe_router_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.0,
                                                 moe_token_dispatcher_type="allgather"), hybrid_only),
    "nemotron_h": (lambda: fam.tiny_nemotron_h("M*-M"), hybrid_only),
    "nemotron_h_tied": (lambda: fam.tiny_nemotron_h("*-M", tied=True), hybrid_only),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(variant):
    maker, requirement = VARIANTS[variant]
    if requirement:
        requirement()
    model = maker()
    seed = zlib.crc32(variant.encode()) % 1000
    randomize(model, seed=seed)
    live_routing(model, seed)
    return model


def exporter_of(model, tmp_path, dtype: str) -> Exporter:
    return Exporter(model, ExportConfig(output_dir=str(tmp_path), formats=["hf"], dtype=dtype, vocab_size=VOCAB,
                                        verification={"enabled": False}))


def megatron_state(exporter) -> dict:
    """The model's full tensors by unit name (one rank holds every slice), copied."""
    out = {}
    for name, pieces in local_shards(exporter.chunks, exporter.rename).items():
        main = [p for p in pieces if p.main]
        full = torch.empty(main[0].global_shape, dtype=main[0].tensor.dtype)
        assert sum(p.tensor.numel() for p in main) == full.numel(), name
        for p in main:
            full[tuple(slice(o, o + s) for o, s in zip(p.offset, p.tensor.shape))] = p.tensor.detach()
        out[name] = full
    return out


def forward(conversion, megatron: dict) -> dict:
    """The package's Megatron -> HF conversion of full tensors (what each export runs per unit)."""
    hf = {}
    for name, tensor in megatron.items():
        for hf_name, out, _ in conversion.unit(name, tensor):
            assert hf_name not in hf, hf_name
            hf[hf_name] = out.clone()
    conversion.finish()
    return hf


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def random_like(hf: dict, spec, info, seed: int) -> dict:
    """Fresh values in every HF tensor (same names, shapes and dtypes); the copies of a vocabulary
    table that MTP layers carry stay copies (Megatron holds one)."""
    gen = torch.Generator().manual_seed(seed)
    out = {name: torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) for name, t in hf.items()}
    for row in spec.mappings:
        if isinstance(row, Vocab) and row.dst in out:
            for template in row.mtp_copies:
                for layer, kind in enumerate(info.layer_symbols):
                    if kind.islower():
                        out[template.replace("{L}", str(layer))] = out[row.dst]
    return out


def check_round_trips(spec, ctx, new_conversion, source: dict, dtype: str, seed: int) -> dict:
    """Megatron -> HF -> Megatron and HF -> Megatron -> HF, bit for bit (vocabulary tables: the
    real rows; the padding rows come back as zeros). ``source``: full Megatron tensors by unit
    name; ``new_conversion``: a fresh forward conversion. Returns the forward's HF tensors."""
    hf = forward(new_conversion(), source)
    source = {canonical_name(spec, n): t for n, t in source.items()}
    back = hf_to_megatron(spec, ctx, hf)
    assert sorted(back) == sorted(n for n in source if not isinstance(find_transform(spec, n)[0], Drop))
    for name, value in back.items():
        want = source[name].to(value.dtype)  # the export's cast (float32 routers stay float32)
        assert value.dtype in (DTYPES[dtype], torch.float32), name
        if vocab_rows(spec, name):
            assert same_bits(value[:VOCAB], want[:VOCAB]), name
            assert value.shape == want.shape and not value[VOCAB:].any(), name
        else:
            assert same_bits(value, want), name
    original = random_like(hf, spec, ctx.info, seed)  # fresh HF values
    again = forward(new_conversion(), hf_to_megatron(spec, ctx, original))
    assert sorted(again) == sorted(original)
    for name, value in original.items():
        assert same_bits(again[name], value), name
    return hf


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_table_round_trips_bit_for_bit(megatron_world, tmp_path, variant, dtype):
    exporter = exporter_of(build(variant), tmp_path, dtype)
    hf = check_round_trips(exporter.spec, exporter.ctx, exporter.job.new_conversion, megatron_state(exporter), dtype,
                           seed=zlib.crc32(variant.encode()))
    # the in-memory forward is the exporter's: the written files hold the same tensors
    written = load_file(str(exporter.export(iteration=1).path / "hf" / "model.safetensors"))
    assert sorted(written) == sorted(hf) and all(same_bits(written[n], hf[n]) for n in hf)
    exporter.close()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_mla_without_q_lora_round_trips(megatron_world, tmp_path, dtype):
    """Megatron-Core's MLA without q LoRA does not build without Transformer Engine: the tiny
    DeepSeek's tensors with its q LoRA pair replaced by one linear_q_proj, described as such."""
    exporter = exporter_of(build("deepseek_v3"), tmp_path, dtype)
    info = exporter.info
    info = dataclasses.replace(info, mla=dataclasses.replace(info.mla, q_lora_rank=None))
    source, gen = {}, torch.Generator().manual_seed(3)
    for name, tensor in megatron_state(exporter).items():
        if name.endswith("linear_q_up_proj.weight"):
            name = name.replace("linear_q_up_proj", "linear_q_proj")
            tensor = torch.randn((tensor.shape[0], info.hidden_size), generator=gen)
        elif "linear_q_down_proj" in name or "self_attention.q_layernorm" in name:
            continue
        source[name] = tensor
    ctx = Context(info=info, vocab_size=VOCAB)
    hf = check_round_trips(exporter.spec, ctx, lambda: Conversion(exporter.spec, ctx, DTYPES[dtype],
                                                                  keep_source=exporter.job.keep_source),
                           source, dtype, seed=5)
    assert "model.layers.0.self_attn.q_proj.weight" in hf and not any("q_a_proj" in n for n in hf)
    exporter.close()


def test_inverse_names_what_is_missing_or_left_over(megatron_world, tmp_path):
    exporter = exporter_of(build("llama_gqa"), tmp_path, "float32")
    hf = forward(exporter.job.new_conversion(), megatron_state(exporter))
    gone = {n: t for n, t in hf.items() if n != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ExportError, match="decoder.layers.1.self_attention.linear_qkv.weight.*"
                                          "no tensor 'model.layers.1.self_attn.k_proj.weight'"):
        hf_to_megatron(exporter.spec, exporter.ctx, gone)
    extra = {**hf, "model.layers.2.mlp.up_proj.weight": hf["model.layers.1.mlp.up_proj.weight"]}
    with pytest.raises(ExportError, match="no Megatron tensor of this model reads.*layers.2.mlp.up_proj"):
        hf_to_megatron(exporter.spec, exporter.ctx, extra)
    assert hf_to_megatron(exporter.spec, exporter.ctx, extra, strict=False).keys() == \
        hf_to_megatron(exporter.spec, exporter.ctx, hf).keys()
    exporter.close()


def test_mtp_copies_of_the_vocabulary_must_be_copies(megatron_world, tmp_path):
    exporter = exporter_of(build("deepseek_v3_mtp_tied"), tmp_path, "float32")
    hf = forward(exporter.job.new_conversion(), megatron_state(exporter))
    copy = f"model.layers.{exporter.info.num_layers}.embed_tokens.weight"
    hf[copy] = hf[copy] + 1
    with pytest.raises(ExportError, match=f"{copy}.*share that one table"):
        hf_to_megatron(exporter.spec, exporter.ctx, hf)
    exporter.close()


def test_layout_inverses_undo_their_forwards():
    gen = torch.Generator().manual_seed(0)
    fc1 = torch.randn(12, 5, generator=gen)
    assert torch.equal(layouts.deinterleave_gate_up(layouts.interleave_gate_up(fc1)), fc1)
    assert torch.equal(layouts.interleave_gate_up(fc1)[1], fc1[6])  # gate0, up0, ...
    qkv = torch.randn((8 + 2 * 2) * 3, 7, generator=gen)
    fused = torch.cat(layouts.qkv_interleaved_to_split(qkv, 8, 2, 3))
    assert torch.equal(layouts.qkv_split_to_interleaved(*layouts.fused_qkv_to_split(fused, 8, 2, 3), 8, 2, 3), qkv)
    table = torch.randn(5, 3, generator=gen)
    padded = layouts.pad_rows_to(table, 8)
    assert torch.equal(layouts.trim_rows(padded, 5), table) and not padded[5:].any()
    with pytest.raises(ValueError, match="has more"):
        layouts.pad_rows_to(table, 4)
