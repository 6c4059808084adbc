"""Megatron-Bridge integration: one callback in ``pretrain``'s list.

    from megatron_trt_ext.bridge import ExportCallback

    pretrain(cfg, forward_step, callbacks=[ExportCallback("bf16", output_dir="exports")])

* ``on_train_start`` (every rank, model and optimizer built, a resumed checkpoint loaded): `attach`
  to the model chunks. Exports trigger on ``megatron.core.dist_checkpointing.save`` for the
  persistent saves directly under ``cfg.checkpoint.save`` (non-persistent ones, in
  ``non_persistent/``, neither export nor count). That call happens while the saved weights are
  the live ones, also with ``async_save`` (Bridge's own ``on_checkpoint_save`` comes after an async
  save has finished, when training has moved on).
* The save count survives a resume inside the checkpoint: `attach` with ``save_state=True`` adds
  the handle's `checkpoint_state` to each counted save's common state (Bridge loads its
  checkpoints by key, so the extra key is not in its way), and ``on_train_start`` of a resumed
  run reads it back from the checkpoint it resumed from; it exports at the iterations an
  uninterrupted run would.
* ``on_train_end``: waits for the running export (bounded) and detaches.

The vocabulary exported is the tokenizer's (``state.tokenizer.vocab_size``) unless the recipe sets
one. A ``HuggingFaceTokenizer`` loaded from a local directory (``cfg.tokenizer.tokenizer_model``, or
the snapshot Bridge resolved it to) is copied into the HF exports with its special-token ids and
Megatron's EOD (`megatron_trt_ext.tokenizer`) unless the recipe names a ``tokenizer_dir``.
Bridge is not imported here: the callback is duck-typed to Bridge's ``Callback`` protocol.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

from . import tokenizer
from .config import ExportConfig
from .errors import ConfigError
from .hook import attach


class ExportCallback:
    """Exports at every Nth persistent checkpoint save of a Megatron-Bridge run.

    Args:
        recipe: a shipped recipe by name ("fp8") or a recipe file, or None for the defaults.
        config: an ExportConfig instead of a recipe.
        **overrides: recipe keys (``output_dir``, ``every_n_saves``, ``serve={"url": ...}`` ...),
            as for `ExportConfig.from_yaml`.
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
        config = self.config
        if config.vocab_size is None:
            config = dataclasses.replace(config, vocab_size=_tokenizer_vocab(state))
        config = _with_tokenizer(config, state)
        self.handle = attach(context.model, config, save_root=checkpoint.save, save_state=True)
        step = int(state.train_state.step)
        if step and checkpoint.load:  # resumed: the count saved in that checkpoint
            self.handle.resume_from(Path(checkpoint.load) / f"iter_{step:07d}")

    def on_train_end(self, context) -> None:
        if self.handle is not None:
            self.handle.detach()
            self.handle = None


def _tokenizer_vocab(state) -> Optional[int]:
    try:
        return int(state.tokenizer.vocab_size)
    except Exception:  # noqa: BLE001 - no tokenizer configured: the padded table is exported (warned)
        return None


def _with_tokenizer(config: ExportConfig, state) -> ExportConfig:
    """The run's Hugging Face tokenizer directory and EOD, where the recipe names no tokenizer_dir."""
    if config.tokenizer_dir is not None:
        return config
    settings = getattr(getattr(state, "cfg", None), "tokenizer", None)
    kind, named = getattr(settings, "tokenizer_type", None), getattr(settings, "tokenizer_model", None)
    built = getattr(state, "tokenizer", None)
    resolved = getattr(built, "path", None)  # a Hub name Bridge resolved to its local snapshot
    directory = (tokenizer.dir_from_training(kind, resolved, "", warn=False) if resolved else None) or \
        tokenizer.dir_from_training(kind, named, "cfg.tokenizer.tokenizer_model",
                                    warn=os.environ.get("RANK", "0") == "0")
    if directory is None:
        return config
    eod = config.eod_token_id if config.eod_token_id is not None else tokenizer.eod_of(built)
    try:
        return dataclasses.replace(config, tokenizer_dir=directory, eod_token_id=eod)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from cfg.tokenizer.tokenizer_model {str(named)!r})") from exc
