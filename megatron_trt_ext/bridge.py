"""Megatron-Bridge integration: one callback in ``pretrain``'s list.

    from megatron_trt_ext.bridge import ExportCallback

    pretrain(cfg, forward_step, callbacks=[ExportCallback("recipes/bf16.yaml", output_dir="exports")])

* ``on_train_start`` (every rank, model and optimizer built, a resumed checkpoint loaded): `attach`
  to the model chunks. Exports trigger on ``megatron.core.dist_checkpointing.save`` for the
  persistent saves directly under ``cfg.checkpoint.save`` (non-persistent ones, in
  ``non_persistent/``, neither export nor count). That call happens while the saved weights are
  the live ones, also with ``async_save`` (Bridge's own ``on_checkpoint_save`` comes after an async
  save has finished, when training has moved on).
* ``on_checkpoint_save``: records the save count next to the checkpoint
  (``iter_NNNNNNN/megatron_trt_ext.json``), so a resumed run exports at the iterations an
  uninterrupted one would; ``on_train_start`` of the resumed run reads it back.
* ``on_train_end``: waits for the running export (bounded) and detaches.

The vocabulary exported is the tokenizer's (``state.tokenizer.vocab_size``) unless the recipe sets
one. Bridge is not imported here: the callback is duck-typed to Bridge's ``Callback`` protocol.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from .config import ExportConfig
from .errors import ConfigError

logger = logging.getLogger("megatron_trt_ext")

SIDECAR = "megatron_trt_ext.json"


class ExportCallback:
    """Exports at every Nth persistent checkpoint save of a Megatron-Bridge run.

    Args:
        recipe: an export recipe file, or None for the defaults.
        config: an ExportConfig instead of a recipe.
        **overrides: recipe keys (``output_dir``, ``every_n_saves`` ...), as for
            `ExportConfig.from_yaml`.
    """

    def __init__(self, recipe: Optional[str] = None, config: Optional[ExportConfig] = None, **overrides):
        if config is not None and (recipe is not None or overrides):
            raise ConfigError("ExportCallback: give a recipe (with overrides) or a config, not both")
        if config is None:  # validated now, when the training script builds its callbacks
            config = (ExportConfig.from_yaml(recipe, **overrides) if recipe is not None
                      else ExportConfig.from_dict(overrides, source="ExportCallback"))
        self.config = config
        self.handle = None

    # ------------------------------------------------------------------ Bridge events
    def on_train_start(self, context) -> None:
        state = context.state
        checkpoint = state.cfg.checkpoint
        if not checkpoint.save:
            raise ConfigError("ExportCallback: cfg.checkpoint.save is not set, so there are no checkpoint saves "
                              "to export at; set it (exports follow the saves)")
        if self.config.vocab_size is None:
            self.config.vocab_size = _tokenizer_vocab(state)
        from .hook import attach

        self.handle = attach(context.model, self.config, save_root=checkpoint.save)
        self.handle.exporter.saves_seen = self._resumed_count(checkpoint, state.train_state.step)

    def on_checkpoint_save(self, context) -> None:
        if self.handle is None:
            return
        step = int(context.state.train_state.step)
        count = self.handle.exporter.save_counts.get(step)
        directory = Path(context.state.cfg.checkpoint.save) / f"iter_{step:07d}"
        if count is None or not directory.is_dir():
            return  # a non-persistent save: not counted
        from . import safe_fs

        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            safe_fs.write_json(directory / SIDECAR, {"saves": count, "iteration": step})

    def on_train_end(self, context) -> None:
        if self.handle is not None:
            self.handle.detach()
            self.handle = None

    # ------------------------------------------------------------------ resume
    @staticmethod
    def _resumed_count(checkpoint, step: int) -> int:
        if not step or not checkpoint.load:
            return 0
        sidecar = Path(checkpoint.load) / f"iter_{int(step):07d}" / SIDECAR
        try:
            return int(json.loads(sidecar.read_text())["saves"])
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("no export save count next to the resumed checkpoint (%s): counting saves from 0", sidecar)
            return 0


def _tokenizer_vocab(state) -> Optional[int]:
    try:
        return int(state.tokenizer.vocab_size)
    except Exception:  # noqa: BLE001 - no tokenizer configured: the padded table is exported (warned)
        return None
