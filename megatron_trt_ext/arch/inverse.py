"""The family-agnostic inverse engine: HF tensors -> full (unsharded, global-name) Megatron tensors.

The mirror of `arch.convert.megatron_to_hf`: for every source tensor the family's table expects
of the model (`convert.source_rows`), the row's own ``inverse`` builds it from the HF tensors it
wrote. Nothing here branches on a family. Used to read an HF checkpoint back into Megatron's
layout (`megatron_trt_ext.importer`) and by the round-trip tests of every table.

Exact both ways, bit for bit in the HF tensors' dtype, except the vocabulary padding rows, which
the HF checkpoint does not hold: they come back as zeros (`spec.Vocab.inverse`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import ExportError
from .convert import find_transform, source_rows
from .spec import ArchSpec, Context, Vocab

# HF tensors that some checkpoints carry and no Megatron tensor holds (recomputed from the config)
IGNORED_HF_TENSORS = (r"\.rotary_emb\.inv_freq$",)


class _Reads(Mapping):
    """An HF mapping that remembers which names were read (to report the ones no row reads)."""

    def __init__(self, hf: Mapping):
        self.hf, self.read = hf, set()

    def __getitem__(self, name):
        value = self.hf[name]
        self.read.add(name)
        return value

    def __contains__(self, name):
        return name in self.hf

    def __iter__(self):
        return iter(self.hf)

    def __len__(self):
        return len(self.hf)


def hf_to_megatron(spec: ArchSpec, ctx: Context, hf: Mapping, strict: bool = True, only=None) -> dict:
    """{Megatron global name: full tensor} of every source tensor the family expects of
    ``ctx.info``, from ``hf`` (HF name -> tensor; any mapping, e.g. lazily read files).

    Names are the table's canonical ones (before `convert.canonical_name`'s aliases). Tensors keep
    the HF dtype and may be views of ``hf``'s. ``strict``: an HF tensor that no row reads (other
    than `IGNORED_HF_TENSORS`) is an error, as a missing one always is: the checkpoint is not the
    model the family table describes. ``only``: build just these Megatron names (what one rank
    holds; no check of unread HF tensors then).
    """
    reads = _Reads(hf)
    out = {}
    for name, transform, groups in source_rows(spec, ctx.info):
        if only is not None and name not in only:
            continue
        try:
            out[name] = transform.inverse(reads, groups, ctx)
        except (KeyError, ValueError, RuntimeError) as exc:  # missing, or of a shape the model cannot take
            message = exc.args[0] if exc.args else str(exc)
            raise ExportError(f"family {spec.name!r}: cannot build Megatron tensor {name!r}: {message}") from None
    if strict and only is None:
        unread = sorted(n for n in hf if n not in reads.read and not any(re.search(p, n) for p in IGNORED_HF_TENSORS))
        if unread:
            raise ExportError(f"family {spec.name!r}: HF tensors no Megatron tensor of this model reads: "
                              f"{unread[:8]}{' ...' if len(unread) > 8 else ''}")
    return out


def vocab_rows(spec: ArchSpec, name: str) -> bool:
    """Whether the Megatron tensor ``name`` is a vocabulary table (its padding rows do not
    survive a round trip through HF)."""
    transform, _ = find_transform(spec, name)
    return isinstance(transform, Vocab)


def hf_vocab_size(spec: ArchSpec, info, hf: Mapping) -> int:
    """The vocabulary size of an HF checkpoint: the rows of the first vocabulary table it holds."""
    for name, transform, groups in source_rows(spec, info):
        if isinstance(transform, Vocab):
            dst = transform.dst.replace("{L}", groups.get("L", ""))
            if dst in hf:
                return int(hf[dst].shape[0])
    raise ExportError(f"family {spec.name!r}: the HF checkpoint has none of the family's vocabulary tables")
