"""Large units written by several ranks, a range of rows each, into the same output files.

A unit's writer writes every output of it, so writer balance can never beat the largest unit
(the 4.2 GB vocabulary tables of Llama-3-405B are 5.3x the mean per-rank load at 1024 ranks).
The plan can cut a unit into row ranges with writers of their own (`plan.SplitPolicy`); this
module says which units may be cut and where each range's rows go.

A unit may be cut when every output tensor of it (HF and TensorRT-LLM) is made of whole rows of
the unit (or of one block of its columns), each output's rows in the unit's order, and zero rows
(vocabulary padding): then a range of source rows is one run of rows of each output, written at
its offset (`SafetensorsFileWriter.write(rows=...)`). That is learned, not assumed, by running
the family's own conversion once on a probe of the unit's row count and a few columns whose
values name their row and column (`row_maps`): vocabulary tables (trimmed to the real
vocabulary, split over TensorRT-LLM ranks with padding), renames, gated fc1 halves, QKV
regrouped by heads, TensorRT-LLM splits along rows or columns all pass; a transpose, a column
interleave, a changed value, a tensor made with other units (concatenations, stacked experts)
fail, and the unit stays whole. A range whose rows would land in two runs of one output keeps
its unit whole too (`split_plan`). Quantized exports and live refits (the server takes whole
tensors) cut nothing.

Zero rows belong to the range holding the source row just before them (the first range for
leading ones), so each range writes one contiguous run of each output and every output row is
written, and hashed, exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from . import host_memory
from .arch.convert import canonical_name, find_transform, megatron_to_hf
from .arch.spec import Concat, Drop, StackExperts
from .errors import ExportError
from .layouts import RowBlocks, ZeroRows
from .plan import SplitPolicy, plan_units


@dataclass(frozen=True)
class Output:
    """One output tensor of a unit as runs of rows: ``(out_first, out_stop, src_first)``,
    ``src_first`` None for zero rows. ``rank``: the TensorRT-LLM rank file, None for HF.
    ``cols``: ``(first, stop, of)``: the output takes columns ``first/of .. stop/of`` of the
    unit's width (a TensorRT-LLM split of a row-parallel linear along its inputs); None: all."""

    fmt: str
    rank: Optional[int]
    name: str
    runs: tuple
    cols: Optional[tuple] = None


def _columns(out: torch.Tensor, probe: torch.Tensor) -> Optional[tuple]:
    """The probe's columns ``out`` holds, ``(first, stop)``, taken from its first non-zero row."""
    k = probe.shape[1]
    nonzero = out[out[:, 0] != 0] if out.dim() == 2 and out.numel() else out[:0]
    if out.dim() != 2 or not 0 < out.shape[1] <= k or k % out.shape[1]:
        return None
    first = int((nonzero[0, 0] - 1) % k) if nonzero.shape[0] else 0
    return first, first + out.shape[1]


def _runs(out: torch.Tensor, probe: torch.Tensor) -> Optional[tuple]:
    """``out`` as runs of the probe's rows (all of them the same block of columns, `_columns`)
    and zero rows, or None when it is not made so."""
    cols = _columns(out, probe)
    if cols is None or out.dtype != probe.dtype:
        return None  # (a dtype of its own: an output kept in float32, converted from the source values)
    k = probe.shape[1]
    first = out[:, 0]
    zero = first == 0
    src = ((first - 1 - cols[0]) / k).round().long()
    if bool(((src < 0) | (src >= probe.shape[0]))[~zero].any()):
        return None
    if not torch.equal(out[~zero], probe[src[~zero], cols[0]:cols[1]]) or bool(out[zero].any()):
        return None
    n = out.shape[0]
    if n == 0:
        return ()
    # a run starts where zero rows begin or end, or where the source row does not follow on
    step = torch.ones(n, dtype=torch.bool)
    step[1:] = (zero[1:] != zero[:-1]) | (~zero[1:] & (src[1:] != src[:-1] + 1))
    starts = step.nonzero().flatten().tolist() + [n]
    return tuple((a, b, None if bool(zero[a]) else int(src[a])) for a, b in zip(starts, starts[1:]))


def _materialise(t) -> torch.Tensor:
    parts = getattr(t, "parts", None)
    if parts is None:
        return t
    return torch.cat([p if isinstance(p, torch.Tensor) else torch.zeros(p.shape, dtype=torch.float64)
                      for p in parts])


def row_maps(spec, ctx, trtllm, name: str, rows: int) -> Optional[tuple]:
    """The outputs of unit ``name`` (``rows`` rows) as row runs, or None when it may not be cut.
    ``trtllm``: a fresh `formats.trtllm.TrtllmConverter` in float64, None without that format."""
    transform, _ = find_transform(spec, canonical_name(spec, name))
    if transform is None or isinstance(transform, (Concat, StackExperts, Drop)):
        return None  # parts of a tensor made with other units, or nothing written
    dst = getattr(transform, "dst", "")
    if isinstance(dst, str) and any(re.search(p, dst) for p in spec.keep_fp32):
        return None  # an output kept in float32 converts from the source values
    k = 2 * max(1, trtllm.tp if trtllm is not None else 1)
    probe = torch.arange(1, rows * k + 1, dtype=torch.float64).reshape(rows, k)
    outputs = []
    try:
        pending: dict = {}
        for hf_name, out in megatron_to_hf(spec, ctx, [(name, probe)], pending):
            outputs.append(("hf", None, hf_name, out))
            if trtllm is not None:
                outputs += [("trtllm", rank, trt_name, _materialise(t))
                            for rank, trt_name, t in trtllm.feed(hf_name, out)]
        if pending:
            return None
        if trtllm is not None:
            trtllm.finish()
    except (ExportError, ValueError, RuntimeError, IndexError):
        return None
    maps = []
    for fmt, rank, out_name, out in outputs:
        runs = _runs(out, probe) if isinstance(out, torch.Tensor) else None
        if runs is None:
            return None
        first, stop = _columns(out, probe)
        maps.append(Output(fmt, rank, out_name, runs, None if (first, stop) == (0, k) else (first, stop, k)))
    return tuple(maps)


def range_writes(outputs: tuple, rows: tuple) -> list:
    """The writes of source rows ``rows`` = (first, stop): ``(output, (out_first, out_stop),
    blocks)`` per output it touches, ``blocks`` a list of ``(src_first, src_stop)`` or ``("zeros",
    n)`` in output order. Raises ValueError when a range's rows of an output are not one run."""
    a, b = rows
    out = []
    for output in outputs:
        runs = output.runs
        mine = []
        for j, (o0, o1, s0) in enumerate(runs):
            if s0 is None:  # zero rows: the range of the source row before them (or after, leading)
                if j > 0:
                    owner = runs[j - 1][2] + (runs[j - 1][1] - runs[j - 1][0]) - 1
                else:
                    owner = runs[j + 1][2] if j + 1 < len(runs) else 0
                if a <= owner < b:
                    mine.append((o0, o1, ("zeros", o1 - o0)))
                continue
            lo, hi = max(a, s0), min(b, s0 + (o1 - o0))
            if lo < hi:
                mine.append((o0 + lo - s0, o0 + hi - s0, (lo, hi)))
        if not mine:
            continue
        if any(prev[1] != nxt[0] for prev, nxt in zip(mine, mine[1:])):
            raise ValueError(f"{output.name}: the rows of source rows {a}:{b} are not one run")
        out.append((output, (mine[0][0], mine[-1][1]), [m[2] for m in mine]))
    return out


def rows_data(blocks: list, tensor: torch.Tensor, first: int, cols: Optional[tuple] = None):
    """The data of one range write: rows of ``tensor`` (source rows from ``first``; their
    columns ``cols``, `Output.cols`) and zero rows, as one tensor (a view) or a `layouts.RowBlocks`."""
    if cols is not None:
        c0, c1, of = cols
        width = tensor.shape[1]
        if width * c0 % of or width * c1 % of:
            raise ValueError(f"columns {c0}/{of}..{c1}/{of} of a {width}-wide tensor are not whole columns")
        tensor = tensor[:, width * c0 // of:width * c1 // of]
    parts = [tensor[lo - first:hi - first] if lo != "zeros" else ZeroRows(hi, tuple(tensor.shape[1:]), tensor.dtype)
             for lo, hi in blocks]
    return parts[0] if len(parts) == 1 else RowBlocks(parts)


def split_plan(classes: list, group_key, units: list, new_trtllm, spec, ctx, threshold: Optional[int]) -> tuple:
    """(units, {unit name: outputs}) with the units `row_maps` admits cut into row ranges when
    larger than ``threshold`` bytes (None: `plan.SplitPolicy`'s default, 1.5x the mean bytes per rank). ``units``: the plan
    without cuts; ``new_trtllm``: makes a fresh float64 TensorRT-LLM converter, or None."""
    policy = SplitPolicy(lambda n: n in maps, threshold=threshold)
    limit = policy.limit(sum(u.nbytes for u in units), len({rank for cls in classes for rank, _ in cls.members}))
    maps = {}
    for unit in units:  # only what may be cut: each probe runs the conversion on the unit's rows
        if len(unit.shape) == 2 and unit.shape[0] >= 2 and unit.nbytes > limit:
            found = row_maps(spec, ctx, new_trtllm(), unit.name, unit.shape[0])
            if found is not None:
                maps[unit.name] = found
    while maps:
        split = plan_units(classes, group_key=group_key, split=policy)
        bad = set()
        for unit in split:
            if unit.rows is not None:
                try:
                    range_writes(maps[unit.name], unit.rows)
                except ValueError:  # a range would write two runs of one output: that unit stays whole
                    bad.add(unit.name)
        if not bad:
            used = {u.name for u in split if u.rows is not None}
            return split, {name: maps[name] for name in used}
        maps = {k: v for k, v in maps.items() if k not in bad}
    return units, {}


def split_for_export(config, spec, info, vocab_size: int, moe_tp: int, moe_ep: int, classes: list, group_key,
                     units: list) -> tuple:
    """The exporter's plan with row ranges (`ExportConfig.split_rows_over`), and each cut unit's
    outputs; unchanged when the option is off, when quantizing, or with a live refit."""
    over = config.split_rows_over
    if over is None or config.quantization.enabled or config.serve.enabled:
        return units, {}
    new_trtllm = (lambda: None)
    if "trtllm_checkpoint" in config.formats:
        from .formats.trtllm import TrtllmConverter

        def new_trtllm():
            return TrtllmConverter(spec.trtllm(info), info, config.inference_tp, config.inference_pp,
                                   torch.float64, moe_tp, moe_ep)
    from .arch.spec import Context

    threshold = None if over == "auto" else config.split_rows_over_bytes
    return split_plan(classes, group_key, units, new_trtllm, spec, Context(info=info, vocab_size=vocab_size),
                      threshold)


def export_range(unit, tensor, outputs: tuple, dtype: torch.dtype, hf, trt, recorder=None, timings=None) -> None:
    """Write one range of a cut unit (rows ``unit.rows``, assembled on this rank) into every
    output at its rows; its fingerprint part to ``recorder``."""
    t = tensor if tensor.dtype == dtype else host_memory.cast(tensor, dtype)
    if recorder is not None:  # of the rows the HF tensor holds (a vocabulary table: its real rows)
        hf_rows = max((s0 + o1 - o0 for o in outputs if o.fmt == "hf" for o0, o1, s0 in o.runs if s0 is not None),
                      default=0)
        recorder.add_rows(unit.name, t, unit.rows, hf_rows, timings)
    for output, out_rows, blocks in range_writes(outputs, unit.rows):
        data = rows_data(blocks, t, unit.rows[0], output.cols)
        if output.fmt == "hf" and hf is not None:
            hf.write(output.name, data, rows=out_rows)
        elif output.fmt == "trtllm" and trt is not None:
            trt.write(output.name, data, fname=f"rank{output.rank}.safetensors", rows=out_rows)
