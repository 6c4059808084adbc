"""Scales and quantized weights from full tensors, with ModelOpt's export numerics.

Weight-side scales are recomputed from the full (gathered) weight, which equals ModelOpt's
calibrated weight amax after its TP synchronization (max over shards). Activation-side values
(input amax, SmoothQuant/AWQ pre-quant scales, KV amax) come from the calibration, as statistics
that travel with their linear through the plan. Fused linears (Megatron's QKV and gate/up) share
per-tensor scales, as TensorRT-LLM requires.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

FP8_MAX = 448.0
INT8_MAX = 127.0


@dataclass
class QuantLinear:
    """One HF linear's weight (unquantized, float) and its scales (unsplit)."""

    algo: object
    weight: torch.Tensor
    # name -> (tensor, kind); kind says which weight dims a scale follows when the weight is split:
    # "tensor" (per-tensor, replicated), "out" (dim 0), "block" (dims 0 and 1/group), "in" (inputs)
    scales: dict = field(default_factory=dict)

    def quantized(self, weight: Optional[torch.Tensor] = None, scales: Optional[dict] = None) -> torch.Tensor:
        """The packed/quantized weight (of a split, when given), via ModelOpt."""
        from modelopt.torch.export.quant_utils import to_quantized_weight

        weight = self.weight if weight is None else weight
        scales = self.scales if scales is None else scales
        ws = scales["weight_scale"][0]
        ws2 = scales["weight_scale_2"][0] if "weight_scale_2" in scales else None
        block = self.algo.group_size or None
        if weight.device.type == "meta":  # planning: shapes only
            return _meta_quantized(self.algo, weight)
        return to_quantized_weight(weight.float(), ws.float(), self.algo.name, ws2, block)


def _meta_quantized(algo, weight):
    out, inp = weight.shape
    if algo.weight == "fp8_tensor":
        return torch.empty(out, inp, dtype=torch.float8_e4m3fn, device="meta")
    if algo.weight == "int8_channel":
        return torch.empty(out, inp, dtype=torch.int8, device="meta")
    if algo.weight == "int4_block":
        return torch.empty(out // 2, inp, dtype=torch.uint8, device="meta")
    return torch.empty(out, inp // 2, dtype=torch.uint8, device="meta")  # nvfp4: two e2m1 per byte


def _amax(t: torch.Tensor) -> torch.Tensor:
    return t.detach().abs().amax().float()


def block_scale(weight: torch.Tensor, group: int, maxbound: float) -> torch.Tensor:
    """Per-block scale [out, in/group] = block amax / maxbound (zeros become 1, as ModelOpt does)."""
    out, inp = weight.shape
    amax = weight.detach().float().reshape(out, inp // group, group).abs().amax(dim=-1)
    scale = amax / maxbound
    return torch.where(scale == 0, torch.ones_like(scale), scale)


class LinearQuantizer:
    """Computes the scales of the HF parts of one Megatron linear.

    Args:
        algo: the `Algorithm` (None for KV-cache-only quantization: linears stay unquantized).
        fused: the full Megatron weight (all parts), for the shared per-tensor amax.
        stats: calibration statistics: ``input_amax`` (scalar), ``pre_quant_scale`` ([in]),
            ``k_amax`` / ``v_amax`` (scalars, on the QKV linear).
    """

    def __init__(self, algo, fused: torch.Tensor, stats: dict):
        self.algo = algo
        self.stats = stats
        self.fused_amax = _amax(fused) if fused.device.type != "meta" else torch.empty((), device="meta")

    def _scalar(self, value) -> torch.Tensor:
        return value.reshape(()).float()

    def quantize_part(self, weight: torch.Tensor) -> QuantLinear:
        algo = self.algo
        scales: dict = {}
        input_amax = self.stats.get("input_amax")
        if algo.weight == "fp8_tensor":
            scales["weight_scale"] = (self.fused_amax / FP8_MAX, "tensor")
        elif algo.weight == "int8_channel":
            amax = weight.detach().float().abs().amax(dim=1)
            scale = amax / INT8_MAX
            scales["weight_scale"] = (torch.where(scale == 0, torch.ones_like(scale), scale), "out")
        elif algo.weight == "int4_block":
            scales["weight_scale"] = (block_scale(weight, algo.group_size, 7.0), "block")
        elif algo.weight == "nvfp4_block":
            from modelopt.torch.quantization.qtensor import NVFP4QTensor

            scale_2 = self.fused_amax / (6.0 * FP8_MAX)
            per_block = NVFP4QTensor.get_weights_scaling_factor(weight.float(), algo.group_size,
                                                                scale_2)[0]
            scales["weight_scale"] = (per_block, "block")
            scales["weight_scale_2"] = (scale_2, "tensor")
        if algo.weight_scale_2 and algo.weight == "int4_block":
            scales["weight_scale_2"] = (self.fused_amax / FP8_MAX, "tensor")
        if algo.activation in ("fp8_tensor", "nvfp4") and input_amax is not None:
            divisor = FP8_MAX if algo.activation == "fp8_tensor" else 6.0 * FP8_MAX
            scales["input_scale"] = (self._scalar(input_amax) / divisor, "tensor")
        elif algo.activation == "int8_tensor" and input_amax is not None:
            scales["input_scale"] = (self._scalar(input_amax) / INT8_MAX, "tensor")
        if algo.pre_quant_scale and "pre_quant_scale" in self.stats:
            scales["pre_quant_scale"] = (self.stats["pre_quant_scale"].float(), "in")
        return QuantLinear(algo, weight, scales)

    def kv_scales(self) -> dict:
        """FP8 KV-cache scales (amax / 448) when calibrated."""
        out = {}
        for key in ("k_amax", "v_amax"):
            if key in self.stats:
                out[key[0]] = self._scalar(self.stats[key]) / FP8_MAX
        return out


def split_scale(tensor: torch.Tensor, kind: str, placement: str, tp: int, rank: int,
                group: int = 0) -> torch.Tensor:
    """The part of a scale that goes with a column- or row-split weight."""
    from .. import layouts

    if kind == "tensor" or tp == 1:
        return tensor
    if placement == "column":
        return layouts.split_for_rank(tensor, 0, tp, rank) if kind in ("out", "block") else tensor
    if placement == "row":
        if kind == "block":
            return layouts.split_for_rank(tensor, 1, tp, rank)
        if kind == "in":
            return layouts.split_for_rank(tensor, 0, tp, rank)
        return tensor
    raise AssertionError(placement)
