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
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import errors as err_mod
from .arch import select_family
from .arch.convert import check_sources
from .config import ExportConfig
from .errors import ConfigError, ExportError
from .gather import Comm, gather_classes
from .job import ExportJob, ExportResult, __version__  # noqa: F401  (re-exported)
from .model_info import drop_mtp_layers, merge_module_facts, module_facts, read_model_info, unwrap_chunks
from .plan import describe, expert_group, local_shards, plan_units

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


def _missing_mamba_kernel(chunks) -> Optional[str]:
    """The kernel a Mamba mixer of the model would call in a forward pass that its Megatron module
    could not import (mamba_ssm's), or None. The mixer calls ``mamba_split_conv1d_scan_combined``
    on its memory-efficient path, else ``mamba_chunk_scan_combined``."""
    import sys

    for chunk in chunks:
        for module in chunk.modules():
            if type(module).__name__ != "MambaMixer":
                continue
            kernel = ("mamba_split_conv1d_scan_combined" if getattr(module, "use_mem_eff_path", False)
                      else "mamba_chunk_scan_combined")
            if getattr(sys.modules.get(type(module).__module__), kernel, None) is None:
                return kernel
    return None


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
        self.quant = config.quant if config.quant.enabled else None
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
            self._check_trtllm_support()
            self._check_inference_layout()
            self.vocab_size = self._export_vocab_size()
            self.probe_options = config.verification_options
            self.probe_enabled = self.probe_options.enabled and "hf" in config.formats
            if self.probe_enabled:
                self.probe_options.check_model(self.info.max_position_embeddings, self.vocab_size)
            self.root = config.check_output_dir_writable()
            if self.rank == 0:  # what interrupted runs left behind (never what a live process holds)
                from . import manifest as mf

                for path in mf.cleanup_leftovers(self.root, stale_after_s=2 * config.timeout_s):
                    logger.info("removed %s, left by an interrupted export", path)
            if "trtllm_engine" in config.formats:
                config.build_options.check_devices(torch.cuda.device_count())
            from .source import canonical_namer

            self.rename = canonical_namer(self.info)
            local = self._local_shards(self.chunks)
            if self.quant is not None:
                self._check_quantization()
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
        self.job = ExportJob(config=config, info=self.info, family=self.spec.name, units=units,
                             vocab_size=self.vocab_size, moe_tp=self.moe_tp, moe_ep=self.moe_ep,
                             rank=self.rank, world_size=self.world_size, root=self.root, mode=self.mode)
        self.saves_seen = 0
        self.save_counts: dict = {}  # iteration -> saves counted up to it (resume bookkeeping)
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

    # ------------------------------------------------------------------ validation
    def _check_trtllm_support(self) -> None:
        wanted = [f for f in self.config.formats if f.startswith("trtllm")]
        reason = self.spec.trtllm_unsupported(self.info) if (wanted and self.spec.trtllm_unsupported) else None
        if reason:
            raise ConfigError(
                f"formats {wanted}: {reason}. Export formats: [hf] and deploy hf/ with TensorRT-LLM's PyTorch "
                "backend (trtllm-serve), vLLM or SGLang")

    def _check_inference_layout(self) -> None:
        info, tp, pp = self.info, self.config.inference_tp, self.config.inference_pp
        heads, groups = info.num_attention_heads, info.num_query_groups
        if heads % tp:
            raise ConfigError(f"inference_tp={tp}: does not divide num_attention_heads={heads}; "
                              f"choose a divisor of {heads}")
        if groups >= tp and groups % tp:
            raise ConfigError(f"inference_tp={tp}: does not divide the {groups} KV heads; choose a divisor "
                              f"of {groups} or a multiple of it that divides {heads}")
        if groups < tp and tp % groups:
            raise ConfigError(f"inference_tp={tp}: larger than the {groups} KV heads but not a multiple of "
                              "them, so KV heads cannot be duplicated evenly; choose a multiple of "
                              f"{groups} that divides {heads}")
        if info.ffn_hidden_size % tp:
            raise ConfigError(f"inference_tp={tp}: does not divide ffn_hidden_size={info.ffn_hidden_size}")
        if info.num_layers % pp:
            raise ConfigError(f"inference_pp={pp}: does not divide num_layers={info.num_layers}; "
                              f"choose a divisor of {info.num_layers}")
        self.moe_tp, self.moe_ep = self._moe_layout(tp)

    def _moe_layout(self, tp: int) -> tuple:
        info = self.info
        moe_tp, moe_ep = self.config.inference_moe_tp, self.config.inference_moe_ep
        if not info.num_experts:
            if moe_tp not in (None, tp) or moe_ep not in (None, 1):
                raise ConfigError("inference_moe_tp/inference_moe_ep: the model has no MoE layers; "
                                  "leave them unset")
            return tp, 1
        if moe_tp is None and moe_ep is None:
            moe_tp, moe_ep = tp, 1
        elif moe_tp is None:
            moe_tp = tp // moe_ep if tp % moe_ep == 0 else 0
        elif moe_ep is None:
            moe_ep = tp // moe_tp if tp % moe_tp == 0 else 0
        if not moe_tp or not moe_ep or moe_tp * moe_ep != tp:
            raise ConfigError(f"inference_moe_tp x inference_moe_ep must equal inference_tp={tp}; got "
                              f"{self.config.inference_moe_tp} x {self.config.inference_moe_ep}")
        if info.num_experts % moe_ep:
            raise ConfigError(f"inference_moe_ep={moe_ep}: does not divide the {info.num_experts} experts")
        if info.moe_ffn_hidden_size % moe_tp:
            raise ConfigError(f"inference_moe_tp={moe_tp}: does not divide the expert FFN size "
                              f"{info.moe_ffn_hidden_size}")
        return moe_tp, moe_ep

    def _check_quantization(self) -> None:
        """Everything about a quantized export that can fail, checked at attach."""
        spec = self.quant
        where = f"quantization.algorithm {spec.algorithm}"
        try:
            import modelopt.torch.quantization  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"{where}: needs NVIDIA ModelOpt ({exc}); install it with "
                              "pip install 'megatron-trt-ext[quant]'") from exc
        refusal = spec.refusal(self.config.formats)
        if refusal:
            raise ConfigError(f"quantization: {refusal}")
        if self.spec.quantization_unsupported:
            raise ConfigError(f"quantization: {self.spec.quantization_unsupported}; export this model unquantized "
                              "(recipes/bf16.yaml)")
        refused = self.spec.calibration_unsupported.get(spec.calibration_kind)
        if refused:
            raise ConfigError(f"{where}: {refused}")
        if spec.calibration_kind is not None:
            missing = _missing_mamba_kernel(self.chunks)
            if missing:
                raise ConfigError(
                    f"{where}" + (f", kv_cache {spec.kv_cache}" if spec.kv_cache != "none" else "") +
                    f": calibration runs the model's forward pass, and its Mamba mixers need {missing} "
                    "(mamba_ssm, on a CUDA machine); install mamba-ssm, or use a weight-only recipe (fp8_pc_pt, "
                    "fp8_pb_wo, mxfp8, w4a16_nvfp4) with kv_cache: none, which needs no forward pass")
        for fmt in self.config.formats:
            reason = self.spec.quantized_formats_unsupported.get(fmt)
            if reason:
                raise ConfigError(f"quantization with formats: [{fmt}] ({self.spec.name} family): {reason}")
        if self.info.num_experts:
            if spec.calibration_kind in ("smoothquant", "awq"):
                raise ConfigError(f"{where}: SmoothQuant/AWQ exports of mixture-of-experts models are not supported "
                                  "yet; use fp8, nvfp4 or a weight-only FP8/FP4 recipe")
        if spec.kv_cache != "none" and self.info.mla:
            raise ConfigError(f"quantization.kv_cache {spec.kv_cache}: multi-latent attention caches the compressed "
                              "latent, whose scales this version does not export; use kv_cache: none")
        if spec.calibration.source == "iterator" and self.calibration_data is None and self.forward_loop is None:
            raise ConfigError("quantization.calibration.source is 'iterator': pass calibration_data=<iterator or "
                              "callable> (e.g. a slice of the training data iterator) to attach()/Exporter()")
        # Shapes (group and block sizes, per inference-TP rank) are checked per linear by the plan.

    def _source(self) -> "Source":
        """What an export reads, all of it taken while training waits: the verification probe's
        reference logits (live model), then the slices: the live model's own, or (quantized
        exports) a calibrated replica's plus its calibration statistics (the replica is dropped
        after the copy). Collective: every rank calls it at the same save."""
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
        return calibration_batches(self.quant.calibration, self.calibration_data, self.info.padded_vocab_size,
                                   device)

    def _probe(self, batches):
        """The verification probe (see `verification.probe`); rank 0 gets the record."""
        if not self.probe_enabled:
            return None
        from .verification.probe import run_probe

        source = self.quant.calibration.source if self.quant is not None else ""
        real_data = batches if source in ("iterator", "jsonl") else None
        dtype = next((p.dtype for c in self.chunks for p in c.parameters()), torch.float32)
        record = run_probe(self.chunks, self.probe_options, self.vocab_size, self.info.padded_vocab_size,
                           self.comm, str(dtype).replace("torch.", ""), real_data, source)
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
        quant = self.config.quant
        return (quant.enabled and quant.calibration_kind in ("max", None)
                and any(a.weight.startswith("fp8") for a in quant.algorithms))

    def _export_vocab_size(self) -> int:
        padded = self.info.padded_vocab_size
        wanted = self.config.vocab_size
        if wanted is None:
            if self.rank == 0:
                warnings.warn(
                    f"vocab_size not set: exporting Megatron's padded vocabulary ({padded} rows). Set "
                    "ExportConfig(vocab_size=<tokenizer size>) to trim the padding rows.", stacklevel=3)
            return padded
        if wanted > padded:
            raise ConfigError(f"vocab_size={wanted}: larger than the model's padded vocabulary ({padded}); "
                              "give the tokenizer's vocabulary size")
        return wanted

    # ------------------------------------------------------------------ export
    def export(self, iteration: int, on_progress=None) -> ExportResult:
        """Export the model as it is now. Call on every rank.

        Sync mode: returns the finished result; raises ExportError, on every rank, naming the
        failing rank and cause (a bad tensor, a full disk, a conversion error); ranks never wait
        on each other longer than ``config.timeout_s``.

        Async mode: returns as soon as this rank's shards are copied to host memory, with
        ``status="running"`` (or ``"skipped"`` under ``busy_policy: skip``); `wait()` gives the
        final result, and failures are logged and recorded, never raised into training.

        ``on_progress``: sync mode, called after each unit (the CLI's progress bars).
        """
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise ConfigError(f"iteration: expected a non-negative int, got {iteration!r}")
        if self._background is not None:
            return self._background.submit(iteration)
        t0 = time.perf_counter()
        source = None
        try:
            try:
                source = self._source()
                local, source_error, timings = source.local, None, {"probe_s": source.probe_s}
            except Exception as exc:  # noqa: BLE001 - shared with the peers in the run's first decision
                local, source_error, timings = {}, exc, {}
            result = self.job.run(self.comm, local, iteration, timings, source_error=source_error,
                                  on_progress=on_progress,
                                  verification=source.probe if source is not None else None)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded and raised as ExportError
            error = exc if isinstance(exc, ExportError) else self._unexpected_failure(iteration, exc)
            result = getattr(error, "result", None) or ExportResult(
                iteration, None, "failed", list(self.config.formats), {}, 0, str(error))
            result.timings["stall_s"] = time.perf_counter() - t0
            self._record(result)
            if error is exc:
                raise
            raise error from exc
        finally:
            source = None  # noqa: F841 - drop the calibration replica now
        result.timings["stall_s"] = time.perf_counter() - t0  # sync: training waited for all of it
        self._record(result)
        from .engines.runner import launch_after_export

        launch_after_export(self.config, self.rank, result)
        return result

    def _unexpected_failure(self, iteration: int, exc: BaseException) -> ExportError:
        """A failure outside the export's own agreed paths (calibration, an unforeseen error):
        named, recorded on disk by this rank (the first record wins), raised as ExportError."""
        from . import manifest as mf

        message = f"export of iteration {iteration} failed on rank {self.rank}: {type(exc).__name__}: {exc}"
        logger.error("%s", message)
        recorded = mf.record_failure(self.root, iteration, self.job.manifest_base(iteration), message)
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

    def _record(self, result: ExportResult) -> None:
        """Every final result (complete, failed, skipped) passes here once: keep it, report it."""
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
        self.save_counts[iteration] = self.saves_seen
        if self.saves_seen % self.config.every_n_saves:
            return None
        if self.config.strict and self.last_result is not None and self.last_result.status == "failed":
            raise ExportError(self.last_result.error)
        try:
            return self.export(iteration)
        except Exception as exc:  # noqa: BLE001 - training goes on; the failure is recorded
            if self.config.strict:
                raise
            logger.error("export at iteration %s failed, training continues: %s", iteration, exc)
            if self.last_result is None or self.last_result.iteration != iteration or self.last_result.ok:
                # never hand back an older (complete) result for a save that failed
                self._record(ExportResult(iteration, None, "failed", list(self.config.formats), {}, 0, str(exc)))
            return self.last_result

    def state_dict(self) -> dict:
        """Trigger state to keep in the training checkpoint, so every-N counting survives a resume."""
        return {"saves_seen": self.saves_seen}

    def load_state_dict(self, state: dict) -> None:
        self.saves_seen = int(state.get("saves_seen", 0))
