"""Export metrics where Megatron users look: one line in the training log per export, and scalars
in Megatron-LM's TensorBoard / Weights & Biases writers when the run has them.

Called once per export when its result is known (sync: at the end of `Exporter.export`; async:
when the trainer learns the worker's result, at the next save, `wait()` or `detach()`). Metrics
never fail an export or training: every error here is logged at debug level and dropped.

Megatron-LM keeps its writers in ``megatron.training.global_vars`` on the rank that owns them (the
last rank). That module is only looked at when the training loop has imported it already: a run
without Megatron-LM has no writers, and importing ``megatron.training`` here would pull in the
whole training package for nothing.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("megatron_trt_ext")

MB = 1e6  # throughput in decimal megabytes per second, as disks are rated


def scalars(result) -> dict:
    """The numbers of one finished export, by TensorBoard tag."""
    timings = result.timings or {}
    # async: export_s is the worker's own time on the export, total_s the time since the save (it
    # also counts the wait for the worker to start or to finish an earlier export)
    seconds = float(timings.get("export_s") or timings.get("total_s") or 0.0)
    since_save = float(timings.get("total_s") or 0.0)
    nbytes = int(result.bytes_written or 0)
    return {
        "export/ok": 1.0 if result.ok else 0.0,
        "export/stall_s": float(timings.get("stall_s") or 0.0),
        "export/seconds": seconds,
        "export/seconds_since_save": since_save,
        "export/bytes": float(nbytes),
        "export/throughput_MBps": nbytes / MB / seconds if seconds > 0 and nbytes else 0.0,
        **({"export/refit_s": float(timings["refit_s"]), "export/refit_ok": float(timings.get("refit_ok") or 0.0)}
           if "refit_s" in timings else {}),
    }


def log_line(result) -> str:
    values = scalars(result)
    line = (f"export iteration {result.iteration}: {result.status}, stall {values['export/stall_s']:.3f} s, "
            f"{values['export/seconds']:.2f} s, {result.bytes_written or 0} bytes, "
            f"{values['export/throughput_MBps']:.1f} MB/s, path {result.path}")
    waited = values["export/seconds_since_save"] - values["export/seconds"]
    if waited >= 0.01:  # async: the save waited for the worker before its export began
        line += f", done {values['export/seconds_since_save']:.2f} s after the save"
    if "export/refit_s" in values:  # the live refit riding on this export
        served = f"served iteration {result.iteration}" if values["export/refit_ok"] else "refit failed"
        line += f", {served} (refit {values['export/refit_s']:.3f} s)"
    if result.error and not result.ok:
        line += f", error: {str(result.error).splitlines()[0][:300]}"
    return line


def megatron_writers() -> tuple:
    """(tensorboard writer, wandb writer) of a running Megatron-LM job on this rank, or Nones."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    if global_vars is None:
        return None, None
    tensorboard = getattr(global_vars, "get_tensorboard_writer", lambda: None)()
    wandb = getattr(global_vars, "get_wandb_writer", lambda: None)()
    return tensorboard, wandb


_wandb_defined: set = set()


def _to_wandb(writer, values: dict, iteration: int) -> None:
    """wandb refuses steps older than its current one, and an async result arrives after training
    moved on: the export scalars get their own step axis (``export/iteration``) and join the
    current row without committing it, so Megatron-LM's own step counting is left alone."""
    if id(writer) not in _wandb_defined and hasattr(writer, "define_metric"):
        writer.define_metric("export/iteration")
        writer.define_metric("export/*", step_metric="export/iteration")
        _wandb_defined.add(id(writer))
    writer.log({**values, "export/iteration": iteration}, commit=False)


def report(result, rank: int) -> None:
    """Log one line (rank 0) and add the scalars to Megatron-LM's writers (where they exist)."""
    if result is None or result.status == "running":
        return
    try:
        if rank == 0:
            log = logger.info if result.ok else logger.warning
            log("%s", log_line(result))
        if result.status not in ("complete", "failed"):
            return  # skipped: nothing was exported, no numbers to plot
        tensorboard, wandb = megatron_writers()
        if tensorboard is None and wandb is None:
            return
        values = scalars(result)
        if tensorboard is not None:
            for tag, value in values.items():
                tensorboard.add_scalar(tag, value, result.iteration)
            if hasattr(tensorboard, "flush"):
                tensorboard.flush()
        if wandb is not None:
            _to_wandb(wandb, values, result.iteration)
    except Exception as exc:  # noqa: BLE001 - metrics never fail an export or training
        logger.debug("export metrics of iteration %s not reported: %s", getattr(result, "iteration", "?"), exc)
