"""The plan from per-rank descriptions in the older dict form, a compact way for tests to write
synthetic layouts (the package plans from `plan.describe` only)."""

from __future__ import annotations

from typing import Iterable

from megatron_trt_ext.plan import group_ranks, plan_units


def rank_descriptions(legacy: Iterable[dict]) -> list:
    """The older per-rank form ``{name: [(rank, offset, shape, global shape, dtype, main)]}`` (one
    dict per rank, in rank order) -> ``(pieces, main)`` descriptions."""
    out = []
    for desc in legacy:
        rows = sorted((name, off, tuple(shp), tuple(gshape), dtype, main)
                      for name, entries in desc.items() for _, off, shp, gshape, dtype, main in entries)
        out.append((tuple(r[:5] for r in rows), tuple(r[5] for r in rows)))
    return out


def build_units(descriptions: Iterable[dict], group_key=None) -> list:
    """`plan_units` from per-rank descriptions in the older dict form (see `rank_descriptions`)."""
    return plan_units(group_ranks(rank_descriptions(descriptions)), group_key)
