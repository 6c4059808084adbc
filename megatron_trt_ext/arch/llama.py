"""Llama family: RMSNorm, RoPE, SwiGLU, MHA/GQA/MQA; optional biases (Qwen2-style qkv bias).

HF class: ``LlamaForCausalLM``; with a bias on q/k/v only (``add_qkv_bias`` without
``add_bias_linear``) ``Qwen2ForCausalLM``, whose attention has exactly that bias pattern.
"""

from .spec import ArchSpec, Drop, GatedMLP, QKV, Rename, Vocab, requirements

P = "decoder.layers.{L}"
H = "model.layers.{L}"

MAPPINGS = (
    Vocab("embedding.word_embeddings.weight", dst="model.embed_tokens.weight"),
    Rename(f"{P}.self_attention.linear_qkv.layer_norm_weight", dst=f"{H}.input_layernorm.weight"),
    QKV(f"{P}.self_attention.linear_qkv.weight",
        q=f"{H}.self_attn.q_proj.weight", k=f"{H}.self_attn.k_proj.weight", v=f"{H}.self_attn.v_proj.weight"),
    QKV(f"{P}.self_attention.linear_qkv.bias", required="add_qkv_bias",
        q=f"{H}.self_attn.q_proj.bias", k=f"{H}.self_attn.k_proj.bias", v=f"{H}.self_attn.v_proj.bias"),
    Rename(f"{P}.self_attention.linear_proj.weight", dst=f"{H}.self_attn.o_proj.weight"),
    Rename(f"{P}.self_attention.linear_proj.bias", dst=f"{H}.self_attn.o_proj.bias", required="add_bias_linear"),
    Rename(f"{P}.mlp.linear_fc1.layer_norm_weight", dst=f"{H}.post_attention_layernorm.weight"),
    # dense MLP layers ("D"; "d" for an MTP layer): MoE families reuse these for their dense layers
    GatedMLP(f"{P}.mlp.linear_fc1.weight", on="Dd", gate=f"{H}.mlp.gate_proj.weight", up=f"{H}.mlp.up_proj.weight"),
    GatedMLP(f"{P}.mlp.linear_fc1.bias", on="Dd", gate=f"{H}.mlp.gate_proj.bias", up=f"{H}.mlp.up_proj.bias",
             required="add_bias_linear"),
    Rename(f"{P}.mlp.linear_fc2.weight", on="Dd", dst=f"{H}.mlp.down_proj.weight"),
    Rename(f"{P}.mlp.linear_fc2.bias", on="Dd", dst=f"{H}.mlp.down_proj.bias", required="add_bias_linear"),
    Rename("decoder.final_layernorm.weight", dst="model.norm.weight"),
    Vocab("output_layer.weight", dst="lm_head.weight", required="!tied_embeddings"),
    Drop("rotary_pos_emb.inv_freq"),
)

# Local-spec modules keep the norm outside the linear; Megatron's sharded state dict maps them to
# the Transformer Engine names, but a plain state_dict() (or an older version) may not.
ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    "mlp.linear_fc1.layer_norm_weight": ("pre_mlp_layernorm.weight",),
}


def _is_qwen2(info) -> bool:
    return info.add_qkv_bias and not info.add_bias_linear


def _rope(info) -> dict:
    legacy = {"rope_theta": info.rotary_base}
    params = {"rope_type": "default", "rope_theta": info.rotary_base}
    if info.rope_scaling:
        scaling = dict(info.rope_scaling)
        legacy["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}
        params.update(scaling)
    # transformers < 5 reads rope_theta/rope_scaling, transformers >= 5 reads rope_parameters.
    return {**legacy, "rope_parameters": params}


def hf_config(info, ctx, dtype: str) -> dict:
    qwen2 = _is_qwen2(info)
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": ctx.vocab_size,
        "hidden_size": info.hidden_size,
        "intermediate_size": info.ffn_hidden_size,
        "num_hidden_layers": info.num_layers,
        "num_attention_heads": info.num_attention_heads,
        "num_key_value_heads": info.num_query_groups,
        "head_dim": info.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": info.max_position_embeddings,
        "rms_norm_eps": info.norm_epsilon,
        "tie_word_embeddings": info.tied_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        **_rope(info),
    }
    if qwen2:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=info.num_layers)
    else:
        cfg.update(attention_bias=info.add_bias_linear, mlp_bias=info.add_bias_linear)
    return cfg


def trtllm(info) -> dict:
    qwen2 = _is_qwen2(info)
    extra = {
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": info.rotary_base,
        "rotary_scaling": ({"type": info.rope_scaling["rope_type"], **info.rope_scaling}
                           if info.rope_scaling else None),
        "hidden_act": "silu",
        "attn_bias": info.add_qkv_bias,
        "mlp_bias": info.add_bias_linear,
    }
    if qwen2:
        extra["qwen_type"] = "qwen2"
    return {"layout": "llama", "architecture": "Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM",
            "config": extra}


def _check(info):
    if _is_qwen2(info) and info.head_dim * info.num_attention_heads != info.hidden_size:
        return ("kv_channels", info.head_dim,
                "Qwen2 (qkv-bias only) needs kv_channels == hidden_size / num_attention_heads")
    if info.rotary_percent != 1.0:
        return ("rotary_percent", info.rotary_percent, "Llama family needs rotary_percent == 1.0")
    return None


LLAMA = ArchSpec(
    name="llama",
    requires=requirements(
        normalization={"RMSNorm"},
        activation={"swiglu"},
        position_embedding={"rope"},
        attention_kind={"mha", "gqa", "mqa"},
    ),
    mappings=MAPPINGS,
    aliases=ALIASES,
    hf_config=hf_config,
    trtllm=trtllm,
    checks=(_check,),
)
