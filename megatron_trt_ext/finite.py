"""The NaN/Inf check on what is written: one reduction per tensor, no boolean tensor.

`torch.isfinite(t).all()` builds a boolean tensor as large as ``t`` and reads it again; on CPU
it took most of an export's time. ``torch.aminmax`` reads ``t`` once and propagates NaN (a NaN
anywhere makes both results NaN), and an Inf anywhere is one of the two extremes, so the tensor
is finite exactly when its minimum and maximum are. Cheaper still, for bfloat16 and float32: a
NaN or an Inf anywhere makes the sum NaN or Inf, so a finite sum proves the tensor finite; only
a sum that is not finite (a NaN or Inf, or a sum that overflowed) is checked again with `aminmax`.
The check runs on the tensor *as written* (after the cast to the export dtype), so a value that
is finite in the live dtype but overflows the export dtype (70000.0 as float16) shows up as Inf
and is caught.
"""

from __future__ import annotations

import math

import torch

from .errors import ExportError

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# dtypes whose sum is checked first: it reads the tensor once and costs 0.6x aminmax for bfloat16,
# 0.5x for float32 (this CPU); a float16 sum overflows its 65504 too often to be worth trying
_SUMMED = (torch.bfloat16, torch.float32)


def is_finite(tensor) -> bool:
    """Whether every element of a floating tensor (or of every block of a `layouts.RowBlocks`) is
    finite. Integer, empty and shape-only (meta) tensors count as finite."""
    parts = getattr(tensor, "parts", None)
    if parts is not None:
        return all(is_finite(part) for part in parts if isinstance(part, torch.Tensor))
    if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
        return True
    if tensor.dtype in _FP8:  # no Inf in FP8 E4M3; NaN only (small scale-quantized tensors)
        return not bool(torch.isnan(tensor.float()).any())
    if tensor.dtype in _SUMMED and math.isfinite(float(tensor.sum())):
        return True  # a NaN or an Inf anywhere makes the sum NaN or Inf; a finite sum proves none
    low, high = torch.aminmax(tensor)  # exact where the sum overflowed (or cannot be trusted to)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def check_finite(name: str, tensor) -> None:
    """Refuse NaN/Inf in a tensor as it is written."""
    if not is_finite(tensor):
        raise ExportError(f"{name}: contains NaN or Inf values as written ({tensor.dtype}); refusing to export "
                          "a broken model (values out of the export dtype's range become Inf)")
