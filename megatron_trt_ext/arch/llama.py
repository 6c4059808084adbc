"""Llama family: RMSNorm, RoPE, SwiGLU, MHA/GQA/MQA; optional biases (Qwen2-style qkv bias).

HF class: ``LlamaForCausalLM``; with a bias on q/k/v only (``add_qkv_bias`` without
``add_bias_linear``) ``Qwen2ForCausalLM``, whose attention has exactly that bias pattern.
"""

from .conditions import DENSE_MLP_LAYERS, LINEAR_BIAS, QKV_BIAS, TIED_EMBEDDINGS, Not
from .features import requirements
from .spec import MEGATRON_ATTENTION, MEGATRON_MLP, QKV, ArchSpec, Drop, GatedMLP, Rename, Vocab

HF_LAYER = "model.layers.{L}"
HF_ATTENTION = f"{HF_LAYER}.self_attn"

EMBEDDING = Vocab("embedding.word_embeddings.weight", dst="model.embed_tokens.weight")
# the attention block with its pre-norm, and the MLP's pre-norm (every layer has both)
ATTENTION_BLOCK = (
    Rename(f"{MEGATRON_ATTENTION}.linear_qkv.layer_norm_weight", dst=f"{HF_LAYER}.input_layernorm.weight"),
    QKV(f"{MEGATRON_ATTENTION}.linear_qkv.weight",
        q=f"{HF_ATTENTION}.q_proj.weight", k=f"{HF_ATTENTION}.k_proj.weight", v=f"{HF_ATTENTION}.v_proj.weight"),
    QKV(f"{MEGATRON_ATTENTION}.linear_qkv.bias", when=QKV_BIAS,
        q=f"{HF_ATTENTION}.q_proj.bias", k=f"{HF_ATTENTION}.k_proj.bias", v=f"{HF_ATTENTION}.v_proj.bias"),
    Rename(f"{MEGATRON_ATTENTION}.linear_proj.weight", dst=f"{HF_ATTENTION}.o_proj.weight"),
    Rename(f"{MEGATRON_ATTENTION}.linear_proj.bias", dst=f"{HF_ATTENTION}.o_proj.bias", when=LINEAR_BIAS),
    Rename(f"{MEGATRON_MLP}.linear_fc1.layer_norm_weight", dst=f"{HF_LAYER}.post_attention_layernorm.weight"),
)
# the dense MLP: MoE families reuse it for their dense layers
DENSE_MLP = (
    GatedMLP(f"{MEGATRON_MLP}.linear_fc1.weight", on=DENSE_MLP_LAYERS,
             gate=f"{HF_LAYER}.mlp.gate_proj.weight", up=f"{HF_LAYER}.mlp.up_proj.weight"),
    GatedMLP(f"{MEGATRON_MLP}.linear_fc1.bias", on=DENSE_MLP_LAYERS, when=LINEAR_BIAS,
             gate=f"{HF_LAYER}.mlp.gate_proj.bias", up=f"{HF_LAYER}.mlp.up_proj.bias"),
    Rename(f"{MEGATRON_MLP}.linear_fc2.weight", on=DENSE_MLP_LAYERS, dst=f"{HF_LAYER}.mlp.down_proj.weight"),
    Rename(f"{MEGATRON_MLP}.linear_fc2.bias", on=DENSE_MLP_LAYERS, when=LINEAR_BIAS,
           dst=f"{HF_LAYER}.mlp.down_proj.bias"),
)
FINAL_NORM = Rename("decoder.final_layernorm.weight", dst="model.norm.weight")
OUTPUT_LAYER = Vocab("output_layer.weight", dst="lm_head.weight", when=Not(TIED_EMBEDDINGS))
ROTARY_FREQUENCIES = Drop("rotary_pos_emb.inv_freq")

MAPPINGS = (EMBEDDING, *ATTENTION_BLOCK, *DENSE_MLP, FINAL_NORM, OUTPUT_LAYER, ROTARY_FREQUENCIES)

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
