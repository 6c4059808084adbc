"""`Exporter`: validates a live model against a config once, then exports it on demand.

The path of one export, on every rank: plan (cached at construction) -> for each unit in the
plan's order, move its slices to its writer rank -> on the writer, convert to HF names/layouts
(family table), cast, split for the inference layout and write each result at its planned place
-> agree on the outcome -> rank 0 writes configs and the manifest and renames the directory.

Output files are laid out before any data moves, from a shape-only run of the same conversion;
rank 0 creates them and every writer fills its tensors in, so writing spreads over ranks.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import errors as err_mod
from . import manifest as mf
from .arch import select_family
from .arch.convert import check_sources, megatron_to_hf
from .arch.spec import Context
from .config import ExportConfig
from .errors import ConfigError, ExportError
from .formats.files import FileSet, write_json
from .formats.hf import HFWriter
from .formats.trtllm import TrtllmConverter, trtllm_config
from .gather import Comm, exchange, iter_meta
from .model_info import read_model_info, unwrap_chunks
from .plan import build_units, describe, expert_group, local_shards

logger = logging.getLogger("megatron_trt_ext")

__version__ = "0.1.0"


@dataclass
class ExportResult:
    """What one export produced. ``path`` and ``status`` are the same on every rank."""

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


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _describe_error(exc: BaseException) -> tuple:
    return (type(exc).__name__, str(exc))


def _raise_agreed(failures: list, rank: int, local_exc: Optional[BaseException], what: str):
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

    Construct it on every rank (it creates the export's process groups and gathers the plan).
    Raises at construction, on every rank alike, never at the first checkpoint:
    UnsupportedModelError for model features no family supports, ConfigError for inference
    layouts that cannot hold the model or an unwritable output directory.
    """

    def __init__(self, model: Any, config: ExportConfig):
        if not isinstance(config, ExportConfig):
            raise ConfigError(f"config: expected an ExportConfig, got {type(config).__name__}")
        self.config = config
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
            description = describe(local_shards(self.chunks), self.rank)
        except err_mod.MegatronTrtExtError as exc:
            local_exc = exc
        gathered = self.comm.all_gather_object(
            (_describe_error(local_exc) if local_exc else None, description))
        failures = [(r, e) for r, (e, _) in enumerate(gathered) if e]
        if failures:
            _raise_agreed(failures, self.rank, local_exc, "export set-up")
        self.ctx = Context(info=self.info, vocab_size=self.vocab_size)
        self.family_trt = self.spec.trtllm(self.info)
        self.units = build_units((d for _, d in gathered), group_key=expert_group)
        check_sources(self.spec, self.info, [u.name for u in self.units])
        self._out_specs = self._plan_outputs()
        self.saves_seen = 0
        self.last_result: Optional[ExportResult] = None

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
        moe_tp, moe_ep = self.config.inference_moe_tp, self.config.inference_moe_ep
        if not info.num_experts:
            if (moe_tp or 1) != (1 if moe_tp is None else tp) or (moe_ep or 1) != 1:
                raise ConfigError("inference_moe_tp/inference_moe_ep: the model has no MoE layers; "
                                  "leave them unset")
            self.moe_tp, self.moe_ep = tp, 1
            return
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
        self.moe_tp, self.moe_ep = moe_tp, moe_ep

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

    # ------------------------------------------------------------------ planning
    def _new_converter(self) -> TrtllmConverter:
        return TrtllmConverter(self.family_trt, self.info, self.config.inference_tp, self.config.inference_pp,
                               _torch_dtype(self.config.dtype), self.moe_tp, self.moe_ep)

    def _convert(self, converter: TrtllmConverter, name: str, tensor: torch.Tensor, dtype: torch.dtype):
        """The one conversion pipeline, shared by the shape-only plan and the real export.

        Casting is elementwise, so casting before or after a split gives the same bits; the
        TensorRT-LLM side casts itself because a few tensors (the MoE router) stay float32.
        """
        for hf_name, out in megatron_to_hf(self.spec, self.ctx, [(name, tensor)]):
            trt = list(converter.feed(hf_name, out)) if "trtllm_checkpoint" in self.config.formats else []
            yield hf_name, out.to(dtype), trt

    def _plan_outputs(self) -> dict:
        dtype = _torch_dtype(self.config.dtype)
        converter = self._new_converter()
        hf_specs, rank_specs = [], {r: [] for r in range(self.config.inference_tp * self.config.inference_pp)}
        for name, meta in iter_meta(self.units):
            for hf_name, out, trt in self._convert(converter, name, meta, dtype):
                hf_specs.append((hf_name, out.dtype, tuple(out.shape)))
                for rank, trt_name, t in trt:
                    rank_specs[rank].append((trt_name, t.dtype, tuple(t.shape)))
        converter.finish()
        return {"hf": hf_specs,
                "trtllm": {f"rank{r}.safetensors": specs for r, specs in rank_specs.items()}}

    def _writers(self, tmp: Path, create: bool) -> tuple:
        hf = trt = None
        if "hf" in self.config.formats:
            hf = HFWriter(tmp / "hf", self._out_specs["hf"], self.config.max_shard_size_bytes,
                          self.spec.hf_config(self.info, self.ctx, self.config.dtype), create=create)
        if "trtllm_checkpoint" in self.config.formats:
            trt = FileSet(tmp / "trtllm_checkpoint", self._out_specs["trtllm"], create=create)
        return hf, trt

    # ------------------------------------------------------------------ export
    def export(self, iteration: int) -> ExportResult:
        """Export the model as it is now. Call on every rank.

        Returns the same ExportResult on every rank. Raises ExportError, on every rank, naming the
        rank and the cause when any rank fails (a bad tensor, a full disk, a conversion error);
        ranks never wait on each other longer than ``config.timeout_s``.
        """
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise ConfigError(f"iteration: expected a non-negative int, got {iteration!r}")
        t0 = time.perf_counter()
        timings = {"gather_s": 0.0, "convert_s": 0.0, "write_s": 0.0}
        tmp = self.root / f".{mf.export_dir_name(iteration)}.partial"
        meta = self._manifest_base(iteration)

        # Phase 1: rank 0 lays out the directory and files; everyone agrees it worked.
        hf = trt = None
        local_exc = None
        try:
            if self.rank == 0:
                tmp = mf.start(self.root, iteration)
                hf, trt = self._writers(tmp, create=True)
        except Exception as exc:  # noqa: BLE001 - any failure must become a shared decision
            local_exc = exc
        failures = self.comm.agree(f"{type(local_exc).__name__}: {local_exc}" if local_exc else None)
        if failures:
            return self._fail(iteration, tmp, meta, timings, t0, failures, local_exc, [hf, trt])
        if self.rank != 0:
            hf, trt = self._writers(tmp, create=False)

        # Phase 2: every unit in plan order. Transfers always run, so no peer ever waits on a rank
        # that failed; after a local failure this rank only keeps the transfers going.
        error = None
        checksums: dict = {}
        local = local_shards(self.chunks)
        converter = self._new_converter()
        dtype = _torch_dtype(self.config.dtype)
        for unit in self.units:
            g0 = time.perf_counter()
            full = exchange(unit, local, self.comm)
            timings["gather_s"] += time.perf_counter() - g0
            if full is None or error is not None:
                continue
            try:
                self._export_unit(unit, full, converter, dtype, hf, trt, timings)
            except Exception as exc:  # noqa: BLE001
                error = f"tensor {unit.name!r}: {type(exc).__name__}: {exc}"
                local_exc = exc
        try:
            if error is None:
                converter.finish()
            for name, writer in (("hf", hf), ("trtllm_checkpoint", trt)):
                if writer is not None:
                    for fname, sums in writer.close().items():
                        checksums[f"{name}/{fname}"] = sums
        except Exception as exc:  # noqa: BLE001
            error = error or f"{type(exc).__name__}: {exc}"
        timings["total_s"] = time.perf_counter() - t0

        # Phase 3: share outcomes and checksums; rank 0 publishes; everyone learns the result.
        gathered = self.comm.all_gather_object((error, checksums, timings))
        failures = [(r, e) for r, (e, _, _) in enumerate(gathered) if e]
        if failures:
            return self._fail(iteration, tmp, meta, timings, t0, failures, None, [hf, trt])
        publish_error, path, bytes_written = None, self.root / mf.export_dir_name(iteration), 0
        if self.rank == 0:
            try:
                bytes_written = self._publish(iteration, tmp, meta, hf, trt, gathered)
            except Exception as exc:  # noqa: BLE001
                publish_error = f"{type(exc).__name__}: {exc}"
        publish_error, bytes_written = self.comm.all_gather_object((publish_error, bytes_written))[0]
        if publish_error:
            return self._fail(iteration, tmp, meta, timings, t0, [(0, publish_error)], None, [])
        timings["total_s"] = time.perf_counter() - t0
        self.last_result = ExportResult(iteration, path, "complete", list(self.config.formats),
                                        timings, bytes_written)
        if self.rank == 0:
            logger.info("exported iteration %d to %s (%.2f s, %d bytes)", iteration, path,
                        timings["total_s"], bytes_written)
        return self.last_result

    def _export_unit(self, unit, full, converter, dtype, hf, trt, timings) -> None:
        if self.config.check_finite and full.is_floating_point() and not bool(torch.isfinite(full).all()):
            raise ExportError("contains NaN or Inf values; refusing to export a broken model")
        c0 = time.perf_counter()
        for hf_name, out, trt_parts in self._convert(converter, unit.name, full, dtype):
            w0 = time.perf_counter()
            timings["convert_s"] += w0 - c0
            if hf is not None:
                hf.write(hf_name, out)
            for rank, name, t in trt_parts:
                trt.write(name, t, fname=f"rank{rank}.safetensors")
            c0 = time.perf_counter()
            timings["write_s"] += c0 - w0

    def _publish(self, iteration, tmp, meta, hf, trt, gathered) -> int:
        files: dict = {}
        for _, sums, _ in gathered:
            for fname, tensors in sums.items():
                files.setdefault(fname, {}).update(tensors)
        for prefix, writer in (("hf", hf.fileset if hf else None), ("trtllm_checkpoint", trt)):
            if writer is not None:
                missing = writer.missing({k[len(prefix) + 1:]: v for k, v in files.items()
                                          if k.startswith(prefix + "/")})
                if missing:
                    raise ExportError(f"{prefix}: planned tensors never written: {missing}")
        if hf is not None:
            hf.finalize(self.config.tokenizer_dir)
        if trt is not None:
            write_json(tmp / "trtllm_checkpoint" / "config.json", trtllm_config(
                self.family_trt, self.info, self.vocab_size, self.config.dtype,
                self.config.inference_tp, self.config.inference_pp, self.moe_tp, self.moe_ep))
        bytes_written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        per_rank = {r: t for r, (_, _, t) in enumerate(gathered)}
        meta.update(files={k: {"sha256": v} for k, v in sorted(files.items())},
                    timings={**per_rank[0], "per_rank": per_rank}, bytes_written=bytes_written)
        mf.publish(tmp, self.root, iteration, meta)
        return bytes_written

    def _fail(self, iteration, tmp, meta, timings, t0, failures, local_exc, writers) -> ExportResult:
        for w in writers:
            if w is not None:
                w.abort()
        timings["total_s"] = time.perf_counter() - t0
        first_rank, cause = failures[0]
        message = f"export of iteration {iteration} failed on rank {first_rank}: {cause}"
        path = tmp
        if self.rank == 0:
            path = mf.mark_failed(tmp, self.root, iteration, {**meta, "timings": timings}, message)
        else:
            path = self.root / f".{mf.export_dir_name(iteration)}.failed"
        self.last_result = ExportResult(iteration, path, "failed", list(self.config.formats),
                                        timings, 0, message)
        raise ExportError(message) from local_exc

    def _manifest_base(self, iteration: int) -> dict:
        return {
            "schema_version": mf.SCHEMA_VERSION,
            "status": "writing",
            "iteration": iteration,
            "created_unix": time.time(),
            "producer": {"name": "megatron-trt-ext", "version": __version__},
            "family": self.spec.name,
            "formats": list(self.config.formats),
            "dtype": self.config.dtype,
            "vocab_size": self.vocab_size,
            "inference": {"tp": self.config.inference_tp, "pp": self.config.inference_pp,
                          "moe_tp": self.moe_tp, "moe_ep": self.moe_ep},
            "source": {"padded_vocab_size": self.info.padded_vocab_size,
                       "num_layers": self.info.num_layers, "world_size": self.world_size},
            "config": self.config.to_dict(),
        }

    # ------------------------------------------------------------------ save-driven trigger
    def on_checkpoint_saved(self, iteration: int, checkpoint_dir: Any = None) -> Optional[ExportResult]:
        """Count a checkpoint save; export at every ``every_n_saves``-th. For callback frameworks.

        Failures are logged and recorded (the manifest of ``.iter_XXXXXXX.failed``) and training
        goes on, unless ``config.strict``.
        """
        self.saves_seen += 1
        if self.saves_seen % self.config.every_n_saves:
            return None
        try:
            return self.export(iteration)
        except Exception as exc:
            if self.config.strict:
                raise
            logger.error("export at iteration %s failed, training continues: %s", iteration, exc)
            return self.last_result

    def state_dict(self) -> dict:
        """Trigger state to keep in the training checkpoint, so every-N counting survives a resume."""
        return {"saves_seen": self.saves_seen}

    def load_state_dict(self, state: dict) -> None:
        self.saves_seen = int(state.get("saves_seen", 0))
