"""Megatron-LM integration: ``--export-*`` flags, and hooks into Megatron-LM's own training loop.

Zero edits (the launcher runs the user's unmodified script)::

    megatron-trt-ext run pretrain_gpt.py <Megatron-LM flags> --export-recipe recipes/bf16.yaml --export-dir exports
    torchrun --nproc-per-node 8 -m megatron_trt_ext.launch pretrain_gpt.py <flags> --export-recipe ...

or one line at the top of the training script (before ``pretrain``)::

    import megatron_trt_ext.megatron_lm; megatron_trt_ext.megatron_lm.install()

`install` patches three functions of ``megatron.training`` (looked up as module attributes by
Megatron-LM's ``pretrain``), never Megatron-LM's files:

* ``parse_args``: the script's own ``extra_args_provider`` (e.g. Megatron-LM's
  ``add_modelopt_args``) runs first, then the ``--export-*`` flags are added: chained, never replaced;
* ``setup_model_and_optimizer``: once the model and optimizer exist on every rank (after a resume
  has loaded the checkpoint), `attach` with the config the flags describe;
* ``save_checkpoint``: after every persistent save (any ``--ckpt-format``; non-persistent saves are
  skipped), the handle counts it and exports every ``--export-interval``-th save. The handle's
  `checkpoint_state` (the count including this save) is put into the ``args`` the checkpoint
  saves, Megatron-LM's place for run state such as ``consumed_train_samples``; a resumed run
  loads it back (``hook.STATE_KEY``), so it exports at the same iterations as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import inspect
import logging
from typing import Any, Callable, Optional

from . import recipes, tokenizer
from .config import BUSY_POLICIES, DTYPES, FORMATS, MODES, ExportConfig, load_recipe_yaml
from .errors import ConfigError
from .hook import STATE_KEY, attach

logger = logging.getLogger("megatron_trt_ext")

def add_export_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--export-*`` flags (usable as, or inside, Megatron-LM's extra_args_provider).
    Adding them twice is harmless (the second call does nothing)."""
    if any("--export-dir" in action.option_strings for action in parser._actions):
        return parser
    group = parser.add_argument_group(title="megatron-trt-ext export")
    group.add_argument("--export-recipe", type=str, default=None,
                       help="export recipe: a shipped one by name (bf16, fp8, nvfp4, ...: megatron-trt-ext recipes) "
                            "or a YAML file; the flags below override it")
    group.add_argument("--export-dir", type=str, default=None,
                       help="where exports go (<dir>/iter_XXXXXXX); setting it switches export on")
    group.add_argument("--export-formats", type=str, default=None,
                       help=f"comma-separated, from {', '.join(FORMATS)}")
    group.add_argument("--export-interval", type=int, default=None,
                       help="export at every Nth persistent checkpoint save")
    group.add_argument("--export-inference-tp", type=int, default=None)
    group.add_argument("--export-inference-pp", type=int, default=None)
    group.add_argument("--export-mode", type=str, default=None, choices=MODES)
    group.add_argument("--export-dtype", type=str, default=None, choices=DTYPES)
    group.add_argument("--export-busy-policy", type=str, default=None, choices=BUSY_POLICIES)
    group.add_argument("--export-keep-last", type=int, default=None)
    group.add_argument("--export-vocab-size", type=int, default=None,
                       help="rows to export (default: the tokenizer's size; never fewer)")
    group.add_argument("--export-timeout", type=int, default=None, help="timeout_s of the recipe")
    group.add_argument("--export-tokenizer-dir", type=str, default=None,
                       help="tokenizer copied into the HF exports (default: --tokenizer-model of a "
                            "HuggingFaceTokenizer, when it is a local directory)")
    group.add_argument("--export-serve-url", type=str, default=None,
                       help="refit the vLLM server at http://HOST:PORT at each export (serve.url of the recipe)")
    return parser


def chain_export_args(provider: Optional[Callable] = None) -> Callable:
    """An extra_args_provider that runs ``provider`` (the script's own, e.g. ModelOpt's flags)
    and then adds the ``--export-*`` flags."""
    def extra_args(parser):
        if provider is not None:
            parser = provider(parser)
        return add_export_args(parser)
    extra_args._megatron_trt_ext = True
    return extra_args


_FLAG_KEYS = (("export_dir", "output_dir"), ("export_interval", "every_n_saves"),
              ("export_inference_tp", "inference_tp"), ("export_inference_pp", "inference_pp"),
              ("export_mode", "mode"), ("export_dtype", "dtype"), ("export_busy_policy", "busy_policy"),
              ("export_keep_last", "keep_last"), ("export_vocab_size", "vocab_size"),
              ("export_timeout", "timeout_s"), ("export_tokenizer_dir", "tokenizer_dir"))


def _recipe_section(recipe: Optional[str], key: str) -> dict:
    """One mapping section of a recipe file ({} when absent or unreadable: from_yaml reports that)."""
    if recipe is None:
        return {}
    try:
        with open(recipes.resolve(recipe)) as f:
            data = load_recipe_yaml(f.read(), recipe)
    except (OSError, ConfigError):
        return {}
    section = data.get(key) if isinstance(data, dict) else None
    return dict(section) if isinstance(section, dict) else {}


def config_from_args(args: Any, tokenizer_vocab: Optional[int] = None,
                     tokenizer_eod: Optional[int] = None) -> Optional[ExportConfig]:
    """The ExportConfig the flags describe, or None when export is off (no --export-dir/recipe).

    ``tokenizer_vocab``: the size of the tokenizer Megatron-LM built (every id it can produce);
    the vocabulary exported when neither the recipe nor ``--export-vocab-size`` sets one, and the
    least any of them may set. ``tokenizer_eod``: its end-of-document id, written as an eos id of
    the HF export. The tokenizer's files come from ``--tokenizer-model`` of a
    ``HuggingFaceTokenizer`` when that is a local directory and neither the recipe nor
    ``--export-tokenizer-dir`` names one.
    """
    recipe = getattr(args, "export_recipe", None)
    output_dir = getattr(args, "export_dir", None)
    if recipe is None and output_dir is None:
        return None
    overrides = {key: getattr(args, flag) for flag, key in _FLAG_KEYS if getattr(args, flag, None) is not None}
    formats = getattr(args, "export_formats", None)
    if formats is not None:
        overrides["formats"] = [f.strip() for f in formats.split(",") if f.strip()]
    serve_url = getattr(args, "export_serve_url", None)
    if serve_url is not None:  # the url joins the recipe's serve section (its other keys stay)
        overrides["serve"] = {**_recipe_section(recipe, "serve"), "url": serve_url}
    try:
        if recipe is not None:
            config = ExportConfig.from_yaml(recipe, **overrides)
        else:
            config = ExportConfig.from_dict(overrides, source="--export-* flags")
    except ConfigError as exc:
        raise ConfigError(f"{exc} (check the --export-* flags)") from exc
    if tokenizer_vocab is not None:
        if config.vocab_size is None:
            config = dataclasses.replace(config, vocab_size=int(tokenizer_vocab))
        elif config.vocab_size < tokenizer_vocab:
            raise ConfigError(
                f"vocab_size={config.vocab_size} (from {config.recipe}) is smaller than the tokenizer's "
                f"{tokenizer_vocab} ids: the export could not embed every token the tokenizer produces; "
                "leave vocab_size unset (the tokenizer's size is used) or raise it")
    return with_run_tokenizer(config, args, tokenizer_eod)


def with_run_tokenizer(config: ExportConfig, args: Any, eod: Optional[int] = None) -> ExportConfig:
    """``config`` with the tokenizer of the run ``args`` describe: ``tokenizer_dir`` from
    ``--tokenizer-model`` of a ``HuggingFaceTokenizer`` in a local directory (unless the config names
    one) and ``eod`` (Megatron's end-of-document id) where there is a tokenizer directory. Shared by
    live and offline exports, so both write the same files."""
    changes = {}
    if config.tokenizer_dir is None:
        derived = tokenizer.dir_from_training(getattr(args, "tokenizer_type", None),
                                              getattr(args, "tokenizer_model", None), "--tokenizer-model",
                                              warn=getattr(args, "rank", 0) == 0)
        if derived is not None:
            changes["tokenizer_dir"] = derived
    if eod is not None and config.eod_token_id is None and (config.tokenizer_dir or changes):
        changes["eod_token_id"] = int(eod)
    try:
        return dataclasses.replace(config, **changes) if changes else config
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from --tokenizer-model {getattr(args, 'tokenizer_model', None)!r})") from exc


def attach_from_args(model: Any, args: Any, tokenizer_vocab: Optional[int] = None, **attach_kwargs):
    """`attach` with the config from ``--export-*`` flags; returns None when export is off."""
    config = config_from_args(args, tokenizer_vocab)
    if config is None:
        return None
    return attach(model, config, **attach_kwargs)


def tokenizer_vocab_size() -> Optional[int]:
    """The size of the tokenizer Megatron-LM built (None when there is none)."""
    try:
        from megatron.training import get_tokenizer

        tokenizer = get_tokenizer()
    except Exception:  # noqa: BLE001 - no global tokenizer (not a Megatron-LM run)
        return None
    size = getattr(tokenizer, "vocab_size", None)
    return int(size) if size is not None else None


def tokenizer_eod_id() -> Optional[int]:
    """The end-of-document id of the tokenizer Megatron-LM built (None when there is none)."""
    try:
        from megatron.training import get_tokenizer

        megatron_tokenizer = get_tokenizer()
    except Exception:  # noqa: BLE001 - no global tokenizer (not a Megatron-LM run)
        return None
    return tokenizer.eod_of(megatron_tokenizer)


# ---------------------------------------------------------------------- hooks into megatron.training
class _State:
    handle = None
    installed = False
    originals: dict = {}


def install() -> None:
    """Hook exports into Megatron-LM's training loop (idempotent). Call before ``pretrain``, on
    every rank (the launcher does). Needs ``megatron.training`` (Megatron-LM, or megatron-core
    >= 0.18's wheel)."""
    if _State.installed:
        return
    try:
        import megatron.training.arguments as arguments
        import megatron.training.checkpointing as checkpointing
        import megatron.training.training as training
    except ImportError as exc:
        raise ConfigError(f"megatron.training is not importable ({exc}): the Megatron-LM hooks need Megatron-LM's "
                          "training loop (a Megatron-LM checkout on PYTHONPATH, or megatron-core >= 0.18)") from exc
    _patch(arguments, "parse_args", _wrap_parse_args)
    try:
        import megatron.training.initialize as initialize

        if hasattr(initialize, "parse_args"):  # Megatron-LM <= 0.17 binds parse_args by name here
            _patch(initialize, "parse_args", _wrap_parse_args)
    except ImportError:
        pass
    _patch(training, "setup_model_and_optimizer", _wrap_setup)
    _patch(training, "save_checkpoint", _wrap_save)
    _patch(checkpointing, "save_checkpoint", _wrap_save)
    _State.installed = True


def uninstall() -> None:
    """Undo `install` and detach (tests; a process normally keeps the hooks to its end)."""
    if _State.handle is not None:
        _State.handle.detach()
        _State.handle = None
    for (module, name), original in _State.originals.items():
        setattr(module, name, original)
    _State.originals.clear()
    _State.installed = False


def _patch(module, name: str, wrap: Callable) -> None:
    original = getattr(module, name)
    if getattr(original, "_megatron_trt_ext", False):
        return
    wrapped = wrap(original)
    wrapped._megatron_trt_ext = True
    _State.originals[(module, name)] = original
    setattr(module, name, wrapped)


def _wrap_parse_args(original):
    @functools.wraps(original)
    def parse_args(extra_args_provider=None, *args, **kwargs):
        return original(chain_export_args(extra_args_provider), *args, **kwargs)
    return parse_args


def _wrap_setup(original):
    @functools.wraps(original)
    def setup_model_and_optimizer(*args, **kwargs):
        result = original(*args, **kwargs)
        from megatron.training import get_args

        model = result[0]
        _State.handle = _attach_to_run(model, get_args())
        return result
    return setup_model_and_optimizer


def _attach_to_run(model, args):
    """On every rank, once the model (resumed or fresh) exists."""
    config = config_from_args(args, tokenizer_vocab_size(), tokenizer_eod_id())
    if config is None:
        return None
    # The save_checkpoint hook triggers exports: dist_checkpointing.save is left alone (it also
    # runs for ModelOpt's extra state and not for every --ckpt-format).
    handle = attach(model, config, wrap_dist_checkpointing=False)
    if getattr(args, "load", None) and getattr(args, "iteration", 0):  # resumed: the count saved with it
        handle.load_state_dict(_resumed_state(args), f"the checkpoint of iteration {args.iteration}")
    return handle


def _resumed_state(args) -> Optional[dict]:
    """The handle's state saved in the args of the checkpoint this run resumed from (None: none)."""
    try:
        from megatron.training.checkpointing import load_args_from_checkpoint

        loaded = load_args_from_checkpoint(copy.copy(args))
    except Exception as exc:  # noqa: BLE001 - the count restarts; load_state_dict says so
        logger.warning("could not read the checkpoint's saved args (%s)", exc)
        return None
    checkpoint_args = loaded[1] if isinstance(loaded, tuple) else None
    return getattr(checkpoint_args, STATE_KEY, None)


def _wrap_save(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_checkpoint(*args, **kwargs):
        handle = _State.handle
        if handle is None or getattr(save_checkpoint, "_active", False):
            return original(*args, **kwargs)  # (the checkpointing and training bindings are one function)
        bound = signature.bind_partial(*args, **kwargs)
        iteration = bound.arguments.get("iteration")
        persistent = not bound.arguments.get("non_persistent_ckpt", False)
        from megatron.training import get_args

        megatron_args = get_args()
        if persistent:
            setattr(megatron_args, STATE_KEY, handle.checkpoint_state())  # saved with this checkpoint
        save_checkpoint._active = True
        try:
            result = original(*args, **kwargs)
        finally:
            save_checkpoint._active = False
        if persistent and iteration is not None:
            handle.on_checkpoint_saved(iteration=int(iteration))
        return result
    return save_checkpoint
