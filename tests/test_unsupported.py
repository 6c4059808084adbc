"""Unsupported models and impossible inference layouts fail at Exporter()/attach(), by name."""

import pytest
import torch.nn.functional as F

from megatron_trt_ext import ConfigError, ExportConfig, Exporter, UnsupportedModelError, attach
from tests.support.models import tiny_gpt, tiny_llama




def renamed(model, cls_name):
    model.__class__ = type(cls_name, (type(model),), {})
    return model


def with_config(model, **fields):
    for k, v in fields.items():
        setattr(model.config, k, v)
    return model


CASES = {
    "moe_pre_softmax_routing": (lambda: tiny_llama(moe=True, moe_router_pre_softmax=True),
                                "moe_routing='softmax_topk'"),
    "moe_shared_expert": (lambda: tiny_llama(moe=True, moe_shared_expert_intermediate_size=32),
                          "moe_shared_expert=True"),
    "qk_layernorm_with_biases": (lambda: tiny_llama(qk_layernorm=True, add_bias_linear=True), "add_bias_linear"),
    "relu_activation": (lambda: tiny_llama(gated_linear_unit=False, activation_func=F.relu), "activation='relu'"),
    "layernorm_llama": (lambda: tiny_llama(normalization="LayerNorm"), "normalization='LayerNorm'"),
    "gpt_with_gqa": (lambda: tiny_gpt(num_query_groups=2), "attention_kind='gqa'"),
    "hybrid_without_pattern": (lambda: renamed(tiny_llama(), "MambaModel"), "hybrid_layer_pattern"),
    "heterogeneous_nas": (lambda: with_config(tiny_llama(), heterogeneous_block_specs=True), "DeciLMForCausalLM"),
    "mla": (lambda: with_config(tiny_llama(), multi_latent_attention=True), "multi_latent_attention=True"),
    "rope_percent": (lambda: tiny_llama(rope_kwargs={"rotary_percent": 0.5}), "rotary_percent"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unsupported_feature_is_named_at_construction(megatron_world, tmp_path, case):
    build, fragment = CASES[case]
    model = build()
    for make in (Exporter, attach):
        with pytest.raises(UnsupportedModelError) as err:
            make(model, ExportConfig(output_dir=str(tmp_path)))
        message = str(err.value)
        assert fragment in message and ("supported" in message or "build it with one" in message)


def test_explicit_family_reports_only_that_family(megatron_world, tmp_path):
    with pytest.raises(UnsupportedModelError) as err:
        Exporter(tiny_llama(), ExportConfig(output_dir=str(tmp_path), family="gpt"))
    assert "gpt:" in str(err.value) and "llama:" not in str(err.value)


def test_not_a_gpt_model(tmp_path):
    import torch

    with pytest.raises(UnsupportedModelError, match="not a Megatron-Core GPTModel"):
        Exporter(torch.nn.Linear(2, 2), ExportConfig(output_dir=str(tmp_path)))


@pytest.mark.parametrize("build,kwargs,fragment", [
    (lambda: tiny_llama(), {"inference_tp": 3}, "inference_tp=3: does not divide num_attention_heads=8"),
    (lambda: tiny_llama(), {"inference_tp": 16}, "inference_tp=16"),
    (lambda: tiny_llama(hidden_size=48, num_attention_heads=6, num_query_groups=3, ffn_hidden_size=64),
     {"inference_tp": 2}, "does not divide the 3 KV heads"),
    (lambda: tiny_llama(), {"inference_pp": 3}, "inference_pp=3: does not divide num_layers=2"),
])
def test_impossible_inference_layout(megatron_world, tmp_path, build, kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        Exporter(build(), ExportConfig(output_dir=str(tmp_path), **kwargs))


def test_kv_duplication_allows_tp_above_kv_heads(megatron_world, tmp_path):
    Exporter(tiny_llama(num_query_groups=2), ExportConfig(output_dir=str(tmp_path), inference_tp=8, vocab_size=120))


def test_unwritable_output_dir_fails_at_attach(megatron_world, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="output_dir"):
        attach(tiny_llama(), ExportConfig(output_dir=str(blocker / "exports")))
