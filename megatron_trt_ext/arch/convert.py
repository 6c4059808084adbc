"""The family-agnostic engine: a stream of Megatron (name, tensor) -> a stream of HF (name, tensor).

Nothing here branches on a family; the family's table says everything.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from ..errors import ExportError
from .spec import ArchSpec, Concat, Context, StackExperts


def canonical_name(spec: ArchSpec, name: str) -> str:
    """Map alternative Megatron spellings (local-spec norms) to the table's canonical ones."""
    for canonical, alternatives in spec.aliases.items():
        for alt in alternatives:
            if name.endswith("." + alt):
                return name[: -len(alt)] + canonical
    return name


def find_transform(spec: ArchSpec, name: str):
    for transform in spec.mappings:
        groups = transform.matches(name)
        if groups is not None:
            return transform, groups
    return None, None


def source_rows(spec: ArchSpec, info) -> Iterator[tuple]:
    """(Megatron name, transform, groups) of every source the model must provide for this
    family, in table order: what the forward expects and what the inverse produces."""
    for transform in spec.mappings:
        if not transform.when(info):
            continue
        rows = [(transform.src, {})]
        if "{P}" in transform.src:
            rows = [(t.replace("{P}", p), {**g, "P": p}) for t, g in rows for p in transform.parts]
        if "{E}" in transform.src:
            rows = [(t.replace("{E}", str(e)), {**g, "E": str(e)}) for t, g in rows for e in range(info.num_experts)]
        if "{L}" in transform.src:
            rows = [(t.replace("{L}", str(i)), {**g, "L": str(i)}) for t, g in rows for i in transform.layers(info)]
        for name, groups in rows:
            yield name, transform, groups


def expected_sources(spec: ArchSpec, info) -> list:
    """Every Megatron name the model must provide for this family."""
    return [name for name, _, _ in source_rows(spec, info)]


def check_sources(spec: ArchSpec, info, names: Iterable[str]) -> None:
    """Fail before any work if a source tensor is unmapped or a required one is missing."""
    names = [canonical_name(spec, n) for n in names]
    unmapped = [n for n in names if find_transform(spec, n)[0] is None]
    missing = sorted(set(expected_sources(spec, info)) - set(names))
    if unmapped or missing:
        raise ExportError(
            f"family {spec.name!r}: the model's tensors do not match the family table. "
            f"Unmapped tensors: {unmapped[:8]}{' ...' if len(unmapped) > 8 else ''}; "
            f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}. "
            "This model variant is not supported; pass family= explicitly or report the layout.")


def megatron_to_hf(spec: ArchSpec, ctx: Context, stream: Iterable, pending: dict = None) -> Iterator[tuple]:
    """Convert a stream of full Megatron tensors to HF-named tensors, one source at a time.
    ``pending`` holds the parts of concatenated tensors between calls (one per export)."""
    for name, tensor in stream:
        transform, groups = find_transform(spec, canonical_name(spec, name))
        if transform is None:
            raise ExportError(f"family {spec.name!r}: no mapping for Megatron tensor {name!r}")
        if isinstance(transform, (Concat, StackExperts)):
            yield from transform.apply(tensor, groups, ctx, pending)
        else:
            yield from transform.apply(tensor, groups, ctx)
