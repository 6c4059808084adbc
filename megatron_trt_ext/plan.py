"""The export plan: which global Megatron tensors exist, who holds which slice, who writes each.

Built from the model's own ``sharded_state_dict()`` metadata (global key, global shape, offset,
replica id), so it is the same whatever the TP/PP/virtual-PP/DP/EP layout. Stacked keys (a
prepended layer axis, and an expert axis for MoE experts) are expanded to one unit per layer (and
expert), so later stages hold one layer's tensor at a time.

Every rank gathers all ranks' descriptions once and computes the same sorted list of units and
the same writer for each; nothing in the plan depends on which rank computes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import ExportError


@dataclass(frozen=True)
class Piece:
    """A main-replica slice of a global tensor, held by one rank."""

    rank: int
    offset: tuple
    shape: tuple


@dataclass(frozen=True)
class Unit:
    """One global tensor of the source model, and the rank that assembles and writes it."""

    name: str
    shape: tuple
    dtype: str
    pieces: tuple
    writer: int = 0
    holders: frozenset = frozenset()  # (rank, offset, shape) of every copy, replicas included

    def local_to_writer(self, piece: Piece) -> bool:
        """Whether the writer holds ``piece`` itself (as main or replica): then nothing moves."""
        return (self.writer, piece.offset, piece.shape) in self.holders

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=torch_dtype(self.dtype)).element_size()


@dataclass(frozen=True)
class LocalPiece:
    offset: tuple
    global_shape: tuple
    tensor: torch.Tensor
    main: bool


def _is_main_replica(replica_id) -> bool:
    if isinstance(replica_id, int):
        return replica_id == 0
    return all(r == 0 for r in replica_id)


_KEY_LAYER_RE = re.compile(r"(^|\.)layers\.\d+\.")


def unit_name(key: str, prepend_offsets: tuple) -> str:
    """Per-layer (and per-expert) name of a stacked checkpoint key.

    ``decoder.layers.X`` with offsets (l,) -> ``decoder.layers.l.X``; MoE expert keys
    ``decoder.layers.mlp.experts.experts.Y`` with offsets (l, e) ->
    ``decoder.layers.l.mlp.experts.experts.e.Y``. Keys that already carry their layer number
    (HybridModel, heterogeneous or MTP layers, MoE at some layers only) stack experts alone:
    ``decoder.layers.3.mlp.experts.experts.Y`` with offsets (e,) -> ``...experts.experts.e.Y``.
    """
    if not prepend_offsets:
        return key
    if _KEY_LAYER_RE.search(key):
        if len(prepend_offsets) == 1 and ".experts." in key:
            before, after = key.rsplit(".experts.", 1)
            return f"{before}.experts.{prepend_offsets[0]}.{after}"
        raise ExportError(f"tensor {key!r}: {len(prepend_offsets)} stacked axes on a key with a layer number; "
                          "only an expert axis is supported there")
    if ".layers." not in key and not key.startswith("layers."):
        raise ExportError(f"tensor {key!r}: stacked axes on a key without '.layers.' are not supported")
    head, tail = key.split("layers.", 1)
    name = f"{head}layers.{prepend_offsets[0]}.{tail}"
    if len(prepend_offsets) == 1:
        return name
    if len(prepend_offsets) == 2 and ".experts." in tail:
        before, after = name.rsplit(".experts.", 1)
        return f"{before}.experts.{prepend_offsets[1]}.{after}"
    raise ExportError(f"tensor {key!r}: {len(prepend_offsets)} stacked axes are not supported "
                      "(known: layer, and layer x expert for MoE experts)")


def local_shards(chunks: list, rename=None) -> dict:
    """Every local slice of every weight: {unit name: [LocalPiece, ...]}.

    The tensors are the live parameters (views, never copies). Replicas (DP copies, TP-replicated
    norms on other TP ranks, the tied output copy on the last stage) are kept but flagged: they
    send nothing, but a rank holding a full replica can write that tensor without any transfer.
    ``rename`` maps a source's names to the canonical ones the families use (`source.canonical_namer`).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    out: dict = {}
    for chunk in chunks:
        sharded = chunk.sharded_state_dict()
        apply_factories(sharded)
        for st in nested_values(sharded):
            if not isinstance(st, ShardedTensor):
                continue
            if st.flattened_range is not None:
                raise ExportError(f"tensor {st.key!r}: flattened (distributed-optimizer) shards are "
                                  "not model weights; pass the model, not the optimizer state")
            p = st.prepend_axis_num
            name = unit_name(st.key, tuple(st.global_offset[:p]))
            offset, global_shape = tuple(st.global_offset[p:]), tuple(st.global_shape[p:])
            name, offset, global_shape = _merge_gated_halves(name, offset, global_shape)
            if rename is not None:
                name = rename(name)
            out.setdefault(name, []).append(LocalPiece(offset, global_shape, st.data,
                                                       _is_main_replica(st.replica_id)))
    return out


def _merge_gated_halves(name: str, offset: tuple, global_shape: tuple) -> tuple:
    """Gated fc1 saved as separate halves (``weight_w``: gate, ``weight_v``: up; Megatron's
    singleton-local-shards layout, also what ModelOpt-quantized modules use) -> the one
    [gate; up] tensor of the default layout."""
    for suffix, half in (("_w", 0), ("_v", 1)):
        if name.endswith(("weight" + suffix, "bias" + suffix)):
            rows = global_shape[0]
            return (name[: -len(suffix)], (offset[0] + half * rows, *offset[1:]),
                    (2 * rows, *global_shape[1:]))
    return name, offset, global_shape


def describe(local: dict, rank: int) -> dict:
    """Picklable description of a rank's slices, for all_gather_object."""
    return {name: [(rank, p.offset, tuple(p.tensor.shape), p.global_shape,
                    str(p.tensor.dtype).replace("torch.", ""), p.main) for p in pieces]
            for name, pieces in local.items()}


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _order(name: str):
    m = _LAYER_RE.search(name)
    if name.startswith("embedding"):
        return (0, 0, name)
    if m:
        return (1, int(m.group(1)), _natural(name))
    return (2, 0, name)


def _natural(name: str):
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


_EXPERT_RE = re.compile(r"\.experts\.\d+\.")


def expert_group(name: str) -> str:
    """Units that must meet on one writer: the experts of one layer's linear (they are stacked
    into one tensor per inference rank). Every other unit is its own group."""
    return _EXPERT_RE.sub(".experts.*.", name)


def build_units(descriptions: Iterable[dict], group_key=None) -> list:
    """Merge every rank's description into one sorted list of units with their writers.

    The writer of a unit is a rank that already holds all of it (a full replica, e.g. DP copies or
    TP-replicated norms), else the rank holding most of its bytes; ties go to the rank with the
    fewest bytes assigned so far, so writing spreads over ranks and each byte crosses the network
    at most once. Units with the same ``group_key`` share one writer (chosen by their total bytes).
    """
    merged: dict = {}
    for desc in descriptions:
        for name, pieces in desc.items():
            merged.setdefault(name, []).extend(pieces)
    group_key = group_key or (lambda n: n)
    load: dict = {}
    group_writer: dict = {}
    group_held: dict = {}
    for name, entries in merged.items():
        holders = {(r, off, shp) for r, off, shp, _, _, _ in entries}
        held = group_held.setdefault(group_key(name), {})
        for r, off, shp, _, _, is_main in entries:
            if is_main:
                for h in {h[0] for h in holders if h[1:] == (off, shp)}:
                    held[h] = held.get(h, 0) + _numel(shp)
    units = []
    for name in sorted(merged, key=_order):
        entries = merged[name]
        shapes = {e[3] for e in entries}
        dtypes = {e[4] for e in entries}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise ExportError(f"tensor {name!r}: ranks disagree on its global shape/dtype {shapes} {dtypes}")
        shape, dtype = shapes.pop(), dtypes.pop()
        main = sorted((Piece(r, off, shp) for r, off, shp, _, _, is_main in entries if is_main),
                      key=lambda p: (p.offset, p.rank))
        covered = sum(_numel(p.shape) for p in main)
        if covered != _numel(shape) or _overlaps(main):
            raise ExportError(
                f"tensor {name!r}: the main replicas cover {covered} of {_numel(shape)} elements; "
                "some rank's slice is missing or duplicated (are all ranks calling export?)")
        holders = frozenset((r, off, shp) for r, off, shp, _, _, _ in entries)
        key = group_key(name)
        if key not in group_writer:
            held = group_held[key]
            group_writer[key] = min(held, key=lambda r: (-held[r], load.get(r, 0), r))
        writer = group_writer[key]
        unit = Unit(name=name, shape=shape, dtype=dtype, pieces=tuple(main), writer=writer,
                    holders=holders)
        load[writer] = load.get(writer, 0) + unit.nbytes
        units.append(unit)
    return units


def _overlaps(pieces: list) -> bool:
    seen = set()
    for p in pieces:
        key = (p.offset, p.shape)
        if key in seen:
            return True
        seen.add(key)
    return False


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)
