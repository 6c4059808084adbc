"""DeepSeek-V3 / Kimi-K2: multi-latent attention (q LoRA on or off, kv LoRA, a decoupled RoPE head
per token, YaRN with mscale) and MoE with sigmoid scores, a selection-only expert bias, group-limited
top-k, a top-k scaling factor and shared experts, dense first layers, and MTP layers.

HF class: ``DeepseekV3ForCausalLM`` (Kimi-K2 has its architecture and loads as ``deepseek_v3``).
Megatron's MLA layouts are HF's (per head q = [nope | rope], kv_up = [k_nope | v], kv_down =
[kv_lora | rope]) and its RoPE de-interleaves the rope dims as HF's ``rope_interleave: true``
does: the weights copy as they are. MTP layers become DeepSeek's extra layers
``model.layers.{num_layers + k}`` (enorm, hnorm, eh_proj, shared_head.norm, and copies of the
embedding and output head), or are dropped with ``drop_mtp: true``. TensorRT-LLM (<= 1.2) has no
DeepSeek-V3 engine (its PyTorch backend loads the HF checkpoint).
"""

from ..facts.rope import yarn_concentration
from . import llama, moe
from .conditions import MTP_LAYERS, Q_LORA, TIED_EMBEDDINGS, Not
from .features import requirements
from .spec import MEGATRON_ATTENTION, MEGATRON_LAYER, ArchSpec, Rename, Vocab, no_trtllm

HF_LAYER = llama.HF_LAYER
HF_ATTENTION = llama.HF_ATTENTION
HF_MLP = f"{HF_LAYER}.mlp"
MTP = f"{MEGATRON_LAYER}.mtp"

MAPPINGS = (
    Vocab("embedding.word_embeddings.weight", dst="model.embed_tokens.weight",
          mtp_copies=("model.layers.{L}.embed_tokens.weight",)),
    Rename(f"{MEGATRON_LAYER}.input_layernorm.weight", dst=f"{HF_LAYER}.input_layernorm.weight"),
    Rename(f"{MEGATRON_ATTENTION}.linear_q_down_proj.weight", dst=f"{HF_ATTENTION}.q_a_proj.weight", when=Q_LORA),
    Rename(f"{MEGATRON_ATTENTION}.q_layernorm.weight", dst=f"{HF_ATTENTION}.q_a_layernorm.weight", when=Q_LORA),
    Rename(f"{MEGATRON_ATTENTION}.linear_q_up_proj.weight", dst=f"{HF_ATTENTION}.q_b_proj.weight", when=Q_LORA),
    Rename(f"{MEGATRON_ATTENTION}.linear_q_proj.weight", dst=f"{HF_ATTENTION}.q_proj.weight", when=Not(Q_LORA)),
    Rename(f"{MEGATRON_ATTENTION}.linear_kv_down_proj.weight", dst=f"{HF_ATTENTION}.kv_a_proj_with_mqa.weight"),
    Rename(f"{MEGATRON_ATTENTION}.kv_layernorm.weight", dst=f"{HF_ATTENTION}.kv_a_layernorm.weight"),
    Rename(f"{MEGATRON_ATTENTION}.linear_kv_up_proj.weight", dst=f"{HF_ATTENTION}.kv_b_proj.weight"),
    Rename(f"{MEGATRON_ATTENTION}.linear_proj.weight", dst=f"{HF_ATTENTION}.o_proj.weight"),
    Rename(f"{MEGATRON_LAYER}.pre_mlp_layernorm.weight", dst=f"{HF_LAYER}.post_attention_layernorm.weight"),
    *llama.DENSE_MLP,  # the dense first layers
    *moe.router(f"{HF_MLP}.gate.weight", expert_bias=f"{HF_MLP}.gate.e_score_correction_bias"),
    *moe.experts(f"{HF_MLP}.experts"),
    *moe.shared_experts(f"{HF_MLP}.shared_experts"),
    Rename(f"{MTP}.enorm.weight", on=MTP_LAYERS, dst=f"{HF_LAYER}.enorm.weight"),
    Rename(f"{MTP}.hnorm.weight", on=MTP_LAYERS, dst=f"{HF_LAYER}.hnorm.weight"),
    Rename(f"{MTP}.eh_proj.weight", on=MTP_LAYERS, dst=f"{HF_LAYER}.eh_proj.weight"),
    Rename(f"{MTP}.final_layernorm.weight", on=MTP_LAYERS, dst=f"{HF_LAYER}.shared_head.norm.weight"),
    Rename("decoder.final_layernorm.weight", dst="model.norm.weight"),
    Vocab("output_layer.weight", dst="lm_head.weight", when=Not(TIED_EMBEDDINGS),
          mtp_copies=("model.layers.{L}.shared_head.head.weight",)),
)

# Transformer Engine fuses MLA's q/kv norms into the up projections, and a dense layer's pre-MLP
# norm into fc1; the local spec keeps them separate.
ALIASES = {
    "self_attention.q_layernorm.weight": ("self_attention.linear_q_up_proj.layer_norm_weight",),
    "self_attention.kv_layernorm.weight": ("self_attention.linear_kv_up_proj.layer_norm_weight",),
    "pre_mlp_layernorm.weight": ("mlp.linear_fc1.layer_norm_weight",),
}


def _rope(mla) -> dict:
    theta = float(mla.rotary_base)
    if mla.rope_type != "yarn":
        return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    yarn = mla.yarn
    params = {"rope_type": "yarn", "rope_theta": theta, "factor": float(yarn.rotary_scaling_factor),
              "original_max_position_embeddings": int(yarn.original_max_position_embeddings),
              "beta_fast": float(yarn.beta_fast), "beta_slow": float(yarn.beta_slow),
              "mscale": float(yarn.mscale), "mscale_all_dim": float(yarn.mscale_all_dim),
              # Megatron's cos/sin factor, written out: HF ignores mscale when mscale_all_dim is 0
              "attention_factor": yarn_concentration(yarn.rotary_scaling_factor, yarn.mscale, yarn.mscale_all_dim)}
    legacy = {k: v for k, v in params.items() if k not in ("rope_theta", "attention_factor")}
    legacy["type"] = "yarn"
    return {"rope_theta": theta, "rope_parameters": params, "rope_scaling": legacy}


def hf_config(info, ctx, dtype: str) -> dict:
    mla, routing = info.mla, info.moe
    dense = moe.dense_layers_of(info)
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": ctx.vocab_size,
        "hidden_size": info.hidden_size,
        "intermediate_size": info.ffn_hidden_size,
        "moe_intermediate_size": info.moe_ffn_hidden_size,
        "num_hidden_layers": info.num_layers,
        "num_attention_heads": info.num_attention_heads,
        "num_key_value_heads": info.num_attention_heads,
        "n_shared_experts": (routing.shared_size or 0) // info.moe_ffn_hidden_size,
        "n_routed_experts": info.num_experts,
        "num_experts_per_tok": info.moe_top_k,
        "routed_scaling_factor": routing.routed_scaling,
        "n_group": routing.num_groups or 1,
        "topk_group": routing.group_topk or 1,
        # Megatron renormalises sigmoid top-k weights whenever k > 1
        "norm_topk_prob": info.moe_top_k > 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "first_k_dense_replace": len(dense),
        "moe_layer_freq": 1,
        "kv_lora_rank": mla.kv_lora_rank,
        "q_lora_rank": mla.q_lora_rank,
        "qk_rope_head_dim": mla.qk_pos_emb_head_dim,
        "qk_nope_head_dim": mla.qk_head_dim,
        "v_head_dim": mla.v_head_dim,
        "rope_interleave": True,
        "num_nextn_predict_layers": info.mtp_num_layers,
        "max_position_embeddings": info.max_position_embeddings,
        "rms_norm_eps": info.norm_epsilon,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": info.tied_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        **_rope(mla),
    }


def _trtllm_unsupported(info):
    return ("TensorRT-LLM (<= 1.2) has no DeepSeek-V3 engine (its TensorRT backend has DeepSeek-V2 without the "
            "noaux_tc routing and MTP; the PyTorch backend loads the HF checkpoint)")


def _check(info):
    mla, routing = info.mla, info.moe
    dense = moe.dense_layers_of(info)
    if dense != list(range(len(dense))):
        return ("moe_layer_freq", info.decoder_kinds,
                "DeepSeek-V3 has its dense MLP layers first (first_k_dense_replace)")
    if not routing.expert_bias:
        return ("moe_router_enable_expert_bias", False, "DeepSeek-V3's noaux_tc routing selects with an expert bias")
    groups = routing.num_groups or 1
    if groups > 1 and info.moe_top_k // (routing.group_topk or 1) != 2:
        return ("moe_router_group_topk", routing.group_topk,
                "HF scores a group by its top-2 experts, Megatron by its top (topk / group_topk): "
                "need topk / group_topk == 2")
    if routing.shared_size and routing.shared_size % info.moe_ffn_hidden_size:
        return ("moe_shared_expert_intermediate_size", routing.shared_size,
                "a whole number of experts (n_shared_experts x moe_ffn_hidden_size)")
    if routing.shared_gate:
        return ("moe_shared_expert_gate", True, "DeepSeek-V3's shared experts are not gated")
    if mla.rope_type != "yarn" and mla.yarn.mscale_all_dim:
        return ("mscale_all_dim", mla.yarn.mscale_all_dim,
                "with plain RoPE Megatron still scales the softmax by mscale_all_dim, HF does not: set it to 0")
    if not mla.q_lora_rank and info.qk_layernorm:
        return ("q_lora_rank", None, "without q LoRA Megatron-Core puts a norm (fused into linear_q_proj) on the "
                "already normalised input, which HF's q_proj does not have")
    if info.rotary_interleaved:
        return ("rotary_interleaved", True, "MLA's rope dims are de-interleaved as HF's rope_interleave expects")
    return None


DEEPSEEK_V3 = ArchSpec(
    name="deepseek_v3",
    requires=requirements(
        attention_module={"MLASelfAttention"},
        multi_latent_attention={True},
        normalization={"RMSNorm"},
        activation={"swiglu"},
        position_embedding={"none", "rope", "yarn"},
        attention_kind={"mha", "gqa", "mqa"},
        qk_layernorm={True},
        multi_token_prediction={True, False},
        moe={True},
        moe_routing={"sigmoid_topk"},
        moe_expert_module={"SequentialMLP", "TEGroupedMLP"},
        moe_every_layer={True, False},
        moe_shared_expert={True, False},
        moe_router_bias={True},
        moe_group_routing={True, False},
        moe_topk_scaling={True, False},
    ),
    mappings=MAPPINGS,
    aliases=ALIASES,
    hf_config=hf_config,
    trtllm=no_trtllm,
    checks=(_check,),
    trtllm_unsupported=_trtllm_unsupported,
    keep_fp32=(r"\.mlp\.gate\.weight$", r"\.mlp\.gate\.e_score_correction_bias$"),
    shared_input_linears=(("self_attention.linear_q_down_proj.weight", "self_attention.linear_kv_down_proj.weight"),),
)
