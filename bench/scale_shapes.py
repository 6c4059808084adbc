"""Shape-only stand-ins for what every rank of a large training job describes at attach.

A model is a list of global tensors (Megatron unit names, global shapes, how Megatron shards
them); a layout is TP x PP x DP with experts spread as expert-TP x EP x expert-DP over the
ranks of a pipeline stage (Megatron's default rank order: TP fastest, then DP, then PP). From
them `rank_locals` builds, for one rank, the ``{unit name: [LocalPiece]}`` map that
`plan.local_shards` returns on a live model, with meta tensors in place of weights, so the
benchmark feeds the real `plan.describe` and `plan.plan_units`.

Sharding rules (as Megatron-Core's sharded state dict gives them): column-parallel linears split
dim 0 over TP (gated fc1: the gate and the up half separately, as `plan._merge_gated_halves`
sees them), row-parallel linears split dim 1, the vocabulary tables split dim 0, norms, routers
and "duplicated" MLA down-projections are whole on every TP rank with the main copy on TP rank
0; DP replicas hold the same slices with the main copy on DP rank 0; experts live on one EP rank
and split over expert-TP, with the main copy on expert-DP rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_trt_ext.plan import LocalPiece

# kinds: column, gated (column, two halves), row, vocab, whole (replicated), and the expert_ forms
EXPERT_KINDS = ("expert_gated", "expert_row")


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple
    kind: str
    layer: int = -1      # -1: a global tensor (embedding on the first stage, the rest on the last)
    expert: int = -1


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    ep: int = 1
    etp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        return self.tp * self.dp // (self.etp * self.ep)

    def describe(self) -> str:
        text = f"TP{self.tp} x PP{self.pp} x DP{self.dp} = {self.world} ranks"
        if self.ep > 1:
            text += f"; experts ETP{self.etp} x EP{self.ep} x EDP{self.edp}"
        return text


def llama3_405b() -> tuple:
    """Llama-3.1-405B: 126 layers, hidden 16384, 128 heads / 8 KV heads of 128, FFN 53248,
    vocabulary 128256, untied."""
    h, heads, kv, d, ffn, vocab, layers = 16384, 128, 8, 128, 53248, 128256, 126
    tensors = [Tensor("embedding.word_embeddings.weight", (vocab, h), "vocab")]
    for layer in range(layers):
        p = f"decoder.layers.{layer}."
        tensors += [
            Tensor(p + "self_attention.linear_qkv.layer_norm_weight", (h,), "whole", layer),
            Tensor(p + "self_attention.linear_qkv.weight", ((heads + 2 * kv) * d, h), "column", layer),
            Tensor(p + "self_attention.linear_proj.weight", (h, heads * d), "row", layer),
            Tensor(p + "mlp.linear_fc1.layer_norm_weight", (h,), "whole", layer),
            Tensor(p + "mlp.linear_fc1.weight", (2 * ffn, h), "gated", layer),
            Tensor(p + "mlp.linear_fc2.weight", (h, ffn), "row", layer),
        ]
    tensors += [Tensor("decoder.final_layernorm.weight", (h,), "whole"),
                Tensor("output_layer.weight", (vocab, h), "vocab")]
    return tensors, {"layers": layers, "heads": heads, "kv_heads": kv, "head_dim": d}


def deepseek_v3_671b() -> tuple:
    """DeepSeek-V3-shaped (671B): 61 layers (3 dense, FFN 18432; 58 MoE with 256 routed experts of
    FFN 2048 and one shared expert), MLA attention (q LoRA 1536, KV LoRA 512, 128 heads, nope 128
    + rope 64, v 128), hidden 7168, vocabulary 129280, untied. MTP layers left out."""
    h, heads, layers, dense, experts, moe_ffn, ffn, vocab = 7168, 128, 61, 3, 256, 2048, 18432, 129280
    q_lora, kv_lora, nope, rope, v = 1536, 512, 128, 64, 128
    tensors = [Tensor("embedding.word_embeddings.weight", (vocab, h), "vocab")]
    for layer in range(layers):
        p = f"decoder.layers.{layer}."
        a = p + "self_attention."
        tensors += [
            Tensor(p + "input_layernorm.weight", (h,), "whole", layer),
            Tensor(a + "linear_q_down_proj.weight", (q_lora, h), "whole", layer),
            Tensor(a + "linear_q_up_proj.layer_norm_weight", (q_lora,), "whole", layer),
            Tensor(a + "linear_q_up_proj.weight", (heads * (nope + rope), q_lora), "column", layer),
            Tensor(a + "linear_kv_down_proj.weight", (kv_lora + rope, h), "whole", layer),
            Tensor(a + "linear_kv_up_proj.layer_norm_weight", (kv_lora,), "whole", layer),
            Tensor(a + "linear_kv_up_proj.weight", (heads * (nope + v), kv_lora), "column", layer),
            Tensor(a + "linear_proj.weight", (h, heads * v), "row", layer),
            Tensor(p + "pre_mlp_layernorm.weight", (h,), "whole", layer),
        ]
        if layer < dense:
            tensors += [Tensor(p + "mlp.linear_fc1.weight", (2 * ffn, h), "gated", layer),
                        Tensor(p + "mlp.linear_fc2.weight", (h, ffn), "row", layer)]
            continue
        tensors += [Tensor(p + "mlp.router.weight", (experts, h), "whole", layer),
                    Tensor(p + "mlp.shared_experts.linear_fc1.weight", (2 * moe_ffn, h), "gated", layer),
                    Tensor(p + "mlp.shared_experts.linear_fc2.weight", (h, moe_ffn), "row", layer)]
        for e in range(experts):
            x = f"{p}mlp.experts.experts.{e}."
            tensors += [Tensor(x + "linear_fc1.weight", (2 * moe_ffn, h), "expert_gated", layer, e),
                        Tensor(x + "linear_fc2.weight", (h, moe_ffn), "expert_row", layer, e)]
    tensors += [Tensor("decoder.final_layernorm.weight", (h,), "whole"),
                Tensor("output_layer.weight", (vocab, h), "vocab")]
    return tensors, {"layers": layers, "experts": experts}


def stage_of(tensor: Tensor, layers: int, pp: int) -> int:
    if tensor.layer < 0:
        return 0 if tensor.name.startswith("embedding") else pp - 1
    return next(s for s in range(pp) if tensor.layer < (s + 1) * layers // pp)


def _split(shape: tuple, dim: int, parts: int, index: int, base: int = 0) -> tuple:
    """(offset, local shape) of slice ``index`` of ``parts`` along ``dim`` (from row ``base``)."""
    size = shape[dim] // parts
    offset = [0] * len(shape)
    offset[dim] = base + index * size
    local = list(shape)
    local[dim] = size
    return tuple(offset), tuple(local)


def slices(tensor: Tensor, parts: int, index: int) -> list:
    """(offset, local shape) of what TP (or expert-TP) rank ``index`` of ``parts`` holds."""
    kind = tensor.kind.replace("expert_", "")
    shape = tensor.shape
    if kind == "whole":
        return [((0,) * len(shape), shape)]
    if kind in ("column", "vocab"):
        return [_split(shape, 0, parts, index)]
    if kind == "row":
        return [_split(shape, 1, parts, index)]
    if kind == "gated":  # gate half and up half, each split over the ranks
        half = (shape[0] // 2, *shape[1:])
        return [(_split(half, 0, parts, index, base)[0], _split(half, 0, parts, index)[1])
                for base in (0, shape[0] // 2)]
    raise AssertionError(kind)


def by_position(tensors: list, info: dict, layout: Layout) -> dict:
    """Tensors by where they live: (stage, None) for dense ones, (stage, EP rank) for experts."""
    per_ep = info.get("experts", 1) // layout.ep
    index: dict = {}
    for tensor in tensors:
        stage = stage_of(tensor, info["layers"], layout.pp)
        ep_rank = tensor.expert // per_ep if tensor.kind in EXPERT_KINDS else None
        index.setdefault((stage, ep_rank), []).append(tensor)
    return index


def rank_locals(index: dict, layout: Layout, rank: int, dtype=torch.bfloat16) -> dict:
    """What ``rank`` would return from `plan.local_shards`: {unit name: [LocalPiece(meta)]}
    (``index``: `by_position`)."""
    tp_rank = rank % layout.tp
    dp_rank = (rank // layout.tp) % layout.dp
    stage = rank // (layout.tp * layout.dp)
    in_stage = tp_rank + layout.tp * dp_rank
    etp_rank = in_stage % layout.etp
    ep_rank = (in_stage // layout.etp) % layout.ep
    edp_rank = in_stage // (layout.etp * layout.ep)
    out: dict = {}
    for tensor in index.get((stage, None), []) + index.get((stage, ep_rank), []):
        if tensor.kind in EXPERT_KINDS:
            held, main = slices(tensor, layout.etp, etp_rank), edp_rank == 0
        else:
            held = slices(tensor, layout.tp, tp_rank)
            main = dp_rank == 0 and (tensor.kind != "whole" or tp_rank == 0)
        out[tensor.name] = [LocalPiece(offset, tensor.shape, torch.empty(shape, dtype=dtype, device="meta"), main)
                            for offset, shape in held]
    return out


def written_bytes(tensor: Tensor, info: dict, inference_tp: int, itemsize: int = 2) -> int:
    """Bytes one unit puts on disk in an HF + TensorRT-LLM export at ``inference_tp``: the HF
    tensor once, and the TensorRT-LLM slices, where replicated tensors repeat on every rank and
    KV heads repeat when the TP is larger than their number."""
    numel = 1
    for s in tensor.shape:
        numel *= s
    hf = numel * itemsize
    trt = hf
    if tensor.kind == "whole" and len(tensor.shape) == 1:
        trt = hf * inference_tp
    if tensor.name.endswith("linear_qkv.weight") and info.get("kv_heads", inference_tp) < inference_tp:
        heads, d = info["heads"], info["head_dim"]
        trt = (heads + 2 * inference_tp) * d * tensor.shape[1] * itemsize
    return hf + trt
