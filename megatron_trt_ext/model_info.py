"""What the exporter needs to know about a live Megatron-Core model, read from the model itself.

`ModelInfo` is plain data, computed once at attach time; the facts of each optional block kind are
read by its own module under `facts/`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn.functional as F

from .errors import UnsupportedModelError
from .facts.mamba import MambaFacts, read_mamba_facts
from .facts.mla import MLAFacts, read_mla_facts
from .facts.moe import MoEFacts, read_moe_facts
from .facts.rope import YarnFacts, read_rotary, read_yarn_facts


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


@dataclass(frozen=True)
class ModelInfo:
    """Architecture facts of the (global, unsharded) model, each held once.

    Block kinds a model may lack (MoE routing, multi-latent attention, Mamba mixers, YaRN of
    standard attention) are frozen records from `facts`, None when absent. Family matching reads
    these fields through `arch.features.family_features`.
    """

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
    layer_symbols: str = ""           # one symbol per target layer (see `_layer_kinds`)
    hybrid_symbols: Optional[str] = None  # HybridModel: the distinct pattern symbols, sorted
    qk_layernorm: bool = False
    zero_centered_gamma: bool = False
    sliding_window: Optional[int] = None   # HF semantics: attend to this many tokens, self included
    sliding_window_layers: Optional[list] = None  # per target layer: True where the window applies
    embedding_multiplier: Optional[float] = None  # MuP's embedding multiplier (None: no MuP)
    mtp_num_layers: int = 0           # multi-token-prediction layers this export writes (GPT layout)
    multi_token_prediction: bool = False  # the model has MTP layers (of any layout) still exported
    # the modules' class names (comma-joined, pooled over pipeline ranks: `merge_module_facts`)
    attention_module: str = "SelfAttention"
    layer_module: str = "TransformerLayer"
    # what no family handles unless it says so (`arch.features.STANDARD`)
    residual_post_layernorm: bool = False
    heterogeneous_layers: bool = False
    rotary_interleaved: bool = False
    query_key_layer_scaling: bool = False
    custom_softmax_scale: bool = False  # other than 1/sqrt(head_dim) (MuP sets that one explicitly)
    mup_output_scale: bool = False
    softmax_type: str = "vanilla"
    glu_linear_offset: float = 0.0
    activation_clamp: Optional[float] = None
    moe: Optional[MoEFacts] = None
    mla: Optional[MLAFacts] = None
    mamba: Optional[MambaFacts] = None
    yarn: Optional[YarnFacts] = None

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
    pos = getattr(first, "position_embedding_type", "learned_absolute")
    symbols, mtp_pattern = hybrid_pattern(first) if cls in HYBRID_CLASSES else ("", None)
    source_layout = _source_layout(cls, symbols)
    layers = _source_layers(chunks)
    has_moe = bool(getattr(config, "num_moe_experts", None)) and (not symbols or "E" in symbols)
    mtp_layers = int(getattr(config, "mtp_num_layers", None) or 0) if source_layout == "gpt" else 0
    kinds = _layer_kinds(config, source_layout, symbols, has_moe, mtp_layers)
    # HybridModel's MLP layers hold an IdentityOp where attention would be
    attention_types = {type(layer.self_attention).__name__ for layer in layers
                       if hasattr(layer, "self_attention")} - ({"IdentityOp"} if symbols else set())
    # A HybridModel's MLP, MoE and Mamba layers are the standard classes for their symbols.
    layer_types = {type(layer).__name__ for layer in layers}
    layer_types -= {"MLPLayer", "MoETransformerLayer", "MambaLayer"} if symbols else set()
    rotary_base, rotary_percent, rope_scaling = read_rotary(chunks, head_dim, pos)
    if vocab is None:
        raise UnsupportedModelError(f"model: {cls} has no vocab_size attribute; only GPTModel and HybridModel "
                                    "are supported")
    num_layers = len(kinds) - mtp_layers
    window, window_layers = _sliding_window(config, num_layers)
    use_mup = bool(getattr(config, "use_mup", False))
    moe_size = (lambda name: int(getattr(config, name, None) or 0) if has_moe else 0)
    return ModelInfo(
        model_class=cls,
        num_layers=num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        ffn_hidden_size=config.ffn_hidden_size,
        padded_vocab_size=vocab,
        max_position_embeddings=getattr(first, "max_sequence_length", None),
        normalization=config.normalization,
        norm_epsilon=config.layernorm_epsilon,
        activation=_activation_name(config),
        position_embedding=pos,
        add_bias_linear=bool(config.add_bias_linear),
        add_qkv_bias=bool(config.add_bias_linear or getattr(config, "add_qkv_bias", False)),
        tied_embeddings=bool(getattr(first, "share_embeddings_and_output_weights", False)),
        rotary_base=rotary_base,
        rotary_percent=rotary_percent,
        rope_scaling=rope_scaling,
        num_experts=moe_size("num_moe_experts"),
        moe_top_k=moe_size("moe_router_topk"),
        moe_ffn_hidden_size=moe_size("moe_ffn_hidden_size"),
        source_layout=source_layout,
        layer_symbols=kinds,
        hybrid_symbols="".join(sorted(set(symbols))) or None,
        qk_layernorm=bool(getattr(config, "qk_layernorm", False)),
        zero_centered_gamma=bool(getattr(config, "layernorm_zero_centered_gamma", False)),
        sliding_window=window,
        sliding_window_layers=window_layers,
        embedding_multiplier=float(getattr(config, "mup_embedding_mult", 1.0)) if use_mup else None,
        mtp_num_layers=mtp_layers,
        multi_token_prediction=bool(getattr(config, "mtp_num_layers", None)) or mtp_pattern is not None,
        attention_module=",".join(sorted(attention_types)) or ("none" if symbols else "SelfAttention"),
        layer_module=",".join(sorted(layer_types)) or "TransformerLayer",
        residual_post_layernorm=bool(getattr(config, "apply_residual_connection_post_layernorm", False)),
        heterogeneous_layers=bool(getattr(config, "heterogeneous_block_specs", False)),
        rotary_interleaved=bool(getattr(config, "rotary_interleaved", False)),
        query_key_layer_scaling=bool(getattr(config, "apply_query_key_layer_scaling", False)),
        custom_softmax_scale=getattr(config, "softmax_scale", None) is not None and abs(
            config.softmax_scale * head_dim ** 0.5 - 1) > 1e-6,
        mup_output_scale=use_mup and abs(float(getattr(config, "mup_output_mult", 1.0) or 1.0) - 1) > 1e-12,
        softmax_type=getattr(config, "softmax_type", "vanilla"),
        glu_linear_offset=float(getattr(config, "glu_linear_offset", 0.0) or 0.0),
        activation_clamp=getattr(config, "activation_func_clamp_value", None),
        moe=read_moe_facts(config, layers) if has_moe else None,
        mla=read_mla_facts(config) if getattr(config, "multi_latent_attention", False) else None,
        mamba=read_mamba_facts(layers),
        yarn=read_yarn_facts(config) if pos == "yarn" else None,
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


def module_facts(info: ModelInfo) -> dict:
    """What a rank read from its own modules (they differ between pipeline stages)."""
    return {"attention_module": info.attention_module, "layer_module": info.layer_module,
            "moe_expert_module": info.moe.expert_module if info.moe is not None else None, "mamba": info.mamba}


def merge_module_facts(info: ModelInfo, all_facts: list) -> ModelInfo:
    """``info`` with the module facts of every rank pooled (class names united, sizes taken from
    a rank that has the module)."""
    def pooled(key: str, own: str) -> str:
        names = {n for facts in all_facts for n in (facts[key] or "").split(",") if n}
        names.discard("none")
        return ",".join(sorted(names)) or own

    moe = info.moe
    if moe is not None:
        moe = dataclasses.replace(moe, expert_module=pooled("moe_expert_module", moe.expert_module))
    mamba = info.mamba or next((facts["mamba"] for facts in all_facts if facts["mamba"]), None)
    return dataclasses.replace(info, attention_module=pooled("attention_module", info.attention_module),
                               layer_module=pooled("layer_module", info.layer_module), moe=moe, mamba=mamba)


def drop_mtp_layers(info: ModelInfo) -> ModelInfo:
    """``info`` without its multi-token-prediction layers (``drop_mtp``)."""
    return dataclasses.replace(info, mtp_num_layers=0, layer_symbols=info.decoder_kinds, multi_token_prediction=False)


def _source_layers(chunks: list) -> list:
    return [layer for c in chunks for layer in getattr(getattr(c, "decoder", None), "layers", [])]


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
