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
from typing import Any, Optional

import torch

from . import errors as err_mod
from .arch import select_family
from .arch.convert import check_sources
from .config import ExportConfig
from .errors import ConfigError, ExportError
from .gather import Comm, gather_classes
from .job import ExportJob, ExportResult, __version__  # noqa: F401  (re-exported)
from .model_info import read_model_info, unwrap_chunks
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
        try:
            self.info = read_model_info(self.chunks)
            self.spec = select_family(self.info, config.family)
            self._check_inference_layout()
            self.vocab_size = self._export_vocab_size()
            self.root = config.check_output_dir_writable()
            if self.rank == 0:  # what interrupted runs left behind (never what a live process holds)
                from . import manifest as mf

                for path in mf.cleanup_leftovers(self.root, stale_after_s=2 * config.timeout_s):
                    logger.info("removed %s, left by an interrupted export", path)
            if "trtllm_engine" in config.formats:
                config.build_options.check_devices(torch.cuda.device_count())
            local = local_shards(self.chunks)
            if self.quant is not None:
                self._check_quantization()
                from .quant.stats import stat_pieces

                local.update(stat_pieces(local, self.quant))
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
        """Which units share a writer: a statistic goes with its linear; experts that one
        TensorRT-LLM rank stacks go together (HF-only exports have no stacked tensors)."""
        if "trtllm_checkpoint" not in self.config.formats or not self.info.num_experts:
            return weight_of
        per_group = self.info.num_experts // self.moe_ep
        return lambda name: expert_group(weight_of(name), per_group)

    @property
    def units(self) -> list:
        return self.job.units

    @property
    def ctx(self):
        return self.job.ctx

    # ------------------------------------------------------------------ validation
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
        spec, info, algo = self.quant, self.info, self.quant.algo
        where = f"quantization.algorithm {spec.algorithm}"
        try:
            import modelopt.torch.quantization  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"{where}: needs NVIDIA ModelOpt ({exc}); install it with "
                              "pip install 'megatron-trt-ext[quant]'") from exc
        if algo is not None and algo.needs_cuda and not torch.cuda.is_available():
            raise ConfigError(f"{where}: ModelOpt's {algo.quant_algo} calibration needs CUDA and this "
                              "machine has no GPU; run on GPUs, or pick fp8, int8_sq, int4_awq or w4a8_awq")
        if self.spec.name != "llama":
            raise ConfigError(f"quantization: supported for the llama family (Llama, Qwen2) in this version, "
                              f"not {self.spec.name!r}; export this model unquantized (bf16 recipe)")
        if spec.calibration.source == "iterator" and self.calibration_data is None and self.forward_loop is None:
            raise ConfigError("quantization.calibration.source is 'iterator': pass calibration_data=<iterator or "
                              "callable> (e.g. a slice of the training data iterator) to attach()/Exporter()")
        if algo is not None and algo.group_size:
            g, tp = algo.group_size, self.config.inference_tp
            row_inputs = {"attention output (heads x head_dim)": info.num_attention_heads * info.head_dim,
                          "MLP down projection (ffn_hidden_size)": info.ffn_hidden_size}
            for what, size in {"hidden_size": info.hidden_size, **row_inputs}.items():
                if size % g:
                    raise ConfigError(f"{where}: {what}={size} is not a multiple of the group size {g}")
            for what, size in row_inputs.items():
                if (size // tp) % g:
                    raise ConfigError(f"{where}: with inference_tp={tp} each rank holds {size // tp} inputs of the "
                                      f"{what}, not a multiple of the group size {g}; lower inference_tp")

    def _source(self):
        """The slices an export reads, and what to drop afterwards: the live model's own, or
        (quantized exports) a calibrated replica's plus its calibration statistics."""
        if self.quant is None:
            return local_shards(self.chunks), None
        from .quant.calibrate import calibrate
        from .quant.stats import stat_pieces

        replica, kv_amax = calibrate(self.chunks, self.quant, self.info, self.calibration_data,
                                     self.forward_loop, self.comm)
        local = local_shards(replica)
        local.update(stat_pieces(local, self.quant, replica, kv_amax))
        return local, replica

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
    def export(self, iteration: int) -> ExportResult:
        """Export the model as it is now. Call on every rank.

        Sync mode: returns the finished result; raises ExportError, on every rank, naming the
        failing rank and cause (a bad tensor, a full disk, a conversion error); ranks never wait
        on each other longer than ``config.timeout_s``.

        Async mode: returns as soon as this rank's shards are copied to host memory, with
        ``status="running"`` (or ``"skipped"`` under ``busy_policy: skip``); `wait()` gives the
        final result, and failures are logged and recorded, never raised into training.
        """
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise ConfigError(f"iteration: expected a non-negative int, got {iteration!r}")
        if self._background is not None:
            return self._background.submit(iteration)
        t0 = time.perf_counter()
        replica = None
        try:
            try:
                local, replica = self._source()
                source_error = None
            except Exception as exc:  # noqa: BLE001 - shared with the peers in the run's first decision
                local, source_error = {}, exc
            result = self.job.run(self.comm, local, iteration, source_error=source_error)
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
            replica = None  # noqa: F841 - drop the calibration replica now
        result.timings["stall_s"] = time.perf_counter() - t0  # sync: training waited for all of it
        self._record(result)
        from .build.runner import launch_after_export

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
        self.last_result = result
        self.results.append(result)

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
