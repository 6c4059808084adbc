"""Every supported variant: the HF export gives the Megatron model's logits under transformers."""

import json
import zlib

import pytest
import torch

from megatron_trt_ext import ExportConfig, Exporter
from tests.support.models import megatron_logits, randomize, tiny_gpt, tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers is the HF oracle (extra 'test')")

VOCAB = 120  # the model's table is padded to 128

VARIANTS = {
    "llama_gqa": (lambda: tiny_llama(), "LlamaForCausalLM"),
    "llama_mha": (lambda: tiny_llama(num_query_groups=8), "LlamaForCausalLM"),
    "llama_mqa": (lambda: tiny_llama(num_query_groups=1), "LlamaForCausalLM"),
    "llama_tied": (lambda: tiny_llama(tied=True), "LlamaForCausalLM"),
    "llama_head_dim_16": (lambda: tiny_llama(kv_channels=16), "LlamaForCausalLM"),
    "llama_all_biases": (lambda: tiny_llama(add_bias_linear=True), "LlamaForCausalLM"),
    "qwen2_qkv_bias": (lambda: tiny_llama(add_qkv_bias=True), "Qwen2ForCausalLM"),
    "llama_rope_theta": (lambda: tiny_llama(rope_kwargs={"rotary_base": 500000}), "LlamaForCausalLM"),
    "llama_rope_linear": (lambda: tiny_llama(rope_kwargs={"seq_len_interpolation_factor": 4.0}),
                          "LlamaForCausalLM"),
    "llama3_rope_scaling": (lambda: tiny_llama(max_seq=16384, rope_kwargs={
        "rope_scaling": True, "rope_scaling_factor": 8.0, "rotary_base": 500000}), "LlamaForCausalLM"),
    "gpt_tied": (lambda: tiny_gpt(), "GPT2LMHeadModel"),
    "gpt_untied": (lambda: tiny_gpt(tied=False), "GPT2LMHeadModel"),
}


def export_hf(model, tmp_path, **kw):
    cfg = ExportConfig(output_dir=str(tmp_path), formats=["hf"], dtype="float32", vocab_size=VOCAB, **kw)
    return Exporter(model, cfg).export(iteration=1)


def assert_same_logits(model, hf_dir, tokens):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    hf.eval()
    want = megatron_logits(model, tokens)[..., :VOCAB]
    with torch.no_grad():
        got = hf(tokens).logits
    assert got.shape == want.shape
    scale = want.abs().max()
    rel = ((got - want).abs().max() / scale).item()
    assert rel < 1e-4, f"max |diff| / logit scale = {rel:.2e}"
    return hf


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_export_matches_megatron_logits(megatron_world, tmp_path, tokens, variant):
    build, architecture = VARIANTS[variant]
    model = build()
    randomize(model, seed=zlib.crc32(variant.encode()) % 1000)
    result = export_hf(model, tmp_path)
    config = json.loads((result.path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert config["vocab_size"] == VOCAB
    assert_same_logits(model, result.path / "hf", tokens)


def test_llama3_rope_scaling_is_read_from_the_model(megatron_world, tmp_path):
    model = tiny_llama(max_seq=16384, rope_kwargs={"rope_scaling": True, "rope_scaling_factor": 8.0,
                                                    "rotary_base": 500000})
    result = export_hf(model, tmp_path)
    config = json.loads((result.path / "hf" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_scaling"]["factor"] == pytest.approx(8.0)
    assert config["rope_theta"] == 500000


def test_sharded_hf_export_loads_and_matches(megatron_world, tmp_path, tokens):
    model = tiny_llama()
    randomize(model, seed=3)
    result = export_hf(model, tmp_path, max_shard_size="40KB")
    hf_dir = result.path / "hf"
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    hf = assert_same_logits(model, hf_dir, tokens)
    assert set(index["weight_map"]) == set(hf.state_dict())
    total = sum(t.numel() * t.element_size() for t in hf.state_dict().values())
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("tied", [False, True])
def test_mixtral_export_matches_megatron_logits(megatron_world, tmp_path, tokens, tied):
    model = tiny_llama(moe=True, tied=tied)
    randomize(model, seed=21)
    result = export_hf(model, tmp_path)
    config = json.loads((result.path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert_same_logits(model, result.path / "hf", tokens)
