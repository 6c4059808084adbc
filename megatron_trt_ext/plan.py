"""The export plan: which global Megatron tensors exist, and who holds which slice of each.

Built from the model's own ``sharded_state_dict()`` metadata (global key, global shape, offset,
replica id), so it is the same whatever the TP/PP/virtual-PP/DP layout. Layer-stacked keys
(``decoder.layers.X`` with a prepended layer axis) are expanded to one unit per layer, so that
later stages hold one layer's tensor at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import ExportError


@dataclass(frozen=True)
class Piece:
    """A slice of a global tensor held by one rank."""

    rank: int
    offset: tuple
    shape: tuple


@dataclass(frozen=True)
class Unit:
    """One global tensor of the source model (one layer's slice of a stacked key)."""

    name: str
    shape: tuple
    dtype: str
    pieces: tuple

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _is_main_replica(replica_id) -> bool:
    if isinstance(replica_id, int):
        return replica_id == 0
    return all(r == 0 for r in replica_id)


def _unit_name(key: str, prepend_offsets: tuple) -> str:
    if not prepend_offsets:
        return key
    if len(prepend_offsets) == 1 and ".layers." in key:
        head, tail = key.split(".layers.", 1)
        return f"{head}.layers.{prepend_offsets[0]}.{tail}"
    raise ExportError(
        f"tensor {key!r}: {len(prepend_offsets)} stacked axes are not supported "
        "(only per-layer stacking; MoE expert stacking is not supported by this version)")


def local_shards(chunks: list) -> dict:
    """Main-replica local slices of every weight: {unit name: [(offset, tensor), ...]}.

    The tensors are the live parameters (views, never copies). Non-main replicas (DP copies,
    TP-replicated norms on other ranks, tied output copies) are skipped: they send nothing.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    out: dict = {}
    for chunk in chunks:
        sharded = chunk.sharded_state_dict()
        apply_factories(sharded)
        for st in nested_values(sharded):
            if not isinstance(st, ShardedTensor) or not _is_main_replica(st.replica_id):
                continue
            if st.flattened_range is not None:
                raise ExportError(f"tensor {st.key!r}: flattened (distributed-optimizer) shards are "
                                  "not model weights; pass the model, not the optimizer state")
            p = st.prepend_axis_num
            name = _unit_name(st.key, tuple(st.global_offset[:p]))
            out.setdefault(name, []).append(
                (tuple(st.global_offset[p:]), tuple(st.global_shape[p:]), st.data))
    return out


def describe(local: dict, rank: int) -> dict:
    """Picklable description of a rank's slices, for all_gather_object."""
    return {name: [(rank, off, tuple(t.shape), gshape, str(t.dtype).replace("torch.", ""))
                   for off, gshape, t in pieces]
            for name, pieces in local.items()}


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _order(name: str):
    m = _LAYER_RE.search(name)
    if name.startswith("embedding"):
        return (0, 0, name)
    if m:
        return (1, int(m.group(1)), name)
    return (2, 0, name)


def build_units(descriptions: Iterable[dict]) -> list:
    """Merge every rank's description into one sorted list of units; identical on every rank."""
    merged: dict = {}
    for desc in descriptions:
        for name, pieces in desc.items():
            merged.setdefault(name, []).extend(pieces)
    units = []
    for name in sorted(merged, key=_order):
        pieces = merged[name]
        shapes = {p[3] for p in pieces}
        dtypes = {p[4] for p in pieces}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise ExportError(f"tensor {name!r}: ranks disagree on its global shape/dtype {shapes} {dtypes}")
        unit = Unit(name=name, shape=shapes.pop(), dtype=dtypes.pop(),
                    pieces=tuple(sorted((Piece(r, off, shp) for r, off, shp, _, _ in pieces),
                                        key=lambda p: (p.offset, p.rank))))
        covered = sum(_numel(p.shape) for p in unit.pieces)
        if covered != unit.numel:
            raise ExportError(
                f"tensor {name!r}: the main replicas cover {covered} of {unit.numel} elements; "
                "some rank's slice is missing or duplicated (are all ranks calling export?)")
        units.append(unit)
    return units


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)
