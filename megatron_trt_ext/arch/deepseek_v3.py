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

from . import llama, moe
from .spec import ArchSpec, Rename, Vocab, no_trtllm, requirements

P = "decoder.layers.{L}"
H = "model.layers.{L}"
A = f"{P}.self_attention"
HA = f"{H}.self_attn"
MTP = "de"

MAPPINGS = (
    Vocab("embedding.word_embeddings.weight", dst="model.embed_tokens.weight",
          mtp_copies=("model.layers.{L}.embed_tokens.weight",)),
    Rename(f"{P}.input_layernorm.weight", dst=f"{H}.input_layernorm.weight"),
    Rename(f"{A}.linear_q_down_proj.weight", dst=f"{HA}.q_a_proj.weight", required="mla_q_lora"),
    Rename(f"{A}.q_layernorm.weight", dst=f"{HA}.q_a_layernorm.weight", required="mla_q_lora"),
    Rename(f"{A}.linear_q_up_proj.weight", dst=f"{HA}.q_b_proj.weight", required="mla_q_lora"),
    Rename(f"{A}.linear_q_proj.weight", dst=f"{HA}.q_proj.weight", required="!mla_q_lora"),
    Rename(f"{A}.linear_kv_down_proj.weight", dst=f"{HA}.kv_a_proj_with_mqa.weight"),
    Rename(f"{A}.kv_layernorm.weight", dst=f"{HA}.kv_a_layernorm.weight"),
    Rename(f"{A}.linear_kv_up_proj.weight", dst=f"{HA}.kv_b_proj.weight"),
    Rename(f"{A}.linear_proj.weight", dst=f"{HA}.o_proj.weight"),
    Rename(f"{P}.pre_mlp_layernorm.weight", dst=f"{H}.post_attention_layernorm.weight"),
    *(m for m in llama.MAPPINGS if m.on == "Dd"),  # dense MLP layers
    *moe.router(P, f"{H}.mlp.gate.weight", expert_bias=f"{H}.mlp.gate.e_score_correction_bias"),
    *moe.experts(P, f"{H}.mlp.experts"),
    *moe.shared_experts(P, f"{H}.mlp.shared_experts"),
    Rename(f"{P}.mtp.enorm.weight", on=MTP, dst=f"{H}.enorm.weight"),
    Rename(f"{P}.mtp.hnorm.weight", on=MTP, dst=f"{H}.hnorm.weight"),
    Rename(f"{P}.mtp.eh_proj.weight", on=MTP, dst=f"{H}.eh_proj.weight"),
    Rename(f"{P}.mtp.final_layernorm.weight", on=MTP, dst=f"{H}.shared_head.norm.weight"),
    Rename("decoder.final_layernorm.weight", dst="model.norm.weight"),
    Vocab("output_layer.weight", dst="lm_head.weight", required="!tied_embeddings",
          mtp_copies=("model.layers.{L}.shared_head.head.weight",)),
)

# Transformer Engine fuses MLA's q/kv norms into the up projections, and a dense layer's pre-MLP
# norm into fc1; the local spec keeps them separate.
ALIASES = {
    "self_attention.q_layernorm.weight": ("self_attention.linear_q_up_proj.layer_norm_weight",),
    "self_attention.kv_layernorm.weight": ("self_attention.linear_kv_up_proj.layer_norm_weight",),
    "pre_mlp_layernorm.weight": ("mlp.linear_fc1.layer_norm_weight",),
}


def _rope(mla: dict) -> dict:
    theta = float(mla["rotary_base"])
    if mla["rope_type"] != "yarn":
        return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    from .. import model_info

    params = {"rope_type": "yarn", "rope_theta": theta, "factor": float(mla["rotary_scaling_factor"]),
              "original_max_position_embeddings": int(mla["original_max_position_embeddings"]),
              "beta_fast": float(mla["beta_fast"]), "beta_slow": float(mla["beta_slow"]),
              "mscale": float(mla["mscale"]), "mscale_all_dim": float(mla["mscale_all_dim"]),
              # Megatron's cos/sin factor, written out: HF ignores mscale when mscale_all_dim is 0
              "attention_factor": model_info.yarn_concentration(mla["rotary_scaling_factor"], mla["mscale"],
                                                                mla["mscale_all_dim"])}
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
        "n_shared_experts": (routing["shared_size"] or 0) // info.moe_ffn_hidden_size,
        "n_routed_experts": info.num_experts,
        "num_experts_per_tok": info.moe_top_k,
        "routed_scaling_factor": routing["scaling"],
        "n_group": routing["num_groups"] or 1,
        "topk_group": routing["group_topk"] or 1,
        # Megatron renormalises sigmoid top-k weights whenever k > 1
        "norm_topk_prob": info.moe_top_k > 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "first_k_dense_replace": len(dense),
        "moe_layer_freq": 1,
        "kv_lora_rank": mla["kv_lora_rank"],
        "q_lora_rank": mla["q_lora_rank"],
        "qk_rope_head_dim": mla["qk_pos_emb_head_dim"],
        "qk_nope_head_dim": mla["qk_head_dim"],
        "v_head_dim": mla["v_head_dim"],
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
        return ("moe_layer_freq", info.decoder_kinds, "DeepSeek-V3 has its dense MLP layers first (first_k_dense_replace)")
    if not routing["expert_bias"]:
        return ("moe_router_enable_expert_bias", False, "DeepSeek-V3's noaux_tc routing selects with an expert bias")
    groups = routing["num_groups"] or 1
    if groups > 1 and info.moe_top_k // (routing["group_topk"] or 1) != 2:
        return ("moe_router_group_topk", routing["group_topk"],
                "HF scores a group by its top-2 experts, Megatron by its top (topk / group_topk): need topk / group_topk == 2")
    if routing["shared_size"] and routing["shared_size"] % info.moe_ffn_hidden_size:
        return ("moe_shared_expert_intermediate_size", routing["shared_size"],
                "a whole number of experts (n_shared_experts x moe_ffn_hidden_size)")
    if routing["shared_gate"]:
        return ("moe_shared_expert_gate", True, "DeepSeek-V3's shared experts are not gated")
    if mla["rope_type"] != "yarn" and mla["mscale_all_dim"]:
        return ("mscale_all_dim", mla["mscale_all_dim"],
                "with plain RoPE Megatron still scales the softmax by mscale_all_dim, HF does not: set it to 0")
    if not mla["q_lora_rank"] and info.qk_layernorm:
        return ("q_lora_rank", None, "without q LoRA Megatron-Core puts a norm (fused into linear_q_proj) on the "
                "already normalised input, which HF's q_proj does not have")
    if info.features.get("rotary_interleaved"):
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
