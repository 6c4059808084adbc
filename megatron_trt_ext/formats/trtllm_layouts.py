"""TensorRT-LLM's tensor names, one generic table per TensorRT-LLM layout: HF name suffix ->
(TensorRT-LLM name suffix, how the tensor is placed on ranks, an op on the way).

"llama": LLaMA-style separate q/k/v and gate/up; "gpt": GPT-2-style fused c_attn with Conv1D
storage; "mixtral"/"qwen3_moe": the llama attention with stacked MoE experts; the others are
variants of these. `formats.trtllm.TrtllmConverter` reads them and places the tensors.

Each op and each placement kind has its inverse declared here next to it (`invert_op`,
`unplace`, `unplace_expert`): `verification.trtllm_read` reads a checkpoint back into HF tensors
with them, and `verify` compares the Megatron tensors the HF inverse tables build from those with
the fingerprints recorded at export.
"""

from __future__ import annotations

import re

import torch

from .. import layouts

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


def invert_op(tensor: torch.Tensor, op) -> torch.Tensor:
    """Inverse of `apply_op`. "+1" comes back in float32 within the rounding of ``w + 1`` to the
    checkpoint dtype (`OP_ROUNDED`), not bit for bit: the stored value is the rounded sum."""
    if op == "T":
        return tensor.t()
    if op == "+1":
        return tensor.float() - 1.0
    return tensor


# ops whose inverse is exact only up to the checkpoint dtype's rounding of the stored value
OP_ROUNDED = frozenset({"+1"})


# ---------------------------------------------------------------------- the inverse placements
def _same_everywhere(parts: list, what: str, first: int = 0) -> torch.Tensor:
    """The one value a replicated tensor has on every rank (ValueError naming the rank that
    differs; ``first``: the TP rank of ``parts[0]``)."""
    for rank, part in enumerate(parts[1:], start=first + 1):
        if part.shape != parts[0].shape or not torch.equal(part, parts[0]):
            raise ValueError(f"TP rank {rank}'s copy differs from TP rank {first}'s ({what})")
    return parts[0]


def unplace(kind: str, parts: list, info, vocab_size: int, which: str = "") -> torch.Tensor:
    """Inverse of ``TrtllmConverter._place``: the HF-layout tensor (before `invert_op`) from
    ``parts``, its pieces on the TP ranks of its stage in TP rank order.

    Kinds as in the table above; ``which`` picks q, k or v out of the per-rank [q_r; k_r; v_r]
    rows (kind "qkv"; "fused_qkv" gives the three concatenated). KV heads repeated over ranks
    (TP above the KV heads) come back once, after checking the copies agree; the vocabulary
    padding of ``lm_head`` is dropped (``vocab_size`` rows).
    """
    tp = len(parts)
    if kind in ("replicated", "embedding", "first", "final", "router"):
        return _same_everywhere(parts, f"placement {kind}: the same on every rank")
    if kind == "column":
        return torch.cat(parts, dim=0)
    if kind == "row":
        return torch.cat(parts, dim=1)
    if kind == "lm_head":
        return layouts.trim_rows(torch.cat(parts, dim=0), vocab_size)
    if kind in ("qkv", "fused_qkv"):
        q_rows, kv_rows = info.num_attention_heads * info.head_dim // tp, max(
            info.num_query_groups * info.head_dim // tp, info.head_dim)
        for rank, part in enumerate(parts):
            if part.shape[0] != q_rows + 2 * kv_rows:
                raise ValueError(f"TP rank {rank} holds {part.shape[0]} q|k|v rows, the model gives "
                                 f"{q_rows} + 2 x {kv_rows}")
        q = torch.cat([p[:q_rows] for p in parts], dim=0)
        k, v = (_kv_heads([p[q_rows + i * kv_rows:q_rows + (i + 1) * kv_rows] for p in parts], info, name)
                for i, name in enumerate("kv"))
        if kind == "fused_qkv":
            return torch.cat([q, k, v], dim=0)
        return {"q": q, "k": k, "v": v}[which]
    raise ValueError(f"no inverse for placement kind {kind!r}")


def _kv_heads(parts: list, info, which: str) -> torch.Tensor:
    """Inverse of `layouts.kv_rows_for_rank` over all ranks: each KV head once (``which``: k or v)."""
    tp = len(parts)
    if info.num_query_groups >= tp:
        return torch.cat(parts, dim=0)
    copies = tp // info.num_query_groups  # head h on ranks h * copies ... (h + 1) * copies - 1
    return torch.cat([_same_everywhere(parts[h * copies:(h + 1) * copies], f"{which} head {h}, repeated over "
                                       f"ranks {h * copies}-{(h + 1) * copies - 1}", h * copies)
                      for h in range(info.num_query_groups)], dim=0)


def expert_place(info, expert: int, moe_tp: int, moe_ep: int) -> tuple:
    """(TP ranks in expert-TP order, index in their stack) of one expert: the placement of
    ``TrtllmConverter._experts_for_rank`` (EP rank = tp_rank % moe_ep, expert-TP rank = tp_rank // moe_ep)."""
    per_rank = info.num_experts // moe_ep
    ep_rank, local = divmod(expert, per_rank)
    return [mt * moe_ep + ep_rank for mt in range(moe_tp)], local


def unplace_expert(role: str, parts: list) -> torch.Tensor:
    """Inverse of ``TrtllmConverter._experts_for_rank`` for one expert: its HF linear (role w1
    gate, w3 up, w2 down) from its slices on the expert-TP ranks (``parts``: each rank's [2I/moe_tp, H]
    fc = [up; gate] or [H, I/moe_tp] proj of that expert)."""
    if role == "w2":
        return torch.cat(parts, dim=1)
    halves = [torch.chunk(p, 2, dim=0) for p in parts]
    return torch.cat([h[0] if role == "w3" else h[1] for h in halves], dim=0)
