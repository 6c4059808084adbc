"""What the exporter needs to know about a live Megatron-Core model, read from the model itself.

`ModelInfo` is plain data (no tensors except RoPE frequencies), computed once at attach time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import UnsupportedModelError


def unwrap_chunks(model: Any) -> list:
    """Return the model chunks (virtual pipeline stages) without DDP / Float16Module wrappers."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if not chunks:
        raise UnsupportedModelError("model: got an empty list of model chunks")
    out = []
    for chunk in chunks:
        seen = 0
        while hasattr(chunk, "module") and not hasattr(chunk, "decoder") and seen < 8:
            chunk = chunk.module
            seen += 1
        if not hasattr(chunk, "config") or not hasattr(chunk, "sharded_state_dict"):
            raise UnsupportedModelError(
                f"model: {type(chunk).__name__} is not a Megatron-Core GPTModel (nor a DDP/Float16Module "
                "wrapper of one, nor a list of such chunks); pass the model you hand to the optimizer")
        out.append(chunk)
    return out


def _activation_name(config) -> str:
    import torch.nn.functional as F

    fn = config.activation_func
    gated = bool(config.gated_linear_unit)
    name = getattr(fn, "__name__", repr(fn))
    if fn is F.silu or name == "silu":
        base = "silu"
    elif fn is F.gelu or name == "gelu":
        base = "gelu_tanh" if getattr(config, "openai_gelu", False) else "gelu"
    elif name in ("quick_gelu", "squared_relu", "relu", "openai_gelu", "fast_gelu"):
        base = {"openai_gelu": "gelu_tanh", "fast_gelu": "gelu_tanh"}.get(name, name)
    else:
        base = name
    if gated:
        return {"silu": "swiglu", "gelu": "geglu"}.get(base, f"gated_{base}")
    return base


@dataclass
class ModelInfo:
    """Architecture facts of the (global, unsharded) model."""

    model_class: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    normalization: str
    norm_epsilon: float
    activation: str
    position_embedding: str
    add_bias_linear: bool
    add_qkv_bias: bool
    tied_embeddings: bool
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rope_scaling: Optional[dict] = None
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    features: dict = field(default_factory=dict)

    @property
    def attention_kind(self) -> str:
        if self.num_query_groups == self.num_attention_heads:
            return "mha"
        return "mqa" if self.num_query_groups == 1 else "gqa"


def read_model_info(chunks: list) -> ModelInfo:
    """Read the architecture of a GPTModel (all chunks share one TransformerConfig)."""
    first = chunks[0]
    config = first.config
    cls = type(first).__name__
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    head_dim = config.kv_channels or config.hidden_size // heads
    vocab = getattr(first, "vocab_size", None)
    max_pos = getattr(first, "max_sequence_length", None)
    pos = getattr(first, "position_embedding_type", "learned_absolute")

    features = {
        "model_class": cls,
        "normalization": config.normalization,
        "activation": _activation_name(config),
        "position_embedding": pos,
        "multi_latent_attention": bool(getattr(config, "multi_latent_attention", False)),
        "moe": bool(getattr(config, "num_moe_experts", None)),
        "qk_layernorm": bool(getattr(config, "qk_layernorm", False)),
        "layernorm_zero_centered_gamma": bool(getattr(config, "layernorm_zero_centered_gamma", False)),
        "residual_post_layernorm": bool(getattr(config, "apply_residual_connection_post_layernorm", False)),
        "multi_token_prediction": bool(getattr(config, "mtp_num_layers", None)),
        "heterogeneous_layers": bool(getattr(config, "heterogeneous_block_specs", False)),
        "rotary_interleaved": bool(getattr(config, "rotary_interleaved", False)),
        "query_key_layer_scaling": bool(getattr(config, "apply_query_key_layer_scaling", False)),
        "softmax_scale": getattr(config, "softmax_scale", None) is not None,
        "attention_window": getattr(config, "window_size", None) is not None,
    }
    attention_types = {type(layer.self_attention).__name__
                       for c in chunks for layer in getattr(getattr(c, "decoder", None), "layers", [])
                       if hasattr(layer, "self_attention")}
    layer_types = {type(layer).__name__
                   for c in chunks for layer in getattr(getattr(c, "decoder", None), "layers", [])}
    if features["moe"]:
        expert_types = {type(layer.mlp.experts).__name__ for c in chunks
                        for layer in getattr(getattr(c, "decoder", None), "layers", [])
                        if hasattr(getattr(layer, "mlp", None), "experts")}
        features["moe_expert_module"] = ",".join(sorted(expert_types))
        freq = getattr(config, "moe_layer_freq", 1)
        score = getattr(config, "moe_router_score_function", "softmax")
        pre_softmax = bool(getattr(config, "moe_router_pre_softmax", False))
        features.update({
            # Mixtral routing: softmax over the top-k logits (== softmax, top-k, renormalize).
            "moe_routing": ("topk_softmax" if score == "softmax" and not pre_softmax
                            else "softmax_topk" if score == "softmax" else f"{score}_topk"),
            "moe_every_layer": freq == 1 or (isinstance(freq, list) and all(freq)),
            "moe_shared_expert": getattr(config, "moe_shared_expert_intermediate_size", None) is not None,
            "moe_router_bias": bool(getattr(config, "moe_router_enable_expert_bias", False)),
            "moe_group_routing": getattr(config, "moe_router_num_groups", None) is not None,
            "moe_topk_scaling": getattr(config, "moe_router_topk_scaling_factor", None) is not None,
        })
    features["attention_module"] = ",".join(sorted(attention_types)) or "SelfAttention"
    features["layer_module"] = ",".join(sorted(layer_types)) or "TransformerLayer"

    rotary_base = float(getattr(first, "rotary_base", 10000))
    rotary_percent = float(getattr(first, "rotary_percent", 1.0))
    rope_scaling = None
    if pos == "rope":
        rope_scaling = _infer_rope_scaling(chunks, rotary_base, head_dim, rotary_percent)

    if vocab is None:
        raise UnsupportedModelError(f"model: {cls} has no vocab_size attribute; only GPTModel is supported")
    return ModelInfo(
        model_class=cls,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        ffn_hidden_size=config.ffn_hidden_size,
        padded_vocab_size=vocab,
        max_position_embeddings=max_pos,
        normalization=config.normalization,
        norm_epsilon=config.layernorm_epsilon,
        activation=features["activation"],
        position_embedding=pos,
        add_bias_linear=bool(config.add_bias_linear),
        add_qkv_bias=bool(config.add_bias_linear or getattr(config, "add_qkv_bias", False)),
        tied_embeddings=bool(getattr(first, "share_embeddings_and_output_weights", False)),
        rotary_base=rotary_base,
        rotary_percent=rotary_percent,
        rope_scaling=rope_scaling,
        num_experts=int(getattr(config, "num_moe_experts", None) or 0),
        moe_top_k=int(getattr(config, "moe_router_topk", 0) or 0) if features["moe"] else 0,
        moe_ffn_hidden_size=int(getattr(config, "moe_ffn_hidden_size", None) or 0) if features["moe"] else 0,
        features=features,
    )


def _llama3_inv_freq(base_inv: torch.Tensor, factor: float, low: float = 1.0, high: float = 4.0,
                     original: int = 8192) -> torch.Tensor:
    """Llama 3.x frequency scaling (the published formula; Megatron fixes low/high/original)."""
    wavelen = 2 * math.pi / base_inv
    low_wavelen, high_wavelen = original / low, original / high
    scaled = torch.where(wavelen > low_wavelen, base_inv / factor, base_inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _infer_rope_scaling(chunks: list, base: float, head_dim: int, percent: float) -> Optional[dict]:
    """Read RoPE scaling from the live rotary module, so the export matches what the model does.

    GPTModel keeps no record of ``rope_scaling``/``rope_scaling_factor`` after construction; its
    rotary module keeps the resulting ``inv_freq`` and the linear ``seq_len_interpolation_factor``.
    """
    rotary = next((getattr(c, "rotary_pos_emb", None) for c in chunks
                   if getattr(c, "rotary_pos_emb", None) is not None), None)
    if rotary is None:
        return None
    linear = getattr(rotary, "seq_len_interpolation_factor", None)
    inv = rotary.inv_freq.detach().to("cpu", torch.float64)
    dim = int(head_dim * percent)
    base_inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if inv.shape != base_inv.shape:
        raise UnsupportedModelError(
            f"rotary embedding: inv_freq has shape {tuple(inv.shape)}, expected {tuple(base_inv.shape)} "
            "from rotary_base/kv_channels/rotary_percent; custom rotary modules are not supported")
    scaling = None
    if torch.allclose(inv, base_inv, rtol=1e-5, atol=0):
        scaling = None
    else:
        factor = float(base_inv[-1] / inv[-1])
        candidate = _llama3_inv_freq(base_inv, factor)
        if not torch.allclose(inv, candidate, rtol=1e-4, atol=0):
            raise UnsupportedModelError(
                "rotary embedding: inv_freq matches neither plain RoPE nor Llama-3 scaling; "
                "supported RoPE variants are: none, linear (seq_len_interpolation_factor), llama3")
        scaling = {"rope_type": "llama3", "factor": round(factor, 6), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if linear:
        if scaling is not None:
            raise UnsupportedModelError("rotary embedding: llama3 scaling combined with linear "
                                        "interpolation is not supported; use one of them")
        scaling = {"rope_type": "linear", "factor": float(linear)}
    return scaling
