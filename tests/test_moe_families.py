"""Mixture-of-experts families, single rank: Qwen3-MoE, DeepSeek-V3 (multi-latent attention, sigmoid
routing with expert bias, group-limited top-k, scaling, shared experts, dense first layers, MTP) and
GPT-OSS (sinks, alternating sliding window, biases, clamped GLU, YaRN): the HF export gives the
Megatron model's logits under transformers, with every routing option live (randomised expert
biases, sequences longer than the window, activations past the clamp). Multi-rank sources (EP2,
EP2xTP2, PP2): test_distributed.py."""

import json
import zlib

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import ConfigError, ExportConfig, Exporter
from tests.support import families as fam
from tests.support.models import megatron_logits, randomize

transformers = pytest.importorskip("transformers", reason="transformers is the HF oracle (extra 'test')")

VOCAB = 120


def live_routing(model, seed: int) -> None:
    """Distinct expert biases per layer, so a selection that ignored them would pick other experts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.decoder.layers:
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if router is not None and getattr(router, "expert_bias", None) is not None:
                router.expert_bias.copy_(0.5 * torch.randn(router.expert_bias.shape, generator=gen))


VARIANTS = {
    "qwen3_moe": (lambda: fam.tiny_qwen3_moe(), "Qwen3MoeForCausalLM", 0.1),
    "qwen3_moe_pre_softmax": (lambda: fam.tiny_qwen3_moe(moe_router_pre_softmax=True), "Qwen3MoeForCausalLM", 0.1),
    "qwen3_moe_every_layer": (lambda: fam.tiny_qwen3_moe(moe_layer_freq=1), "Qwen3MoeForCausalLM", 0.1),
    "deepseek_v3": (lambda: fam.tiny_deepseek(), "DeepseekV3ForCausalLM", 0.1),
    "deepseek_v3_mscale_all_dim_0": (lambda: fam.tiny_deepseek(mscale=1.0, mscale_all_dim=0.0),
                                     "DeepseekV3ForCausalLM", 0.1),
    "deepseek_v3_mtp": (lambda: fam.tiny_deepseek(mtp=1), "DeepseekV3ForCausalLM", 0.1),
    "gpt_oss": (lambda: fam.tiny_gpt_oss(), "GptOssForCausalLM", 0.3),
}


def export(model, tmp_path, **kw):
    cfg = dict(output_dir=str(tmp_path), formats=["hf"], dtype="float32", vocab_size=VOCAB)
    cfg.update(kw)
    return Exporter(model, ExportConfig(**cfg)).export(iteration=1)


def mla_builds_here() -> None:
    """megatron-core 0.16.1's MLA attention type-checks against Transformer Engine classes even with
    the local spec (it cannot be built without TE); 0.19 resolves its norms without TE."""
    import importlib.util

    if importlib.util.find_spec("megatron.core.transformer.mla_qk_norm_config") is None:
        pytest.skip("multi-latent attention builds without Transformer Engine from megatron-core 0.19 on "
                    "(scripts/test-mcore-latest runs these)")


def build(variant):
    if variant.startswith("deepseek"):
        mla_builds_here()
    maker, architecture, scale = VARIANTS[variant]
    model = maker()
    seed = zlib.crc32(variant.encode()) % 1000
    randomize(model, seed=seed, scale=scale)
    live_routing(model, seed)
    return model, architecture


TOKENS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(9))


def hf_logits(path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(TOKENS).logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_export_matches_megatron_logits(megatron_world, tmp_path, variant):
    model, architecture = build(variant)
    result = export(model, tmp_path)
    config = json.loads((result.path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    want = megatron_logits(model, TOKENS)[..., :VOCAB]
    got = hf_logits(result.path)
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 1e-4, f"{variant}: max |diff| / logit scale = {rel:.2e}"


def test_routing_features_are_live(megatron_world):
    """The tests above would catch a dropped feature: each changes these models' logits."""
    mla_builds_here()
    model, _ = build("deepseek_v3")
    base = megatron_logits(model, TOKENS)
    for layer in model.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            with torch.no_grad():
                router.expert_bias.zero_()
    assert (megatron_logits(model, TOKENS) - base).abs().max() > 1e-3  # the expert bias selects
    oss, _ = build("gpt_oss")
    clamp_free = fam.tiny_gpt_oss(activation_func_clamp_value=None)
    clamp_free.load_state_dict(oss.state_dict())
    assert (megatron_logits(oss, TOKENS) - megatron_logits(clamp_free, TOKENS)).abs().max() > 1e-3
    windowless = fam.tiny_gpt_oss(window_size=None, window_attn_skip_freq=None)
    windowless.load_state_dict(oss.state_dict())
    assert (megatron_logits(oss, TOKENS) - megatron_logits(windowless, TOKENS)).abs().max() > 1e-3


def test_qwen3_moe_dense_layers_and_routing_in_the_config(megatron_world, tmp_path):
    model, _ = build("qwen3_moe")
    config = json.loads((export(model, tmp_path).path / "hf" / "config.json").read_text())
    assert (config["mlp_only_layers"], config["decoder_sparse_step"], config["norm_topk_prob"]) == ([0], 1, True)
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (4, 2, 32)


def test_deepseek_mtp_layers_are_deepseeks_extra_layers_or_dropped(megatron_world, tmp_path):
    model, _ = build("deepseek_v3_mtp")
    tensors = load_file(str(export(model, tmp_path / "mtp").path / "hf" / "model.safetensors"))
    mtp = model.mtp.layers[0]
    assert torch.equal(tensors["model.layers.2.eh_proj.weight"], mtp.eh_proj.weight.detach())
    assert torch.equal(tensors["model.layers.2.enorm.weight"], mtp.enorm.weight.detach())
    assert torch.equal(tensors["model.layers.2.shared_head.norm.weight"], mtp.final_layernorm.weight.detach())
    assert torch.equal(tensors["model.layers.2.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(tensors["model.layers.2.shared_head.head.weight"], tensors["lm_head.weight"])
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in tensors
    dropped = export(model, tmp_path / "dropped", drop_mtp=True)
    config = json.loads((dropped.path / "hf" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    assert not any(n.startswith("model.layers.2.") for n in load_file(str(dropped.path / "hf" / "model.safetensors")))


def test_every_expert_of_every_layer_exactly_once(megatron_world, tmp_path):
    """Users lose experts elsewhere (7 of 8 at EP=8): count them in the export."""
    mla_builds_here()
    for variant, pattern in (("qwen3_moe", "model.layers.{}.mlp.experts.{}.down_proj.weight"),
                             ("deepseek_v3", "model.layers.{}.mlp.experts.{}.down_proj.weight")):
        model, _ = build(variant)
        tensors = load_file(str(export(model, tmp_path / variant).path / "hf" / "model.safetensors"))
        info = Exporter(model, ExportConfig(output_dir=str(tmp_path / "x"), vocab_size=VOCAB, formats=["hf"])).info
        moe_layers = [i for i, k in enumerate(info.decoder_kinds) if k == "E"]
        found = sorted(n for n in tensors if ".experts." in n and n.endswith("down_proj.weight"))
        assert found == sorted(pattern.format(layer, e) for layer in moe_layers for e in range(info.num_experts))


def test_tensorrt_llm_formats_follow_what_tensorrt_llm_has(megatron_world, tmp_path):
    mla_builds_here()
    for maker in (fam.tiny_deepseek, fam.tiny_gpt_oss, fam.tiny_qwen3_moe):  # the last has a dense layer
        with pytest.raises(ConfigError, match="formats \\['trtllm_checkpoint'\\]"):
            Exporter(maker(), ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB))
    model, _ = build("qwen3_moe_every_layer")
    result = export(model, tmp_path / "trt", formats=["hf", "trtllm_checkpoint"], inference_tp=2, inference_moe_ep=2)
    config = json.loads((result.path / "trtllm_checkpoint" / "config.json").read_text())
    assert (config["architecture"], config["qwen_type"]) == ("Qwen3MoeForCausalLM", "qwen3_moe")
    assert config["moe"]["normalization_mode"] == 1 and config["mapping"]["moe_ep_size"] == 2
    hf = load_file(str(result.path / "hf" / "model.safetensors"))
    for rank in range(2):
        t = load_file(str(result.path / "trtllm_checkpoint" / f"rank{rank}.safetensors"))
        experts = range(2 * rank, 2 * rank + 2)  # expert parallel: this rank's half of the experts, whole
        want = torch.stack([torch.cat([hf[f"model.layers.0.mlp.experts.{e}.up_proj.weight"],
                                       hf[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"]]) for e in experts])
        assert torch.equal(t["transformer.layers.0.mlp.fc.weight"], want.to(t["transformer.layers.0.mlp.fc.weight"].dtype))
        assert t["transformer.layers.0.mlp.router.weight"].dtype == torch.float32
        assert "transformer.layers.0.attention.q_layernorm.weight" in t
