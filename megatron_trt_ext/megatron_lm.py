"""Megatron-LM integration: command-line flags and attaching from parsed arguments.

In ``pretrain_gpt.py``::

    from megatron_trt_ext.megatron_lm import add_export_args, attach_from_args

    def extra_args(parser):
        return add_export_args(parser)

    pretrain(train_valid_test_datasets_provider, model_provider, ModelType.encoder_or_decoder,
             forward_step, extra_args_provider=extra_args)

and, once the model exists (e.g. at the end of ``model_provider`` on every rank, or right after
``setup_model_and_optimizer``)::

    handle = attach_from_args(model, get_args())

Megatron-LM saves through ``megatron.core.dist_checkpointing.save``; every
``--export-interval``-th save then also exports, in the background by default.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from .config import BUSY_POLICIES, DTYPES, FORMATS, MODES, ExportConfig
from .errors import ConfigError


def add_export_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--export-*`` flags (usable as, or inside, Megatron-LM's extra_args_provider)."""
    group = parser.add_argument_group(title="megatron-trt-ext export")
    group.add_argument("--export-recipe", type=str, default=None,
                       help="YAML export recipe (recipes/*.yaml); the flags below override it")
    group.add_argument("--export-dir", type=str, default=None,
                       help="where exports go (<dir>/iter_XXXXXXX); setting it switches export on")
    group.add_argument("--export-formats", type=str, default=None,
                       help=f"comma-separated, from {', '.join(FORMATS)}")
    group.add_argument("--export-interval", type=int, default=None,
                       help="export at every Nth checkpoint save")
    group.add_argument("--export-inference-tp", type=int, default=None)
    group.add_argument("--export-inference-pp", type=int, default=None)
    group.add_argument("--export-mode", type=str, default=None, choices=MODES)
    group.add_argument("--export-dtype", type=str, default=None, choices=DTYPES)
    group.add_argument("--export-busy-policy", type=str, default=None, choices=BUSY_POLICIES)
    group.add_argument("--export-keep-last", type=int, default=None)
    return parser


def config_from_args(args: Any) -> Optional[ExportConfig]:
    """The ExportConfig the flags describe, or None when export is off (no --export-dir/recipe)."""
    recipe = getattr(args, "export_recipe", None)
    output_dir = getattr(args, "export_dir", None)
    if recipe is None and output_dir is None:
        return None
    overrides = {}
    for flag, key in (("export_dir", "output_dir"), ("export_interval", "every_n_saves"),
                      ("export_inference_tp", "inference_tp"), ("export_inference_pp", "inference_pp"),
                      ("export_mode", "mode"), ("export_dtype", "dtype"),
                      ("export_busy_policy", "busy_policy"), ("export_keep_last", "keep_last")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    formats = getattr(args, "export_formats", None)
    if formats is not None:
        overrides["formats"] = [f.strip() for f in formats.split(",") if f.strip()]
    # Megatron-LM knows the tokenizer's real size; the model's table is padded.
    vocab = getattr(args, "vocab_size", None) or getattr(getattr(args, "tokenizer", None), "vocab_size", None)
    if vocab is not None:
        overrides.setdefault("vocab_size", int(vocab))
    try:
        if recipe is not None:
            return ExportConfig.from_yaml(recipe, **overrides)
        return ExportConfig.from_dict(overrides, source="--export-* flags")
    except ConfigError as exc:
        raise ConfigError(f"{exc} (check the --export-* flags)") from exc


def attach_from_args(model: Any, args: Any):
    """`attach` with the config from ``--export-*`` flags; returns None when export is off."""
    config = config_from_args(args)
    if config is None:
        return None
    from .hook import attach

    return attach(model, config)
