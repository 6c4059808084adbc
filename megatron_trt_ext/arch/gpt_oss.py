"""GPT-OSS: attention with biases and learnable sinks (``softmax_type: learnable``), sliding-window
attention on every other layer, a top-k softmax router with a bias, experts with biases and the
clamped GLU ``(clamp(up, -l, l) + 1) * quick_gelu(min(gate, l))`` (Megatron: ``quick_gelu`` with
``glu_linear_offset: 1`` and ``activation_func_clamp_value: l``), YaRN RoPE.

HF class: ``GptOssForCausalLM``, whose checkpoints store each layer's experts fused: ``gate_up_proj``
[E, H, 2I] with gate and up interleaved on the last dim, ``down_proj`` [E, I, H] (both transposed),
and their biases. Megatron's ``window_size=(W-1, 0)`` is HF's ``sliding_window: W``. TensorRT-LLM
(<= 1.2) has no GPT-OSS engine (its PyTorch backend loads the HF checkpoint).
"""

from ..facts.rope import yarn_concentration
from . import llama, moe
from .conditions import MOE_LAYERS
from .features import requirements
from .spec import MEGATRON_ATTENTION, MEGATRON_EXPERT, ArchSpec, Rename, StackExperts, no_trtllm

HF_MLP = f"{llama.HF_LAYER}.mlp"

MAPPINGS = (
    llama.EMBEDDING, *llama.ATTENTION_BLOCK, llama.FINAL_NORM, llama.ROTARY_FREQUENCIES,
    Rename(f"{MEGATRON_ATTENTION}.core_attention.softmax_offset", dst=f"{llama.HF_ATTENTION}.sinks"),
    *moe.router(f"{HF_MLP}.router.weight", bias=f"{HF_MLP}.router.bias"),
    StackExperts(f"{MEGATRON_EXPERT}.linear_fc1.weight", on=MOE_LAYERS, dst=f"{HF_MLP}.experts.gate_up_proj",
                 interleave=True, transpose=True),
    StackExperts(f"{MEGATRON_EXPERT}.linear_fc1.bias", on=MOE_LAYERS, dst=f"{HF_MLP}.experts.gate_up_proj_bias",
                 interleave=True),
    StackExperts(f"{MEGATRON_EXPERT}.linear_fc2.weight", on=MOE_LAYERS, dst=f"{HF_MLP}.experts.down_proj",
                 transpose=True),
    StackExperts(f"{MEGATRON_EXPERT}.linear_fc2.bias", on=MOE_LAYERS, dst=f"{HF_MLP}.experts.down_proj_bias"),
    llama.OUTPUT_LAYER,
)


def _rope(info) -> dict:
    yarn = info.yarn
    theta = float(info.rotary_base)
    factor = float(yarn.rotary_scaling_factor)
    return {"rope_theta": theta, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": theta, "factor": factor,
        "original_max_position_embeddings": int(yarn.original_max_position_embeddings),
        "beta_fast": float(yarn.beta_fast), "beta_slow": float(yarn.beta_slow),
        "truncate": bool(yarn.correction_range_round_to_int),
        "attention_factor": yarn_concentration(factor, yarn.mscale, yarn.mscale_all_dim)}}


def hf_config(info, ctx, dtype: str) -> dict:
    windowed = info.sliding_window_layers or [False] * info.num_layers
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "vocab_size": ctx.vocab_size,
        "hidden_size": info.hidden_size,
        "intermediate_size": info.moe_ffn_hidden_size,
        "num_hidden_layers": info.num_layers,
        "num_attention_heads": info.num_attention_heads,
        "num_key_value_heads": info.num_query_groups,
        "head_dim": info.head_dim,
        "num_local_experts": info.num_experts,
        "num_experts_per_tok": info.moe_top_k,
        "sliding_window": info.sliding_window,
        "layer_types": ["sliding_attention" if w else "full_attention" for w in windowed],
        "swiglu_limit": float(info.activation_clamp),
        "attention_bias": True,
        "rms_norm_eps": info.norm_epsilon,
        "max_position_embeddings": info.max_position_embeddings,
        "tie_word_embeddings": info.tied_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": dtype,
        **_rope(info),
    }


def _trtllm_unsupported(info):
    return "TensorRT-LLM (<= 1.2) has no GPT-OSS engine (its PyTorch backend loads the HF checkpoint)"


def _check(info):
    if info.glu_linear_offset != 1.0:
        return ("glu_linear_offset", info.glu_linear_offset, "GPT-OSS adds 1 to the GLU's linear half")
    if info.sliding_window is None:
        return ("window_size", None, "GPT-OSS alternates sliding-window and full attention")
    if not (info.add_bias_linear and info.moe.router_bias):
        return ("add_bias_linear", False, "GPT-OSS biases attention, router and experts")
    return None


GPT_OSS = ArchSpec(
    name="gpt_oss",
    requires=requirements(
        normalization={"RMSNorm"},
        activation={"gated_quick_gelu"},
        glu_linear_offset={1.0},
        activation_clamp={7.0},
        position_embedding={"yarn"},
        attention_kind={"mha", "gqa", "mqa"},
        attention_window={True},
        softmax_type={"learnable"},
        linear_bias={True},
        moe={True},
        moe_routing={"topk_softmax"},
        moe_expert_module={"SequentialMLP", "TEGroupedMLP"},
        moe_every_layer={True},
        moe_shared_expert={False},
        moe_router_bias={False},
        moe_group_routing={False},
        moe_topk_scaling={False},
    ),
    mappings=MAPPINGS,
    aliases=llama.ALIASES,
    hf_config=hf_config,
    trtllm=no_trtllm,
    checks=(_check,),
    trtllm_unsupported=_trtllm_unsupported,
    quantization_unsupported=("quantized GPT-OSS exports are not supported yet (its experts are fused 3-D "
                              "tensors, which the published checkpoints carry as MXFP4 with their own layout)"),
)
