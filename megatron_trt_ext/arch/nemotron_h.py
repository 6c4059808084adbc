"""Nemotron-H: Mamba-2 hybrids (HybridModel with ``M`` layers) -> ``NemotronHForCausalLM``, one HF
layer per pattern symbol: ``M`` Mamba-2 mixer, ``*`` attention (no RoPE, no bias), ``-``
squared-ReLU MLP. Written with the hub's names (``backbone.*``), which transformers, vLLM, SGLang
and TensorRT-LLM's PyTorch backend load.

Megatron saves a mixer's in_proj as its components (z, x, B, C, dt) and its conv1d as (x, B, C),
because each TP rank holds a slice of every component; HF's tensors are the components
concatenated in that order (`Concat`). TensorRT-LLM (<= 1.2) has no Nemotron-H engine: the
TensorRT-LLM formats are refused.
"""

from .spec import ArchSpec, Concat, QKV, Rename, Vocab, no_trtllm, requirements

E = "decoder.layers.{L}"
B = "backbone.layers.{L}"

MAPPINGS = (
    Vocab("embedding.word_embeddings.weight", dst="backbone.embeddings.weight"),
    # every block's pre-norm is one HF name; Megatron fuses it into the block's first linear
    Rename(f"{E}.mixer.in_proj.layer_norm_weight", dst=f"{B}.norm.weight", on="M"),
    Rename(f"{E}.self_attention.linear_qkv.layer_norm_weight", dst=f"{B}.norm.weight", on="*"),
    Rename(f"{E}.mlp.linear_fc1.layer_norm_weight", dst=f"{B}.norm.weight", on="-"),
    # Mamba-2 mixer
    Concat(f"{E}.mixer.in_proj.weight.{{P}}", dst=f"{B}.mixer.in_proj.weight", parts=("z", "x", "B", "C", "dt"),
           on="M"),
    Concat(f"{E}.mixer.conv1d.weight.{{P}}", dst=f"{B}.mixer.conv1d.weight", parts=("x", "B", "C"), on="M"),
    Concat(f"{E}.mixer.conv1d.bias.{{P}}", dst=f"{B}.mixer.conv1d.bias", parts=("x", "B", "C"), on="M"),
    Rename(f"{E}.mixer.A_log", dst=f"{B}.mixer.A_log", on="M"),
    Rename(f"{E}.mixer.D", dst=f"{B}.mixer.D", on="M"),
    Rename(f"{E}.mixer.dt_bias", dst=f"{B}.mixer.dt_bias", on="M"),
    Rename(f"{E}.mixer.norm.weight", dst=f"{B}.mixer.norm.weight", on="M"),
    Rename(f"{E}.mixer.out_proj.weight", dst=f"{B}.mixer.out_proj.weight", on="M"),
    # attention (no RoPE)
    QKV(f"{E}.self_attention.linear_qkv.weight", on="*",
        q=f"{B}.mixer.q_proj.weight", k=f"{B}.mixer.k_proj.weight", v=f"{B}.mixer.v_proj.weight"),
    Rename(f"{E}.self_attention.linear_proj.weight", dst=f"{B}.mixer.o_proj.weight", on="*"),
    # MLP
    Rename(f"{E}.mlp.linear_fc1.weight", dst=f"{B}.mixer.up_proj.weight", on="-"),
    Rename(f"{E}.mlp.linear_fc2.weight", dst=f"{B}.mixer.down_proj.weight", on="-"),
    Rename("decoder.final_layernorm.weight", dst="backbone.norm_f.weight"),
    Vocab("output_layer.weight", dst="lm_head.weight", required="!tied_embeddings"),
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
        "ssm_state_size": mamba["state_dim"],
        "mamba_num_heads": mamba["num_heads"],
        "mamba_head_dim": mamba["head_dim"],
        "n_groups": mamba["num_groups"],
        "conv_kernel": mamba["conv_kernel"],
        # an int for transformers; the mixers size themselves from heads x head_dim, not from this
        "expand": mamba["d_inner"] // info.hidden_size if mamba["d_inner"] % info.hidden_size == 0 else 2,
        "chunk_size": mamba["chunk_size"],
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
    if info.mamba is not None and abs(info.norm_epsilon - info.mamba["norm_epsilon"]) > 0:
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
