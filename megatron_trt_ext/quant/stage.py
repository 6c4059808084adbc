"""Quantization as one stage of the export stream: an HF-named full tensor in, its quantized
tensor and scales out.

The stage sits after conversion (`arch`), so it sees Hugging Face names and layouts, and
before the writers, so it never sees files; the tensors it gets are whole, so it never sees
ranks either. What it needs from the calibration arrives as statistics units (`quant.stats`)
that travel through the plan with their linear; the caller keeps them until the linear's
weight arrives and hands them in.

Three things are decided here and nowhere else:

- which algorithm each HF linear gets (recipe, exclusions, overrides), and that the parts of
  one Megatron linear (q/k/v, gate/up) agree, since serving engines fuse them again;
- how an AWQ/SmoothQuant pre-quant scale is folded into the norm before the linear (the HF
  format has no place for it on the linear when the norm can carry it);
- the KV-cache scales of the attention's k and v projections.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Final, Iterator, Literal, Optional, Union

import torch

from ..errors import ConfigError
from .calibrate import is_linear_part, is_quantizable_linear, linear_of
from .fp8_source import STAT as NATIVE_SCALE
from .numerics import LinearQuantizer, QuantLinear
from .spec import Algorithm, QuantSpec
from .stats import FOLD, GROUP, SEP, fold_name, is_stat, norm_units, stat_name, stats_for, weight_of


class _Deferred(enum.Enum):
    WHOLE_HF_TENSOR = "the whole HF tensor"


# The quantizer of a component of a concatenated linear (a Mamba mixer's in_proj): its weight
# scales come from the whole HF weight, so it is made once the last component arrives
# (`QuantStage.whole_quantizer`).
WHOLE_HF_TENSOR: Final = _Deferred.WHOLE_HF_TENSOR

Quantizer = Union[LinearQuantizer, Literal[_Deferred.WHOLE_HF_TENSOR], None]

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _module(hf_name: str) -> str:
    return hf_name[: -len(".weight")]


def _scale_dtype(value: torch.Tensor) -> torch.Tensor:
    """Scales are float32, except NVFP4's per-block scales (FP8) and MXFP8's (E8M0 exponents, uint8)."""
    return value if value.dtype in (torch.float8_e4m3fn, torch.uint8) else value.float()


@dataclass
class QuantStage:
    """The quantization of one export (one recipe, one model).

    ``unit_names``: every source unit of the plan (the fold statistics among them say which
    norms take a pre-quant scale). ``dtype``: the checkpoint dtype, which pre-quant scales take
    (as ModelOpt writes them). ``conv1d_linears``: the family stores linears as [in, out]
    (GPT-2's Conv1D); scales and packing follow [out, in]. ``aliases``: the family's fold aliases
    (`ArchSpec.aliases`), naming the norm before a linear.
    """

    spec: QuantSpec
    num_layers: int
    zero_centered_gamma: bool
    unit_names: frozenset
    dtype: torch.dtype
    conv1d_linears: bool = False
    aliases: dict = field(default_factory=dict)
    # Megatron linear -> (first HF part, its Algorithm): parts of a fused linear must agree
    part_algos: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ which units
    def needs_source(self, name: str) -> bool:
        """Whether a unit is converted from its source values, not cast to the export dtype
        first: statistics, quantizable linears and norms that take a folded pre-quant scale."""
        return is_stat(name) or is_quantizable_linear(name) or name in self.fold_targets

    @cached_property
    def fold_targets(self) -> frozenset:
        """Norm units that take a folded AWQ pre-quant scale in the HF export."""
        return frozenset(weight_of(n) for n in self.unit_names if SEP + FOLD in n)

    @cached_property
    def folded_linears(self) -> frozenset:
        """Quantizable linears whose AWQ pre-quant scale the HF export folds into the preceding
        norm (`Exporter._fold_aliases`; the fold statistics say which)."""
        folds = {n for n in self.unit_names if SEP + FOLD in n}
        return frozenset(n for n in self.unit_names if folds and is_quantizable_linear(n) and any(
            fold_name(norm) in folds for norm in norm_units(n, self.unit_names, self.aliases)))

    # ------------------------------------------------------------------ quantizers
    def quantizer(self, name: str, tensor: torch.Tensor, stats: dict) -> Quantizer:
        """The quantizer of a Megatron unit (None: not a quantizable linear), taking its
        statistics out of ``stats``."""
        if not is_quantizable_linear(name):
            return None
        if is_linear_part(name):
            return WHOLE_HF_TENSOR
        values = {stat: stats.pop(stat_name(name, stat)) for stat in stats_for(self.spec, name)}
        group_amax = stats.pop(stat_name(name, GROUP), None)
        return LinearQuantizer(tensor, values, native_scale=stats.pop(stat_name(name, NATIVE_SCALE), None),
                               group_amax=group_amax)

    def whole_quantizer(self, name: str, weight: torch.Tensor, stats: dict) -> LinearQuantizer:
        """The quantizer of a concatenated linear (its last component ``name`` just arrived):
        weight scales from the whole HF weight, statistics named after the whole linear."""
        whole = linear_of(name)
        return LinearQuantizer(weight, {stat: stats.pop(stat_name(whole, stat))
                                        for stat in stats_for(self.spec, whole)})

    def take_fold(self, name: str, stats: dict) -> Optional[torch.Tensor]:
        """The pre-quant scale a norm unit takes (None: it takes none)."""
        return stats.pop(fold_name(name), None) if stats else None

    # ------------------------------------------------------------------ algorithms
    def algorithm(self, source_name: str, hf_name: str) -> Optional[Algorithm]:
        """The algorithm of one HF part of a quantizable Megatron linear (None: unquantized).
        The parts of one fused linear (q/k/v, gate/up) must agree: engines fuse them again."""
        if not hf_name.endswith(".weight"):
            return None
        module = _module(hf_name)
        m = _LAYER.search(hf_name)
        layer = int(m.group(1)) if m else None
        if layer is not None and layer >= self.num_layers:
            algo = None  # multi-token prediction layers stay unquantized, as ModelOpt leaves them
        else:
            algo = self.spec.algorithm_for(module, layer, self.num_layers)
        first = self.part_algos.setdefault(source_name, (module, algo))
        if first[1] != algo:
            def label(a):
                return a.name if a is not None else "none"
            raise ConfigError(f"quantization: {first[0]} gets {label(first[1])} but {module} gets {label(algo)}; "
                              f"they are parts of one Megatron linear ({source_name}), which serving engines fuse "
                              "again: give them the same algorithm in exclude/overrides")
        return algo

    def decided_algorithm(self, source_name: str) -> Optional[Algorithm]:
        """What `algorithm` decided for a Megatron linear (None: unquantized, or never seen)."""
        return self.part_algos.get(source_name, (None, None))[1]

    @staticmethod
    def check_shape(module: str, shape: tuple, algo: Algorithm, input_splits: tuple = (1, None)) -> None:
        """Group and block sizes must divide the linear (per inference TP rank when split).
        ``input_splits``: (how many ranks split its inputs, the option that sets it)."""
        out, inp = shape
        group = algo.block or algo.group_size
        what = "block size" if algo.block else "group size"
        fix = f"exclude it (quantization.exclude: ['{module}']) or choose another algorithm"
        if group and inp % group:
            raise ConfigError(f"quantization {algo.name}: {module} has {inp} inputs, not a multiple of the "
                              f"{what} {group}; {fix}")
        if algo.block and out % algo.block:
            raise ConfigError(f"quantization {algo.name}: {module} has {out} outputs, not a multiple of the "
                              f"{what} {algo.block}; {fix}")
        splits, key = input_splits
        if group and splits > 1 and (inp // splits) % group:
            raise ConfigError(f"quantization {algo.name}: with {key}={splits} each rank holds {inp // splits} inputs "
                              f"of {module}, not a multiple of the {what} {group}; lower {key} or {fix}")

    # ------------------------------------------------------------------ tensors out
    def quantize(self, quantizer: LinearQuantizer, hf_name: str, weight: torch.Tensor, algo: Algorithm,
                 native: Optional[torch.Tensor] = None, input_splits: tuple = (1, None)) -> QuantLinear:
        """One HF linear weight, quantized with ``algo``. ``native``: the multipliers of an
        FP8-trained weight, in the weight's HF layout."""
        if self.conv1d_linears:  # back to Linear layout: scales and packing follow [out, in]
            weight = weight.t()
            native = native.t() if native is not None and native.dim() == 2 else native
        self.check_shape(_module(hf_name), tuple(weight.shape), algo, input_splits)
        return quantizer.quantize_part(weight, algo, native)

    def scales(self, qlinear: QuantLinear, hf_name: str, folded: bool = False) -> Iterator[tuple]:
        """(HF name, tensor) of a quantized linear's scales. ``folded``: its pre-quant scale went
        into the norm before it (TensorRT-LLM keeps its own, which the caller feeds there)."""
        module = _module(hf_name)
        for scale, (value, _) in qlinear.scales.items():
            if scale == "pre_quant_scale" and folded:
                continue
            # pre_quant_scale takes the checkpoint dtype (as ModelOpt writes it); scales stay float32
            out = value.to(self.dtype) if scale == "pre_quant_scale" else _scale_dtype(value)
            yield f"{module}.{scale}", out.contiguous()

    @staticmethod
    def kv_scales(quantizer: LinearQuantizer, hf_name: str) -> list:
        """(which, HF name, scale) of the KV-cache scales a k or v projection carries."""
        kv = quantizer.kv_scales()
        return [(which, f"{_module(hf_name)}.{which}_scale", kv[which]) for which in ("k", "v")
                if hf_name.endswith(f"{which}_proj.weight") and which in kv]

    def fold_into_norm(self, hf_name: str, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """norm(x) * s as one norm: weight * s (zero-centred: (1 + w) * s - 1), bias * s."""
        scale = scale.float().reshape(-1)
        x = out.float()
        if hf_name.endswith(".bias") or not self.zero_centered_gamma:
            return x * scale
        return (1.0 + x) * scale - 1.0
