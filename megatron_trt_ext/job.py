"""One export, as data and as a run: `ExportJob` holds everything an export needs except the
tensors (picklable, so the background worker process can run it), and `ExportJob.run` executes
the phases on one rank:

1. rank 0 lays out the directory and every output file; all ranks agree it worked;
2. every unit in plan order: move slices to the writer (`gather`), convert and quantize
   (`conversion`, `quant.stage`), write at the planned place; transfers always run, so no peer
   ever waits on a rank that failed;
3. all ranks share outcomes and checksums; rank 0 writes configs and the manifest and renames the
   directory (`publish`); all ranks learn the result.

This module only orders those steps and turns any failure into one decision shared by every
rank; what each step does lives in its own module.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch

from . import host_memory
from . import manifest as mf
from . import publish
from .arch import FAMILIES
from .arch.spec import Context
from .config import ExportConfig
from .conversion import Conversion, plan_outputs
from .errors import ExportError
from .finite import check_finite
from .formats.files import FileSet, write_json
from .formats.hf import HFWriter
from .formats.trtllm import TrtllmConverter, trtllm_config
from .formats.write_pool import WritePool
from .gather import exchange, iter_meta
from .plan import torch_dtype
from .quant.export_config import (check_quantizes_something, hf_quant_config_file, hf_quantization_config,
                                  trtllm_quantization)
from .quant.stage import QuantStage
from .result import ExportResult
from .row_split import export_range
from .serve.sink import RefitSink
from .verification import fingerprint as fingerprints
from .verification.exact import MODEL_INFO, info_record

logger = logging.getLogger("megatron_trt_ext")
# bytes of converted units that may wait for their writes whatever the largest tensor (`write_pool`)
WRITE_BUFFER_FLOOR = 128 << 20


@dataclass
class ExportJob:
    """One exporter's plan for every export, on one rank: the units it gathers, what it writes
    where (``out_specs``, laid out once from a shape-only run of the conversion), and how."""

    config: ExportConfig
    info: object
    family: str
    units: list
    vocab_size: int
    moe_tp: int
    moe_ep: int
    rank: int
    world_size: int
    root: Path
    mode: str = "sync"
    out_specs: dict = field(default_factory=dict)
    keep_source: frozenset = frozenset()  # units with an output in a dtype other than the export's
    tokenizer: Optional[object] = None  # `tokenizer.TokenizerFacts`: files and ids for the HF export
    row_maps: dict = field(default_factory=dict)  # units cut into row ranges: their outputs (`row_split`)

    def __post_init__(self):
        if not self.out_specs:
            trt_ranks = self.config.inference_tp * self.config.inference_pp
            self.out_specs, self.keep_source = plan_outputs(self.new_conversion(), iter_meta(self.units), trt_ranks)
            if self.quant is not None:
                check_quantizes_something(self.quant, self.out_specs["quant"])

    @property
    def spec(self):
        return FAMILIES[self.family]

    @property
    def ctx(self) -> Context:
        return Context(info=self.info, vocab_size=self.vocab_size)

    @property
    def family_trt(self) -> dict:
        return self.spec.trtllm(self.info)

    @property
    def quant(self):
        spec = self.config.quantization
        return spec if spec.enabled else None

    @cached_property
    def quant_stage(self) -> Optional[QuantStage]:
        """The quantization stage (None: not quantizing). One per job: the algorithms the plan
        decided for the parts of each fused linear are checked again in every export."""
        if self.quant is None:
            return None
        return QuantStage(self.quant, num_layers=self.info.num_layers,
                          zero_centered_gamma=self.info.zero_centered_gamma,
                          unit_names=frozenset(u.name for u in self.units), dtype=torch_dtype(self.config.dtype),
                          conv1d_linears=self.spec.conv1d_linears, aliases=self.spec.aliases)

    def new_conversion(self) -> Conversion:
        """A fresh pass of the conversion pipeline (one per export, one for the plan)."""
        c = self.config
        trtllm = None
        if "trtllm_checkpoint" in c.formats:
            trtllm = TrtllmConverter(self.family_trt, self.info, c.inference_tp, c.inference_pp,
                                     torch_dtype(c.dtype), self.moe_tp, self.moe_ep)
        return Conversion(self.spec, self.ctx, torch_dtype(c.dtype), trtllm, self.quant_stage, self.keep_source)

    def write_pool(self) -> WritePool:
        """Writer threads for one export. The budget lets about half of the largest unit (in the
        export dtype), and at least `WRITE_BUFFER_FLOOR`, wait for its writes while the next
        unit is gathered and converted, which keeps peak memory within two of the largest tensor
        beyond that floor (see `write_pool`). The floor keeps the disk busy while the kernel
        throttles the writers (its dirty-page limit) and the caller casts the next units ahead:
        with half of a 64 MiB largest tensor only, a 350M model's export took 1.2x as long. The
        background worker uses one thread: it shares the machine with training."""
        size = torch_dtype(self.config.dtype).itemsize
        largest = max((u.numel * size for u in self.units), default=0)
        return WritePool(threads=1 if self.mode == "async" else 2,
                         budget_bytes=max(largest // 2, WRITE_BUFFER_FLOOR), check_finite=self.config.check_finite)

    def writers(self, tmp: Path, create: bool, pool: Optional[WritePool] = None) -> tuple:
        hf = trt = None
        if "hf" in self.config.formats:
            hf_config = self.spec.hf_config(self.info, self.ctx, self.config.dtype)
            if self.quant is not None:
                hf_config["quantization_config"] = hf_quantization_config(self.quant, self.out_specs["quant"])
            hf = HFWriter(tmp / "hf", self.out_specs["hf"], self.config.max_shard_size_bytes, hf_config,
                          create=create, pool=pool, tokenizer=self.tokenizer)
        if "trtllm_checkpoint" in self.config.formats:
            trt = FileSet(tmp / "trtllm_checkpoint", self.out_specs["trtllm"], create=create, pool=pool)
        return hf, trt

    def needed_pieces(self) -> list:
        """(unit name, offset, shape) of the local slices this rank reads in an export: what a
        snapshot must copy. A rank sends main slices its writer lacks and writes from its own."""
        needs = []
        for unit in self.units:  # a slice that several row ranges read (`row_split`): once
            if unit.writer == self.rank:
                needs += [(unit.name, *p.key) for p in unit.pieces if unit.local_to_writer(p)]
            else:
                needs += [(unit.name, *p.key) for p in unit.pieces
                          if p.rank == self.rank and not unit.local_to_writer(p)]
        return list(dict.fromkeys(needs))

    def manifest_base(self, iteration: int) -> dict:
        c = self.config
        return {
            "schema_version": mf.SCHEMA_VERSION,
            "status": "writing",
            "iteration": iteration,
            "created_unix": time.time(),
            "producer": dict(mf.PRODUCER),
            "family": self.family,
            "formats": list(c.formats),
            "mode": self.mode,
            "dtype": c.dtype,
            "vocab_size": self.vocab_size,
            "inference": {"tp": c.inference_tp, "pp": c.inference_pp, "moe_tp": self.moe_tp, "moe_ep": self.moe_ep},
            "source": {"padded_vocab_size": self.info.padded_vocab_size, "num_layers": self.info.num_layers,
                       "world_size": self.world_size},
            "config": c.to_dict(),
            MODEL_INFO: info_record(self.info),  # what `verify` derives the HF config and inverse tables from
            **({"tokenizer": self.tokenizer.record()} if self.tokenizer is not None else {}),
        }

    # ------------------------------------------------------------------ the run
    def run(self, comm, local: dict, iteration: int, timings: Optional[dict] = None,
            source_error: Optional[BaseException] = None, on_progress=None, verification=None) -> ExportResult:
        """Run one export on this rank. Raises ExportError (on every rank alike) on failure; its
        ``result`` attribute is the failed ExportResult (``path``: the failure record, or None
        when nothing could be written). ``source_error``: this rank could not produce its
        slices (e.g. calibration failed); it joins the run's first decision, so every rank
        fails together instead of waiting for it. ``on_progress``: called after every unit (the
        worker's heartbeat). ``verification``: the probe record (`verification.probe.ProbeRecord`,
        rank 0 only), written next to the manifest by the publisher."""
        t0 = time.perf_counter()
        timings = {"gather_s": 0.0, "convert_s": 0.0, "write_s": 0.0, **(timings or {})}
        submitted = timings.pop("submitted_unix", None)  # async: count the time since the save
        refit_due = bool(timings.pop("serve_due", True)) and self.config.serve.enabled
        base_total = time.time() - submitted if submitted else 0.0
        run = _Run(iteration=iteration, tmp=mf.partial_path(self.root, iteration),
                   meta=self.manifest_base(iteration), timings=timings, t0=t0, base_total=base_total,
                   round_name=comm.next_round(iteration) if not comm.broken else "broken",
                   on_progress=on_progress or (lambda: None), verification=verification, refit_due=refit_due)
        run.pool = self.write_pool()
        try:
            with _one_torch_thread():
                return self._run(comm, local, run, source_error)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a collective broke: a peer is lost or timed out
            raise self._broken(comm, run, exc) from exc
        finally:
            run.pool.close()
            for writer in run.writers:  # closes what a failed run left open (after a close: nothing)
                writer.abort()
            if run.sink is not None:  # a collective broke mid-run: the server is told, never left a mix
                run.sink.close("the export broke off")
            if run.lock is not None:
                run.lock.release()

    def _run(self, comm, local: dict, run: "_Run", source_error) -> ExportResult:
        iteration, timings = run.iteration, run.timings
        if comm.broken:
            raise RuntimeError(comm.broken)
        hf = trt = None
        local_exc = source_error
        try:
            if self.rank == 0:
                run.lock = mf.IterationLock(self.root, iteration, stale_after_s=2 * self.config.timeout_s).acquire()
                run.tmp = publish.start(self.root, iteration, run.lock)
                if local_exc is None:
                    hf, trt = self.writers(run.tmp, create=True, pool=run.pool)
                    run.writers = [w for w in (hf, trt) if w is not None]
        except Exception as exc:  # noqa: BLE001 - any failure must become a shared decision
            local_exc = local_exc or exc
        failures = comm.agree(f"{type(local_exc).__name__}: {local_exc}" if local_exc else None)
        if failures:
            self._fail(comm, run, failures, local_exc, [hf, trt])
        if self.rank != 0:
            hf, trt = self.writers(run.tmp, create=False, pool=run.pool)
            run.writers = [w for w in (hf, trt) if w is not None]
        if run.refit_due:  # the converted HF tensors also stream into the server (`serve.sink`)
            run.sink = RefitSink(comm, self.rank, self.config.serve, str(iteration), specs=self.out_specs["hf"])

        error = None
        checksums: dict = {}
        conversion = self.new_conversion()
        dtype = conversion.dtype
        recorder = fingerprints.Recorder(self.spec, self.ctx, dtype, self.quant_stage, self.keep_source, run.pool) \
            if {"hf", "trtllm_checkpoint"} & set(self.config.formats) else None  # `verify` reads both back
        size = dtype.itemsize
        for unit in self.units:
            if unit.writer == self.rank:  # waits while earlier units' writes hold the memory budget
                w0 = time.perf_counter()
                run.pool.begin(unit.numel * size)
                timings["write_s"] += time.perf_counter() - w0
            g0 = time.perf_counter()
            full = exchange(unit, local, comm, cast_to=dtype if conversion.casts_first(unit.name) else None)
            timings["gather_s"] += time.perf_counter() - g0
            if run.lock is not None:
                run.lock.refresh()
            run.on_progress()
            if full is None or error is not None:
                continue
            try:
                if unit.rows is not None:  # rows of a unit several ranks write (`row_split`)
                    export_range(unit, full, self.row_maps[unit.name], dtype, hf, trt, recorder, timings)
                else:
                    self._export_unit(unit, full, conversion, hf, trt, timings, run.sink, recorder)
            except Exception as exc:  # noqa: BLE001
                error = f"tensor {unit.name!r}: {type(exc).__name__}: {exc}"
                local_exc = exc
            full = None  # the writer threads keep what they still need; the rest goes now
            run.pool.end()
        w0 = time.perf_counter()
        try:
            if error is None:
                conversion.finish()
            if error is None and recorder is not None:  # to rank 0 with the checksums
                checksums[fingerprints.FILE_NAME] = recorder.entries
            for name, writer in (("hf", hf), ("trtllm_checkpoint", trt)):
                if writer is not None:  # waits for the writer threads, then fsyncs
                    for fname, sums in writer.close().items():
                        checksums[f"{name}/{fname}"] = sums
        except Exception as exc:  # noqa: BLE001
            error = error or f"{type(exc).__name__}: {exc}"
            local_exc = local_exc or exc
        timings["write_s"] += time.perf_counter() - w0
        if run.sink is not None:  # recorded in the manifest; a failed refit never fails the export
            sink, run.sink = run.sink, None
            record = sink.finish(comm, error)
            if record is not None:
                run.meta["serve"] = record
                timings.update(refit_s=record["seconds"], refit_ok=float(record["status"] == "complete"))

        timings["total_s"] = run.base_total + time.perf_counter() - run.t0
        failures = comm.agree(error)
        if failures:
            self._fail(comm, run, failures, local_exc, [hf, trt])
        # Checksums and timings only matter to the publisher: gathered to rank 0, not to everyone.
        gathered = comm.gather_object((error, checksums, timings))
        publish_error, bytes_written = None, 0
        if self.rank == 0:
            try:
                bytes_written = self._publish(run, hf, trt, gathered)
            except Exception as exc:  # noqa: BLE001
                publish_error = f"{type(exc).__name__}: {exc}"
        publish_error, bytes_written = comm.all_gather_object((publish_error, bytes_written))[0]
        if publish_error:
            self._fail(comm, run, [(0, publish_error)], None, [])
        timings["total_s"] = run.base_total + time.perf_counter() - run.t0
        path = self.root / mf.export_dir_name(iteration)
        if self.rank == 0:
            # debug: the training log's one line per export comes from `metrics` (with the stall)
            logger.debug("exported iteration %d to %s (%.2f s, %d bytes)", iteration, path,
                         timings["total_s"], bytes_written)
            publish.apply_retention(self.root, self.config.keep_last)  # never fails the export
        return ExportResult(iteration, path, "complete", list(self.config.formats), timings, bytes_written,
                            serve=run.meta.get("serve"))

    def _export_unit(self, unit, full, conversion: Conversion, hf, trt, timings, sink=None, recorder=None) -> None:
        if isinstance(full, torch.Tensor) and full.dtype != conversion.dtype and conversion.casts_first(unit.name):
            # a unit `exchange` returned uncast (a local view): cast once here, as `Conversion.unit`
            # would, so the fingerprint is computed in the write pass of the bytes it describes
            c0 = time.perf_counter()
            full = host_memory.cast(full, conversion.dtype)
            timings["convert_s"] += time.perf_counter() - c0
        if recorder is not None:  # of the unit as exported, for `verify` (`verification.fingerprint`)
            recorder.add(unit.name, full, timings)
        c0 = time.perf_counter()
        for hf_name, out, trt_parts in conversion.unit(unit.name, full):
            w0 = time.perf_counter()
            timings["convert_s"] += w0 - c0
            if self.config.check_finite and hf is None and sink is not None:
                # checked as written (after the cast): 70000.0 is finite in float32, inf in float16.
                # The writer threads check every tensor they write, in their pass over its bytes
                # (`WritePool.check_finite`); one that no HF file holds is checked before the server gets it
                check_finite(hf_name, out)
                timings["check_s"] = timings.get("check_s", 0.0) + time.perf_counter() - w0
                w0 = time.perf_counter()
            if hf is not None:
                hf.write(hf_name, out)
            if sink is not None:  # the same tensor, as written, to the server
                sink.put(hf_name, out)
            for rank, name, t in trt_parts:
                trt.write(name, t, fname=f"rank{rank}.safetensors")
            c0 = time.perf_counter()
            timings["write_s"] += c0 - w0

    def _publish(self, run: "_Run", hf, trt, gathered: list) -> int:
        """Rank 0, after every rank succeeded: checks, configs, manifest, final name."""
        files = publish.checksums(gathered)
        publish.add_probe(run.tmp, run.meta, files, run.verification)
        publish.add_fingerprints(run.tmp, run.meta, files)
        publish.check_written(files, {"hf": hf.fileset if hf else None, "trtllm_checkpoint": trt})
        if hf is not None:
            hf.finalize()
            if self.quant is not None:
                write_json(run.tmp / "hf" / "hf_quant_config.json",
                           hf_quant_config_file(self.quant, self.out_specs["quant"]))
        if trt is not None:
            c = self.config
            trt_config = trtllm_config(self.family_trt, self.info, self.vocab_size, c.dtype, c.inference_tp,
                                       c.inference_pp, self.moe_tp, self.moe_ep)
            if self.quant is not None:
                trt_config["quantization"] = trtllm_quantization(self.quant, self.out_specs["quant"])
            write_json(run.tmp / "trtllm_checkpoint" / "config.json", trt_config)
        return publish.finish(run.tmp, self.root, run.iteration, run.meta, files, [t for _, _, t in gathered])

    # ------------------------------------------------------------------ failures
    def _failed_result(self, run: "_Run", message: str, path) -> ExportResult:
        run.timings["total_s"] = run.base_total + time.perf_counter() - run.t0
        return ExportResult(run.iteration, path, "failed", list(self.config.formats), run.timings, 0, message)

    def _fail(self, comm, run: "_Run", failures, local_exc, writers):
        """An agreed failure (every rank knows it): the lock holder records it, then every rank
        learns whether the record exists and raises the same ExportError."""
        for w in writers:
            if w is not None:
                w.abort()
        first_rank, cause = failures[0]
        message = f"export of iteration {run.iteration} failed on rank {first_rank}: {cause}"
        recorded = None
        if self.rank == 0 and isinstance(local_exc, mf.LockedError):
            # another live process exports this iteration: its directories are not ours to touch
            logger.error("%s (nothing recorded on disk: the iteration belongs to that process)", message)
        elif self.rank == 0:
            recorded = self._record_failure(run, message)
        recorded = comm.all_gather_object(str(recorded) if recorded else None)[0]
        exc = ExportError(message)
        exc.result = self._failed_result(run, message, Path(recorded) if recorded else None)
        raise exc from local_exc

    def _broken(self, comm, run: "_Run", exc: BaseException) -> ExportError:
        """A collective broke (a peer was lost, or timed out): tear the groups down so every peer
        fails now, find out who is gone, record the failure from whoever is left."""
        # The failed frames hold pending transfers, which keep the group's connections open.
        traceback.clear_frames(exc.__traceback__)
        comm.abort(f"iteration {run.iteration}: {type(exc).__name__}: {exc}")
        lost = comm.lost_ranks(run.round_name)
        if lost:
            who = f"rank(s) {lost} lost (no sign of life within {comm.grace_s:.0f} s)"
        elif lost is None:
            who = "a peer rank was lost or timed out"
        else:
            who = "a collective failed or timed out"
        message = (f"export of iteration {run.iteration} failed on rank {self.rank}: {who}: "
                   f"{type(exc).__name__}: {str(exc)[:300]}")
        logger.error("%s", message)
        # Whoever survives records it (the first record wins).
        recorded = self._record_failure(run, message)
        error = ExportError(message)
        error.result = self._failed_result(run, message, recorded)
        return error

    def _record_failure(self, run: "_Run", message: str) -> Optional[Path]:
        """The failure record on disk; the lock holder also drops its partial directory."""
        return publish.record_failure(self.root, run.iteration, {**run.meta, "timings": run.timings}, message,
                                      partial=run.tmp if run.lock is not None else None)


@dataclass
class _Run:
    """The state of one export attempt on one rank."""

    iteration: int
    tmp: Path
    meta: dict
    timings: dict
    t0: float
    base_total: float
    round_name: str
    on_progress: object = None
    verification: Optional[object] = None
    lock: Optional[object] = None
    pool: Optional[WritePool] = None
    writers: list = field(default_factory=list)
    refit_due: bool = False
    sink: Optional[RefitSink] = None


@contextlib.contextmanager
def _one_torch_thread():
    """Torch's intra-op threads off during an export (restored after). The export's elementwise
    work (cast, checks, copies) is memory-bound, and its parallelism comes from the writer
    threads; an OpenMP team on top of them oversubscribes the cores, and its spinning workers
    doubled the CPU time of an export here. In sync mode training is paused meanwhile; the
    background worker runs with one thread anyway."""
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)
