"""Mixtral family: the Llama attention block with a top-k softmax-routed MoE of SwiGLU experts.

HF class: ``MixtralForCausalLM``, written with the hub's expert names
(``block_sparse_moe.gate`` for the router, ``experts.E.w1/w3/w2`` for gate/up/down), which
transformers, vLLM, SGLang and TensorRT-LLM load.
"""

from . import llama, moe
from .spec import ArchSpec

# the hub's expert names (transformers, vLLM, SGLang and TensorRT-LLM load them)
MOE_BLOCK = f"{llama.HF_LAYER}.block_sparse_moe"
MAPPINGS = (llama.EMBEDDING, *llama.ATTENTION_BLOCK, llama.FINAL_NORM, llama.OUTPUT_LAYER, llama.ROTARY_FREQUENCIES,
            *moe.router(f"{MOE_BLOCK}.gate.weight"),
            *moe.experts(f"{MOE_BLOCK}.experts", gate="w1", up="w3", down="w2"))


def hf_config(info, ctx, dtype: str) -> dict:
    base = llama.hf_config(info, ctx, dtype)
    for key in ("attention_bias", "mlp_bias"):
        base.pop(key, None)
    base.update(
        architectures=["MixtralForCausalLM"], model_type="mixtral",
        intermediate_size=info.moe_ffn_hidden_size, num_local_experts=info.num_experts,
        num_experts_per_tok=info.moe_top_k, output_router_logits=False, router_aux_loss_coef=0.0,
        router_jitter_noise=0.0, sliding_window=None)
    return base


def trtllm(info) -> dict:
    base = llama.trtllm(info)
    config = dict(base["config"], hidden_act="swiglu",
                  moe={"num_experts": info.num_experts, "top_k": info.moe_top_k,
                       "normalization_mode": 1,  # renormalize the top-k weights (Mixtral)
                       "sparse_mixer_epsilon": 0.01, "tp_mode": 0,
                       "device_limited_n_group": 0, "device_limited_topk_group": 0,
                       "device_limited_routed_scaling_factor": 1.0})
    return {"layout": "mixtral", "architecture": "MixtralForCausalLM", "config": config,
            "intermediate_size": info.moe_ffn_hidden_size}


def _check(info):
    if info.add_qkv_bias or info.add_bias_linear:
        return ("add_bias_linear", True, "Mixtral has no linear biases")
    return llama._check(info)


MIXTRAL = ArchSpec(
    name="mixtral",
    # TEGroupedMLP's sharded state dict is SequentialMLP's (Megatron keeps them interchangeable);
    # the legacy GroupedMLP stores all local experts in one tensor and is not supported.
    requires={**llama.LLAMA.requires, "moe": {True}, "moe_routing": {"topk_softmax"},
              "moe_expert_module": {"SequentialMLP", "TEGroupedMLP"},
              "moe_every_layer": {True}, "moe_shared_expert": {False}, "moe_router_bias": {False},
              "moe_group_routing": {False}, "moe_topk_scaling": {False}},
    mappings=MAPPINGS,
    aliases=llama.ALIASES,
    hf_config=hf_config,
    trtllm=trtllm,
    checks=(_check,),
)
