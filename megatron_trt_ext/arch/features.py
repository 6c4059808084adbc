"""The vocabulary family tables are matched in: named feature values of a model, derived from its
typed `ModelInfo` (which holds each fact once), and the values every family pins.

The names are also what refusals print ("moe_routing='softmax_topk' (supported: topk_softmax)"),
so they stay stable even where a `ModelInfo` field is named differently.
"""

from __future__ import annotations


def family_features(info) -> dict:
    """The feature values that family tables (`ArchSpec.requires`) are matched against."""
    features = {
        "model_class": info.model_class,
        "source_layout": info.source_layout,
        "normalization": info.normalization,
        "activation": info.activation,
        "position_embedding": info.position_embedding,
        "multi_latent_attention": info.mla is not None,
        "moe": info.moe is not None,
        "mamba": "M" in (info.hybrid_symbols or ""),
        "hybrid_symbols": info.hybrid_symbols,
        "qk_layernorm": info.qk_layernorm,
        "layernorm_zero_centered_gamma": info.zero_centered_gamma,
        "residual_post_layernorm": info.residual_post_layernorm,
        "multi_token_prediction": info.multi_token_prediction,
        "heterogeneous_layers": info.heterogeneous_layers,
        "rotary_interleaved": info.rotary_interleaved,
        "query_key_layer_scaling": info.query_key_layer_scaling,
        "softmax_scale": info.custom_softmax_scale,
        "mup_output_scale": info.mup_output_scale,
        "attention_window": info.sliding_window is not None,
        "embedding_multiplier": info.embedding_multiplier is not None,
        "softmax_type": info.softmax_type,
        "glu_linear_offset": info.glu_linear_offset,
        "activation_clamp": info.activation_clamp,
        "attention_module": info.attention_module,
        "layer_module": info.layer_module,
        "attention_kind": info.attention_kind,
        "linear_bias": info.add_bias_linear,
    }
    moe = info.moe
    if moe is not None:
        features.update({
            "moe_expert_module": moe.expert_module,
            "moe_routing": moe.routing,
            "moe_every_layer": set(info.layer_symbols.upper()) == {"E"},
            "moe_shared_expert": moe.shared_size is not None,
            "moe_router_bias": moe.expert_bias,  # Megatron's moe_router_enable_expert_bias
            "moe_group_routing": moe.num_groups is not None,
            "moe_topk_scaling": moe.scaling_factor is not None,
        })
    return features


# The features every family pins unless it supports something else: a family's ``requires`` starts
# from these, so a model with a feature no table handles is refused instead of exported wrongly.
STANDARD = {
    "model_class": {"GPTModel", "HybridModel"},
    "source_layout": {"gpt", "hybrid_paired"},
    "layer_module": {"TransformerLayer"},
    "attention_module": {"SelfAttention"},
    "multi_latent_attention": {False},
    "moe": {False},
    "mamba": {False},
    "qk_layernorm": {False},
    "layernorm_zero_centered_gamma": {False},
    "residual_post_layernorm": {False},
    "multi_token_prediction": {False},
    "heterogeneous_layers": {False},
    "rotary_interleaved": {False},
    "query_key_layer_scaling": {False},
    "softmax_scale": {False},
    "attention_window": {False},
    "embedding_multiplier": {False},
    "mup_output_scale": {False},
    "softmax_type": {"vanilla"},
    "glu_linear_offset": {0.0},
    "activation_clamp": {None},
}


def requirements(**overrides) -> dict:
    """`STANDARD` with a family's own allowed values."""
    return {**STANDARD, **overrides}
