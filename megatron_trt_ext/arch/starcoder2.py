"""Starcoder2: LayerNorm with bias, a non-gated GeLU MLP (tanh or exact), biases on every linear,
GQA, RoPE, and an optional sliding window over every layer.

HF class: ``Starcoder2ForCausalLM``. A Megatron ``window_size=(W-1, 0)`` attends to W tokens (self
included), HF's ``sliding_window: W``. TensorRT-LLM (<= 1.2): ``Starcoder2ForCausalLM`` = its
``GPTForCausalLM`` with ``gpt_variant: starcoder2`` (GPT tensor names); its config has no
sliding-window field, so windowed models are refused for the TensorRT-LLM formats.
"""

import dataclasses

from . import nemotron
from .features import requirements
from .spec import ArchSpec, Rename

_MLP = {"mlp.up_proj.weight": "mlp.c_fc.weight", "mlp.up_proj.bias": "mlp.c_fc.bias",
        "mlp.down_proj.weight": "mlp.c_proj.weight", "mlp.down_proj.bias": "mlp.c_proj.bias"}


def _starcoder_names(transform):
    """Nemotron's block table with Starcoder2's MLP names (c_fc / c_proj)."""
    if isinstance(transform, Rename):
        for old, new in _MLP.items():
            if transform.dst.endswith(old):
                return dataclasses.replace(transform, dst=transform.dst[: -len(old)] + new)
    return transform


MAPPINGS = tuple(_starcoder_names(t) for t in nemotron.MAPPINGS)
_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def hf_config(info, ctx, dtype: str) -> dict:
    return {
        "architectures": ["Starcoder2ForCausalLM"],
        "model_type": "starcoder2",
        "vocab_size": ctx.vocab_size,
        "hidden_size": info.hidden_size,
        "intermediate_size": info.ffn_hidden_size,
        "num_hidden_layers": info.num_layers,
        "num_attention_heads": info.num_attention_heads,
        "num_key_value_heads": info.num_query_groups,
        "hidden_act": _HF_ACT[info.activation],
        "max_position_embeddings": info.max_position_embeddings,
        "norm_epsilon": info.norm_epsilon,
        "use_bias": True,
        "sliding_window": info.sliding_window,
        "tie_word_embeddings": info.tied_embeddings,
        "residual_dropout": 0.0, "embedding_dropout": 0.0, "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "bos_token_id": None, "eos_token_id": None,  # the tokenizer's, not GPT-2's defaults
        "rope_parameters": {"rope_type": "default", "rope_theta": info.rotary_base},
        "rope_theta": info.rotary_base,
    }


def trtllm(info) -> dict:
    return {"layout": "gpt_qkv", "architecture": "Starcoder2ForCausalLM",
            "config": {"gpt_variant": "starcoder2", "position_embedding_type": "rope_gpt_neox",
                       "rotary_base": info.rotary_base, "rotary_pct": 1.0, "hidden_act": "gelu", "bias": True}}


def _trtllm_unsupported(info):
    if info.sliding_window is not None:
        return (f"a {info.sliding_window}-token sliding window: TensorRT-LLM's GPT checkpoint (Starcoder2) has no "
                "sliding-window field, so its engines would attend to the full context")
    return None


def _check(info):
    if info.head_dim * info.num_attention_heads != info.hidden_size:
        return ("kv_channels", info.head_dim, "Starcoder2 needs kv_channels == hidden_size / num_attention_heads")
    if info.rotary_percent != 1.0:
        return ("rotary_percent", info.rotary_percent, "Starcoder2 needs rotary_percent == 1.0")
    if info.sliding_window_layers is not None and not all(info.sliding_window_layers):
        return ("window_attn_skip_freq", "set", "Starcoder2's window applies to every layer")
    return None


STARCODER2 = ArchSpec(
    name="starcoder2",
    requires=requirements(
        normalization={"LayerNorm"},
        activation=set(_HF_ACT),
        position_embedding={"rope"},
        attention_kind={"mha", "gqa", "mqa"},
        linear_bias={True},
        attention_window={False, True},
    ),
    mappings=MAPPINGS,
    aliases=nemotron.ALIASES,
    hf_config=hf_config,
    trtllm=trtllm,
    checks=(_check,),
    trtllm_unsupported=_trtllm_unsupported,
)
