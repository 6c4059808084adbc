"""The one conversion pipeline of a unit: Megatron full tensor -> HF tensors (`arch`) -> quantized
tensors and scales (`quant.stage`, when quantizing) -> TensorRT-LLM rank parts (`formats.trtllm`).

The same pipeline runs twice: on shape-only tensors when the exporter is built (`plan_outputs`
lays out every output file from what it yields) and on the gathered tensors of each export, so
the planned files and the written ones cannot disagree. No ranks and no files here: the job
gathers and writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch

from . import host_memory
from .arch.convert import megatron_to_hf
from .arch.spec import ArchSpec, Context
from .errors import ExportError
from .formats.trtllm import TrtllmConverter
from .quant.fp8_source import dequantize
from .quant.numerics import LinearQuantizer
from .quant.stage import WHOLE_HF_TENSOR, QuantStage
from .quant.stats import is_stat


@dataclass
class ConvertState:
    """What one conversion holds between source tensors: calibration statistics waiting for their
    linear, and parts of concatenated tensors waiting for the rest."""

    stats: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)

    def finish(self) -> None:
        if self.pending:
            raise ExportError(f"incomplete concatenated tensors (parts never arrived): {sorted(self.pending)[:4]}")


@dataclass
class Conversion:
    """One pass of the plan's units through the pipeline (one export, or the plan).

    ``spec``: the family (`arch.spec.ArchSpec`). ``trtllm``: the TensorRT-LLM converter, None
    when that format is not written. ``quant``: the quantization stage, None when not
    quantizing. ``keep_source``: units with an output in a dtype other than ``dtype``.
    """

    spec: ArchSpec
    ctx: Context
    dtype: torch.dtype
    trtllm: Optional[TrtllmConverter] = None
    quant: Optional[QuantStage] = None
    keep_source: frozenset = frozenset()
    state: ConvertState = field(default_factory=ConvertState)

    def casts_first(self, name: str) -> bool:
        """Whether a unit is cast to the export dtype before its transforms: every unquantized
        unit whose outputs all take the export dtype."""
        if name in self.keep_source:
            return False
        return self.quant is None or not self.quant.needs_source(name)

    def unit(self, name: str, tensor: torch.Tensor, cast_first: bool = True) -> Iterator[tuple]:
        """Yields (hf_name, hf_tensor, [(rank, trt_name, trt_tensor), ...]) of one unit.

        Casting is elementwise and every output of an unquantized unit is a rearrangement of its
        elements (views, splits, zero padding), so the unit is cast once, first: the same bits as
        casting each output, one pass instead of one per format, and the transforms then move
        export-dtype bytes. Units with an output that keeps another dtype (MoE routers stay
        float32; ``keep_source``), norms that take a folded pre-quant scale and quantized
        linears convert from the source values. Calibration statistics (quantized exports) wait
        in ``state.stats`` until their linear's weight arrives, parts of concatenated tensors in
        ``state.pending`` until the last part arrives.
        """
        state, quant = self.state, self.quant
        if is_stat(name):
            state.stats[name] = tensor
            return
        quantizer = quant.quantizer(name, tensor, state.stats) if quant is not None else None
        fold = quant.take_fold(name, state.stats) if quant is not None else None
        if cast_first and quantizer is None and fold is None and self.casts_first(name):
            tensor = host_memory.cast(tensor, self.dtype)
        native = quantizer.native_scale if isinstance(quantizer, LinearQuantizer) else None
        # FP8-trained weights: their multipliers go through the same row transforms as the bytes
        native_parts = dict(megatron_to_hf(self.spec, self.ctx, [(name, native)], {})) if native is not None else {}
        for hf_name, out in megatron_to_hf(self.spec, self.ctx, [(name, tensor)], state.pending):
            algo = quant.algorithm(name, hf_name) if quantizer is not None else None
            if algo is not None:
                if quantizer is WHOLE_HF_TENSOR:  # the concatenated linear is complete: its own scales
                    quantizer = quant.whole_quantizer(name, out, state.stats)
                yield from self._quantized(quantizer, hf_name, out, algo, folded=name in quant.folded_linears,
                                           native=native_parts.get(hf_name))
                continue
            if hf_name in native_parts:  # an FP8-trained linear left unquantized: its values
                out = dequantize(out, native_parts[hf_name])
            trt = list(self.trtllm.feed(hf_name, out)) if self.trtllm is not None else []
            if trt and isinstance(quantizer, LinearQuantizer):
                trt += self._fused_kv_scale(quantizer, hf_name)
            hf_out = out if fold is None else quant.fold_into_norm(hf_name, out, fold)
            yield hf_name, hf_out.to(self._hf_dtype(hf_name)), trt
            if isinstance(quantizer, LinearQuantizer) and hf_name.endswith(("k_proj.weight", "v_proj.weight")):
                yield from self._kv_scales(quantizer, hf_name)

    def finish(self) -> None:
        """Every fused and concatenated tensor was completed (raises ExportError otherwise)."""
        if self.trtllm is not None:
            self.trtllm.finish()
        self.state.finish()

    def _hf_dtype(self, hf_name: str) -> torch.dtype:
        """The export dtype, or float32 for what the family keeps in float32 (MoE routers)."""
        if any(re.search(pattern, hf_name) for pattern in self.spec.keep_fp32):
            return torch.float32
        return self.dtype

    def _quantized(self, quantizer, hf_name: str, weight: torch.Tensor, algo, folded: bool, native) -> Iterator[tuple]:
        trtllm = self.trtllm
        splits = trtllm.input_splits(hf_name) if trtllm is not None else (1, None)
        qlinear = self.quant.quantize(quantizer, hf_name, weight, algo, native, splits)
        trt = list(trtllm.feed(hf_name, qlinear)) + self._fused_kv_scale(quantizer, hf_name) \
            if trtllm is not None else []
        yield hf_name, qlinear.quantized(), trt
        for scale_name, value in self.quant.scales(qlinear, hf_name, folded):
            yield scale_name, value, []
        yield from self._kv_scales(quantizer, hf_name)

    def _fused_kv_scale(self, quantizer, hf_name: str) -> list:
        """The KV-cache scale of a fused q|k|v HF linear (GPT-2's c_attn), for TensorRT-LLM: the
        HF format of such a family is not written quantized (`ArchSpec.quantized_formats_unsupported`)."""
        kv = quantizer.kv_scales()
        if not kv or not self.trtllm.fused_qkv(hf_name):
            return []
        return [t for which in ("k", "v") for t in self.trtllm.feed_kv_scale(hf_name, which, kv[which])]

    def _kv_scales(self, quantizer, hf_name: str) -> Iterator[tuple]:
        for which, scale_name, value in self.quant.kv_scales(quantizer, hf_name):
            trt = list(self.trtllm.feed_kv_scale(hf_name, which, value)) if self.trtllm is not None else []
            yield scale_name, value.float(), trt


def plan_outputs(conversion: Conversion, sources: Iterable[tuple], trt_ranks: int) -> tuple:
    """Every output file's tensors, from the conversion run on shape-only tensors; and the units
    that must not be cast first (an output in another dtype than the export's).

    ``sources``: (unit name, shape-only tensor) in plan order. Returns (specs, keep_source):
    ``specs["hf"]`` lists (name, dtype, shape) of the HF tensors, ``specs["trtllm"]`` the same per
    rank file, and ``specs["quant"]`` (quantized exports) what the config blocks say per linear.
    """
    dtype, quant = conversion.dtype, conversion.quant
    hf_specs, rank_specs = [], {r: [] for r in range(trt_ranks)}
    keep_source = set()
    quantized: dict = {}  # HF module -> Algorithm
    unquantized_hf, unquantized_trt = set(), set()
    for name, meta in sources:
        for hf_name, out, trt in conversion.unit(name, meta, cast_first=False):
            hf_specs.append((hf_name, out.dtype, tuple(out.shape)))
            if out.dtype != dtype:
                keep_source.add(name)
            for rank, trt_name, t in trt:
                rank_specs[rank].append((trt_name, t.dtype, tuple(t.shape)))
                if t.dtype != dtype:
                    keep_source.add(name)
            if quant is None or not hf_name.endswith(".weight"):
                continue
            module = hf_name[: -len(".weight")]
            algo = quant.decided_algorithm(name) if module != "lm_head" else None
            if algo is not None:
                quantized[module] = algo
            elif out.dim() >= 2:  # an unquantized linear, embedding or convolution: listed, as ModelOpt does
                unquantized_hf.add(module)
                unquantized_trt.update(n[: -len(".weight")] for _, n, t in trt
                                       if t.dim() == 2 and n.endswith(".weight") and ".layers." in n)
    conversion.finish()
    specs = {"hf": hf_specs, "trtllm": {f"rank{r}.safetensors": s for r, s in rank_specs.items()}}
    if quant is not None:
        unquantized_hf.add("lm_head")  # also when tied to the embedding (the module exists)
        specs["quant"] = {"layers": {m: a.name for m, a in quantized.items()},
                          "hf_exclude": sorted(unquantized_hf),
                          "trt_exclude": ["lm_head", *sorted(unquantized_trt)]}
    return specs, frozenset(keep_source)
