"""Nemotron-H: Mamba-2 hybrids (HybridModel with ``M`` layers) -> ``NemotronHForCausalLM``, one HF
layer per pattern symbol: ``M`` Mamba-2 mixer, ``*`` attention (no RoPE, no bias), ``-``
squared-ReLU MLP. Written with the hub's names (``backbone.*``), which transformers, vLLM, SGLang
and TensorRT-LLM's PyTorch backend load.

Megatron saves a mixer's in_proj as its components (z, x, B, C, dt) and its conv1d as (x, B, C),
because each TP rank holds a slice of every component; HF's tensors are the components
concatenated in that order (`Concat`). TensorRT-LLM (<= 1.2) has no Nemotron-H engine: the
TensorRT-LLM formats are refused.
"""

from .conditions import ATTENTION_LAYERS, MAMBA_LAYERS, MLP_LAYERS, TIED_EMBEDDINGS, Not
from .features import requirements
from .spec import MEGATRON_ATTENTION, MEGATRON_LAYER, MEGATRON_MLP, QKV, ArchSpec, Concat, Rename, Vocab, no_trtllm

MIXER = f"{MEGATRON_LAYER}.mixer"
HF_LAYER = "backbone.layers.{L}"
HF_MIXER = f"{HF_LAYER}.mixer"  # every HF block's module is its mixer, whatever its kind


def _in_proj_sizes(info) -> tuple:
    """z, x (the inner width each), B, C (groups x state each), dt (one per head)."""
    m = info.mamba
    return (m.d_inner, m.d_inner, m.num_groups * m.state_dim, m.num_groups * m.state_dim, m.num_heads)


def _conv1d_sizes(info) -> tuple:
    """x, B, C: the channels the causal convolution runs over."""
    m = info.mamba
    return (m.d_inner, m.num_groups * m.state_dim, m.num_groups * m.state_dim)


MAPPINGS = (
    Vocab("embedding.word_embeddings.weight", dst="backbone.embeddings.weight"),
    # every block's pre-norm is one HF name; Megatron fuses it into the block's first linear
    Rename(f"{MIXER}.in_proj.layer_norm_weight", dst=f"{HF_LAYER}.norm.weight", on=MAMBA_LAYERS),
    Rename(f"{MEGATRON_ATTENTION}.linear_qkv.layer_norm_weight", dst=f"{HF_LAYER}.norm.weight", on=ATTENTION_LAYERS),
    Rename(f"{MEGATRON_MLP}.linear_fc1.layer_norm_weight", dst=f"{HF_LAYER}.norm.weight", on=MLP_LAYERS),
    # Mamba-2 mixer
    Concat(f"{MIXER}.in_proj.weight.{{P}}", dst=f"{HF_MIXER}.in_proj.weight", parts=("z", "x", "B", "C", "dt"),
           on=MAMBA_LAYERS, sizes=_in_proj_sizes),
    Concat(f"{MIXER}.conv1d.weight.{{P}}", dst=f"{HF_MIXER}.conv1d.weight", parts=("x", "B", "C"), on=MAMBA_LAYERS,
           sizes=_conv1d_sizes),
    Concat(f"{MIXER}.conv1d.bias.{{P}}", dst=f"{HF_MIXER}.conv1d.bias", parts=("x", "B", "C"), on=MAMBA_LAYERS,
           sizes=_conv1d_sizes),
    *(Rename(f"{MIXER}.{name}", dst=f"{HF_MIXER}.{name}", on=MAMBA_LAYERS)
      for name in ("A_log", "D", "dt_bias", "norm.weight", "out_proj.weight")),
    # attention (no RoPE)
    QKV(f"{MEGATRON_ATTENTION}.linear_qkv.weight", on=ATTENTION_LAYERS,
        q=f"{HF_MIXER}.q_proj.weight", k=f"{HF_MIXER}.k_proj.weight", v=f"{HF_MIXER}.v_proj.weight"),
    Rename(f"{MEGATRON_ATTENTION}.linear_proj.weight", dst=f"{HF_MIXER}.o_proj.weight", on=ATTENTION_LAYERS),
    # MLP
    Rename(f"{MEGATRON_MLP}.linear_fc1.weight", dst=f"{HF_MIXER}.up_proj.weight", on=MLP_LAYERS),
    Rename(f"{MEGATRON_MLP}.linear_fc2.weight", dst=f"{HF_MIXER}.down_proj.weight", on=MLP_LAYERS),
    Rename("decoder.final_layernorm.weight", dst="backbone.norm_f.weight"),
    Vocab("output_layer.weight", dst="lm_head.weight", when=Not(TIED_EMBEDDINGS)),
)

# (a Mamba layer's own norm is not aliased: "norm.weight" would also match the mixer's gated norm;
# the sharded state dict names it mixer.in_proj.layer_norm_weight anyway)
ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    "mlp.linear_fc1.layer_norm_weight": ("pre_mlp_layernorm.weight",),
}

_BLOCK_TYPES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
_HF5_BLOCK_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def hf_config(info, ctx, dtype: str) -> dict:
    mamba = info.mamba
    symbols = info.layer_symbols
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": ctx.vocab_size,
        "hidden_size": info.hidden_size,
        # transformers >= 5 reads layers_block_type; the hub's (and 4.x's, vLLM's) configs the pattern
        "layers_block_type": [_HF5_BLOCK_TYPES[s] for s in symbols],
        "hybrid_override_pattern": symbols,
        "num_hidden_layers": len(symbols),
        "tie_word_embeddings": info.tied_embeddings,
        "num_attention_heads": info.num_attention_heads,
        "num_key_value_heads": info.num_query_groups,
        "head_dim": info.head_dim,
        "max_position_embeddings": info.max_position_embeddings,
        "attention_bias": False,
        "intermediate_size": info.ffn_hidden_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "ssm_state_size": mamba.state_dim,
        "mamba_num_heads": mamba.num_heads,
        "mamba_head_dim": mamba.head_dim,
        "n_groups": mamba.num_groups,
        "conv_kernel": mamba.conv_kernel,
        # an int for transformers; the mixers size themselves from heads x head_dim, not from this
        "expand": mamba.d_inner // info.hidden_size if mamba.d_inner % info.hidden_size == 0 else 2,
        "chunk_size": mamba.chunk_size,
        "mamba_hidden_act": "silu",
        "use_conv_bias": True,
        "mamba_proj_bias": False,
        "use_bias": False,
        # Megatron applies no lower clamp to the SSM step; HF clamps it at time_step_min (also the
        # log-uniform init's lower end, so 0 would break initialisation): 1e-9 changes no step
        # that matters (softplus(x) < 1e-9 needs x < -20.7)
        "time_step_min": 1e-9,
        "layer_norm_epsilon": info.norm_epsilon,
        "residual_in_fp32": False,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def _trtllm_unsupported(info):
    return ("TensorRT-LLM (<= 1.2) has no Nemotron-H engine (its TensorRT backend has no hybrid Mamba model; "
            "the PyTorch backend loads the HF checkpoint)")


def _check(info):
    if info.mamba is not None and abs(info.norm_epsilon - info.mamba.norm_epsilon) > 0:
        return ("layernorm_epsilon", info.norm_epsilon,
                "Nemotron-H uses one epsilon for every norm, and Megatron's Mamba mixer norm fixes 1e-5")
    if info.add_qkv_bias or info.add_bias_linear:
        return ("add_bias_linear", True, "Nemotron-H's attention and MLP have no biases")
    return None


_NO_REPLICA_CALIBRATION = (
    "SmoothQuant/AWQ exports of Mamba hybrids are not supported (their per-channel scales would span the "
    "components of a mixer's in_proj, and ModelOpt has no SmoothQuant/AWQ recipe for Mamba mixers); use fp8, "
    "nvfp4, mixed precision or a weight-only recipe")


NEMOTRON_H = ArchSpec(
    name="nemotron_h",
    requires=requirements(
        model_class={"HybridModel", "MambaModel"},
        source_layout={"hybrid_per_layer"},
        layer_module={"TransformerLayer"},
        attention_module={"SelfAttention", "none"},
        mamba={True, False},
        hybrid_symbols={"M", "*M", "-M", "*-M", "*-", "*", "-"},
        normalization={"RMSNorm"},
        activation={"squared_relu"},
        position_embedding={"none"},
    ),
    mappings=MAPPINGS,
    aliases=ALIASES,
    hf_config=hf_config,
    trtllm=no_trtllm,
    checks=(_check,),
    trtllm_unsupported=_trtllm_unsupported,
    calibration_unsupported={kind: _NO_REPLICA_CALIBRATION for kind in ("smoothquant", "awq")},
)
