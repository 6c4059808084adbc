"""One export, as data and as a run: `ExportJob` holds everything an export needs except the
tensors (picklable, so the background worker process can run it), and `ExportJob.run` executes
the phases on one rank:

1. rank 0 lays out the directory and every output file; all ranks agree it worked;
2. every unit in plan order: move slices to the writer, convert, cast, write at the planned place;
   transfers always run, so no peer ever waits on a rank that failed;
3. all ranks share outcomes and checksums; rank 0 writes configs and the manifest and renames the
   directory; all ranks learn the result.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import manifest as mf
from .arch import FAMILIES
from .arch.convert import megatron_to_hf
from .arch.spec import Context
from .config import ExportConfig
from .errors import ConfigError, ExportError
from .finite import check_finite
from .formats.files import FileSet, write_json
from .formats.hf import HFWriter
from .formats.trtllm import TrtllmConverter, trtllm_config
from .formats.write_pool import WritePool
from .gather import exchange, iter_meta
from .quant.numerics import LinearQuantizer

logger = logging.getLogger("megatron_trt_ext")

__version__ = "0.1.0"

# The quantizer of a component of a concatenated linear (a Mamba mixer's in_proj): made from the
# whole HF weight once its last component arrives (`ExportJob.convert`).
WHOLE_HF_TENSOR = object()


@dataclass
class ExportResult:
    """What one export produced. ``path`` and ``status`` are the same on every rank.

    ``status``: ``complete``, ``failed``, ``skipped`` (busy policy) or ``running`` (async, not
    finished yet; ``Exporter.wait()`` returns the final result).
    """

    iteration: int
    path: Path
    status: str
    formats: list
    timings: dict = field(default_factory=dict)
    bytes_written: int = 0
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "complete"


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@dataclass
class ExportJob:
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
    # Megatron linear -> (first HF part, its Algorithm): parts of a fused linear must agree
    _part_algos: dict = field(default_factory=dict, repr=False)
    keep_source: frozenset = frozenset()  # units with an output in a dtype other than the export's

    def __post_init__(self):
        if not self.out_specs:
            self.out_specs, self.keep_source = self._plan_outputs()

    @property
    def spec(self):
        return FAMILIES[self.family]

    @property
    def ctx(self) -> Context:
        return Context(info=self.info, vocab_size=self.vocab_size)

    @property
    def family_trt(self) -> dict:
        return self.spec.trtllm(self.info)

    # ------------------------------------------------------------------ conversion
    def new_converter(self):
        c = self.config
        if "trtllm_checkpoint" not in c.formats:
            return _NoTrtllm()
        return TrtllmConverter(self.family_trt, self.info, c.inference_tp, c.inference_pp,
                               torch_dtype(c.dtype), self.moe_tp, self.moe_ep)

    @property
    def quant(self):
        spec = self.config.quant
        return spec if spec.enabled else None

    def convert(self, converter: TrtllmConverter, name: str, tensor: torch.Tensor, dtype: torch.dtype,
                state: "ConvertState", cast_first: bool = True):
        """The one conversion pipeline, shared by the shape-only plan and the real export.

        Yields (hf_name, hf_tensor, [(rank, trt_name, trt_tensor), ...]). Casting is elementwise
        and every output of an unquantized unit is a rearrangement of its elements (views,
        splits, zero padding), so the unit is cast once, first: the same bits as casting each
        output, one pass instead of one per format, and the transforms then move export-dtype
        bytes. Units with an output that keeps another dtype (MoE routers stay float32;
        ``keep_source``), norms that take a folded pre-quant scale and quantized linears convert
        from the source values. Calibration statistics (quantized exports) wait in
        ``state.stats`` until their linear's weight arrives, parts of concatenated tensors in
        ``state.pending`` until the last part arrives.
        """
        from .quant.stats import fold_name, is_stat

        if is_stat(name):
            state.stats[name] = tensor
            return
        trt_on = "trtllm_checkpoint" in self.config.formats
        quantizer = self._quantizer(name, tensor, state.stats)
        fold = state.stats.pop(fold_name(name), None) if state.stats else None
        if cast_first and quantizer is None and fold is None and self._cast_first(name):
            tensor = tensor.to(dtype)
        native = quantizer.native_scale if isinstance(quantizer, LinearQuantizer) else None
        # FP8-trained weights: their multipliers go through the same row transforms as the bytes
        native_parts = dict(megatron_to_hf(self.spec, self.ctx, [(name, native)], {})) if native is not None else {}
        for hf_name, out in megatron_to_hf(self.spec, self.ctx, [(name, tensor)], state.pending):
            algo = self._algo_for(name, hf_name) if quantizer is not None else None
            if algo is not None:
                if quantizer is WHOLE_HF_TENSOR:  # the concatenated linear is complete: its own scales
                    quantizer = self._whole_quantizer(name, out, state.stats)
                yield from self._convert_quantized(converter, quantizer, hf_name, out, trt_on, algo,
                                                   folded=name in self.folded_linears,
                                                   native=native_parts.get(hf_name))
                continue
            if hf_name in native_parts:  # an FP8-trained linear left unquantized: its values
                from .quant.fp8_source import dequantize

                out = dequantize(out, native_parts[hf_name])
            trt = list(converter.feed(hf_name, out)) if trt_on else []
            if trt and isinstance(quantizer, LinearQuantizer):
                trt += self._fused_kv_scale(converter, quantizer, hf_name)
            hf_out = out if fold is None else self._fold_into_norm(hf_name, out, fold)
            yield hf_name, hf_out.to(self._hf_dtype(hf_name, dtype)), trt
            if isinstance(quantizer, LinearQuantizer) and hf_name.endswith(("k_proj.weight", "v_proj.weight")):
                yield from self._kv_scale(converter, quantizer, hf_name, trt_on)

    def _hf_dtype(self, hf_name: str, dtype: torch.dtype) -> torch.dtype:
        """The export dtype, or float32 for what the family keeps in float32 (MoE routers)."""
        import re

        if any(re.search(pattern, hf_name) for pattern in self.spec.keep_fp32):
            return torch.float32
        return dtype

    def _cast_first(self, name: str) -> bool:
        """Whether a unit is cast to the export dtype before its transforms: every unquantized
        unit whose outputs all take the export dtype."""
        if name in self.keep_source:
            return False
        if self.quant is None:
            return True
        from .quant.calibrate import is_quantizable_linear
        from .quant.stats import is_stat

        return not is_stat(name) and not is_quantizable_linear(name) and name not in self._fold_targets

    @property
    def _fold_targets(self) -> frozenset:
        """Norm units that take a folded AWQ pre-quant scale in the HF export."""
        cached = self.__dict__.get("_fold_target_cache")
        if cached is None:
            from .quant.stats import FOLD, SEP, weight_of

            cached = frozenset(weight_of(u.name) for u in self.units if SEP + FOLD in u.name)
            self.__dict__["_fold_target_cache"] = cached
        return cached

    def _quantizer(self, name: str, tensor: torch.Tensor, stats: Optional[dict]):
        if self.quant is None:
            return None
        from .quant.calibrate import is_linear_part, is_quantizable_linear
        from .quant.stats import stat_name, stats_for

        if not is_quantizable_linear(name):
            return None
        if is_linear_part(name):
            return WHOLE_HF_TENSOR
        from .quant.fp8_source import STAT

        from .quant.stats import GROUP

        values = {stat: stats.pop(stat_name(name, stat)) for stat in stats_for(self.quant, name)}
        group_amax = stats.pop(stat_name(name, GROUP), None)
        return LinearQuantizer(tensor, values, native_scale=stats.pop(stat_name(name, STAT), None),
                               group_amax=group_amax)

    def _whole_quantizer(self, name: str, weight: torch.Tensor, stats: dict) -> LinearQuantizer:
        """The quantizer of a concatenated linear (its last component ``name`` just arrived):
        weight scales from the whole HF weight, statistics named after the whole linear."""
        from .quant.calibrate import linear_of
        from .quant.stats import stat_name, stats_for

        whole = linear_of(name)
        return LinearQuantizer(weight, {stat: stats.pop(stat_name(whole, stat))
                                        for stat in stats_for(self.quant, whole)})

    def _algo_for(self, source_name: str, hf_name: str):
        """The algorithm of one HF part of a quantizable Megatron linear (None: unquantized).
        The parts of one fused linear (q/k/v, gate/up) must agree: engines fuse them again."""
        import re

        if not hf_name.endswith(".weight"):
            return None
        module = hf_name[: -len(".weight")]
        m = re.search(r"\.layers\.(\d+)\.", hf_name)
        layer = int(m.group(1)) if m else None
        if layer is not None and layer >= self.info.num_layers:
            algo = None  # multi-token prediction layers stay unquantized, as ModelOpt leaves them
        else:
            algo = self.quant.algorithm_for(module, layer, self.info.num_layers)
        first = self._part_algos.setdefault(source_name, (module, algo))
        if first[1] != algo:
            def label(a):
                return a.name if a is not None else "none"
            raise ConfigError(f"quantization: {first[0]} gets {label(first[1])} but {module} gets {label(algo)}; "
                              f"they are parts of one Megatron linear ({source_name}), which serving engines fuse "
                              "again: give them the same algorithm in exclude/overrides")
        return algo

    def _check_shape(self, converter, module: str, shape: tuple, algo, trt_on: bool) -> None:
        """Group and block sizes must divide the linear (per inference TP rank when split)."""
        out, inp = shape
        group = algo.block or algo.group_size
        what = "block size" if algo.block else "group size"
        fix = f"exclude it (quantization.exclude: ['{module}']) or choose another algorithm"
        if group and inp % group:
            raise ConfigError(f"quantization {algo.name}: {module} has {inp} inputs, not a multiple of the "
                              f"{what} {group}; {fix}")
        if algo.block and out % algo.block:
            raise ConfigError(f"quantization {algo.name}: {module} has {out} outputs, not a multiple of the "
                              f"{what} {algo.block}; {fix}")
        splits, key = converter.input_splits(module + ".weight") if trt_on else (1, None)
        if group and splits > 1 and (inp // splits) % group:
            raise ConfigError(f"quantization {algo.name}: with {key}={splits} each rank holds {inp // splits} inputs "
                              f"of {module}, not a multiple of the {what} {group}; lower {key} or {fix}")

    @property
    def folded_linears(self) -> frozenset:
        """Quantizable linears whose AWQ pre-quant scale the HF export folds into the preceding
        norm (`Exporter._fold_aliases`; the fold statistics say which)."""
        cached = self.__dict__.get("_folded")
        if cached is None:
            from .quant.calibrate import is_quantizable_linear
            from .quant.stats import FOLD, SEP, norm_units

            names = {u.name for u in self.units}
            folds = {n for n in names if SEP + FOLD in n}
            cached = frozenset(n for n in names if folds and is_quantizable_linear(n) and any(
                fold_target in folds for fold_target in _fold_names(norm_units(n, names, self.spec.aliases))))
            self.__dict__["_folded"] = cached
        return cached

    def _fold_into_norm(self, hf_name: str, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """norm(x) * s as one norm: weight * s (zero-centred: (1 + w) * s - 1), bias * s."""
        scale = scale.float().reshape(-1)
        x = out.float()
        if hf_name.endswith(".bias") or not self.info.zero_centered_gamma:
            return x * scale
        return (1.0 + x) * scale - 1.0

    def _convert_quantized(self, converter, quantizer, hf_name, weight, trt_on, algo, folded: bool = False,
                           native=None):
        module = hf_name[: -len(".weight")]
        if self.spec.conv1d_linears:  # back to Linear layout: scales and packing follow [out, in]
            weight = weight.t()
            native = native.t() if native is not None and native.dim() == 2 else native
        self._check_shape(converter, module, tuple(weight.shape), algo, trt_on)
        qlinear = quantizer.quantize_part(weight, algo, native)
        trt = list(converter.feed(hf_name, qlinear)) + self._fused_kv_scale(converter, quantizer, hf_name) \
            if trt_on else []
        yield hf_name, qlinear.quantized(), trt
        for scale, (value, _) in qlinear.scales.items():
            if scale == "pre_quant_scale" and folded:
                continue  # folded into the norm before this linear (TensorRT-LLM keeps its own)
            # pre_quant_scale takes the checkpoint dtype (as ModelOpt writes it); scales stay float32
            out = value.to(torch_dtype(self.config.dtype)) if scale == "pre_quant_scale" else _scale_dtype(value)
            yield f"{module}.{scale}", out.contiguous(), []
        yield from self._kv_scale(converter, quantizer, hf_name, trt_on)

    @staticmethod
    def _fused_kv_scale(converter, quantizer, hf_name) -> list:
        """The KV-cache scale of a fused q|k|v HF linear (GPT-2's c_attn), for TensorRT-LLM: the
        HF format of such a family is not written quantized (`ArchSpec.quantized_formats_unsupported`)."""
        kv = quantizer.kv_scales()
        if not kv or not converter.fused_qkv(hf_name):
            return []
        return [t for which in ("k", "v") for t in converter.feed_kv_scale(hf_name, which, kv[which])]

    def _kv_scale(self, converter, quantizer, hf_name, trt_on):
        kv = quantizer.kv_scales()
        module = hf_name[: -len(".weight")]
        for which in ("k", "v"):
            if hf_name.endswith(f"{which}_proj.weight") and which in kv:
                trt = list(converter.feed_kv_scale(hf_name, which, kv[which])) if trt_on else []
                yield f"{module}.{which}_scale", kv[which].float(), trt

    def _plan_outputs(self) -> tuple:
        """Every output file's tensors, from the conversion run on shape-only tensors; and the
        units that must not be cast first (an output in another dtype than the export's)."""
        dtype = torch_dtype(self.config.dtype)
        converter = self.new_converter()
        hf_specs, rank_specs = [], {r: [] for r in range(self.config.inference_tp * self.config.inference_pp)}
        state = ConvertState()
        keep_source = set()
        quantized: dict = {}  # HF module -> Algorithm
        unquantized_hf, unquantized_trt = set(), set()
        for name, meta in iter_meta(self.units):
            for hf_name, out, trt in self.convert(converter, name, meta, dtype, state, cast_first=False):
                hf_specs.append((hf_name, out.dtype, tuple(out.shape)))
                if out.dtype != dtype:
                    keep_source.add(name)
                for rank, trt_name, t in trt:
                    rank_specs[rank].append((trt_name, t.dtype, tuple(t.shape)))
                    if t.dtype != dtype:
                        keep_source.add(name)
                if self.quant is None or not hf_name.endswith(".weight"):
                    continue
                module = hf_name[: -len(".weight")]
                algo = self._part_algos.get(name, (None, None))[1] if module != "lm_head" else None
                if algo is not None:
                    quantized[module] = algo
                elif out.dim() >= 2:  # an unquantized linear, embedding or convolution: listed, as ModelOpt does
                    unquantized_hf.add(module)
                    unquantized_trt.update(n[: -len(".weight")] for _, n, t in trt
                                           if t.dim() == 2 and n.endswith(".weight") and ".layers." in n)
        converter.finish()
        state.finish()
        specs = {"hf": hf_specs, "trtllm": {f"rank{r}.safetensors": s for r, s in rank_specs.items()}}
        if self.quant is not None:
            unquantized_hf.add("lm_head")  # also when tied to the embedding (the module exists)
            specs["quant"] = {"layers": {m: a.name for m, a in quantized.items()},
                              "hf_exclude": sorted(unquantized_hf),
                              "trt_exclude": ["lm_head", *sorted(unquantized_trt)]}
        return specs, frozenset(keep_source)

    def write_pool(self) -> WritePool:
        """Writer threads for one export. The budget lets about half of the largest unit (in the
        export dtype) wait for its writes while the next unit is gathered and converted, which
        keeps peak memory within two of the largest tensor (see `write_pool`). The background
        worker uses one thread: it shares the machine with training."""
        size = torch_dtype(self.config.dtype).itemsize
        largest = max((u.numel * size for u in self.units), default=0)
        return WritePool(threads=1 if self.mode == "async" else 2, budget_bytes=largest // 2)

    def writers(self, tmp: Path, create: bool, pool: Optional[WritePool] = None) -> tuple:
        hf = trt = None
        if "hf" in self.config.formats:
            hf_config = self.spec.hf_config(self.info, self.ctx, self.config.dtype)
            if self.quant is not None:
                from .quant.export_config import hf_quantization_config

                hf_config["quantization_config"] = hf_quantization_config(self.quant, self.out_specs["quant"])
            hf = HFWriter(tmp / "hf", self.out_specs["hf"], self.config.max_shard_size_bytes, hf_config,
                          create=create, pool=pool)
        if "trtllm_checkpoint" in self.config.formats:
            trt = FileSet(tmp / "trtllm_checkpoint", self.out_specs["trtllm"], create=create, pool=pool)
        return hf, trt

    def needed_pieces(self) -> list:
        """(unit name, offset, shape) of the local slices this rank reads in an export: what a
        snapshot must copy. A rank sends main slices its writer lacks and writes from its own."""
        needs = []
        for unit in self.units:
            if unit.writer == self.rank:
                needs += [(unit.name, p.offset, p.shape) for p in unit.pieces if unit.local_to_writer(p)]
            else:
                needs += [(unit.name, p.offset, p.shape) for p in unit.pieces
                          if p.rank == self.rank and not unit.local_to_writer(p)]
        return needs

    def manifest_base(self, iteration: int) -> dict:
        c = self.config
        return {
            "schema_version": mf.SCHEMA_VERSION,
            "status": "writing",
            "iteration": iteration,
            "created_unix": time.time(),
            "producer": {"name": "megatron-trt-ext", "version": __version__},
            "family": self.family,
            "formats": list(c.formats),
            "mode": self.mode,
            "dtype": c.dtype,
            "vocab_size": self.vocab_size,
            "inference": {"tp": c.inference_tp, "pp": c.inference_pp, "moe_tp": self.moe_tp, "moe_ep": self.moe_ep},
            "source": {"padded_vocab_size": self.info.padded_vocab_size, "num_layers": self.info.num_layers,
                       "world_size": self.world_size},
            "config": c.to_dict(),
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
        base_total = time.time() - submitted if submitted else 0.0
        run = _Run(iteration=iteration, tmp=mf.partial_path(self.root, iteration),
                   meta=self.manifest_base(iteration), timings=timings, t0=t0, base_total=base_total,
                   round_name=comm.next_round(iteration) if not comm.broken else "broken",
                   on_progress=on_progress or (lambda: None), verification=verification)
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
                run.tmp = mf.start(self.root, iteration, run.lock)
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

        error = None
        checksums: dict = {}
        converter = self.new_converter()
        dtype = torch_dtype(self.config.dtype)
        state = ConvertState()
        size = dtype.itemsize
        for unit in self.units:
            if unit.writer == self.rank:  # waits while earlier units' writes hold the memory budget
                w0 = time.perf_counter()
                run.pool.begin(unit.numel * size)
                timings["write_s"] += time.perf_counter() - w0
            g0 = time.perf_counter()
            full = exchange(unit, local, comm, cast_to=dtype if self._cast_first(unit.name) else None)
            timings["gather_s"] += time.perf_counter() - g0
            if run.lock is not None:
                run.lock.refresh()
            run.on_progress()
            if full is None or error is not None:
                continue
            try:
                self._export_unit(unit, full, converter, dtype, hf, trt, timings, state)
            except Exception as exc:  # noqa: BLE001
                error = f"tensor {unit.name!r}: {type(exc).__name__}: {exc}"
                local_exc = exc
            full = None  # the writer threads keep what they still need; the rest goes now
            run.pool.end()
        w0 = time.perf_counter()
        try:
            if error is None:
                converter.finish()
                state.finish()
            for name, writer in (("hf", hf), ("trtllm_checkpoint", trt)):
                if writer is not None:  # waits for the writer threads, then fsyncs
                    for fname, sums in writer.close().items():
                        checksums[f"{name}/{fname}"] = sums
        except Exception as exc:  # noqa: BLE001
            error = error or f"{type(exc).__name__}: {exc}"
            local_exc = local_exc or exc
        timings["write_s"] += time.perf_counter() - w0

        timings["total_s"] = run.base_total + time.perf_counter() - run.t0
        failures = comm.agree(error)
        if failures:
            self._fail(comm, run, failures, local_exc, [hf, trt])
        # Checksums and timings only matter to the publisher: gathered to rank 0, not to everyone.
        gathered = comm.gather_object((error, checksums, timings))
        publish_error, bytes_written = None, 0
        if self.rank == 0:
            try:
                bytes_written = self._publish(iteration, run.tmp, run.meta, hf, trt, gathered, run.verification)
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
            mf.apply_retention(self.root, self.config.keep_last)  # never fails the export
        return ExportResult(iteration, path, "complete", list(self.config.formats), timings, bytes_written)

    def _export_unit(self, unit, full, converter, dtype, hf, trt, timings, state) -> None:
        c0 = time.perf_counter()
        for hf_name, out, trt_parts in self.convert(converter, unit.name, full, dtype, state):
            w0 = time.perf_counter()
            timings["convert_s"] += w0 - c0
            if self.config.check_finite:
                # checked as written (after the cast): 70000.0 is finite in float32, inf in float16;
                # TensorRT-LLM parts in the export dtype are pieces of `out`, already checked
                check_finite(hf_name, out)
                for _, trt_name, t in trt_parts:
                    if t.dtype != out.dtype:
                        check_finite(trt_name, t)
                timings["check_s"] = timings.get("check_s", 0.0) + time.perf_counter() - w0
                w0 = time.perf_counter()
            if hf is not None:
                hf.write(hf_name, out)
            for rank, name, t in trt_parts:
                trt.write(name, t, fname=f"rank{rank}.safetensors")
            c0 = time.perf_counter()
            timings["write_s"] += c0 - w0

    def _publish(self, iteration, tmp, meta, hf, trt, gathered, verification=None) -> int:
        files: dict = {}
        for _, sums, _ in gathered:
            for fname, tensors in sums.items():
                files.setdefault(fname, {}).update(tensors)
        meta["verification"] = verification.meta if verification is not None else {"status": "off"}
        if verification is not None and verification.ok:
            from .safe_fs import write_bytes
            from .verification.probe import FILE_NAME

            write_bytes(tmp / FILE_NAME, verification.data)
            files[FILE_NAME] = dict(verification.sha256)
        for prefix, writer in (("hf", hf.fileset if hf else None), ("trtllm_checkpoint", trt)):
            if writer is not None:
                missing = writer.missing({k[len(prefix) + 1:]: v for k, v in files.items()
                                          if k.startswith(prefix + "/")})
                if missing:
                    raise ExportError(f"{prefix}: planned tensors never written: {missing}")
        if hf is not None:
            hf.finalize(self.config.tokenizer_dir)
            if self.quant is not None:
                from .quant.export_config import hf_quant_config_file

                write_json(tmp / "hf" / "hf_quant_config.json", hf_quant_config_file(self.quant, self.out_specs["quant"]))
        if trt is not None:
            c = self.config
            trt_config = trtllm_config(self.family_trt, self.info, self.vocab_size, c.dtype, c.inference_tp,
                                       c.inference_pp, self.moe_tp, self.moe_ep)
            if self.quant is not None:
                from .quant.export_config import trtllm_quantization

                trt_config["quantization"] = trtllm_quantization(self.quant, self.out_specs["quant"])
            write_json(tmp / "trtllm_checkpoint" / "config.json", trt_config)
        bytes_written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        per_rank = {r: t for r, (_, _, t) in enumerate(gathered)}
        meta.update(files={k: {"sha256": v} for k, v in sorted(files.items())},
                    timings={**per_rank[0], "per_rank": per_rank}, bytes_written=bytes_written)
        mf.publish(tmp, self.root, iteration, meta)
        return bytes_written

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
            recorded = mf.record_failure(self.root, run.iteration, {**run.meta, "timings": run.timings}, message,
                                         partial=run.tmp if run.lock is not None else None)
        recorded = comm.all_gather_object(str(recorded) if recorded else None)[0]
        exc = ExportError(message)
        exc.result = self._failed_result(run, message, Path(recorded) if recorded else None)
        raise exc from local_exc

    def _broken(self, comm, run: "_Run", exc: BaseException) -> ExportError:
        """A collective broke (a peer was lost, or timed out): tear the groups down so every peer
        fails now, find out who is gone, record the failure from whoever is left."""
        import traceback

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
        # Whoever survives records it (the first record wins); the lock holder also drops its
        # partial directory.
        recorded = mf.record_failure(self.root, run.iteration, {**run.meta, "timings": run.timings}, message,
                                     partial=run.tmp if run.lock is not None else None)
        error = ExportError(message)
        error.result = self._failed_result(run, message, recorded)
        return error


class _NoTrtllm:
    """Stands in for the TensorRT-LLM converter when that format is not written."""

    def feed(self, *args):
        return iter(())

    feed_kv_scale = feed

    def finish(self) -> None:
        pass


@dataclass
class ConvertState:
    """What one conversion holds between source tensors: calibration statistics waiting for their
    linear, and parts of concatenated tensors waiting for the rest."""

    stats: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)

    def finish(self) -> None:
        if self.pending:
            raise ExportError(f"incomplete concatenated tensors (parts never arrived): {sorted(self.pending)[:4]}")


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


def _fold_names(norm_units: list) -> list:
    from .quant.stats import fold_name

    return [fold_name(n) for n in norm_units]


def _scale_dtype(value: torch.Tensor) -> torch.Tensor:
    """Scales are float32, except NVFP4's per-block scales (FP8) and MXFP8's (E8M0 exponents, uint8)."""
    return value if value.dtype in (torch.float8_e4m3fn, torch.uint8) else value.float()


def failed_path(root: Path, iteration: int) -> Path:
    return mf.failed_path(root, iteration)
