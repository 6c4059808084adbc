"""TensorRT-LLM checkpoint: HF-named tensors -> per-rank TensorRT-LLM tensors, and config.json.

One generic table per TensorRT-LLM layout (`trtllm_layouts`) names the tensors and says how each
is placed on ranks. Rank files are ``rank{pp_rank * tp + tp_rank}``; layer numbers inside a file are
local to its pipeline stage. Every tensor is cast to the checkpoint dtype here, except the MoE
router, which TensorRT-LLM keeps in float32.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from .. import layouts
from ..errors import ExportError
from .trtllm_layouts import LAYOUTS, apply_op


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

    def _split_quant_fused(self, q) -> tuple:
        """A fused [Q|K|V] `QuantLinear` as three, rows split and per-row scales with them."""
        from dataclasses import replace

        def rows(t, start, stop, skind):
            return t[start:stop] if skind in ("out", "block") else t

        info = self.info
        q_rows, kv_rows = info.num_attention_heads * info.head_dim, info.num_query_groups * info.head_dim
        bounds = ((0, q_rows), (q_rows, q_rows + kv_rows), (q_rows + kv_rows, q_rows + 2 * kv_rows))
        return tuple(replace(q, weight=q.weight[a:b],
                             scales={k: (rows(v, a, b, skind), skind) for k, (v, skind) in q.scales.items()})
                     for a, b in bounds)

    def _place_quant(self, stage: int, name: str, kind: str, q) -> Iterator[tuple]:
        """A quantized linear: split the float weight and its scales, then quantize each split."""
        from ..quant.numerics import split_scale

        module = name[: -len(".weight")]
        if kind == "fused_qkv":  # GPT-2's c_attn: its q, k and v rows, as separate parts
            q, kind = self._split_quant_fused(q), "qkv"
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
            yield rank, name, self._packed(ref, weight, scales)
            for key, out in self._scale_tensors(ref, scales):
                yield rank, f"{module}.{key}", out

    @staticmethod
    def _packed(ref, weight: torch.Tensor, scales: dict) -> torch.Tensor:
        packed = ref.quantized(weight, scales)
        if ref.algo.weight == "int4_block":
            # int8, as ModelOpt writes them: TensorRT-LLM only repacks int8 weights for its int4 kernels
            return packed.view(torch.int8)
        return packed

    def _scale_tensors(self, ref, scales: dict) -> list:
        """(TensorRT-LLM name suffix, tensor) of each scale of one quantized linear (split)."""
        out = []
        for key, (value, skind) in scales.items():
            if key == "pre_quant_scale":
                t = value.to(self.dtype)  # declared in the checkpoint dtype by TensorRT-LLM
            elif value.dtype in (torch.float8_e4m3fn, torch.uint8):
                t = value  # NVFP4 block scales (FP8), MXFP8 exponents (uint8)
            else:
                t = value.float()
            trt_key = "per_channel_scale" if ref.algo.weight == "fp8_channel" and key == "weight_scale" \
                else self._TRT_SCALE[key]
            if skind == "tensor":  # [1], except NVFP4's scalars (as ModelOpt writes each)
                t = t.reshape(()) if ref.algo.weight == "nvfp4_block" else t.reshape(1)
            out.append((trt_key, t))
        return out

    def _place_quant_experts(self, stage: int, name: str, kind: str, parts: dict, ep_rank: int) -> Iterator[tuple]:
        """One inference EP rank's quantized experts, stacked as `_experts_for_rank` stacks float
        ones (fc = [up; gate] of each expert, split over the expert-TP ranks): each expert's split
        quantized with its own scales, which are stacked along the expert dimension (per-tensor
        ones: [E, 1], NVFP4's [E]); the input scale is one for the layer's experts (ModelOpt syncs
        it), written once as [1], as ModelOpt writes it for experts (NVFP4's too)."""
        from ..quant.numerics import split_scale

        module = name[: -len(".weight")]
        per_rank = self.info.num_experts // self.moe_ep
        experts = range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
        for tp_rank, rank in enumerate(self._stage_ranks(stage)):
            if tp_rank % self.moe_ep != ep_rank:
                continue
            moe_tp_rank = tp_rank // self.moe_ep
            packed, per_expert = [], []
            for e in experts:
                if kind == "experts_fc":  # up (w3) then gate (w1): one Megatron linear, per-tensor scales shared
                    pieces = (parts[("w3", e)], parts[("w1", e)])
                    weight = torch.cat([layouts.split_for_rank(p.weight, 0, self.moe_tp, moe_tp_rank) for p in pieces])
                    scales = {key: (torch.cat([split_scale(p.scales[key][0], skind, "column", self.moe_tp, moe_tp_rank)
                                               for p in pieces]) if skind in ("out", "block") else value, skind)
                              for key, (value, skind) in pieces[0].scales.items()}
                    ref = pieces[0]
                else:
                    ref = parts[("w2", e)]
                    weight = layouts.split_for_rank(ref.weight, 1, self.moe_tp, moe_tp_rank)
                    scales = {key: (split_scale(v, skind, "row", self.moe_tp, moe_tp_rank), skind)
                              for key, (v, skind) in ref.scales.items()}
                packed.append(self._packed(ref, weight, scales))
                per_expert.append(self._scale_tensors(ref, scales))
            yield rank, name, torch.stack(packed)
            for i, (key, first) in enumerate(per_expert[0]):
                if key == self._TRT_SCALE["input_scale"]:
                    yield rank, f"{module}.{key}", first.reshape(1)
                else:
                    yield rank, f"{module}.{key}", torch.stack([scales[i][1] for scales in per_expert])

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
        name, kind, op = entry
        tensor = apply_op(tensor, op)
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

    def _expert(self, suffix: str):
        """(expert number, role w1 gate / w3 up / w2 down) of an expert linear's HF name suffix
        within a layer, or None."""
        experts_re = self.table.get("experts")
        em = experts_re.match(suffix) if experts_re is not None else None
        if em is None:
            return None
        return int(em.group(1)), self.table.get("expert_roles", {}).get(em.group(2), em.group(2))

    def _feed_layer(self, layer: int, suffix: str, hf_name: str, tensor) -> Iterator[tuple]:
        stage, local = divmod(layer, self.layers_per_stage)
        prefix = f"transformer.layers.{local}."
        expert_role = self._expert(suffix)
        if expert_role:
            # Each inference EP rank stacks its own experts: placed as soon as they are all here,
            # so a writer holds one EP rank's experts at most (see plan.expert_group).
            expert, which = expert_role
            kind = "experts_proj" if which == "w2" else "experts_fc"
            per_rank = self.info.num_experts // self.moe_ep
            ep_rank = expert // per_rank
            parts = self._pending.setdefault((layer, kind, ep_rank), {})
            parts[(which, expert)] = tensor
            if len(parts) < per_rank * (1 if kind == "experts_proj" else 2):
                return
            del self._pending[(layer, kind, ep_rank)]
            name = prefix + ("mlp.proj.weight" if kind == "experts_proj" else "mlp.fc.weight")
            if isinstance(tensor, torch.Tensor):
                yield from self._place(stage, name, kind, parts, only_ep_rank=ep_rank)
            else:  # quantized experts (`QuantLinear`s)
                yield from self._place_quant_experts(stage, name, kind, parts, ep_rank)
            return
        entry = self.table["layer"].get(suffix)
        if entry is None:
            raise ExportError(f"TensorRT-LLM layout: no mapping for HF tensor {hf_name!r}")
        trt_suffix, kind, op = entry
        if isinstance(tensor, torch.Tensor):
            tensor = apply_op(tensor, op)
        # else a quantized linear (`QuantLinear`): its weight is in Linear layout already
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

    def fused_qkv(self, hf_name: str) -> bool:
        """Whether this HF tensor is one fused q|k|v linear weight (GPT-2's c_attn)."""
        m = self.layer_re.match(hf_name)
        entry = self.table["layer"].get(m.group(2)) if m else None
        return entry is not None and entry[1] == "fused_qkv" and hf_name.endswith(".weight")

    def input_splits(self, hf_name: str) -> tuple:
        """(how many ranks split this HF linear along its inputs, the config key that sets it):
        the inference TP for row-parallel linears, the expert TP for experts' down projections."""
        m = self.layer_re.match(hf_name)
        if not m:
            return 1, None
        expert_role = self._expert(m.group(2))
        if expert_role:
            return (self.moe_tp, "inference_moe_tp") if expert_role[1] == "w2" else (1, None)
        entry = self.table["layer"].get(m.group(2))
        return (self.tp, "inference_tp") if entry is not None and entry[1] == "row" else (1, None)

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
