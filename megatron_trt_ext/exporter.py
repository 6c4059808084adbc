"""`Exporter`: validates a live model against a config once, then exports it on demand.

Construction (on every rank) reads the model's architecture, picks its family, checks the
inference layout, gathers every rank's slice descriptions into one plan, and lays out the output
files on shape-only tensors. `export()` then runs the plan synchronously (`ExportJob.run`) or
hands a host snapshot to the background worker (`background.BackgroundExporter`).
"""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import errors as err_mod
from . import tokenizer
from .arch import select_family
from .arch.convert import check_sources
from .attach_checks import check_inference_layout, check_quantization, check_trtllm_support, export_vocab_size
from .config import ExportConfig
from .errors import ConfigError, ExportError
from .gather import Comm, gather_classes
from .job import ExportJob
from .result import ExportResult
from .model_info import drop_mtp_layers, merge_module_facts, module_facts, read_model_info, unwrap_chunks
from .plan import describe, expert_group, local_shards, plan_units
from .row_split import split_for_export

logger = logging.getLogger("megatron_trt_ext")

_live_exporters: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for exporter in list(_live_exporters):
        try:
            exporter.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


@dataclass
class Source:
    """What one export reads, taken during the stall: the local slices, the calibration replica
    holding them (quantized exports; dropped after the copy), the probe record (rank 0)."""

    local: dict
    replica: Optional[list]
    probe: Optional[Any]
    probe_s: float = 0.0


def _raise_failed_refit(config: ExportConfig, result: Optional[ExportResult]) -> None:
    """``strict``: a failed live refit is raised into training like a failed export (the export
    itself stays complete); otherwise it is only recorded and logged."""
    record = getattr(result, "serve", None) or {}
    if config.strict and record.get("status") == "failed":
        raise ExportError(f"refit at iteration {result.iteration} failed: {record.get('error')}")


def _describe_error(exc: BaseException) -> tuple:
    return (type(exc).__name__, str(exc))


def _raise_agreed(failures: list, local_exc: Optional[BaseException], what: str):
    """Raise on every rank: the local exception where it happened, its description elsewhere."""
    if local_exc is not None:
        raise local_exc
    first_rank, (cls_name, message) = failures[0]
    cls = getattr(err_mod, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, err_mod.MegatronTrtExtError)):
        cls = ExportError
    raise cls(f"{what} failed on rank {first_rank}: {message}")


class Exporter:
    """Export a live Megatron-Core GPTModel, whatever its TP/PP/virtual-PP/DP/EP layout.

    Args:
        model: a GPTModel, a list of model chunks (virtual pipeline), or DDP/Float16Module-wrapped.
        config: an ExportConfig.
        default_mode: the mode when ``config.mode`` is unset (`attach` passes ``"async"``).

    Construct it on every rank (it creates the export's process groups and gathers the plan).
    Raises at construction, on every rank alike, never at the first checkpoint:
    UnsupportedModelError for model features no family supports, ConfigError for inference
    layouts that cannot hold the model, an unwritable output directory or missing build devices.
    """

    def __init__(self, model: Any, config: ExportConfig, default_mode: str = "sync",
                 calibration_data: Any = None, forward_loop: Any = None):
        if not isinstance(config, ExportConfig):
            raise ConfigError(f"config: expected an ExportConfig, got {type(config).__name__}")
        self.config = config
        self.quant = config.quantization if config.quantization.enabled else None
        self.calibration_data = calibration_data
        self.forward_loop = forward_loop
        self.mode = config.mode or default_mode
        self.chunks = unwrap_chunks(model)
        device = next((p.device for c in self.chunks for p in c.parameters()), torch.device("cpu"))
        self.comm = Comm(config.timeout_s, device)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        local_exc, description = None, None
        # What a rank sees of the model depends on its stage (a pipeline stage of dense layers has
        # no experts, one of attention layers no Mamba mixer): the ranks pool those facts first.
        try:
            info = read_model_info(self.chunks)
        except err_mod.MegatronTrtExtError as exc:
            info, local_exc = None, exc
        gathered = self.comm.all_gather_object(
            (_describe_error(local_exc) if local_exc else None, module_facts(info) if info else None))
        failures = [(r, e) for r, (e, _) in enumerate(gathered) if e]
        if failures:
            _raise_agreed(failures, local_exc, "export set-up")
        try:
            self.info = merge_module_facts(info, [facts for _, facts in gathered])
            if config.drop_mtp:
                self.info = drop_mtp_layers(self.info)
            self.spec = select_family(self.info, config.family)
            check_trtllm_support(self.spec, self.info, config.formats)
            self.moe_tp, self.moe_ep = check_inference_layout(self.info, config)
            self.vocab_size = export_vocab_size(self.info, config, self.rank)
            self.tokenizer = tokenizer.read(config, self.vocab_size) if "hf" in config.formats else None
            self.probe_options = config.verification
            self.probe_enabled = self.probe_options.enabled and "hf" in config.formats
            if self.probe_enabled:
                self.probe_options.check_model(self.info.max_position_embeddings, self.vocab_size)
            self.root = config.check_output_dir_writable()
            if self.rank == 0:  # what interrupted runs left behind (never what a live process holds)
                from . import publish

                for path in publish.cleanup_leftovers(self.root, stale_after_s=2 * config.timeout_s):
                    logger.info("removed %s, left by an interrupted export", path)
            if "trtllm_engine" in config.formats:
                config.build.check_devices(torch.cuda.device_count())
            if config.serve.enabled and config.serve.transport == "nccl":  # CUDA and vLLM, on this side
                from .serve.nccl import check_available

                check_available()
            from .source import canonical_namer

            self.rename = canonical_namer(self.info)
            local = self._local_shards(self.chunks)
            if self.quant is not None:
                check_quantization(config, self.quant, self.spec, self.info, self.chunks, calibration_data,
                                   forward_loop)
                from .quant.stats import stat_pieces

                local.update(stat_pieces(local, self.quant, fold_aliases=self._fold_aliases(),
                                         groups=self.spec.shared_input_linears))
            description = describe(local)
        except err_mod.MegatronTrtExtError as exc:
            local_exc = exc
        failures, classes = gather_classes(self.comm, description,
                                           _describe_error(local_exc) if local_exc else None)
        if failures:
            _raise_agreed(failures, local_exc, "export set-up")
        from .quant.stats import is_stat, weight_of

        units = plan_units(classes, group_key=self._group_key(weight_of))
        check_sources(self.spec, self.info, [u.name for u in units if not is_stat(u.name)])
        units, row_maps = split_for_export(config, self.spec, self.info, self.vocab_size, self.moe_tp, self.moe_ep,
                                           classes, self._group_key(weight_of), units)
        self.job = ExportJob(config=config, info=self.info, family=self.spec.name, units=units,
                             vocab_size=self.vocab_size, moe_tp=self.moe_tp, moe_ep=self.moe_ep,
                             rank=self.rank, world_size=self.world_size, root=self.root, mode=self.mode,
                             tokenizer=self.tokenizer, row_maps=row_maps)
        self.saves_seen = 0
        self.last_result: Optional[ExportResult] = None
        self.results: list = []
        self._background = None
        if self.mode == "async":
            from .background import BackgroundExporter

            self._background = BackgroundExporter(self)
        _live_exporters.add(self)

    def _group_key(self, weight_of):
        """Which units share a writer: a statistic goes with its linear (or the norm it folds
        into); the parts of a Concat, and experts stacked into one HF tensor (`unit_group`);
        experts that one TensorRT-LLM rank stacks."""
        from .arch.spec import unit_group

        per_group = None
        if "trtllm_checkpoint" in self.config.formats and self.info.num_experts:
            per_group = self.info.num_experts // self.moe_ep

        def key(name: str) -> str:
            name = weight_of(name)
            group = unit_group(self.spec, name)
            if group is not None:
                return group
            return expert_group(name, per_group) if per_group else name
        return key

    @property
    def units(self) -> list:
        return self.job.units

    @property
    def ctx(self):
        return self.job.ctx

    def take_source(self) -> "Source":
        """What an export reads, all of it taken while training waits: the verification probe's
        reference logits (live model), then the slices: the live model's own, or (quantized
        exports) a calibrated replica's plus its calibration statistics (the replica is dropped
        after the copy). Collective: every rank calls it at the same save (the sync export, or
        the background exporter's snapshot)."""
        batches, batches_error = None, None
        try:
            batches = self._calibration_batches()
        except Exception as exc:  # noqa: BLE001 - raised after the probe, whose collectives every rank runs
            batches_error = exc
        t0 = time.perf_counter()
        probe = self._probe(batches)
        probe_s = time.perf_counter() - t0
        if batches_error is not None:
            raise batches_error
        if self.quant is None:
            return Source(self._local_shards(self.chunks), None, probe, probe_s)
        from .quant.calibrate import calibrate
        from .quant.stats import stat_pieces

        local = self._local_shards(self.chunks)
        groups = self.spec.shared_input_linears
        calibration = calibrate(self.chunks, self.quant, self.info, local, self.calibration_data,
                                self.forward_loop, self.comm, batches=batches, groups=groups)
        replica = calibration.replica
        if replica is not None:  # ModelOpt's smoothquant/awq rescaled the replica's weights: export those
            local = self._local_shards(replica)
        local.update(stat_pieces(local, self.quant, calibration, self._fold_aliases(), groups))
        return Source(local, replica, probe, probe_s)

    def _fold_aliases(self):
        """AWQ's pre-quant scales of the linears right after a norm (q/k/v, gate/up) fold into that
        norm in the Hugging Face export, as ModelOpt writes it (TensorRT-LLM's PyTorch backend reads
        no pre-quant scale on fused linears); None when nothing folds."""
        if self.quant.calibration_kind == "awq" and "hf" in self.config.formats:
            return dict(self.spec.aliases)
        return None

    def _calibration_batches(self):
        """Calibration batches drawn once per export, shared by calibration and the probe (an
        iterator source is read once); None when calibration draws its own or there is none."""
        if self.quant is None or self.forward_loop is not None:
            return None
        from .quant.calibrate import calibration_batches

        device = next((p.device for c in self.chunks for p in c.parameters()), torch.device("cpu"))
        return calibration_batches(self.quant.calibration, self.calibration_data, self.vocab_size,
                                   device)

    def _probe(self, batches):
        """The verification probe (see `verification.probe`); rank 0 gets the record."""
        if not self.probe_enabled:
            return None
        from .plan import torch_dtype
        from .verification.probe import Rounding, parameter_count, run_probe

        source = self.quant.calibration.source if self.quant is not None else ""
        real_data = batches if source in ("iterator", "jsonl") else None
        dtype = next((p.dtype for c in self.chunks for p in c.parameters()), torch.float32)
        # unquantized exports: the reference is the weights as exported (rounded to the export dtype)
        rounding = None if self.quant is not None else Rounding(torch_dtype(self.config.dtype), self.rename,
                                                                self.job.keep_source)
        record = run_probe(self.chunks, self.probe_options, self.vocab_size, self.info.padded_vocab_size,
                           self.comm, str(dtype).replace("torch.", ""), real_data, source, rounding,
                           parameters=parameter_count(self.units), max_positions=self.info.max_position_embeddings)
        if record is not None and not record.ok:
            logger.warning("verification probe failed, the export goes on without reference logits: %s",
                           record.meta.get("error"))
        return record

    def _local_shards(self, chunks) -> dict:
        local = local_shards(chunks, self.rename)
        if self.config.drop_mtp:  # the MTP layers' tensors neither move nor get written
            local = {name: pieces for name, pieces in local.items() if not name.startswith("mtp.")}
        if self._native_fp8():
            from .quant.calibrate import is_linear_part, is_quantizable_linear
            from .quant.fp8_source import native_pieces

            # (components of a concatenated linear are dequantized: their format scales span them all)
            local = native_pieces(local, chunks, lambda n: is_quantizable_linear(n) and not is_linear_part(n))
        return local

    def _native_fp8(self) -> bool:
        """FP8-trained weights (Transformer Engine FP8 parameters) move as their E4M3 bytes and
        scales when the recipe writes FP8 weights (fp8, fp8_pc_pt, fp8_pb_wo) and calibrates
        without rescaling them (not SmoothQuant/AWQ, whose replica ModelOpt rescales)."""
        quant = self.config.quantization
        return (quant.enabled and quant.calibration_kind in ("max", None)
                and any(a.weight.startswith("fp8") for a in quant.algorithms))

    # ------------------------------------------------------------------ export
    def export(self, iteration: int, on_progress=None, serve: bool = True) -> ExportResult:
        """Export the model as it is now. Call on every rank.

        Sync mode: returns the finished result; raises ExportError, on every rank, naming the
        failing rank and cause (a bad tensor, a full disk, a conversion error); ranks never wait
        on each other longer than ``config.timeout_s``.

        Async mode: returns as soon as this rank's shards are copied to host memory, with
        ``status="running"`` (``"failed"`` when the snapshot failed on a rank); `wait()` gives the
        final result, and failures are logged and recorded, never raised into training. Under
        ``busy_policy: skip`` a queued save that a newer one replaces before its export starts
        is recorded later as ``"skipped"`` (see ``results``).

        ``on_progress``: sync mode, called after each unit (the CLI's progress bars).
        ``serve``: with ``config.serve`` set, also refit the server (the manifest's ``serve`` key
        records how it went; a failed refit never fails the export).
        """
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise ConfigError(f"iteration: expected a non-negative int, got {iteration!r}")
        if self._background is not None:
            result = self._background.submit(iteration, serve=serve)
            if result.status == "running":  # shown until the final result is recorded
                self.last_result = result
            return result
        t0 = time.perf_counter()
        source = None
        try:
            try:
                source = self.take_source()
                local, source_error, timings = source.local, None, {"probe_s": source.probe_s}
            except Exception as exc:  # noqa: BLE001 - shared with the peers in the run's first decision
                local, source_error, timings = {}, exc, {}
            timings["serve_due"] = serve
            result = self.job.run(self.comm, local, iteration, timings, source_error=source_error,
                                  on_progress=on_progress,
                                  verification=source.probe if source is not None else None)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded and raised as ExportError
            error = exc if isinstance(exc, ExportError) else self._unexpected_failure(iteration, exc)
            result = getattr(error, "result", None) or ExportResult(
                iteration, None, "failed", list(self.config.formats), {}, 0, str(error))
            result.timings["stall_s"] = time.perf_counter() - t0
            self.record(result)
            if error is exc:
                raise
            raise error from exc
        finally:
            source = None  # noqa: F841 - drop the calibration replica now
        result.timings["stall_s"] = time.perf_counter() - t0  # sync: training waited for all of it
        self.record(result)
        from .engines.runner import launch_after_export

        launch_after_export(self.config, self.rank, result)
        return result

    def _unexpected_failure(self, iteration: int, exc: BaseException) -> ExportError:
        """A failure outside the export's own agreed paths (calibration, an unforeseen error):
        named, recorded on disk by this rank (the first record wins), raised as ExportError."""
        from . import publish

        message = f"export of iteration {iteration} failed on rank {self.rank}: {type(exc).__name__}: {exc}"
        logger.error("%s", message)
        recorded = publish.record_failure(self.root, iteration, self.job.manifest_base(iteration), message)
        error = ExportError(message)
        error.result = ExportResult(iteration, recorded, "failed", list(self.config.formats), {}, 0, message)
        return error

    def wait(self) -> Optional[ExportResult]:
        """Block until the background export (if any) is done; returns its result."""
        if self._background is not None:
            return self._background.wait()
        return self.last_result

    def close(self) -> None:
        """Finish the running export and stop the worker process (idempotent)."""
        if self._background is not None:
            background, self._background = self._background, None
            background.close()

    def record(self, result: ExportResult) -> None:
        """Every final result (complete, failed, skipped) passes here once: keep it, report it.
        The background exporter records the results its worker sends back here too."""
        self.last_result = result
        self.results.append(result)
        from .metrics import report

        report(result, self.rank)

    # ------------------------------------------------------------------ save-driven trigger
    def on_checkpoint_saved(self, iteration: int, checkpoint_dir: Any = None) -> Optional[ExportResult]:
        """Count a checkpoint save; export at every ``every_n_saves``-th. For callback frameworks.

        Failures are logged and recorded (the manifest of ``.iter_XXXXXXX.failed``) and training
        goes on, unless ``config.strict``.
        """
        self.saves_seen += 1
        if self.saves_seen % self.config.every_n_saves:
            return None
        if self.config.strict and self.last_result is not None and self.last_result.status == "failed":
            raise ExportError(self.last_result.error)
        _raise_failed_refit(self.config, self.last_result)  # strict: an async refit that failed
        serve = self.config.serve
        try:
            result = self.export(iteration, serve=serve.enabled and self.saves_seen % serve.every_n_saves == 0)
            _raise_failed_refit(self.config, result)
            return result
        except Exception as exc:  # noqa: BLE001 - training goes on; the failure is recorded
            if self.config.strict:
                raise
            logger.error("export at iteration %s failed, training continues: %s", iteration, exc)
            if self.last_result is None or self.last_result.iteration != iteration or self.last_result.ok:
                # never hand back an older (complete) result for a save that failed
                self.record(ExportResult(iteration, None, "failed", list(self.config.formats), {}, 0, str(exc)))
            return self.last_result

    def state_dict(self) -> dict:
        """Trigger state to keep in the training checkpoint, so every-N counting survives a resume."""
        return {"saves_seen": self.saves_seen}

    def load_state_dict(self, state: dict) -> None:
        self.saves_seen = int(state.get("saves_seen", 0))
