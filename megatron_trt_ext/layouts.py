"""Pure layout functions on full tensors. No ranks, no collectives, no format names.

Each transform has its inverse next to it so tests can check ``inverse(forward(x)) == x``.
"""

from __future__ import annotations

import torch


def qkv_interleaved_to_split(qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """Megatron's fused QKV -> (q, k, v).

    Megatron stores the rows of ``linear_qkv`` grouped by query group: for each of the G groups,
    its nh/G query heads, then its key head, then its value head. Works for weights
    ``[(nh + 2G) * d, H]`` and biases ``[(nh + 2G) * d]``.
    """
    heads_per_group = num_heads // num_query_groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_query_groups, heads_per_group + 2, head_dim, *rest)
    q = grouped[:, :heads_per_group].reshape(num_heads * head_dim, *rest)
    k = grouped[:, heads_per_group].reshape(num_query_groups * head_dim, *rest)
    v = grouped[:, heads_per_group + 1].reshape(num_query_groups * head_dim, *rest)
    return q, k, v


def qkv_split_to_interleaved(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                             num_query_groups: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`qkv_interleaved_to_split`."""
    heads_per_group = num_heads // num_query_groups
    rest = q.shape[1:]
    q = q.reshape(num_query_groups, heads_per_group, head_dim, *rest)
    k = k.reshape(num_query_groups, 1, head_dim, *rest)
    v = v.reshape(num_query_groups, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def gated_to_gate_up(fc1: torch.Tensor):
    """Gated fc1 in checkpoint (global) layout ``[gate; up]`` -> (gate, up).

    Megatron's sharded state dict already un-interleaves the per-TP-rank [gate_r; up_r] halves
    (its swiglu factory), so the global tensor is simply the two halves.
    """
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def gate_up_to_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`gated_to_gate_up`."""
    return torch.cat([gate, up], dim=0)


def fused_qkv_to_split(fused: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """One [Q|K|V] tensor (GPT-2's c_attn, [out, in] layout) -> (q, k, v): the inverse of
    ``torch.cat(qkv_interleaved_to_split(...))``."""
    return torch.split(fused, [num_heads * head_dim, num_query_groups * head_dim, num_query_groups * head_dim], dim=0)


def interleave_gate_up(fc1: torch.Tensor) -> torch.Tensor:
    """Gated fc1 ``[gate; up]`` -> rows gate0, up0, gate1, up1, ... (GPT-OSS's fused experts)."""
    gate, up = gated_to_gate_up(fc1)
    return torch.stack([gate, up], dim=1).reshape(fc1.shape)


def deinterleave_gate_up(rows: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`interleave_gate_up`."""
    pairs = rows.reshape(rows.shape[0] // 2, 2, *rows.shape[1:])
    return gate_up_to_gated(pairs[:, 0], pairs[:, 1])


def trim_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Drop padding rows (vocab padding) beyond ``rows``."""
    if rows > t.shape[0]:
        raise ValueError(f"cannot trim {tuple(t.shape)} to {rows} rows: it has fewer")
    return t[:rows]


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 0 up to a multiple of ``multiple`` (inverse of :func:`trim_rows`)."""
    extra = (-t.shape[0]) % multiple
    if not extra:
        return t
    return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))], dim=0)


def pad_rows_to(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended up to ``rows`` (inverse of :func:`trim_rows` on the real rows: what
    the trimmed rows held is not known, Megatron's vocabulary padding is simply zero here)."""
    if rows < t.shape[0]:
        raise ValueError(f"cannot pad {tuple(t.shape)} to {rows} rows: it has more")
    if rows == t.shape[0]:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))], dim=0)


def split_for_rank(t: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    """The ``rank``-th of ``tp`` equal slices along ``dim``."""
    if t.shape[dim] % tp:
        raise ValueError(f"dim {dim} of {tuple(t.shape)} does not divide by tp={tp}")
    return torch.chunk(t, tp, dim=dim)[rank]


def repeat_kv_heads(t: torch.Tensor, num_kv_heads: int, head_dim: int, tp: int) -> torch.Tensor:
    """Repeat each KV head so that ``tp`` ranks each hold at least one (needs tp % nkv == 0).

    TensorRT-LLM's convention for inference TP larger than the number of KV heads: head h is
    repeated tp/nkv times, so rank r gets head r // (tp / nkv).
    """
    if num_kv_heads >= tp:
        return t
    if tp % num_kv_heads:
        raise ValueError(f"inference TP {tp} is not a multiple of the {num_kv_heads} KV heads")
    rest = t.shape[1:]
    heads = t.reshape(num_kv_heads, 1, head_dim, *rest)
    return heads.expand(num_kv_heads, tp // num_kv_heads, head_dim, *rest).reshape(-1, *rest)


def kv_rows_for_rank(t: torch.Tensor, num_kv_heads: int, head_dim: int, tp: int, rank: int) -> torch.Tensor:
    """``split_for_rank(repeat_kv_heads(t, ...), 0, tp, rank)`` as a view: the rank's KV rows
    without building the repeated tensor."""
    if num_kv_heads >= tp:
        return split_for_rank(t, 0, tp, rank)
    if tp % num_kv_heads:
        raise ValueError(f"inference TP {tp} is not a multiple of the {num_kv_heads} KV heads")
    head = rank // (tp // num_kv_heads)
    return t[head * head_dim:(head + 1) * head_dim]


class ZeroRows:
    """A block of zero rows, described but never allocated (the vocabulary padding of a split)."""

    def __init__(self, rows: int, tail: tuple, dtype: torch.dtype):
        self.rows, self.tail, self.dtype = rows, tuple(tail), dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, *self.tail))

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * torch.empty((), dtype=self.dtype).element_size()

    def to(self, dtype: torch.dtype) -> "ZeroRows":
        return ZeroRows(self.rows, self.tail, dtype)


class RowBlocks:
    """A dim-0 concatenation that is never materialised: tensors (usually views of one source)
    and zero blocks, in order. The writer streams the blocks one after the other, so the bytes
    (and their checksum) equal those of ``torch.cat`` of the blocks, without the copy.

    Used where TensorRT-LLM wants one tensor made of pieces of others: the fused q|k|v of a rank,
    and the vocabulary-padded slices of ``lm_head``.
    """

    def __init__(self, parts: list):
        parts = [p for p in parts if p.shape[0]]
        if not parts:
            raise ValueError("RowBlocks needs at least one non-empty block")
        tails = {tuple(p.shape[1:]) for p in parts}
        dtypes = {p.dtype for p in parts}
        if len(tails) != 1 or len(dtypes) != 1:
            raise ValueError(f"RowBlocks: blocks disagree on row shape {tails} or dtype {dtypes}")
        self.parts = parts
        self.dtype = dtypes.pop()
        self._tail = tails.pop()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(p.shape[0] for p in self.parts), *self._tail))

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.parts if isinstance(p, torch.Tensor)), torch.device("cpu"))

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def to(self, dtype: torch.dtype) -> "RowBlocks":
        if dtype == self.dtype:
            return self
        return RowBlocks([p.to(dtype) for p in self.parts])

    def materialize(self) -> torch.Tensor:
        """The tensor these blocks describe (tests, and consumers that need a real tensor)."""
        blocks = [p if isinstance(p, torch.Tensor) else torch.zeros(p.shape, dtype=p.dtype, device=self.device)
                  for p in self.parts]
        return torch.cat(blocks, dim=0)


def row_blocks(parts: list):
    """One tensor when there is a single tensor block (nothing to concatenate), else RowBlocks."""
    parts = [p for p in parts if p.shape[0]]
    if len(parts) == 1 and isinstance(parts[0], torch.Tensor):
        return parts[0]
    return RowBlocks(parts)


def padded_rows_for_rank(t: torch.Tensor, tp: int, rank: int):
    """``split_for_rank(pad_rows(t, tp), 0, tp, rank)`` without the padded copy: a view of the
    rank's real rows, followed by the zero rows that fall into its slice."""
    total = t.shape[0] + (-t.shape[0]) % tp
    per_rank = total // tp
    start, stop = rank * per_rank, (rank + 1) * per_rank
    real = t[min(start, t.shape[0]):min(stop, t.shape[0])]
    zeros = stop - max(start, t.shape[0])
    blocks = [real] + ([ZeroRows(zeros, tuple(t.shape[1:]), t.dtype)] if zeros > 0 else [])
    return row_blocks(blocks)
