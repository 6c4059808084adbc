"""TensorRT-LLM's tensor names, one generic table per TensorRT-LLM layout: HF name suffix ->
(TensorRT-LLM name suffix, how the tensor is placed on ranks, an op on the way).

"llama": LLaMA-style separate q/k/v and gate/up; "gpt": GPT-2-style fused c_attn with Conv1D
storage; "mixtral"/"qwen3_moe": the llama attention with stacked MoE experts; the others are
variants of these. `formats.trtllm.TrtllmConverter` reads them and places the tensors.
"""

from __future__ import annotations

import re

import torch

# (trt suffix, kind, op): op is None, "T" (Conv1D storage: transpose) or "+1" (zero-centred gamma:
# TensorRT-LLM's norms are plain, so the stored 1 is added back).
_LLAMA_LAYER = {
    "input_layernorm.weight": ("input_layernorm.weight", "replicated", None),
    "self_attn.q_proj.weight": ("attention.qkv.weight", "q", None),
    "self_attn.k_proj.weight": ("attention.qkv.weight", "k", None),
    "self_attn.v_proj.weight": ("attention.qkv.weight", "v", None),
    "self_attn.q_proj.bias": ("attention.qkv.bias", "q", None),
    "self_attn.k_proj.bias": ("attention.qkv.bias", "k", None),
    "self_attn.v_proj.bias": ("attention.qkv.bias", "v", None),
    "self_attn.o_proj.weight": ("attention.dense.weight", "row", None),
    "self_attn.o_proj.bias": ("attention.dense.bias", "replicated", None),
    "post_attention_layernorm.weight": ("post_layernorm.weight", "replicated", None),
    # gate_proj is the activated half: TensorRT-LLM calls it fc; up_proj is its "gate".
    "mlp.gate_proj.weight": ("mlp.fc.weight", "column", None),
    "mlp.up_proj.weight": ("mlp.gate.weight", "column", None),
    "mlp.down_proj.weight": ("mlp.proj.weight", "row", None),
    "mlp.gate_proj.bias": ("mlp.fc.bias", "column", None),
    "mlp.up_proj.bias": ("mlp.gate.bias", "column", None),
    "mlp.down_proj.bias": ("mlp.proj.bias", "replicated", None),
}
_LLAMA_GLOBAL = {
    "model.embed_tokens.weight": ("transformer.vocab_embedding.weight", "embedding", None),
    "model.norm.weight": ("transformer.ln_f.weight", "final", None),
    "lm_head.weight": ("lm_head.weight", "lm_head", None),
}


def _plus_one_norms(table: dict) -> dict:
    """The same table with every norm weight offset by one (zero-centred gamma)."""
    return {k: (v[0], v[1], "+1") if "norm" in k and k.endswith(".weight") else v for k, v in table.items()}


# HF layouts with separate q/k/v and a plain MLP into TensorRT-LLM's GPT layout (GPTForCausalLM
# variants nemotron and starcoder2).
_GPT_QKV_LAYER = {
    **{k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("mlp.")},
    "input_layernorm.bias": ("input_layernorm.bias", "replicated", None),
    "post_attention_layernorm.bias": ("post_layernorm.bias", "replicated", None),
    "mlp.up_proj.weight": ("mlp.fc.weight", "column", None),
    "mlp.up_proj.bias": ("mlp.fc.bias", "column", None),
    "mlp.down_proj.weight": ("mlp.proj.weight", "row", None),
    "mlp.down_proj.bias": ("mlp.proj.bias", "replicated", None),
    "mlp.c_fc.weight": ("mlp.fc.weight", "column", None),
    "mlp.c_fc.bias": ("mlp.fc.bias", "column", None),
    "mlp.c_proj.weight": ("mlp.proj.weight", "row", None),
    "mlp.c_proj.bias": ("mlp.proj.bias", "replicated", None),
}
_GPT_QKV_GLOBAL = {**_LLAMA_GLOBAL, "model.norm.bias": ("transformer.ln_f.bias", "final", None)}

# kind: how a tensor is placed on ranks.
#   replicated: whole on every TP rank of the owning stage     column: split dim 0
#   row: split dim 1        q/k/v: buffered, fused per rank     fused_qkv: [Q|K|V] split per rank
#   embedding: first stage, whole (+ lm_head copy when tied)   first: first stage, whole
#   final: last stage, whole                                   lm_head: last stage, vocab-padded dim-0 split
#   router: whole, float32          w1/w3/w2: one expert's gate/up/down, stacked per rank
LAYOUTS = {
    "llama": {"layer_prefix": "model.layers.", "global": _LLAMA_GLOBAL, "layer": _LLAMA_LAYER},
    "qwen3": {"layer_prefix": "model.layers.", "global": _LLAMA_GLOBAL, "layer": {
        **_LLAMA_LAYER,
        "self_attn.q_norm.weight": ("attention.q_layernorm.weight", "replicated", None),
        "self_attn.k_norm.weight": ("attention.k_layernorm.weight", "replicated", None)}},
    "gemma": {"layer_prefix": "model.layers.", "global": _plus_one_norms(_LLAMA_GLOBAL),
              "layer": _plus_one_norms(_LLAMA_LAYER)},
    "gpt_nemotron": {"layer_prefix": "model.layers.", "global": _plus_one_norms(_GPT_QKV_GLOBAL),
                     "layer": _plus_one_norms(_GPT_QKV_LAYER)},
    "gpt_qkv": {"layer_prefix": "model.layers.", "global": _GPT_QKV_GLOBAL, "layer": _GPT_QKV_LAYER},
    "mixtral": {
        "layer_prefix": "model.layers.",
        "global": _LLAMA_GLOBAL,
        "layer": {k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("mlp.")} | {
            "block_sparse_moe.gate.weight": ("mlp.router.weight", "router", None),
        },
        # (expert, role) of each expert linear; roles: w1 gate, w3 up, w2 down
        "experts": re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$"),
    },
    "qwen3_moe": {
        "layer_prefix": "model.layers.",
        "global": _LLAMA_GLOBAL,
        "layer": {k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("mlp.")} | {
            "self_attn.q_norm.weight": ("attention.q_layernorm.weight", "replicated", None),
            "self_attn.k_norm.weight": ("attention.k_layernorm.weight", "replicated", None),
            "mlp.gate.weight": ("mlp.router.weight", "router", None),
        },
        "experts": re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"),
        "expert_roles": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
    },
    "gpt": {
        "layer_prefix": "transformer.h.",
        "global": {
            "transformer.wte.weight": ("transformer.vocab_embedding.weight", "embedding", None),
            "transformer.wpe.weight": ("transformer.position_embedding.weight", "first", None),
            "transformer.ln_f.weight": ("transformer.ln_f.weight", "final", None),
            "transformer.ln_f.bias": ("transformer.ln_f.bias", "final", None),
            "lm_head.weight": ("lm_head.weight", "lm_head", None),
        },
        "layer": {
            "ln_1.weight": ("input_layernorm.weight", "replicated", None),
            "ln_1.bias": ("input_layernorm.bias", "replicated", None),
            "attn.c_attn.weight": ("attention.qkv.weight", "fused_qkv", "T"),
            "attn.c_attn.bias": ("attention.qkv.bias", "fused_qkv", None),
            "attn.c_proj.weight": ("attention.dense.weight", "row", "T"),
            "attn.c_proj.bias": ("attention.dense.bias", "replicated", None),
            "ln_2.weight": ("post_layernorm.weight", "replicated", None),
            "ln_2.bias": ("post_layernorm.bias", "replicated", None),
            "mlp.c_fc.weight": ("mlp.fc.weight", "column", "T"),
            "mlp.c_fc.bias": ("mlp.fc.bias", "column", None),
            "mlp.c_proj.weight": ("mlp.proj.weight", "row", "T"),
            "mlp.c_proj.bias": ("mlp.proj.bias", "replicated", None),
        },
    },
}


def apply_op(tensor: torch.Tensor, op) -> torch.Tensor:
    """A table entry's op on a float tensor (quantized linears are in Linear layout already)."""
    if op == "T":
        return tensor.t()
    if op == "+1":
        return tensor.float() + 1.0
    return tensor
