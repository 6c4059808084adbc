"""Assemble full global tensors from slices, one unit at a time.

This version serves a single rank (every slice is local). The multi-rank path moves slices to a
writer rank in the plan's order.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .errors import ExportError
from .plan import Unit, torch_dtype


def assemble_local(unit: Unit, local: dict) -> torch.Tensor:
    """The full tensor of ``unit`` from local slices; a single covering slice is returned as is."""
    pieces = local.get(unit.name)
    if not pieces:
        raise ExportError(f"tensor {unit.name!r}: no local slice on this rank")
    if len(pieces) == 1 and tuple(pieces[0][2].shape) == tuple(unit.shape):
        return pieces[0][2].detach()
    first = pieces[0][2]
    full = torch.empty(unit.shape, dtype=first.dtype, device=first.device)
    for offset, _, tensor in pieces:
        index = tuple(slice(o, o + s) for o, s in zip(offset, tensor.shape))
        full[index] = tensor.detach()
    return full


def iter_local(units: list, local: dict) -> Iterator[tuple]:
    for unit in units:
        yield unit.name, assemble_local(unit, local)


def iter_meta(units: list) -> Iterator[tuple]:
    """Shape-only stand-ins with the same names, for planning the output files."""
    for unit in units:
        yield unit.name, torch.empty(unit.shape, dtype=torch_dtype(unit.dtype), device="meta")
