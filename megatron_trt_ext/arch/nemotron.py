"""Nemotron-3/4 (and the GPT-Next / Nemotron GPT models): LayerNorm with zero-centred gamma
(LayerNorm1P: the stored weight w is applied as 1 + w), a squared-ReLU non-gated MLP, RoPE on a
leading fraction of each head (``rotary_percent``), GQA.

HF class: ``NemotronForCausalLM``, whose norm stores the same zero-centred w (a plain copy, no +1).
TensorRT-LLM (<= 1.2): ``NemotronForCausalLM`` = its ``GPTForCausalLM`` with ``gpt_variant:
nemotron``; its LayerNorm is plain, so the +1 is added to every norm weight there.
"""

from . import llama
from .conditions import LINEAR_BIAS
from .features import requirements
from .spec import MEGATRON_ATTENTION, MEGATRON_MLP, ArchSpec, Rename

HF_LAYER = llama.HF_LAYER

# LayerNorm (not RMSNorm): the biases of both pre-norms and of the final norm
NORM_BIASES = (
    Rename(f"{MEGATRON_ATTENTION}.linear_qkv.layer_norm_bias", dst=f"{HF_LAYER}.input_layernorm.bias"),
    Rename(f"{MEGATRON_MLP}.linear_fc1.layer_norm_bias", dst=f"{HF_LAYER}.post_attention_layernorm.bias"),
    Rename("decoder.final_layernorm.bias", dst="model.norm.bias"),
)
# a plain (non-gated) MLP
MLP = (
    Rename(f"{MEGATRON_MLP}.linear_fc1.weight", dst=f"{HF_LAYER}.mlp.up_proj.weight"),
    Rename(f"{MEGATRON_MLP}.linear_fc1.bias", dst=f"{HF_LAYER}.mlp.up_proj.bias", when=LINEAR_BIAS),
    Rename(f"{MEGATRON_MLP}.linear_fc2.weight", dst=f"{HF_LAYER}.mlp.down_proj.weight"),
    Rename(f"{MEGATRON_MLP}.linear_fc2.bias", dst=f"{HF_LAYER}.mlp.down_proj.bias", when=LINEAR_BIAS),
)
# Llama's attention block (biases where the model has them), embedding and output head
MAPPINGS = (llama.EMBEDDING, *llama.ATTENTION_BLOCK, *NORM_BIASES, *MLP, llama.FINAL_NORM, llama.OUTPUT_LAYER,
            llama.ROTARY_FREQUENCIES)

ALIASES = {
    **llama.ALIASES,
    "self_attention.linear_qkv.layer_norm_bias": ("input_layernorm.bias",),
    "mlp.linear_fc1.layer_norm_bias": ("pre_mlp_layernorm.bias",),
}


def hf_config(info, ctx, dtype: str) -> dict:
    rope = {"rope_type": "default", "rope_theta": info.rotary_base, "partial_rotary_factor": info.rotary_percent}
    return {
        "architectures": ["NemotronForCausalLM"],
        "model_type": "nemotron",
        "vocab_size": ctx.vocab_size,
        "hidden_size": info.hidden_size,
        "intermediate_size": info.ffn_hidden_size,
        "num_hidden_layers": info.num_layers,
        "num_attention_heads": info.num_attention_heads,
        "num_key_value_heads": info.num_query_groups,
        "head_dim": info.head_dim,
        "hidden_act": "relu2",
        "max_position_embeddings": info.max_position_embeddings,
        "norm_eps": info.norm_epsilon,
        "tie_word_embeddings": info.tied_embeddings,
        "attention_bias": info.add_qkv_bias,
        "mlp_bias": info.add_bias_linear,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        # transformers >= 5 reads rope_parameters; 4.x (and TensorRT-LLM's converter) the flat keys
        "rope_parameters": rope,
        "rope_theta": info.rotary_base,
        "partial_rotary_factor": info.rotary_percent,
    }


def trtllm(info) -> dict:
    return {"layout": "gpt_nemotron", "architecture": "NemotronForCausalLM",
            "config": {"gpt_variant": "nemotron", "position_embedding_type": "rope_gpt_neox",
                       "rotary_base": info.rotary_base, "rotary_pct": info.rotary_percent,
                       "hidden_act": "squared-relu", "bias": info.add_bias_linear}}


def _check(info):
    if info.add_qkv_bias != info.add_bias_linear:
        return ("add_qkv_bias", info.add_qkv_bias, "Nemotron biases every linear or none")
    return None


NEMOTRON = ArchSpec(
    name="nemotron",
    requires=requirements(
        normalization={"LayerNorm"},
        layernorm_zero_centered_gamma={True},
        activation={"squared_relu"},
        position_embedding={"rope"},
        attention_kind={"mha", "gqa", "mqa"},
    ),
    mappings=MAPPINGS,
    aliases=ALIASES,
    hf_config=hf_config,
    trtllm=trtllm,
    checks=(_check,),
)
