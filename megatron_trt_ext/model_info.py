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
                f"model: {type(chunk).__name__} is not a Megatron-Core GPTModel or HybridModel (nor a "
                "DDP/Float16Module wrapper of one, nor a list of such chunks); pass the model you hand to the "
                "optimizer")
        out.append(chunk)
    return out


def _activation_name(config) -> str:
    """The activation the MLP really computes (gated variants named after their GLU)."""
    import functools

    import torch.nn.functional as F

    fn = config.activation_func
    gated = bool(config.gated_linear_unit)
    keywords = {}
    if isinstance(fn, functools.partial):
        fn, keywords = fn.func, dict(fn.keywords or {})
    name = getattr(fn, "__name__", repr(fn))
    if fn is F.silu or name == "silu":
        base = "silu"
    elif fn is F.gelu or name == "gelu":
        # Megatron's fused bias-GeLU (bias_activation_fusion) is the tanh approximation.
        tanh = keywords.get("approximate") == "tanh" or bool(getattr(config, "bias_activation_fusion", False))
        base = "gelu_tanh" if tanh or getattr(config, "openai_gelu", False) else "gelu"
    elif name in ("quick_gelu", "squared_relu", "relu", "openai_gelu", "fast_gelu"):
        base = {"openai_gelu": "gelu_tanh", "fast_gelu": "gelu_tanh"}.get(name, name)
    else:
        base = name
    if gated:
        return {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}.get(base, f"gated_{base}")
    return base


HYBRID_CLASSES = ("HybridModel", "MambaModel")


def hybrid_pattern(chunk) -> tuple:
    """(main layer symbols, MTP pattern or None) of a HybridModel: ``|`` (pipeline segments) removed."""
    pattern = getattr(chunk, "hybrid_layer_pattern", None) or getattr(chunk, "hybrid_override_pattern", None) or ""
    main, _, mtp = pattern.partition("/")
    return main.replace("|", ""), (mtp or None)


def _source_layout(cls: str, symbols: str) -> str:
    """How source layers map to target layers: ``gpt`` (one GPT layer each), ``hybrid_paired``
    (a HybridModel whose pattern is attention + MLP/MoE pairs: GPT layer i = hybrid layers 2i and
    2i+1), ``hybrid_per_layer`` (anything else: one target layer per pattern symbol)."""
    if cls not in HYBRID_CLASSES:
        return "gpt"
    if not symbols:
        raise UnsupportedModelError(f"model: {cls} without a hybrid_layer_pattern (or hybrid_override_pattern); "
                                    "build it with one")
    pairs = [symbols[i:i + 2] for i in range(0, len(symbols), 2)]
    if symbols and len(symbols) % 2 == 0 and all(p in ("*-", "*E") for p in pairs):
        return "hybrid_paired"
    return "hybrid_per_layer"


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
    source_layout: str = "gpt"
    layer_symbols: str = ""           # HybridModel: one pattern symbol per source layer
    qk_layernorm: bool = False
    zero_centered_gamma: bool = False
    sliding_window: Optional[int] = None   # HF semantics: attend to this many tokens, self included
    sliding_window_layers: Optional[list] = None  # per target layer: True where the window applies
    embedding_multiplier: Optional[float] = None
    mamba: Optional[dict] = None
    moe: Optional[dict] = None     # routing facts (score function, groups, bias, scaling, shared experts)
    mla: Optional[dict] = None     # multi-latent attention dims and its RoPE (YaRN) settings
    yarn: Optional[dict] = None    # YaRN RoPE of standard attention (position_embedding_type "yarn")
    mtp_num_layers: int = 0
    features: dict = field(default_factory=dict)

    # predicates that family tables name in ``required=``
    @property
    def mla_q_lora(self) -> bool:
        return bool(self.mla and self.mla.get("q_lora_rank"))

    @property
    def moe_router_bias(self) -> bool:
        return bool(self.moe and self.moe["router_bias"])

    @property
    def moe_shared_experts(self) -> bool:
        return bool(self.moe and self.moe["shared_size"])

    @property
    def decoder_kinds(self) -> str:
        """Per decoder layer (MTP layers excluded): the layer symbols in upper case."""
        return "".join(k for k in self.layer_symbols if not k.islower())

    @property
    def attention_kind(self) -> str:
        if self.num_query_groups == self.num_attention_heads:
            return "mha"
        return "mqa" if self.num_query_groups == 1 else "gqa"


def read_model_info(chunks: list) -> ModelInfo:
    """Read the architecture of a GPTModel or HybridModel (all chunks share one TransformerConfig)."""
    first = chunks[0]
    config = first.config
    cls = type(first).__name__
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    head_dim = config.kv_channels or config.hidden_size // heads
    vocab = getattr(first, "vocab_size", None)
    max_pos = getattr(first, "max_sequence_length", None)
    pos = getattr(first, "position_embedding_type", "learned_absolute")
    symbols, mtp_pattern = hybrid_pattern(first) if cls in HYBRID_CLASSES else ("", None)
    source_layout = _source_layout(cls, symbols)
    layers = _source_layers(chunks)
    has_moe = bool(getattr(config, "num_moe_experts", None)) and (not symbols or "E" in symbols)
    mtp_layers = int(getattr(config, "mtp_num_layers", None) or 0) if source_layout == "gpt" else 0
    kinds = _layer_kinds(config, source_layout, symbols, has_moe, mtp_layers)

    features = {
        "model_class": cls,
        "source_layout": source_layout,
        "normalization": config.normalization,
        "activation": _activation_name(config),
        "position_embedding": pos,
        "multi_latent_attention": bool(getattr(config, "multi_latent_attention", False)),
        "moe": has_moe,
        "mamba": "M" in symbols,
        "hybrid_symbols": "".join(sorted(set(symbols))) or None,
        "qk_layernorm": bool(getattr(config, "qk_layernorm", False)),
        "layernorm_zero_centered_gamma": bool(getattr(config, "layernorm_zero_centered_gamma", False)),
        "residual_post_layernorm": bool(getattr(config, "apply_residual_connection_post_layernorm", False)),
        "multi_token_prediction": bool(getattr(config, "mtp_num_layers", None)) or mtp_pattern is not None,
        "heterogeneous_layers": bool(getattr(config, "heterogeneous_block_specs", False)),
        "rotary_interleaved": bool(getattr(config, "rotary_interleaved", False)),
        "query_key_layer_scaling": bool(getattr(config, "apply_query_key_layer_scaling", False)),
        # a scale other than the standard 1/sqrt(head_dim) (MuP sets the standard one explicitly)
        "softmax_scale": getattr(config, "softmax_scale", None) is not None and abs(
            config.softmax_scale * head_dim ** 0.5 - 1) > 1e-6,
        "mup_output_scale": abs(float(getattr(config, "mup_output_mult", 1.0) or 1.0) - 1) > 1e-12
        if getattr(config, "use_mup", False) else False,
        "attention_window": getattr(config, "window_size", None) is not None,
        "embedding_multiplier": bool(getattr(config, "use_mup", False)),
        "softmax_type": getattr(config, "softmax_type", "vanilla"),
        "glu_linear_offset": float(getattr(config, "glu_linear_offset", 0.0) or 0.0),
        "activation_clamp": getattr(config, "activation_func_clamp_value", None),
    }
    # HybridModel's MLP layers hold an IdentityOp where attention would be
    attention_types = {type(layer.self_attention).__name__ for layer in layers
                       if hasattr(layer, "self_attention")} - ({"IdentityOp"} if symbols else set())
    layer_types = {type(layer).__name__ for layer in layers}
    if has_moe:
        expert_types = {type(layer.mlp.experts).__name__ for layer in layers
                        if hasattr(getattr(layer, "mlp", None), "experts")}
        features["moe_expert_module"] = ",".join(sorted(expert_types))
        score = getattr(config, "moe_router_score_function", "softmax")
        pre_softmax = bool(getattr(config, "moe_router_pre_softmax", False))
        every_layer = set(kinds.upper()) == {"E"}
        features.update({
            # Mixtral routing: softmax over the top-k logits (== softmax, top-k, renormalize).
            "moe_routing": ("topk_softmax" if score == "softmax" and not pre_softmax
                            else "softmax_topk" if score == "softmax" else f"{score}_topk"),
            "moe_every_layer": every_layer,
            "moe_shared_expert": getattr(config, "moe_shared_expert_intermediate_size", None) is not None,
            "moe_router_bias": bool(getattr(config, "moe_router_enable_expert_bias", False)),
            "moe_group_routing": getattr(config, "moe_router_num_groups", None) is not None,
            "moe_topk_scaling": getattr(config, "moe_router_topk_scaling_factor", None) is not None,
        })
    features["attention_module"] = ",".join(sorted(attention_types)) or ("none" if symbols else "SelfAttention")
    # A HybridModel's MLP, MoE and Mamba layers are the standard classes for their symbols.
    layer_types -= {"MLPLayer", "MoETransformerLayer", "MambaLayer"} if symbols else set()
    features["layer_module"] = ",".join(sorted(layer_types)) or "TransformerLayer"

    rotary = next((getattr(c, "rotary_pos_emb", None) for c in chunks
                   if getattr(c, "rotary_pos_emb", None) is not None), None)
    rotary_base = float(getattr(first, "rotary_base", 0) or 0) or None
    rotary_percent = float(getattr(first, "rotary_percent", 0) or 0) or None
    if rotary is not None and (rotary_base is None or rotary_percent is None):
        # HybridModel keeps neither: read them back from the rotary module's frequencies.
        rotary_base, rotary_percent = _rotary_from_inv_freq(rotary, head_dim)
    rotary_base = rotary_base or 10000.0
    rotary_percent = rotary_percent or 1.0
    rope_scaling = None
    if pos == "rope":
        rope_scaling = _infer_rope_scaling(chunks, rotary_base, head_dim, rotary_percent)

    if vocab is None:
        raise UnsupportedModelError(f"model: {cls} has no vocab_size attribute; only GPTModel and HybridModel "
                                    "are supported")
    num_layers = len(kinds) - mtp_layers
    window, window_layers = _sliding_window(config, num_layers)
    return ModelInfo(
        model_class=cls,
        num_layers=num_layers,
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
        num_experts=int(getattr(config, "num_moe_experts", None) or 0) if has_moe else 0,
        moe_top_k=int(getattr(config, "moe_router_topk", 0) or 0) if has_moe else 0,
        moe_ffn_hidden_size=int(getattr(config, "moe_ffn_hidden_size", None) or 0) if has_moe else 0,
        source_layout=source_layout,
        layer_symbols=kinds,
        qk_layernorm=features["qk_layernorm"],
        zero_centered_gamma=features["layernorm_zero_centered_gamma"],
        sliding_window=window,
        sliding_window_layers=window_layers,
        embedding_multiplier=(float(getattr(config, "mup_embedding_mult", 1.0))
                              if features["embedding_multiplier"] else None),
        mamba=_mamba_info(layers) if any(hasattr(layer, "mixer") for layer in layers) else None,
        moe=_moe_info(config) if has_moe else None,
        mla=_mla_info(config) if features["multi_latent_attention"] else None,
        yarn=_yarn_info(config) if pos == "yarn" else None,
        mtp_num_layers=mtp_layers,
        features=features,
    )


def _layer_kinds(config, source_layout: str, symbols: str, has_moe: bool, mtp_layers: int) -> str:
    """One symbol per target layer: a HybridModel's own pattern symbols (one layer each), or for
    GPT blocks ``D`` (dense MLP) / ``E`` (MoE), in lower case for the MTP layers that follow."""
    if source_layout == "hybrid_per_layer":
        return symbols
    if source_layout == "hybrid_paired":
        return "".join("E" if symbols[i + 1] == "E" else "D" for i in range(0, len(symbols), 2))
    n = config.num_layers
    if not has_moe:
        kinds = "D" * n
    else:
        freq = getattr(config, "moe_layer_freq", 1)
        if isinstance(freq, int):
            kinds = "".join("E" if i % freq == 0 else "D" for i in range(n))
        else:
            kinds = "".join("E" if f else "D" for f in list(freq)[:n])
    # MTP layers reuse the last decoder layer's spec (Megatron's get_gpt_mtp_block_spec)
    return kinds + kinds[-1].lower() * mtp_layers


def _moe_info(config) -> dict:
    scaling = getattr(config, "moe_router_topk_scaling_factor", None)
    return {
        "score": getattr(config, "moe_router_score_function", "softmax"),
        "pre_softmax": bool(getattr(config, "moe_router_pre_softmax", False)),
        "topk": int(config.moe_router_topk),
        "scaling": float(scaling) if scaling is not None else 1.0,
        "num_groups": getattr(config, "moe_router_num_groups", None),
        "group_topk": getattr(config, "moe_router_group_topk", None),
        "expert_bias": bool(getattr(config, "moe_router_enable_expert_bias", False)),
        "shared_size": getattr(config, "moe_shared_expert_intermediate_size", None),
        "shared_gate": bool(getattr(config, "moe_shared_expert_gate", False)),
        "router_bias": bool(config.add_bias_linear),
    }


def _mla_info(config) -> dict:
    names = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
             "rotary_base", "rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim")
    return {name: getattr(config, name, None) for name in names}


def yarn_concentration(factor, mscale=None, mscale_all_dim=None) -> float:
    """Megatron's YaRN cos/sin factor (its "concentration factor")."""
    def get(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale is None or mscale_all_dim is None:
        return get(factor)
    return float(get(factor, mscale) / get(factor, mscale_all_dim))


def _yarn_info(config) -> dict:
    """YaRN of standard attention: Megatron reads it from ``yarn_*`` attributes set on the config."""
    names = ("rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "correction_range_round_to_int")
    return {name: getattr(config, f"yarn_{name}", None) for name in names}


_MODULE_FEATURES = ("attention_module", "layer_module", "moe_expert_module")


def module_facts(info: ModelInfo) -> dict:
    """What a rank read from its own modules (they differ between pipeline stages)."""
    return {"features": {k: info.features.get(k) for k in _MODULE_FEATURES}, "mamba": info.mamba}


def merge_module_facts(info: ModelInfo, all_facts: list) -> ModelInfo:
    """``info`` with the module facts of every rank pooled (class names united, sizes taken from
    a rank that has the module)."""
    import dataclasses

    features = dict(info.features)
    for key in _MODULE_FEATURES:
        names = {n for facts in all_facts for n in (facts["features"].get(key) or "").split(",") if n}
        names.discard("none")
        if key in features:
            features[key] = ",".join(sorted(names)) or features[key]
    mamba = info.mamba or next((facts["mamba"] for facts in all_facts if facts["mamba"]), None)
    return dataclasses.replace(info, features=features, mamba=mamba)


def drop_mtp_layers(info: ModelInfo) -> ModelInfo:
    """``info`` without its multi-token-prediction layers (``drop_mtp``)."""
    import dataclasses

    features = {**info.features, "multi_token_prediction": False}
    return dataclasses.replace(info, mtp_num_layers=0, layer_symbols=info.decoder_kinds, features=features)


def _source_layers(chunks: list) -> list:
    return [layer for c in chunks for layer in getattr(getattr(c, "decoder", None), "layers", [])]


def _rotary_from_inv_freq(rotary, head_dim: int) -> tuple:
    """(base, percent) that reproduce the rotary module's ``inv_freq`` exactly (float32, as
    Megatron computes it); round values are preferred, so 10000 is not read as 9999.98."""
    inv = rotary.inv_freq.detach().to("cpu", torch.float32)
    dim = 2 * inv.numel()
    percent = dim / head_dim
    if inv.numel() < 2:
        return 10000.0, percent
    estimate = float(inv[1].double() ** (-dim / 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    candidates = [estimate] + [float(f"{estimate:.{digits}g}") for digits in range(1, 8)]
    for candidate in sorted(set(candidates), key=lambda c: (len(repr(c)), c)):
        if torch.equal(1.0 / (candidate ** exponents), inv):
            return candidate, percent
    return estimate, percent


def _sliding_window(config, num_layers: int) -> tuple:
    """Megatron's ``window_size=(left, right)`` attends to left+1 tokens (self included): HF's
    ``sliding_window`` is that count. Per layer: ``window_attn_skip_freq`` (int N: every Nth layer
    attends fully; list: 1 marks a windowed layer)."""
    window = getattr(config, "window_size", None)
    if window is None:
        return None, None
    left, right = window
    if right not in (0, None) or left is None or left < 0:
        raise UnsupportedModelError(f"window_size={tuple(window)}: only causal windows (left, 0) export; "
                                    "supported: (W-1, 0) for a W-token sliding window")
    skip = getattr(config, "window_attn_skip_freq", None)
    if skip is None:
        layers = [True] * num_layers
    elif isinstance(skip, int):
        layers = [(i + 1) % skip != 0 for i in range(num_layers)]
    else:
        layers = [bool(x) for x in list(skip)[:num_layers]]
    return int(left) + 1, layers


def _mamba_info(layers: list) -> dict:
    """The global sizes of the Mamba-2 mixers (megatron keeps them global; per-rank sizes are
    the ``*_local_tp`` ones)."""
    mixer = next(layer.mixer for layer in layers if hasattr(layer, "mixer"))
    return {"d_inner": int(mixer.d_inner), "num_heads": int(mixer.nheads), "head_dim": int(mixer.headdim),
            "num_groups": int(mixer.ngroups), "state_dim": int(mixer.d_state), "conv_kernel": int(mixer.d_conv),
            "chunk_size": int(getattr(mixer, "chunk_size", 128)),
            "norm_epsilon": 1e-5}  # Megatron's gated mixer norm fixes its epsilon at 1e-5


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
