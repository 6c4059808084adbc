"""TensorRT-LLM checkpoint: HF-named tensors -> per-rank TensorRT-LLM tensors, and config.json.

One generic table per TensorRT-LLM layout ("llama": LLaMA-style separate q/k/v and gate/up,
"gpt": GPT-2-style fused c_attn with Conv1D storage). Rank files are ``rank{pp * tp + tp_rank}``;
layer numbers inside a file are local to its pipeline stage.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from ..errors import ExportError
from .. import layouts

# kind: how a tensor is placed on ranks.
#   replicated: whole on every TP rank of the owning stage     column: split dim 0
#   row: split dim 1        q/k/v: buffered, fused per rank     fused_qkv: [Q|K|V] split per rank
#   embedding: first stage, whole (+ lm_head copy when tied)   first: first stage, whole
#   final: last stage, whole                                   lm_head: last stage, vocab-padded dim-0 split
LAYOUTS = {
    "llama": {
        "layer_prefix": "model.layers.",
        "global": {
            "model.embed_tokens.weight": ("transformer.vocab_embedding.weight", "embedding", False),
            "model.norm.weight": ("transformer.ln_f.weight", "final", False),
            "lm_head.weight": ("lm_head.weight", "lm_head", False),
        },
        "layer": {
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
        },
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
    """

    def __init__(self, family: dict, info, tp: int, pp: int):
        self.table = LAYOUTS[family["layout"]]
        self.layer_re = re.compile("^" + re.escape(self.table["layer_prefix"]) + r"(\d+)\.(.+)$")
        self.info = info
        self.tp, self.pp = tp, pp
        self.layers_per_stage = info.num_layers // pp
        self._pending: dict = {}

    # ------------------------------------------------------------------ placement helpers
    def _stage_ranks(self, stage: int) -> range:
        return range(stage * self.tp, (stage + 1) * self.tp)

    def _qkv_for_rank(self, q, k, v, rank_in_tp: int) -> torch.Tensor:
        info, tp = self.info, self.tp
        k = layouts.repeat_kv_heads(k, info.num_query_groups, info.head_dim, tp)
        v = layouts.repeat_kv_heads(v, info.num_query_groups, info.head_dim, tp)
        parts = [layouts.split_for_rank(t, 0, tp, rank_in_tp) for t in (q, k, v)]
        return torch.cat(parts, dim=0)

    def _split_fused(self, fused):
        info = self.info
        q_rows = info.num_attention_heads * info.head_dim
        kv_rows = info.num_query_groups * info.head_dim
        return fused[:q_rows], fused[q_rows:q_rows + kv_rows], fused[q_rows + kv_rows:]

    def _place(self, stage: int, name: str, kind: str, tensor) -> Iterator[tuple]:
        for tp_rank, rank in enumerate(self._stage_ranks(stage)):
            if kind == "replicated":
                yield rank, name, tensor
            elif kind == "column":
                yield rank, name, layouts.split_for_rank(tensor, 0, self.tp, tp_rank)
            elif kind == "row":
                yield rank, name, layouts.split_for_rank(tensor, 1, self.tp, tp_rank)
            elif kind == "fused_qkv":
                yield rank, name, self._qkv_for_rank(*self._split_fused(tensor), tp_rank)
            elif kind == "qkv":
                yield rank, name, self._qkv_for_rank(*tensor, tp_rank)
            elif kind == "lm_head":
                padded = layouts.pad_rows(tensor, self.tp)
                yield rank, name, layouts.split_for_rank(padded, 0, self.tp, tp_rank)
            else:
                raise AssertionError(kind)

    # ------------------------------------------------------------------ the stream
    def feed(self, hf_name: str, tensor: torch.Tensor) -> Iterator[tuple]:
        m = self.layer_re.match(hf_name)
        if m:
            layer, suffix = int(m.group(1)), m.group(2)
            entry = self.table["layer"].get(suffix)
            if entry is None:
                raise ExportError(f"TensorRT-LLM layout: no mapping for HF tensor {hf_name!r}")
            trt_suffix, kind, transpose = entry
            stage, local = divmod(layer, self.layers_per_stage)
            name = f"transformer.layers.{local}.{trt_suffix}"
            if transpose:
                tensor = tensor.t()
            if kind in ("q", "k", "v"):
                parts = self._pending.setdefault((layer, trt_suffix), {})
                parts[kind] = tensor
                if len(parts) < 3:
                    return
                del self._pending[(layer, trt_suffix)]
                tensor, kind = (parts["q"], parts["k"], parts["v"]), "qkv"
            yield from self._place(stage, name, kind, tensor)
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

    def finish(self) -> None:
        if self._pending:
            raise ExportError(f"TensorRT-LLM layout: incomplete fused tensors {sorted(self._pending)[:4]}")


def trtllm_config(family: dict, info, vocab_size: int, dtype: str, tp: int, pp: int) -> dict:
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
        "intermediate_size": info.ffn_hidden_size,
        "norm_epsilon": info.norm_epsilon,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "tie_word_embeddings": info.tied_embeddings,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp, "cp_size": 1,
                    "moe_tp_size": tp, "moe_ep_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        **family["config"],
    }
