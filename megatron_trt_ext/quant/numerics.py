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
    # "tensor" (per-tensor, replicated), "out" (dim 0), "block" (dims 0 and 1/group), "in" (inputs),
    # "block2d" (FP8 128x128 blocks, HF only)
    scales: dict = field(default_factory=dict)
    # the weight is E4M3 already (uint8 bytes): FP8-trained weights exported natively
    prequantized: bool = False

    def quantized(self, weight: Optional[torch.Tensor] = None, scales: Optional[dict] = None) -> torch.Tensor:
        """The packed/quantized weight (of a split, when given), via ModelOpt."""
        from modelopt.torch.export.quant_utils import to_quantized_weight

        weight = self.weight if weight is None else weight
        if self.prequantized:
            return weight.view(torch.float8_e4m3fn)
        scales = self.scales if scales is None else scales
        ws = scales["weight_scale"][0]
        ws2 = scales["weight_scale_2"][0] if "weight_scale_2" in scales else None
        block = self.algo.block or self.algo.group_size or None
        if weight.device.type == "meta":  # planning: shapes only
            return _meta_quantized(self.algo, weight)
        if ws.dtype != torch.uint8:  # MXFP8's E8M0 exponents stay uint8
            ws = ws.float()
        return to_quantized_weight(weight.float(), ws, self.algo.name, ws2, block)


def _meta_quantized(algo, weight):
    out, inp = weight.shape
    if algo.weight in ("fp8_tensor", "fp8_channel", "fp8_block", "mxfp8"):
        return torch.empty(out, inp, dtype=torch.float8_e4m3fn, device="meta")
    if algo.weight == "int8_channel":
        return torch.empty(out, inp, dtype=torch.int8, device="meta")
    if algo.weight == "int4_block":
        return torch.empty(out // 2, inp, dtype=torch.uint8, device="meta")
    return torch.empty(out, inp // 2, dtype=torch.uint8, device="meta")  # nvfp4: two e2m1 per byte


def _amax(t: torch.Tensor) -> torch.Tensor:
    return t.detach().abs().amax().float()


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def block_scale(weight: torch.Tensor, group: int, maxbound: float) -> torch.Tensor:
    """Per-block scale [out, in/group] = block amax / maxbound (zeros become 1, as ModelOpt does)."""
    out, inp = weight.shape
    amax = weight.detach().float().reshape(out, inp // group, group).abs().amax(dim=-1)
    return _nonzero(amax / maxbound)


def square_block_scale(weight: torch.Tensor, block: int) -> torch.Tensor:
    """FP8 2-D block scale in ModelOpt's unified layout [out/b, 1, in/b, 1] = block amax / 448."""
    out, inp = weight.shape
    amax = weight.detach().float().reshape(out // block, block, inp // block, block).abs().amax(dim=(1, 3))
    return _nonzero(amax / FP8_MAX).reshape(out // block, 1, inp // block, 1)


class LinearQuantizer:
    """Computes the scales of the HF parts of one Megatron linear.

    Args:
        fused: the full Megatron weight (all parts), for the shared per-tensor amax.
        stats: calibration statistics: ``input_amax`` (scalar), ``pre_quant_scale`` ([in]),
            ``k_amax`` / ``v_amax`` (scalars, on the QKV linear).
        kv_divisor: the amax divisor of the KV-cache scales (448 for FP8 and for NVFP4, whose
            per-tensor scale ModelOpt's unified export writes as amax / 448 too).
    """

    def __init__(self, fused: torch.Tensor, stats: dict, kv_divisor: float = FP8_MAX,
                 native_scale: Optional[torch.Tensor] = None, group_amax: Optional[torch.Tensor] = None):
        self.stats = stats
        # max |weight| over a shared-input group of separate linears (`ArchSpec.shared_input_linears`)
        self.group_amax = group_amax
        self.kv_divisor = kv_divisor
        self.native_scale = native_scale  # FP8-trained weights: their multipliers (see quant.fp8_source)
        self._fused = fused
        self._fused_amax = None

    @property
    def fused_amax(self) -> torch.Tensor:
        if self._fused_amax is None:
            fused = self._fused
            if fused.device.type == "meta":
                self._fused_amax = torch.empty((), device="meta")
            elif self.native_scale is not None:
                from .fp8_source import dequantize

                self._fused_amax = _amax(dequantize(fused, self.native_scale))
            else:
                self._fused_amax = _amax(fused)
        return self._fused_amax

    def _scalar(self, value) -> torch.Tensor:
        return value.reshape(()).float()

    def quantize_part(self, weight: torch.Tensor, algo, native: Optional[torch.Tensor] = None) -> QuantLinear:
        """One HF part. ``native``: the part's FP8 multipliers when the weight is FP8 as trained
        (uint8 E4M3 bytes): FP8 formats keep the bytes (see `_native_fp8`), others dequantize."""
        if native is not None:
            if algo.weight in ("fp8_tensor", "fp8_channel", "fp8_block"):
                qlinear = self._native_fp8(weight, native, algo)
                qlinear.scales.update(self._activation_scales(algo))
                return qlinear
            from .fp8_source import dequantize

            weight = dequantize(weight, native)
        scales: dict = {}
        meta = weight.device.type == "meta"
        if algo.weight == "fp8_tensor":
            scales["weight_scale"] = (self.fused_amax / FP8_MAX, "tensor")
        elif algo.weight == "fp8_channel":
            scales["weight_scale"] = (_nonzero(weight.detach().float().abs().amax(dim=1) / FP8_MAX), "out")
        elif algo.weight == "fp8_block":
            scales["weight_scale"] = (square_block_scale(weight, algo.block), "block2d")
        elif algo.weight == "mxfp8":
            if meta:
                scale = torch.empty(weight.shape[0], weight.shape[1] // algo.group_size, dtype=torch.uint8,
                                    device="meta")
            else:
                from modelopt.torch.quantization.qtensor import MXFP8QTensor

                scale = MXFP8QTensor.get_weights_scaling_factor(weight.float())
            scales["weight_scale"] = (scale, "block")
        elif algo.weight == "int8_channel":
            scales["weight_scale"] = (_nonzero(weight.detach().float().abs().amax(dim=1) / INT8_MAX), "out")
        elif algo.weight == "int4_block":
            scales["weight_scale"] = (block_scale(weight, algo.group_size, 7.0), "block")
        elif algo.weight == "nvfp4_block":
            amax = self.fused_amax if self.group_amax is None else self.group_amax.reshape(()).float()
            scale_2 = amax / (6.0 * FP8_MAX)
            if meta:
                per_block = torch.empty(weight.shape[0], weight.shape[1] // algo.group_size,
                                        dtype=torch.float8_e4m3fn, device="meta")
            else:
                from modelopt.torch.quantization.qtensor import NVFP4QTensor

                per_block = NVFP4QTensor.get_weights_scaling_factor(weight.float(), algo.group_size, scale_2)[0]
            scales["weight_scale"] = (per_block, "block")
            scales["weight_scale_2"] = (scale_2, "tensor")
        if algo.weight_scale_2 and algo.weight == "int4_block":
            scales["weight_scale_2"] = (self.fused_amax / FP8_MAX, "tensor")
        scales.update(self._activation_scales(algo))
        return QuantLinear(algo, weight, scales)

    def _activation_scales(self, algo) -> dict:
        scales = {}
        input_amax = self.stats.get("input_amax")
        if algo.activation is not None:
            if input_amax is None:
                raise AssertionError(f"{algo.name}: no input amax was calibrated for this linear")
            divisor = {"fp8_tensor": FP8_MAX, "nvfp4": 6.0 * FP8_MAX, "int8_tensor": INT8_MAX}[algo.activation]
            scales["input_scale"] = (self._scalar(input_amax) / divisor, "tensor")
        if algo.pre_quant_scale and "pre_quant_scale" in self.stats:
            scales["pre_quant_scale"] = (self.stats["pre_quant_scale"].float(), "in")
        return scales

    def _native_fp8(self, weight: torch.Tensor, native: torch.Tensor, algo) -> QuantLinear:
        """FP8 as trained into an FP8 format: the trained bytes wherever the format's scale is the
        trained one (per-tensor: one multiplier over the fused linear, the largest of its shards';
        per-channel: each row's; 128x128 blocks: each block's), requantized only where a coarser
        format scale spans shards trained with different ones."""
        from .fp8_source import BLOCK, requantize

        rows, cols = weight.shape
        if algo.weight == "fp8_tensor":
            target = self.native_scale.amax()
            return QuantLinear(algo, requantize(weight, native, target), {"weight_scale": (target, "tensor")}, True)
        if algo.weight == "fp8_channel":
            target = native.amax(dim=1)
            return QuantLinear(algo, requantize(weight, native, target[:, None]),
                               {"weight_scale": (target, "out")}, True)
        assert algo.block == BLOCK, algo
        blocks = native.reshape(rows // BLOCK, BLOCK, -1).amax(dim=1)
        target = blocks.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)[:, :cols]
        return QuantLinear(algo, requantize(weight, native, target),
                           {"weight_scale": (blocks.reshape(rows // BLOCK, 1, -1, 1), "block2d")}, True)

    def kv_scales(self) -> dict:
        """KV-cache scales (amax / divisor) when calibrated."""
        out = {}
        for key in ("k_amax", "v_amax"):
            if key in self.stats:
                out[key[0]] = self._scalar(self.stats[key]) / self.kv_divisor
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
