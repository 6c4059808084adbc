"""Per-rank bodies for multi-process tests and benchmarks (run through `tests.support.distributed`)."""

from __future__ import annotations

import errno
import os

import torch

from .models import tiny_gpt, tiny_llama

def _families():
    from . import families

    return {"qwen3": families.tiny_qwen3, "nemotron": families.tiny_nemotron, "starcoder2": families.tiny_starcoder2,
            "gemma": families.tiny_gemma, "hybrid": families.tiny_hybrid, "nemotron_h": families.tiny_nemotron_h,
            "qwen3_moe": families.tiny_qwen3_moe, "deepseek": families.tiny_deepseek,
            "gpt_oss": families.tiny_gpt_oss}


BUILDERS = {"llama": tiny_llama, "gpt": tiny_gpt, "mixtral": lambda **kw: tiny_llama(moe=True, **kw),
            **_families()}


def build(family: str, tp: int = 1, pp: int = 1, vpp=None, ep: int = 1, etp=None, **model_kw):
    """The model chunks of this rank for a layout (parallel_state must be initialized)."""
    from megatron.core import parallel_state as ps

    parallel = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                    virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=ep,
                    expert_tensor_parallel_size=etp if etp is not None else tp,
                    pipeline_dtype=torch.float32)
    # MoE with TP trains only with sequence parallel, which torch norms (CPU) refuse; building and
    # exporting need neither, so these models are export-only on CPU.
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = dict(vp_stage=vp_stage) if vpp else {}
        model_kwargs = dict(
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=not vpp, **stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=not vpp, **stage), **stage)
        chunks.append(BUILDERS[family](model_kwargs=model_kwargs, **parallel, **model_kw))
    return chunks


def load(chunks: list, checkpoint_dir: str) -> None:
    """Load weights re-sharded from a distributed checkpoint into this rank's chunks."""
    from megatron.core import dist_checkpointing

    # One load for all chunks (as Megatron-LM does for virtual pipelines), so the loader sees every
    # rank's complete set of shards.
    sharded = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    state = dist_checkpointing.load(sharded, checkpoint_dir)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{i}"], strict=False)


def export_layout(rank: int, world_size: int, family: str, layout: dict, checkpoint_dir: str,
                  exports: list, model_kw: dict | None = None, inject: dict | None = None) -> list:
    """Build ``family`` in ``layout``, load the checkpoint, run each export; return outcomes."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_trt_ext import ExportConfig, Exporter

    ps.initialize_model_parallel(layout.get("tp", 1), layout.get("pp", 1), layout.get("vpp"),
                                 expert_model_parallel_size=layout.get("ep", 1),
                                 expert_tensor_parallel_size=layout.get("etp"))
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=not torch.cuda.is_available())
    chunks = build(family, **layout, **(model_kw or {}))
    load(chunks, checkpoint_dir)
    _inject(rank, inject or {})
    model = chunks if layout.get("vpp") else chunks[0]
    out = []
    for options in exports:
        exporter = Exporter(model, ExportConfig(**options))
        try:
            result = exporter.export(iteration=1)
            if result.status == "running":  # async: the worker processes of all ranks finish it
                if (inject or {}).get("kill_worker_rank") == rank:  # a lost worker, mid-export
                    _kill_own_worker(exporter)
                result = exporter.wait()
            if result.ok:
                out.append(("complete", str(result.path), None))
            else:
                out.append((result.status, str(result.path) if result.path else None, result.error))
        except Exception as exc:  # noqa: BLE001 - the test inspects what each rank saw
            result = getattr(exc, "result", None)
            out.append(("failed", str(result.path) if result is not None and result.path else None,
                        f"{type(exc).__name__}: {exc}"))
        finally:
            exporter.close()
    return out


def _kill_own_worker(exporter) -> None:
    """SIGKILL this rank's export worker once it has started the export."""
    import signal
    import time

    background = exporter._background
    deadline = time.monotonic() + 60
    while background.running is None and time.monotonic() < deadline:
        background.poll()
        time.sleep(0.005)
    os.kill(background.proc.pid, signal.SIGKILL)


def _inject(rank: int, inject: dict) -> None:
    """Fault injection for the collective-safety tests."""
    from megatron_trt_ext.formats import safetensors_stream
    from megatron_trt_ext import job as job_mod

    if inject.get("disk_full_rank") == rank:
        def full(self, name, tensor, **kwargs):  # kwargs: a row range (`split_rows_over`)
            raise OSError(errno.ENOSPC, "No space left on device (injected)", self.path)
        safetensors_stream.SafetensorsFileWriter.write = full
    if inject.get("die_rank") == rank:
        original = job_mod.exchange
        count = {"n": 0}

        def exchange_then_die(unit, local, comm, **kwargs):
            count["n"] += 1
            if count["n"] > inject.get("die_after_units", 3):
                os._exit(17)  # a lost rank: no exception, no goodbye
            return original(unit, local, comm, **kwargs)
        job_mod.exchange = exchange_then_die
