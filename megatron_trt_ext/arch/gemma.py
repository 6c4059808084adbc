"""Gemma (1): RMSNorm with zero-centred gamma ((1 + w), computed in float32), a tanh-GeGLU MLP,
embeddings scaled by sqrt(hidden_size), head_dim independent of hidden/heads, tied embeddings.

Megatron expresses it with ``layernorm_zero_centered_gamma`` on RMSNorm (Transformer Engine's
norms), GeGLU, and MuP's embedding multiplier (``use_mup``, ``mup_embedding_mult = sqrt(hidden)``,
``mup_attn_scale_power = 0.5`` so attention keeps the standard 1/sqrt(head_dim)). HF class:
``GemmaForCausalLM`` (stores the zero-centred w too, and scales embeddings itself).
TensorRT-LLM (<= 1.2): ``GemmaForCausalLM`` (LLaMA names; its norms are plain: +1 on export).
Gemma 2/3 (norms after each sublayer, logit soft-capping) have no Megatron-Core counterpart.
"""

from . import llama
from .features import requirements
from .spec import ArchSpec


def hf_config(info, ctx, dtype: str) -> dict:
    cfg = llama.hf_config(info, ctx, dtype)
    for key in ("mlp_bias", "hidden_act"):
        cfg.pop(key, None)
    cfg.update(architectures=["GemmaForCausalLM"], model_type="gemma", hidden_activation="gelu_pytorch_tanh",
               hidden_act="gelu_pytorch_tanh", attention_bias=False)
    return cfg


def trtllm(info) -> dict:
    base = llama.trtllm(info)
    config = dict(base["config"], hidden_act="gelu", attn_bias=False)
    return {"layout": "gemma", "architecture": "GemmaForCausalLM", "config": config}


def _check(info):
    if not info.tied_embeddings:
        return ("share_embeddings_and_output_weights", False, "Gemma ties its embeddings")
    if info.add_bias_linear or info.add_qkv_bias:
        return ("add_bias_linear", True, "Gemma has no linear biases")
    if abs(info.embedding_multiplier - info.hidden_size ** 0.5) > 1e-6 * info.hidden_size ** 0.5:
        return ("mup_embedding_mult", info.embedding_multiplier,
                f"Gemma scales embeddings by sqrt(hidden_size) = {info.hidden_size ** 0.5:.6g}")
    if info.rotary_percent != 1.0:
        return ("rotary_percent", info.rotary_percent, "Gemma needs rotary_percent == 1.0")
    return None


GEMMA = ArchSpec(
    name="gemma",
    requires=requirements(
        normalization={"RMSNorm"},
        layernorm_zero_centered_gamma={True},
        activation={"geglu_tanh"},
        position_embedding={"rope"},
        attention_kind={"mha", "gqa", "mqa"},
        embedding_multiplier={True},
    ),
    mappings=llama.MAPPINGS,
    aliases=llama.ALIASES,
    hf_config=hf_config,
    trtllm=trtllm,
    checks=(_check,),
)
