"""The verification probe: reference logits of the live model, recorded with each export.

At each export (inside the training stall: before the snapshot copy for async exports, before
the run for sync ones) the live model runs forward-only on a few short token sequences, and the
top-k logits per position (values and ids, float32, over the exported vocabulary) are stored in
the export as ``verification.safetensors`` next to ``manifest.json``. ``megatron-trt-ext verify``
later runs the same tokens through the exported HF checkpoint and compares.

Every rank runs the same steps and the same collectives in the same order, on the export's own
groups (`gather.Comm`):

1. rank 0 sizes the probe (`spec.probe_size`: what the recipe set, else fewer tokens for larger
   models, from the exported parameter count, which every rank's plan holds alike), picks the
   tokens (the calibration batches' first rows when the recipe has a real calibration source, else
   ids drawn by a generator of its own, seeded, never the global RNG) and shares them (all-gather),
   so every rank, every DP replica included, probes the same tokens; the size and its rule go
   into the manifest, the tokens into the probe file that `verify` reads;
2. every rank runs the forward pass (eval mode restored, no grad, RNG restored): one chunk
   through `forward.run_forward`; pipeline stages through `stages.staged_forward`, which hands the
   activations on with point-to-point messages on the model's own device (CPU included); with the
   weights rounded to the export dtype for the pass when the model holds finer ones
   (`rounded_to_export`: the reference is then the export's own weights computed in float32, so a
   correct export matches it to float32 noise), restored bit for bit afterwards;
3. the last stage's ranks take the top-k of their logits (their vocabulary shard, when the
   output layer is tensor-parallel) and everything goes to rank 0 (gather), which merges the
   shards' candidates into the global top-k and keeps the record for the manifest.

A failure is shared, never raised: the export goes on without reference logits, and the manifest
says why (``verification.status: failed``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import forward
from ..forward import is_staged
from .spec import probe_size
from .stages import staged_forward

FILE_NAME = "verification.safetensors"

# the reference kinds a manifest records (``verification.reference``; none: made before it existed)
AS_EXPORTED = "as_exported"  # the weights rounded to the export dtype, computed in float32
LIVE = "live"  # the live weights computed in the model's own dtype
_ROUNDABLE = (torch.float32, torch.float64)  # finer than every export dtype; computed in float32 or finer


@dataclass(frozen=True)
class Rounding:
    """How the probe makes its reference the weights as exported: ``dtype`` the export dtype,
    ``rename`` the source's canonical namer (`plan.local_shards`), ``keep`` the units the export
    keeps in float32 (`conversion.plan_outputs`, MoE routers of some families), never rounded."""

    dtype: torch.dtype
    rename: object = None
    keep: frozenset = frozenset()


@dataclass
class ProbeRecord:
    """What rank 0 adds to the export: the file's bytes, its tensors' checksums, the manifest entry.
    Plain data (bytes, dicts): it travels to the export worker through a pipe."""

    meta: dict
    data: Optional[bytes] = None
    sha256: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.data is not None


def parameter_count(units) -> int:
    """The exported tensors' elements: the plan's global units (the same list on every rank),
    calibration statistics left out. What `spec.probe_size` sizes the probe by."""
    from ..quant.stats import is_stat

    return sum(unit.numel for unit in units if not is_stat(unit.name))


def synthetic_tokens(options, vocab_size: int) -> torch.Tensor:
    """Deterministic ids in [0, vocab_size): the same for every export of a run."""
    gen = torch.Generator().manual_seed(options.seed)  # never the global RNG
    return torch.randint(0, vocab_size, (options.num_sequences, options.seq_len), generator=gen)


def choose_tokens(options, vocab_size: int, calibration: Optional[list], calibration_source: str) -> tuple:
    """(tokens [n, s] int64 on CPU, where they came from). Calibration rows are used when they lie in
    the exported vocabulary (a padded id would have no row in the HF checkpoint)."""
    why = ""
    if calibration:
        rows = torch.cat([b.detach().cpu().reshape(-1, b.shape[-1]) for b in calibration])
        rows = rows[: options.num_sequences, : options.seq_len].long()
        if len(rows) and int(rows.max()) < vocab_size and int(rows.min()) >= 0:
            return rows.contiguous(), f"calibration data ({calibration_source}), first rows"
        why = f" (the {calibration_source} calibration rows hold ids outside the exported vocabulary)"
    return (synthetic_tokens(options, vocab_size),
            f"synthetic: ids drawn uniformly from [0, {vocab_size}) by a generator seeded {options.seed}{why}")


def _vocab_offset(width: int, padded_vocab: int) -> int:
    """Where this rank's logits start in the (padded) vocabulary: tensor-parallel output layers
    hold one contiguous shard per TP rank; a gathered output holds all of it."""
    if width == padded_vocab:
        return 0
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() * width


def _context_parallel() -> int:
    try:
        from megatron.core import parallel_state as ps

        return ps.get_context_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    except Exception:  # noqa: BLE001 - no parallel state: one rank
        return 1


def local_candidates(logits: torch.Tensor, vocab_size: int, padded_vocab: int, top_k: int) -> tuple:
    """(offset, width, values [n, s, k'], ids [n, s, k']) of this rank's shard of the logits, ids
    global; padding ids (>= vocab_size) never count."""
    logits = logits.detach().float()
    width = logits.shape[-1]
    offset = _vocab_offset(width, padded_vocab)
    valid = max(0, min(width, vocab_size - offset))
    k = min(top_k, valid)
    if k == 0:
        return offset, width, None, None
    values, ids = torch.topk(logits[..., :valid], k, dim=-1)
    return offset, width, values.cpu(), (ids + offset).cpu()


def merge_candidates(parts: list, vocab_size: int, top_k: int) -> tuple:
    """The global top-k from the shards' candidates; a shard seen twice (DP replicas) counts once.
    Raises when the shards do not cover the exported vocabulary."""
    shards: dict = {}
    for offset, width, values, ids in parts:
        shards.setdefault(offset, (width, values, ids))
    covered = 0
    for offset in sorted(shards):
        if offset > covered:
            break
        covered = max(covered, offset + shards[offset][0])
    if covered < vocab_size:
        raise RuntimeError(f"the last pipeline stage's logits cover vocabulary ids [0, {covered}) only, not the "
                           f"{vocab_size} exported")
    present = [shards[o] for o in sorted(shards) if shards[o][1] is not None]
    values = torch.cat([v for _, v, _ in present], dim=-1)
    ids = torch.cat([i for _, _, i in present], dim=-1)
    top_values, where = torch.topk(values, top_k, dim=-1)
    return top_values.contiguous(), torch.gather(ids, -1, where).contiguous()


def forward_logits(chunks: list, tokens: torch.Tensor) -> list:
    """The logits of ``tokens`` on the last pipeline stage ([] elsewhere): one microbatch holding
    every sequence, so each stage reads its weights once (on GPUs a probe this small is bound by
    that read)."""
    outputs: list = []
    if is_staged(chunks):
        staged_forward(chunks, tokens, outputs.append)
    else:
        forward.run_forward(chunks, [tokens], on_output=outputs.append)
    return outputs


def reference_kind(chunks: list, rounding: Optional[Rounding]) -> str:
    """AS_EXPORTED when the reference can be the export's weights computed in float32: every
    floating parameter is float32 (or float64), so rounding them to the export dtype reproduces the
    exported values and the forward pass runs in float32 as the HF model does. A model holding
    bf16/fp16 parameters computes in that dtype (Megatron casts activations and attention
    probabilities to it), so its reference stays LIVE and the statistical limits apply. Quantized
    exports (``rounding`` None) stay LIVE: quantization is not emulated here."""
    if rounding is None:
        return LIVE
    dtypes = {p.dtype for c in chunks for p in c.parameters() if p.dtype.is_floating_point}
    return AS_EXPORTED if dtypes and dtypes <= set(_ROUNDABLE) else LIVE


@contextmanager
def rounded_to_export(chunks: list, rounding: Rounding):
    """Every exported tensor of ``chunks`` rounded in place to the export dtype (the values the
    export writes; float32 storage, so the forward pass still runs in float32), and restored bit for
    bit on leaving, whatever happens inside. Costs one copy of the rounded tensors, on their device.

    The tensors are the views `plan.local_shards` gives, the same the export converts; one that is
    not a view of a parameter or buffer of the model raises (rounding it would not change the
    model). Views that overlap (a GLU's halves, the tied output copy) are rounded twice (the
    rounding is idempotent) and restored in reverse order, so the first saved copy wins."""
    from ..plan import local_shards

    owned = {t.untyped_storage().data_ptr() for c in chunks for t in (*c.parameters(), *c.buffers())}
    saved: list = []
    try:
        with torch.no_grad():
            for name, pieces in local_shards(chunks, rounding.rename).items():
                if name in rounding.keep:
                    continue
                for piece in pieces:
                    tensor = piece.tensor
                    if tensor.dtype not in _ROUNDABLE or tensor.dtype == rounding.dtype:
                        continue
                    if tensor.untyped_storage().data_ptr() not in owned:
                        raise RuntimeError(f"tensor {name!r}: its state-dict view is a copy, not the live "
                                           "parameter, so the probe cannot round it to the export dtype")
                    saved.append((tensor, tensor.clone()))
                    tensor.copy_(tensor.to(rounding.dtype))
        yield
    finally:
        with torch.no_grad():
            for tensor, original in reversed(saved):
                tensor.copy_(original)


def run_probe(chunks: list, options, vocab_size: int, padded_vocab: int, comm, model_dtype: str,
              calibration: Optional[list] = None, calibration_source: str = "",
              rounding: Optional[Rounding] = None, parameters: Optional[int] = None,
              max_positions: int = 0) -> Optional[ProbeRecord]:
    """Run the probe; call on every rank. Returns the record on rank 0, None elsewhere.
    ``rounding``: the export dtype and names, for a reference computed from the weights as
    exported (`reference_kind`); None: the live weights (quantized exports, older callers).
    ``parameters`` (`parameter_count`) and ``max_positions`` size what ``options`` leaves unset
    (`spec.probe_size`); only rank 0's count matters (its tokens are shared)."""
    t0 = time.perf_counter()
    size = probe_size(options, parameters, max_positions)
    options = dataclasses.replace(options, num_sequences=size.num_sequences, seq_len=size.seq_len)
    chosen = None
    if comm.rank == 0:
        try:
            if _context_parallel() > 1:
                raise RuntimeError("context parallelism splits the sequence over ranks; the probe does not "
                                   "support it yet")
            chosen = choose_tokens(options, vocab_size, calibration, calibration_source)
        except Exception as exc:  # noqa: BLE001 - shared: every rank skips the forward pass
            chosen = f"{type(exc).__name__}: {exc}"
    chosen = comm.all_gather_object(chosen)[0]
    contribution, error, kind = [], None, LIVE
    if isinstance(chosen, str):
        error = chosen
    else:
        tokens, origin = chosen
        device = next((p.device for c in chunks for p in c.parameters()), torch.device("cpu"))
        try:
            kind = reference_kind(chunks, rounding)
            if kind == AS_EXPORTED:
                with rounded_to_export(chunks, rounding):
                    outputs = forward_logits(chunks, tokens.to(device))
            else:
                outputs = forward_logits(chunks, tokens.to(device))
            if outputs:  # the last pipeline stage
                logits = torch.cat(outputs, dim=0)[: len(tokens)]
                contribution = [local_candidates(logits, vocab_size, padded_vocab, options.top_k)]
        except Exception as exc:  # noqa: BLE001 - joins the gather below, so no rank waits on this one
            error = f"rank {comm.rank}: {type(exc).__name__}: {exc}"
    gathered = comm.gather_object((error, contribution, kind))
    if comm.rank != 0:
        return None
    errors = [e for e, _, _ in gathered if e]
    kinds = {k for _, _, k in gathered}
    if not errors and len(kinds) > 1:  # one reference must not mix rounded and live stages
        errors = [f"the ranks disagree on the reference ({sorted(kinds)}): their parameters differ in dtype"]
    if errors:
        return _failed(options, errors[0], t0, size)
    try:
        values, ids = merge_candidates([part for _, parts, _ in gathered for part in parts], vocab_size,
                                       options.top_k)
    except Exception as exc:  # noqa: BLE001
        return _failed(options, f"{type(exc).__name__}: {exc}", t0, size)
    reference = {"reference": kind, "reference_dtype": str(rounding.dtype).replace("torch.", "")
                 if kind == AS_EXPORTED else model_dtype, "size": size.record()}
    return _record(options, tokens, origin, values, ids, vocab_size, model_dtype, t0, reference)


def _failed(options, error: str, t0: float, size) -> ProbeRecord:
    return ProbeRecord(meta={"status": "failed", "error": error, **options.to_dict(), "size": size.record()},
                       seconds=time.perf_counter() - t0)


def _record(options, tokens, origin, values, ids, vocab_size, model_dtype, t0, reference: dict) -> ProbeRecord:
    from safetensors.torch import save

    from ..formats.safetensors_stream import tensor_bytes

    tensors = {"tokens": tokens.long().contiguous(), "topk_values": values.float().contiguous(),
               "topk_ids": ids.long().contiguous()}
    sha256 = {name: hashlib.sha256(tensor_bytes(t)).hexdigest() for name, t in tensors.items()}
    seconds = time.perf_counter() - t0
    meta = {
        "status": "recorded", "file": FILE_NAME, "top_k": int(values.shape[-1]),
        "num_sequences": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
        "probe_shape": list(tokens.shape), "vocab_size": vocab_size, "model_dtype": model_dtype,
        "tokens_from": origin,
        "computed_from": "the model being exported (live: at the save; offline: as loaded), "
                         + ("its weights rounded to the export dtype (as exported), computed in float32, "
                            if reference["reference"] == AS_EXPORTED else
                            f"its weights as they are, computed in {model_dtype}, ")
                         + "forward only (eval mode, no grad), the last pipeline stage's logits over the exported "
                           "vocabulary, float32",
        **reference,
        "tensors": {"tokens": "int64 [num_sequences, seq_len]",
                    "topk_values": "float32 [num_sequences, seq_len, top_k], descending",
                    "topk_ids": "int64 [num_sequences, seq_len, top_k]"},
        "probe_s": seconds,
    }
    return ProbeRecord(meta=meta, data=save(tensors), sha256=sha256, seconds=seconds)

