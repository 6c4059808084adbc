"""Qwen3-MoE: Qwen3 attention (q/k RMSNorm, head_dim independent of hidden) and a softmax top-k
router over SwiGLU experts, no shared expert; dense MLP layers where Megatron's ``moe_layer_freq``
puts them.

HF class: ``Qwen3MoeForCausalLM`` with the hub's per-expert names (``mlp.gate``,
``mlp.experts.E.gate_proj/up_proj/down_proj``). Megatron ``moe_router_pre_softmax=False`` (top-k
on logits, softmax over the k) is HF ``norm_topk_prob: true``; ``pre_softmax=True`` (softmax, then
top-k, no renormalisation) is ``norm_topk_prob: false``. The dense layers are written as
``mlp_only_layers`` (Megatron's int ``moe_layer_freq`` N makes layer i MoE when i % N == 0, HF's
``decoder_sparse_step`` when (i+1) % N == 0: never translated). TensorRT-LLM (<= 1.2):
``Qwen3MoeForCausalLM`` (QWen, ``qwen_type: qwen3_moe``) when every layer is MoE.
"""

from . import moe, qwen3
from .features import requirements
from .llama import HF_LAYER
from .spec import ArchSpec

MAPPINGS = qwen3.MAPPINGS + moe.router(f"{HF_LAYER}.mlp.gate.weight") + moe.experts(f"{HF_LAYER}.mlp.experts")


def hf_config(info, ctx, dtype: str) -> dict:
    cfg = qwen3.hf_config(info, ctx, dtype)
    cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
               num_experts=info.num_experts, num_experts_per_tok=info.moe_top_k,
               moe_intermediate_size=info.moe_ffn_hidden_size, decoder_sparse_step=1,
               mlp_only_layers=moe.dense_layers_of(info), norm_topk_prob=not info.moe.pre_softmax,
               output_router_logits=False, router_aux_loss_coef=0.0)
    return cfg


def trtllm(info) -> dict:
    base = qwen3.trtllm(info)
    config = dict(base["config"], qwen_type="qwen3_moe", moe_intermediate_size=info.moe_ffn_hidden_size,
                  moe={"num_experts": info.num_experts, "top_k": info.moe_top_k,
                       # TensorRT-LLM MoeConfig.ExpertScaleNormalizationMode: 1 RENORMALIZE, 0 NONE
                       "normalization_mode": 0 if info.moe.pre_softmax else 1,
                       "sparse_mixer_epsilon": 0.01, "tp_mode": 0, "device_limited_n_group": 0,
                       "device_limited_topk_group": 0, "device_limited_routed_scaling_factor": 1.0})
    return {"layout": "qwen3_moe", "architecture": "Qwen3MoeForCausalLM", "config": config,
            "intermediate_size": info.moe_ffn_hidden_size}


def _trtllm_unsupported(info):
    if set(info.decoder_kinds) != {"E"}:
        return ("dense layers among the MoE layers: TensorRT-LLM's Qwen3-MoE engine makes every layer MoE "
                "(no mlp_only_layers)")
    return None


QWEN3_MOE = ArchSpec(
    name="qwen3_moe",
    requires=requirements(
        normalization={"RMSNorm"},
        activation={"swiglu"},
        position_embedding={"rope"},
        attention_kind={"mha", "gqa", "mqa"},
        qk_layernorm={True},
        moe={True},
        moe_routing={"topk_softmax", "softmax_topk"},
        moe_expert_module={"SequentialMLP", "TEGroupedMLP"},
        moe_every_layer={True, False},
        moe_shared_expert={False},
        moe_router_bias={False},
        moe_group_routing={False},
        moe_topk_scaling={False},
    ),
    mappings=MAPPINGS,
    aliases={**qwen3.llama.ALIASES},
    hf_config=hf_config,
    trtllm=trtllm,
    checks=qwen3.QWEN3.checks,
    trtllm_unsupported=_trtllm_unsupported,
)
