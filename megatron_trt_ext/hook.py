"""`attach`: export at every Nth ``megatron.core.dist_checkpointing.save``.

The wrapper calls the original save, and only after it returns asks the exporter (which counts
saves) whether this one should export. All active handles share one wrapper, installed with the
first attach and removed with the last detach, so handles can be detached in any order.

The save count survives a resume the way the rest of a training run's state does: inside the
training checkpoint, as ``checkpoint[STATE_KEY] = handle.checkpoint_state()`` (the count including
that save), read back with ``handle.load_state_dict``. Every integration uses this one
mechanism: Megatron-LM keeps it in the checkpoint's ``args``, Megatron-Bridge (``save_state=True``:
the wrapper adds it to the checkpoint's common state) and a megatron-core loop either way.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any, Optional

from .config import ExportConfig
from .errors import ConfigError
from .exporter import Exporter, ExportResult

logger = logging.getLogger("megatron_trt_ext")

_ITER_RE = re.compile(r"iter_(\d+)")
STATE_KEY = "megatron_trt_ext"  # where a training checkpoint keeps `ExportHandle.checkpoint_state()`
_active: list = []
_original_save = None


def iteration_from_path(checkpoint_dir: Any) -> Optional[int]:
    """The iteration in a Megatron checkpoint path (``.../iter_0000100``), or None."""
    if checkpoint_dir is None:
        return None
    for part in reversed(Path(str(checkpoint_dir)).parts):
        m = _ITER_RE.fullmatch(part) or _ITER_RE.search(part)
        if m:
            return int(m.group(1))
    return None


def _is_sub_save(checkpoint_dir: Any) -> bool:
    """A save into a directory inside a checkpoint (``iter_0000100/modelopt_state``): part of the
    checkpoint's save, not a checkpoint of its own."""
    parts = Path(str(checkpoint_dir)).parts
    return bool(parts) and not _ITER_RE.search(parts[-1]) and any(_ITER_RE.fullmatch(p) for p in parts[:-1])


class ExportHandle:
    """An attached exporter. ``detach()`` stops it; ``exporter`` gives direct access."""

    def __init__(self, exporter: Exporter, save_root: Any = None, save_state: bool = False):
        self.exporter = exporter
        self.attached = False
        self.save_root = Path(save_root).resolve() if save_root is not None else None
        self.save_state = save_state

    def _wanted(self, checkpoint_dir: Any) -> bool:
        """Whether a dist_checkpointing save is a checkpoint to count (see `attach`)."""
        if _is_sub_save(checkpoint_dir):
            return False
        if self.save_root is not None and Path(str(checkpoint_dir)).resolve().parent != self.save_root:
            logger.debug("save to %s is not a checkpoint under %s (non-persistent?): not counted",
                         checkpoint_dir, self.save_root)
            return False
        return True

    @property
    def last_result(self) -> Optional[ExportResult]:
        return self.exporter.last_result

    # ------------------------------------------------------------------ resume
    def checkpoint_state(self) -> dict:
        """The trigger state to store, under `STATE_KEY`, in the checkpoint being saved now (build
        it with the model's and optimizer's state, before the save): its count includes that save,
        which the hook counts once the save returns."""
        return {**self.exporter.state_dict(), "saves_seen": self.exporter.saves_seen + 1}

    def load_state_dict(self, state: Optional[dict], source: Any = "the resumed checkpoint") -> None:
        """Resume counting from a checkpoint's `checkpoint_state()` (None: it has none, e.g. it
        was saved without megatron-trt-ext; counting starts from 0, with a warning)."""
        if state is None:
            logger.warning("no export save count in %s (saved without megatron-trt-ext?): counting saves from 0",
                           source)
            state = {}
        self.exporter.load_state_dict(state)

    def resume_from(self, checkpoint_dir: Any) -> None:
        """`load_state_dict` from the common state of a dist_checkpointing checkpoint (one saved
        with ``save_state=True``)."""
        import megatron.core.dist_checkpointing as dc

        try:
            state = dc.load_common_state_dict(str(checkpoint_dir)).get(STATE_KEY)
        except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint: the count restarts, said so
            logger.warning("could not read the checkpoint's common state (%s)", exc)
            state = None
        self.load_state_dict(state, checkpoint_dir)

    def on_checkpoint_saved(self, iteration: Optional[int] = None, checkpoint_dir: Any = None):
        """Called after each save (by the wrapper, or by a framework's callback)."""
        if iteration is None:
            iteration = iteration_from_path(checkpoint_dir)
        if iteration is None:
            msg = (f"checkpoint save to {checkpoint_dir!r}: no iteration in the path (expected "
                   "iter_NNNNNNN); call handle.on_checkpoint_saved(iteration=...) from your save callback")
            if self.exporter.config.strict:
                raise ConfigError(msg)
            logger.error("%s; export skipped", msg)
            return None
        return self.exporter.on_checkpoint_saved(iteration, checkpoint_dir)

    def wait(self) -> Optional[ExportResult]:
        """Block until the running background export is done; returns its result."""
        return self.exporter.wait()

    def detach(self) -> None:
        """Stop exporting: restore the original save, finish the running export, stop the worker."""
        global _original_save
        if not self.attached:
            return
        self.attached = False
        self.exporter.close()
        if self in _active:
            _active.remove(self)
        if not _active and _original_save is not None:
            _set_save(_original_save)
            _original_save = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def _set_save(fn) -> None:
    import megatron.core.dist_checkpointing as dc
    import megatron.core.dist_checkpointing.serialization as ser

    dc.save = fn
    ser.save = fn


def _make_wrapper(original):
    @functools.wraps(original)
    def save_and_export(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        counting = [handle for handle in _active if handle._wanted(checkpoint_dir)]
        keeper = next((handle for handle in counting if handle.save_state), None)
        if keeper is not None and isinstance(sharded_state_dict, dict):  # a copy: the caller's dict is not changed
            sharded_state_dict = {**sharded_state_dict, STATE_KEY: keeper.checkpoint_state()}
        result = original(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        for handle in counting:
            handle.on_checkpoint_saved(None, checkpoint_dir)
        return result

    return save_and_export


def attach(model: Any, config: ExportConfig, calibration_data: Any = None, forward_loop: Any = None,
           wrap_dist_checkpointing: bool = True, save_root: Any = None, save_state: bool = False) -> ExportHandle:
    """Validate ``model`` against ``config`` now and export at every Nth checkpoint save.

    Args:
        model: GPTModel, list of chunks, or DDP/Float16Module-wrapped model (as for `Exporter`).
        config: ExportConfig (``every_n_saves`` sets N).
        calibration_data: quantized exports with ``calibration.source: iterator``: a callable
            returning a fresh iterator of token batches (called once per export), or a list of
            batches; e.g. ``lambda: iter(held_out_batches)``. A one-shot iterator is refused (the
            first export would use it up).
        forward_loop: quantized exports: your own ``callable(model)`` running the calibration
            forward passes (ModelOpt's convention) instead of the built-in loop over the
            calibration batches (which uses Megatron's pipeline schedule for PP/virtual PP; there
            ``model`` is a ModuleList of the rank's chunks).

        wrap_dist_checkpointing: trigger on ``megatron.core.dist_checkpointing.save`` (the default,
            for loops built on megatron-core). False when something else calls
            ``handle.on_checkpoint_saved`` (Megatron-LM's save hook, a framework callback).
        save_root: only saves into a directory directly under it count (``<save_root>/iter_N``):
            a framework's non-persistent saves elsewhere neither export nor count. Saves into a
            directory inside a checkpoint (``iter_N/modelopt_state``) never count.
        save_state: add `ExportHandle.checkpoint_state()` to each counted checkpoint's common state
            (key `STATE_KEY`), for `ExportHandle.resume_from`. Off by default: a loop that loads a
            checkpoint straight into the model (``model.load_state_dict(dist_checkpointing.load(...))``)
            would refuse the extra key; such a loop stores ``checkpoint_state()`` itself.

    Returns:
        ExportHandle; call ``detach()`` to stop exporting and restore the original save.
    """
    global _original_save
    exporter = Exporter(model, config, default_mode="async", calibration_data=calibration_data,
                        forward_loop=forward_loop)
    handle = ExportHandle(exporter, save_root, save_state)
    if wrap_dist_checkpointing:
        import megatron.core.dist_checkpointing as dc

        if _original_save is None:
            _original_save = dc.save
            _set_save(_make_wrapper(_original_save))
        _active.append(handle)
    handle.attached = True
    return handle
