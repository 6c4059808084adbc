"""Qwen3 (dense): the Llama block with per-head RMSNorm on q and k (over head_dim, before RoPE) and
a head_dim independent of hidden/heads.

HF class: ``Qwen3ForCausalLM``. Megatron: ``qk_layernorm=True`` (``q_layernorm``/``k_layernorm``,
one weight of head_dim shared by all heads, as HF's ``q_norm``/``k_norm``). TensorRT-LLM (<= 1.2):
``Qwen3ForCausalLM`` (its QWen model with ``qwen_type: qwen3``), LLaMA tensor names plus
``attention.q_layernorm``/``k_layernorm``.
"""

from . import llama
from .features import requirements
from .spec import MEGATRON_ATTENTION, ArchSpec, Rename

MAPPINGS = llama.MAPPINGS + (
    Rename(f"{MEGATRON_ATTENTION}.q_layernorm.weight", dst=f"{llama.HF_ATTENTION}.q_norm.weight"),
    Rename(f"{MEGATRON_ATTENTION}.k_layernorm.weight", dst=f"{llama.HF_ATTENTION}.k_norm.weight"),
)


def hf_config(info, ctx, dtype: str) -> dict:
    cfg = llama.hf_config(info, ctx, dtype)
    for key in ("mlp_bias",):
        cfg.pop(key, None)
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
               use_sliding_window=False, sliding_window=None, max_window_layers=info.num_layers,
               layer_types=["full_attention"] * info.num_layers)
    return cfg


def trtllm(info) -> dict:
    base = llama.trtllm(info)
    config = dict(base["config"], qwen_type="qwen3", attn_bias=False)
    return {"layout": "qwen3", "architecture": "Qwen3ForCausalLM", "config": config}


def _check(info):
    if info.add_qkv_bias or info.add_bias_linear:
        return ("add_bias_linear", True, "Qwen3 here has no linear biases (HF's attention_bias also biases o_proj)")
    if info.rotary_percent != 1.0:
        return ("rotary_percent", info.rotary_percent, "Qwen3 needs rotary_percent == 1.0")
    return None


QWEN3 = ArchSpec(
    name="qwen3",
    requires=requirements(
        normalization={"RMSNorm"},
        activation={"swiglu"},
        position_embedding={"rope"},
        attention_kind={"mha", "gqa", "mqa"},
        qk_layernorm={True},
    ),
    mappings=MAPPINGS,
    aliases=llama.ALIASES,
    hf_config=hf_config,
    trtllm=trtllm,
    checks=(_check,),
)
