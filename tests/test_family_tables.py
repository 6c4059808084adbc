"""The family tables' typed words and `ModelInfo`'s typed facts, on hand-made model descriptions
(no model is built): which source tensors a model must have follows from its facts, and the facts
a rank reads from its own modules pool over pipeline ranks."""

import dataclasses

import pytest

from megatron_trt_ext.arch import FAMILIES, family_features
from megatron_trt_ext.arch.conditions import TIED_EMBEDDINGS, Condition, Layers, Not
from megatron_trt_ext.arch.convert import expected_sources
from megatron_trt_ext.facts import MambaFacts, MLAFacts, MoEFacts
from megatron_trt_ext.model_info import ModelInfo, drop_mtp_layers, merge_module_facts, module_facts


def info(**fields) -> ModelInfo:
    base = dict(model_class="GPTModel", num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=8,
                head_dim=8, ffn_hidden_size=128, padded_vocab_size=128, max_position_embeddings=64,
                normalization="RMSNorm", norm_epsilon=1e-5, activation="swiglu", position_embedding="rope",
                add_bias_linear=False, add_qkv_bias=False, tied_embeddings=False, layer_symbols="DD")
    return ModelInfo(**{**base, **fields})


def test_every_table_row_says_when_and_where_with_typed_objects():
    for spec in FAMILIES.values():
        for row in spec.mappings:
            assert isinstance(row.when, Condition) and isinstance(row.on, Layers), (spec.name, row.src)


def test_negated_condition():
    assert Not(TIED_EMBEDDINGS)(info()) and not Not(TIED_EMBEDDINGS)(info(tied_embeddings=True))
    assert Not(TIED_EMBEDDINGS) == Not(TIED_EMBEDDINGS) and Not(TIED_EMBEDDINGS).name == "not tied embeddings"


def test_conditions_decide_which_sources_a_llama_must_have():
    llama = FAMILIES["llama"]
    plain, tied = expected_sources(llama, info()), expected_sources(llama, info(tied_embeddings=True))
    assert "output_layer.weight" in plain and "output_layer.weight" not in tied
    assert "rotary_pos_emb.inv_freq" not in plain  # dropped, never expected
    qwen2 = expected_sources(llama, info(add_qkv_bias=True))
    assert "decoder.layers.1.self_attention.linear_qkv.bias" in qwen2
    assert "decoder.layers.1.self_attention.linear_proj.bias" not in qwen2
    biased = expected_sources(llama, info(add_bias_linear=True, add_qkv_bias=True))
    assert {"decoder.layers.1.self_attention.linear_proj.bias", "decoder.layers.0.mlp.linear_fc2.bias"} <= set(biased)
    assert "decoder.layers.0.self_attention.linear_qkv.bias" not in plain


@pytest.mark.parametrize("q_lora_rank,shared_size", [(None, None), (16, 64)])
def test_deepseek_sources_follow_layer_kinds_and_block_facts(q_lora_rank, shared_size):
    """Layer 0 dense, layer 1 MoE, layer 2 an MTP layer of layer 1's kind; q LoRA and shared
    experts where the facts say so."""
    model = info(layer_symbols="DEe", mtp_num_layers=1, multi_token_prediction=True, num_experts=2,
                 moe_top_k=1, moe_ffn_hidden_size=32, qk_layernorm=True,
                 moe=MoEFacts(score="sigmoid", expert_bias=True, shared_size=shared_size),
                 mla=MLAFacts(q_lora_rank=q_lora_rank, kv_lora_rank=16, rope_type="rope", rotary_base=10000))
    names = set(expected_sources(FAMILIES["deepseek_v3"], model))
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names and "decoder.layers.1.mlp.linear_fc1.weight" not in names
    assert {"decoder.layers.1.mlp.experts.experts.1.linear_fc2.weight", "decoder.layers.2.mlp.router.expert_bias",
            "decoder.layers.2.mtp.enorm.weight"} <= names
    assert "decoder.layers.0.mlp.router.weight" not in names and "decoder.layers.1.mtp.enorm.weight" not in names
    assert ("decoder.layers.0.self_attention.linear_q_down_proj.weight" in names) == bool(q_lora_rank)
    assert ("decoder.layers.0.self_attention.linear_q_proj.weight" in names) == (not q_lora_rank)
    assert ("decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in names) == bool(shared_size)
    dropped = set(expected_sources(FAMILIES["deepseek_v3"], drop_mtp_layers(model)))
    assert not any(name.startswith("decoder.layers.2.") for name in dropped)


def test_moe_features_come_from_the_moe_facts():
    features = family_features(info(layer_symbols="EE", num_experts=4, moe=MoEFacts(pre_softmax=True,
                                                                                     shared_size=32)))
    assert (features["moe"], features["moe_routing"], features["moe_every_layer"]) == (True, "softmax_topk", True)
    assert (features["moe_shared_expert"], features["moe_group_routing"], features["moe_topk_scaling"]) == (
        True, False, False)
    assert not family_features(info())["moe"] and "moe_routing" not in family_features(info())


def test_module_facts_pool_over_pipeline_ranks():
    """Each pipeline stage sees its own layers' classes: the first stage no Mamba mixer, the last
    no MoE layer; the merged description has all of them."""
    mamba = MambaFacts(d_inner=128, num_heads=4, head_dim=32, num_groups=1, state_dim=16, conv_kernel=4,
                       chunk_size=128)
    first = info(layer_symbols="EE", num_experts=4, moe=MoEFacts(expert_module="SequentialMLP"))
    last = dataclasses.replace(first, attention_module="none", moe=MoEFacts(expert_module=""), mamba=mamba)
    merged = merge_module_facts(first, [module_facts(first), module_facts(last)])
    assert (merged.attention_module, merged.moe.expert_module, merged.mamba) == ("SelfAttention", "SequentialMLP",
                                                                                 mamba)
    grouped = dataclasses.replace(first, moe=MoEFacts(expert_module="TEGroupedMLP"))
    merged = merge_module_facts(first, [module_facts(first), module_facts(grouped)])
    assert family_features(merged)["moe_expert_module"] == "SequentialMLP,TEGroupedMLP"


def test_facts_read_from_a_live_moe_model(megatron_world):
    from megatron_trt_ext.model_info import read_model_info, unwrap_chunks
    from tests.support.models import tiny_llama

    live = read_model_info(unwrap_chunks(tiny_llama(moe=True, moe_router_pre_softmax=True,
                                                    moe_shared_expert_intermediate_size=32)))
    assert (live.num_experts, live.moe_top_k, live.layer_symbols) == (4, 2, "EE")
    assert (live.moe.routing, live.moe.shared_size, live.moe.expert_module) == ("softmax_topk", 32, "SequentialMLP")
    assert live.mla is None and live.mamba is None and live.yarn is None
    assert family_features(live)["moe_shared_expert"]
