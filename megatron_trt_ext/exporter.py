"""`Exporter`: validates a live model against a config once, then exports it on demand.

The path of one export: plan (cached) -> gather full tensors one at a time -> convert to HF
names/layouts (family table) -> cast -> write HF shards and/or TensorRT-LLM rank files -> manifest
-> atomic rename. Output files are laid out before any data moves, from a shape-only run of the
same conversion, so each tensor is written where it belongs as soon as it exists.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import manifest as mf
from .arch import select_family
from .arch.convert import check_sources, megatron_to_hf
from .arch.spec import Context
from .config import ExportConfig
from .errors import ConfigError, ExportError, UnsupportedModelError
from .formats.files import FileSet, write_json
from .formats.hf import HFWriter
from .formats.trtllm import TrtllmConverter, trtllm_config
from .gather import iter_local, iter_meta
from .model_info import read_model_info, unwrap_chunks
from .plan import build_units, describe, local_shards

logger = logging.getLogger("megatron_trt_ext")

__version__ = "0.1.0"


@dataclass
class ExportResult:
    """What one export produced. ``path`` is the same on every rank."""

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


def _world() -> tuple:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Exporter:
    """Export a live Megatron-Core GPTModel.

    Args:
        model: a GPTModel, a list of model chunks (virtual pipeline), or DDP/Float16Module-wrapped.
        config: an ExportConfig.

    Raises at construction (never at the first checkpoint): UnsupportedModelError for model
    features no family supports, ConfigError for inference layouts that cannot hold the model or
    an unwritable output directory.
    """

    def __init__(self, model: Any, config: ExportConfig):
        if not isinstance(config, ExportConfig):
            raise ConfigError(f"config: expected an ExportConfig, got {type(config).__name__}")
        self.config = config
        self.chunks = unwrap_chunks(model)
        self.info = read_model_info(self.chunks)
        self.spec = select_family(self.info, config.family)
        self.rank, self.world_size = _world()
        if self.world_size > 1:
            raise UnsupportedModelError(
                f"training layout: {self.world_size} ranks; this version exports single-rank models "
                "only (TP=PP=DP=1). Multi-rank sources are not supported yet.")
        self._check_inference_layout()
        self.vocab_size = self._export_vocab_size()
        self.root = config.check_output_dir_writable()
        self.ctx = Context(info=self.info, vocab_size=self.vocab_size)
        self.family_trt = self.spec.trtllm(self.info)
        self.units = build_units([describe(local_shards(self.chunks), self.rank)])
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

    def _export_vocab_size(self) -> int:
        padded = self.info.padded_vocab_size
        wanted = self.config.vocab_size
        if wanted is None:
            warnings.warn(
                f"vocab_size not set: exporting Megatron's padded vocabulary ({padded} rows). Set "
                "ExportConfig(vocab_size=<tokenizer size>) to trim the padding rows.", stacklevel=3)
            return padded
        if wanted > padded:
            raise ConfigError(f"vocab_size={wanted}: larger than the model's padded vocabulary ({padded}); "
                              "give the tokenizer's vocabulary size")
        return wanted

    # ------------------------------------------------------------------ planning
    def _convert(self, stream, dtype: torch.dtype):
        """The one conversion pipeline, shared by the shape-only plan and the real export."""
        converter = TrtllmConverter(self.family_trt, self.info, self.config.inference_tp,
                                    self.config.inference_pp)
        for hf_name, tensor in megatron_to_hf(self.spec, self.ctx, stream):
            out = tensor.to(dtype)
            trt = list(converter.feed(hf_name, out)) if "trtllm_checkpoint" in self.config.formats else []
            yield hf_name, out, trt
        converter.finish()

    def _plan_outputs(self) -> dict:
        dtype = _torch_dtype(self.config.dtype)
        hf_specs, rank_specs = [], {r: [] for r in range(self.config.inference_tp * self.config.inference_pp)}
        for hf_name, out, trt in self._convert(iter_meta(self.units), dtype):
            hf_specs.append((hf_name, out.dtype, tuple(out.shape)))
            for rank, name, t in trt:
                rank_specs[rank].append((name, t.dtype, tuple(t.shape)))
        return {"hf": hf_specs,
                "trtllm": {f"rank{r}.safetensors": specs for r, specs in rank_specs.items()}}

    # ------------------------------------------------------------------ export
    def export(self, iteration: int) -> ExportResult:
        """Export the model as it is now. Call on every rank; raises ExportError on failure."""
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise ConfigError(f"iteration: expected a non-negative int, got {iteration!r}")
        t0 = time.perf_counter()
        timings = {"gather_s": 0.0, "convert_s": 0.0, "write_s": 0.0}
        tmp = mf.start(self.root, iteration)
        meta = self._manifest_base(iteration)
        writers = []
        try:
            hf = trt = None
            if "hf" in self.config.formats:
                hf = HFWriter(tmp / "hf", self._out_specs["hf"], self.config.max_shard_size_bytes,
                              self.spec.hf_config(self.info, self.ctx, self.config.dtype))
                writers.append(hf)
            if "trtllm_checkpoint" in self.config.formats:
                trt = FileSet(tmp / "trtllm_checkpoint", self._out_specs["trtllm"])
                writers.append(trt)
            local = local_shards(self.chunks)
            source = _timed(iter_local(self.units, local), timings, "gather_s")
            for hf_name, out, trt_parts in _timed(self._convert(source, _torch_dtype(self.config.dtype)),
                                                  timings, "convert_s"):
                w0 = time.perf_counter()
                if hf is not None:
                    hf.write(hf_name, out)
                for rank, name, t in trt_parts:
                    trt.write(name, t, fname=f"rank{rank}.safetensors")
                timings["write_s"] += time.perf_counter() - w0
            # Generators above time their own yields; subtract nested time so stages don't overlap.
            timings["convert_s"] = max(0.0, timings["convert_s"] - timings["gather_s"])
            files = {}
            if hf is not None:
                for fname, sums in hf.close(self.config.tokenizer_dir).items():
                    files[f"hf/{fname}"] = sums
            if trt is not None:
                for fname, sums in trt.close().items():
                    files[f"trtllm_checkpoint/{fname}"] = sums
                write_json(tmp / "trtllm_checkpoint" / "config.json", trtllm_config(
                    self.family_trt, self.info, self.vocab_size, self.config.dtype,
                    self.config.inference_tp, self.config.inference_pp))
            bytes_written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            timings["total_s"] = time.perf_counter() - t0
            meta.update(files={k: {"sha256": v} for k, v in files.items()}, timings=timings,
                        bytes_written=bytes_written)
            path = mf.publish(tmp, self.root, iteration, meta)
        except Exception as exc:
            for w in writers:
                w.abort()
            timings["total_s"] = time.perf_counter() - t0
            error = f"{type(exc).__name__}: {exc}"
            failed = mf.mark_failed(tmp, self.root, iteration, {**meta, "timings": timings}, error)
            self.last_result = ExportResult(iteration, failed, "failed", list(self.config.formats),
                                            timings, 0, error)
            if isinstance(exc, ExportError):
                raise
            raise ExportError(f"export of iteration {iteration} failed: {error}") from exc
        self.last_result = ExportResult(iteration, path, "complete", list(self.config.formats),
                                        timings, bytes_written)
        logger.info("exported iteration %d to %s (%.2f s, %d bytes)", iteration, path,
                    timings["total_s"], bytes_written)
        return self.last_result

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
            "inference": {"tp": self.config.inference_tp, "pp": self.config.inference_pp},
            "source": {"padded_vocab_size": self.info.padded_vocab_size,
                       "num_layers": self.info.num_layers, "world_size": self.world_size},
            "config": {k: v for k, v in self.config.to_dict().items()},
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


def _timed(gen, timings: dict, key: str):
    """Wrap a generator, adding the time spent producing each item to ``timings[key]``."""
    it = iter(gen)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            timings[key] += time.perf_counter() - t0
            return
        timings[key] += time.perf_counter() - t0
        yield item
