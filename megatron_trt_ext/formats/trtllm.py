"""TensorRT-LLM checkpoint: HF-named tensors -> per-rank TensorRT-LLM tensors, and config.json.

One generic table per TensorRT-LLM layout ("llama": LLaMA-style separate q/k/v and gate/up,
"gpt": GPT-2-style fused c_attn with Conv1D storage, "mixtral": the llama attention with stacked
MoE experts). Rank files are ``rank{pp_rank * tp + tp_rank}``; layer numbers inside a file are
local to its pipeline stage. Every tensor is cast to the checkpoint dtype here, except the MoE
router, which TensorRT-LLM keeps in float32.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from ..errors import ExportError
from .. import layouts

_LLAMA_LAYER = {
    "input_layernorm.weight": ("input_layernorm.weight", "replicated", False),
    "self_attn.q_proj.weight": ("attention.qkv.weight", "q", False),
    "self_attn.k_proj.weight": ("attention.qkv.weight", "k", False),
    "self_attn.v_proj.weight": ("attention.qkv.weight", "v", False),
    "self_attn.q_proj.bias": ("attention.qkv.bias", "q", False),
    "self_attn.k_proj.bias": ("attention.qkv.bias", "k", False),
    "self_attn.v_proj.bias": ("attention.qkv.bias", "v", False),
    "self_attn.o_proj.weight": ("attention.dense.weight", "row", False),
    "self_attn.o_proj.bias": ("attention.dense.bias", "replicated", False),
    "post_attention_layernorm.weight": ("post_layernorm.weight", "replicated", False),
    # gate_proj is the activated half: TensorRT-LLM calls it fc; up_proj is its "gate".
    "mlp.gate_proj.weight": ("mlp.fc.weight", "column", False),
    "mlp.up_proj.weight": ("mlp.gate.weight", "column", False),
    "mlp.down_proj.weight": ("mlp.proj.weight", "row", False),
    "mlp.gate_proj.bias": ("mlp.fc.bias", "column", False),
    "mlp.up_proj.bias": ("mlp.gate.bias", "column", False),
    "mlp.down_proj.bias": ("mlp.proj.bias", "replicated", False),
}
_LLAMA_GLOBAL = {
    "model.embed_tokens.weight": ("transformer.vocab_embedding.weight", "embedding", False),
    "model.norm.weight": ("transformer.ln_f.weight", "final", False),
    "lm_head.weight": ("lm_head.weight", "lm_head", False),
}

# kind: how a tensor is placed on ranks.
#   replicated: whole on every TP rank of the owning stage     column: split dim 0
#   row: split dim 1        q/k/v: buffered, fused per rank     fused_qkv: [Q|K|V] split per rank
#   embedding: first stage, whole (+ lm_head copy when tied)   first: first stage, whole
#   final: last stage, whole                                   lm_head: last stage, vocab-padded dim-0 split
#   router: whole, float32          w1/w3/w2: one expert's gate/up/down, stacked per rank
LAYOUTS = {
    "llama": {"layer_prefix": "model.layers.", "global": _LLAMA_GLOBAL, "layer": _LLAMA_LAYER},
    "mixtral": {
        "layer_prefix": "model.layers.",
        "global": _LLAMA_GLOBAL,
        "layer": {k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("mlp.")} | {
            "block_sparse_moe.gate.weight": ("mlp.router.weight", "router", False),
        },
        "experts": re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$"),
    },
    "gpt": {
        "layer_prefix": "transformer.h.",
        "global": {
            "transformer.wte.weight": ("transformer.vocab_embedding.weight", "embedding", False),
            "transformer.wpe.weight": ("transformer.position_embedding.weight", "first", False),
            "transformer.ln_f.weight": ("transformer.ln_f.weight", "final", False),
            "transformer.ln_f.bias": ("transformer.ln_f.bias", "final", False),
            "lm_head.weight": ("lm_head.weight", "lm_head", False),
        },
        "layer": {
            "ln_1.weight": ("input_layernorm.weight", "replicated", False),
            "ln_1.bias": ("input_layernorm.bias", "replicated", False),
            "attn.c_attn.weight": ("attention.qkv.weight", "fused_qkv", True),
            "attn.c_attn.bias": ("attention.qkv.bias", "fused_qkv", False),
            "attn.c_proj.weight": ("attention.dense.weight", "row", True),
            "attn.c_proj.bias": ("attention.dense.bias", "replicated", False),
            "ln_2.weight": ("post_layernorm.weight", "replicated", False),
            "ln_2.bias": ("post_layernorm.bias", "replicated", False),
            "mlp.c_fc.weight": ("mlp.fc.weight", "column", True),
            "mlp.c_fc.bias": ("mlp.fc.bias", "column", False),
            "mlp.c_proj.weight": ("mlp.proj.weight", "row", True),
            "mlp.c_proj.bias": ("mlp.proj.bias", "replicated", False),
        },
    },
}


class TrtllmConverter:
    """Feeds HF tensors in, yields ``(rank, name, tensor)`` for the inference layout.

    Args:
        family: the family's TensorRT-LLM description (``ArchSpec.trtllm(info)``).
        info: ModelInfo of the source model.
        tp, pp: inference tensor / pipeline parallel sizes.
        dtype: checkpoint dtype.
        moe_tp, moe_ep: how the TP ranks split MoE experts (moe_tp * moe_ep == tp).
    """

    def __init__(self, family: dict, info, tp: int, pp: int, dtype: torch.dtype,
                 moe_tp: int | None = None, moe_ep: int = 1):
        self.table = LAYOUTS[family["layout"]]
        self.layer_re = re.compile("^" + re.escape(self.table["layer_prefix"]) + r"(\d+)\.(.+)$")
        self.info = info
        self.tp, self.pp, self.dtype = tp, pp, dtype
        self.moe_ep = moe_ep
        self.moe_tp = moe_tp if moe_tp is not None else tp // moe_ep
        self.layers_per_stage = info.num_layers // pp
        self._pending: dict = {}

    # ------------------------------------------------------------------ placement helpers
    def _stage_ranks(self, stage: int) -> range:
        return range(stage * self.tp, (stage + 1) * self.tp)

    def _qkv_for_rank(self, q, k, v, rank_in_tp: int):
        """The rank's q|k|v rows as views (KV heads repeated when TP exceeds them), fused lazily:
        the writer streams the three blocks, so no concatenated copy is made."""
        info, tp = self.info, self.tp
        kv = [layouts.kv_rows_for_rank(t, info.num_query_groups, info.head_dim, tp, rank_in_tp) for t in (k, v)]
        return layouts.row_blocks([layouts.split_for_rank(q, 0, tp, rank_in_tp), *kv])

    def _split_fused(self, fused):
        info = self.info
        q_rows = info.num_attention_heads * info.head_dim
        kv_rows = info.num_query_groups * info.head_dim
        return fused[:q_rows], fused[q_rows:q_rows + kv_rows], fused[q_rows + kv_rows:]

    def _experts_for_rank(self, parts: dict, which: str, tp_rank: int) -> torch.Tensor:
        moe_tp_rank, moe_ep_rank = tp_rank // self.moe_ep, tp_rank % self.moe_ep
        per_rank = self.info.num_experts // self.moe_ep
        experts = range(moe_ep_rank * per_rank, (moe_ep_rank + 1) * per_rank)
        if which == "fc":  # [E_local, 2*I/moe_tp, H] = cat(up (w3), gate (w1)): activation on the second half
            return torch.stack([torch.cat([
                layouts.split_for_rank(parts[("w3", e)], 0, self.moe_tp, moe_tp_rank),
                layouts.split_for_rank(parts[("w1", e)], 0, self.moe_tp, moe_tp_rank)]) for e in experts])
        return torch.stack([layouts.split_for_rank(parts[("w2", e)], 1, self.moe_tp, moe_tp_rank)
                            for e in experts])

    def _place(self, stage: int, name: str, kind: str, tensor, only_ep_rank=None) -> Iterator[tuple]:
        for tp_rank, rank in enumerate(self._stage_ranks(stage)):
            if only_ep_rank is not None and tp_rank % self.moe_ep != only_ep_rank:
                continue
            if kind == "replicated":
                out = tensor
            elif kind == "column":
                out = layouts.split_for_rank(tensor, 0, self.tp, tp_rank)
            elif kind == "row":
                out = layouts.split_for_rank(tensor, 1, self.tp, tp_rank)
            elif kind == "fused_qkv":
                out = self._qkv_for_rank(*self._split_fused(tensor), tp_rank)
            elif kind == "qkv":
                out = self._qkv_for_rank(*tensor, tp_rank)
            elif kind == "lm_head":
                out = layouts.padded_rows_for_rank(tensor, self.tp, tp_rank)
            elif kind == "router":
                yield rank, name, tensor.to(torch.float32)
                continue
            elif kind in ("experts_fc", "experts_proj"):
                out = self._experts_for_rank(tensor, kind[len("experts_"):], tp_rank)
            else:
                raise AssertionError(kind)
            yield rank, name, out.to(self.dtype)

    # ------------------------------------------------------------------ quantized linears
    _TRT_SCALE = {"weight_scale": "weights_scaling_factor", "input_scale": "activation_scaling_factor",
                  "weight_scale_2": "weights_scaling_factor_2", "pre_quant_scale": "prequant_scaling_factor"}

    def _repeat_kv_rows(self, t: torch.Tensor) -> torch.Tensor:
        info = self.info
        rows = t if t.dim() > 1 else t.unsqueeze(1)
        out = layouts.repeat_kv_heads(rows, info.num_query_groups, info.head_dim, self.tp)
        return out if t.dim() > 1 else out.squeeze(1)

    def _place_quant(self, stage: int, name: str, kind: str, q) -> Iterator[tuple]:
        """A quantized linear: split the float weight and its scales, then quantize each split."""
        from ..quant.numerics import split_scale

        module = name[: -len(".weight")]
        for tp_rank, rank in enumerate(self._stage_ranks(stage)):
            if kind == "qkv":
                parts = []
                for which, part in zip("qkv", q):
                    w = part.weight if which == "q" else self._repeat_kv_rows(part.weight)
                    parts.append((part, layouts.split_for_rank(w, 0, self.tp, tp_rank)))
                weight = torch.cat([w for _, w in parts], dim=0)
                scales = {}
                for key, (value, skind) in q[0].scales.items():
                    if skind in ("out", "block"):
                        pieces = [split_scale(p.scales[key][0] if which == "q" else
                                              self._repeat_kv_rows(p.scales[key][0]), skind, "column", self.tp, tp_rank)
                                  for which, (p, _) in zip("qkv", parts)]
                        scales[key] = (torch.cat(pieces, dim=0), skind)
                    else:
                        scales[key] = (value, skind)
                ref = q[0]
            else:
                placement = {"column": "column", "row": "row", "replicated": "column"}[kind]
                weight = q.weight if kind == "replicated" else layouts.split_for_rank(
                    q.weight, 0 if placement == "column" else 1, self.tp, tp_rank)
                scales = {key: (split_scale(v, skind, placement, self.tp if kind != "replicated" else 1, tp_rank), skind)
                          for key, (v, skind) in q.scales.items()}
                ref = q
            yield rank, name, ref.quantized(weight, scales)
            for key, (value, skind) in scales.items():
                out = value if value.dtype == torch.float8_e4m3fn else value.float()  # NVFP4 block scales: FP8
                yield rank, f"{module}.{self._TRT_SCALE[key]}", out.reshape(1) if skind == "tensor" else out

    def feed_kv_scale(self, hf_name: str, which: str, scale: torch.Tensor) -> Iterator[tuple]:
        """FP8 KV cache: one scale per layer, the larger of the K and V scales."""
        m = self.layer_re.match(hf_name)
        layer = int(m.group(1))
        parts = self._pending.setdefault((layer, "kv_scale"), {})
        parts[which] = scale
        if len(parts) < 2:
            return
        del self._pending[(layer, "kv_scale")]
        stage, local = divmod(layer, self.layers_per_stage)
        value = torch.maximum(parts["k"], parts["v"]).float().reshape(1)
        for rank in self._stage_ranks(stage):
            yield rank, f"transformer.layers.{local}.attention.kv_cache_scaling_factor", value

    # ------------------------------------------------------------------ the stream
    def feed(self, hf_name: str, tensor: torch.Tensor) -> Iterator[tuple]:
        m = self.layer_re.match(hf_name)
        if m:
            yield from self._feed_layer(int(m.group(1)), m.group(2), hf_name, tensor)
            return
        entry = self.table["global"].get(hf_name)
        if entry is None:
            raise ExportError(f"TensorRT-LLM layout: no mapping for HF tensor {hf_name!r}")
        name, kind, _ = entry
        last = self.pp - 1
        if kind == "embedding":
            yield from self._place(0, name, "replicated", tensor)
            if self.info.tied_embeddings:
                yield from self._place(last, "lm_head.weight", "lm_head", tensor)
        elif kind == "first":
            yield from self._place(0, name, "replicated", tensor)
        elif kind == "final":
            yield from self._place(last, name, "replicated", tensor)
        elif kind == "lm_head":
            yield from self._place(last, name, "lm_head", tensor)

    def _feed_layer(self, layer: int, suffix: str, hf_name: str, tensor) -> Iterator[tuple]:
        stage, local = divmod(layer, self.layers_per_stage)
        prefix = f"transformer.layers.{local}."
        experts_re = self.table.get("experts")
        em = experts_re.match(suffix) if experts_re is not None else None
        if em:
            # Each inference EP rank stacks its own experts: placed as soon as they are all here,
            # so a writer holds one EP rank's experts at most (see plan.expert_group).
            expert, which = int(em.group(1)), em.group(2)
            kind = "experts_proj" if which == "w2" else "experts_fc"
            per_rank = self.info.num_experts // self.moe_ep
            ep_rank = expert // per_rank
            parts = self._pending.setdefault((layer, kind, ep_rank), {})
            parts[(which, expert)] = tensor
            if len(parts) < per_rank * (1 if kind == "experts_proj" else 2):
                return
            del self._pending[(layer, kind, ep_rank)]
            yield from self._place(stage, prefix + ("mlp.proj.weight" if kind == "experts_proj" else "mlp.fc.weight"),
                                   kind, parts, only_ep_rank=ep_rank)
            return
        entry = self.table["layer"].get(suffix)
        if entry is None:
            raise ExportError(f"TensorRT-LLM layout: no mapping for HF tensor {hf_name!r}")
        trt_suffix, kind, transpose = entry
        if transpose:
            tensor = tensor.t()
        if kind in ("q", "k", "v"):
            parts = self._pending.setdefault((layer, trt_suffix), {})
            parts[kind] = tensor
            if len(parts) < 3:
                return
            del self._pending[(layer, trt_suffix)]
            tensor, kind = (parts["q"], parts["k"], parts["v"]), "qkv"
        quantized = not isinstance(tensor, (torch.Tensor, tuple)) or (
            isinstance(tensor, tuple) and not isinstance(tensor[0], torch.Tensor))
        if quantized:
            yield from self._place_quant(stage, prefix + trt_suffix, kind, tensor)
        else:
            yield from self._place(stage, prefix + trt_suffix, kind, tensor)

    def finish(self) -> None:
        if self._pending:
            raise ExportError(f"TensorRT-LLM layout: incomplete fused tensors {sorted(self._pending)[:4]}")


def trtllm_config(family: dict, info, vocab_size: int, dtype: str, tp: int, pp: int,
                  moe_tp: int | None = None, moe_ep: int = 1) -> dict:
    """The shared ``config.json`` of the checkpoint (PretrainedConfig fields)."""
    return {
        "architecture": family["architecture"],
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": vocab_size,
        "max_position_embeddings": info.max_position_embeddings,
        "hidden_size": info.hidden_size,
        "num_hidden_layers": info.num_layers,
        "num_attention_heads": info.num_attention_heads,
        "num_key_value_heads": info.num_query_groups,
        "head_size": info.head_dim,
        "intermediate_size": family.get("intermediate_size", info.ffn_hidden_size),
        "norm_epsilon": info.norm_epsilon,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "tie_word_embeddings": info.tied_embeddings,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp, "cp_size": 1,
                    "moe_tp_size": moe_tp if moe_tp is not None else tp // moe_ep, "moe_ep_size": moe_ep},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        **family["config"],
    }
