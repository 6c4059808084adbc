"""GPT family: LayerNorm with bias, learned absolute positions, GeLU MLP, biases everywhere.

HF class: ``GPT2LMHeadModel``. It is the transformers class with exactly these semantics
(pre-LN blocks, learned positions, one fused QKV, 4 biased linears, exact or tanh GeLU through
``activation_function``); it stores linears as Conv1D, i.e. transposed ([in, out]), which the
table below handles with ``transpose=True``. It has no GQA, hence ``attention_kind: mha``.
"""

from .conditions import TIED_EMBEDDINGS, Not
from .features import requirements
from .spec import MEGATRON_ATTENTION, MEGATRON_MLP, ArchSpec, FusedQKV, Rename, Vocab

HF_LAYER = "transformer.h.{L}"

MAPPINGS = (
    Vocab("embedding.word_embeddings.weight", dst="transformer.wte.weight"),
    Rename("embedding.position_embeddings.weight", dst="transformer.wpe.weight"),
    Rename(f"{MEGATRON_ATTENTION}.linear_qkv.layer_norm_weight", dst=f"{HF_LAYER}.ln_1.weight"),
    Rename(f"{MEGATRON_ATTENTION}.linear_qkv.layer_norm_bias", dst=f"{HF_LAYER}.ln_1.bias"),
    FusedQKV(f"{MEGATRON_ATTENTION}.linear_qkv.weight", dst=f"{HF_LAYER}.attn.c_attn.weight", transpose=True),
    FusedQKV(f"{MEGATRON_ATTENTION}.linear_qkv.bias", dst=f"{HF_LAYER}.attn.c_attn.bias"),
    Rename(f"{MEGATRON_ATTENTION}.linear_proj.weight", dst=f"{HF_LAYER}.attn.c_proj.weight", transpose=True),
    Rename(f"{MEGATRON_ATTENTION}.linear_proj.bias", dst=f"{HF_LAYER}.attn.c_proj.bias"),
    Rename(f"{MEGATRON_MLP}.linear_fc1.layer_norm_weight", dst=f"{HF_LAYER}.ln_2.weight"),
    Rename(f"{MEGATRON_MLP}.linear_fc1.layer_norm_bias", dst=f"{HF_LAYER}.ln_2.bias"),
    Rename(f"{MEGATRON_MLP}.linear_fc1.weight", dst=f"{HF_LAYER}.mlp.c_fc.weight", transpose=True),
    Rename(f"{MEGATRON_MLP}.linear_fc1.bias", dst=f"{HF_LAYER}.mlp.c_fc.bias"),
    Rename(f"{MEGATRON_MLP}.linear_fc2.weight", dst=f"{HF_LAYER}.mlp.c_proj.weight", transpose=True),
    Rename(f"{MEGATRON_MLP}.linear_fc2.bias", dst=f"{HF_LAYER}.mlp.c_proj.bias"),
    Rename("decoder.final_layernorm.weight", dst="transformer.ln_f.weight"),
    Rename("decoder.final_layernorm.bias", dst="transformer.ln_f.bias"),
    Vocab("output_layer.weight", dst="lm_head.weight", when=Not(TIED_EMBEDDINGS)),
)

ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.layer_norm_bias": ("input_layernorm.bias",),
    "mlp.linear_fc1.layer_norm_weight": ("pre_mlp_layernorm.weight",),
    "mlp.linear_fc1.layer_norm_bias": ("pre_mlp_layernorm.bias",),
}

_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


def hf_config(info, ctx, dtype: str) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": ctx.vocab_size,
        "n_embd": info.hidden_size,
        "n_layer": info.num_layers,
        "n_head": info.num_attention_heads,
        "n_inner": info.ffn_hidden_size,
        "n_positions": info.max_position_embeddings,
        "activation_function": _HF_ACT[info.activation],
        "layer_norm_epsilon": info.norm_epsilon,
        "tie_word_embeddings": info.tied_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def trtllm(info) -> dict:
    return {"layout": "gpt", "architecture": "GPTForCausalLM",
            "config": {"position_embedding_type": "learned_absolute", "bias": True,
                       "hidden_act": {"gelu": "gelu", "gelu_tanh": "gelu"}[info.activation],
                       "gpt_variant": "gpt2", "rotary_pct": 0.0}}


def _check(info):
    if info.head_dim * info.num_attention_heads != info.hidden_size:
        return ("kv_channels", info.head_dim, "GPT-2 layout needs kv_channels == hidden_size / num_attention_heads")
    return None


# Quantized GPT-2 is a TensorRT-LLM checkpoint (GPTForCausalLM, which ModelOpt also exports for
# decoder_type "gpt"): no Hugging Face loader takes a quantized GPT2LMHeadModel.
_NO_QUANTIZED_HF = (
    "no serving engine loads a quantized GPT2LMHeadModel checkpoint (its linears are Conv1D, stored "
    "[in, out]: vLLM's GPT-2 loader transposes every c_attn/c_proj/c_fc weight, which breaks quantized "
    "weights, and TensorRT-LLM's PyTorch backend and SGLang have no GPT-2 ModelOpt path); write formats: "
    "[trtllm_checkpoint] (trtllm-build, TensorRT-LLM <= 1.2: fp8, fp8_pc_pt, int8_sq, int4_awq, w4a8_awq, "
    "nvfp4), or export this model unquantized for Hugging Face (recipes/bf16.yaml)")


GPT = ArchSpec(
    name="gpt",
    requires=requirements(
        normalization={"LayerNorm"},
        activation=set(_HF_ACT),
        position_embedding={"learned_absolute"},
        attention_kind={"mha"},
        linear_bias={True},
    ),
    mappings=MAPPINGS,
    aliases=ALIASES,
    hf_config=hf_config,
    trtllm=trtllm,
    checks=(_check,),
    conv1d_linears=True,
    quantized_formats_unsupported={"hf": _NO_QUANTIZED_HF},
)
