"""Export a saved Megatron-LM checkpoint (``torch_dist``) with the same path as live exports.

    megatron-trt-ext export CKPT_DIR --recipe recipes/bf16.yaml --output-dir exports [--iteration N]
    torchrun --nproc-per-node 8 -m megatron_trt_ext.cli export CKPT_DIR ...

The checkpoint's saved arguments are read without unpickling arbitrary objects (an allowlist:
``argparse.Namespace`` and Megatron's enum classes), the model is built from them through
Megatron-LM's own model builders (``megatron.training``, megatron-core >= 0.18) at a layout chosen
for the ranks at hand (any number; ``--tp``/``--pp``), its weights are loaded with
``dist_checkpointing.load`` (which re-shards), and `Exporter` runs on it: the same plan,
converters and manifest as an export during training. Nothing but the Megatron checkpoint is
needed (no original Hugging Face checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import io
import json
import os
from pathlib import Path
from typing import Optional

import torch

from .errors import ConfigError

_ENUM_MODULES = ("megatron.core.", "signal")


def resolve_iteration_dir(checkpoint: str | os.PathLike, iteration: Optional[int] = None) -> tuple:
    """(iteration directory, iteration) from a checkpoint root (with its tracker file) or an
    ``iter_NNNNNNN`` directory."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {str(path)!r}: not a directory; give a Megatron-LM --save directory "
                          "or one of its iter_NNNNNNN directories")
    if path.name.startswith("iter_") and iteration is None:
        return path, int(path.name[len("iter_"):])
    if iteration is None:
        tracker = path / "latest_checkpointed_iteration.txt"
        if not tracker.is_file():
            raise ConfigError(f"checkpoint {str(path)!r}: no latest_checkpointed_iteration.txt; pass --iteration N "
                              "or an iter_NNNNNNN directory")
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise ConfigError(f"{tracker}: {text!r} is not an iteration (a 'release' checkpoint: pass its directory)")
        iteration = int(text)
    directory = path / f"iter_{iteration:07d}"
    if not directory.is_dir():
        raise ConfigError(f"checkpoint {str(path)!r}: no iteration {iteration} ({directory.name} is missing)")
    return directory, iteration


def check_torch_dist(directory: Path) -> None:
    meta = directory / "metadata.json"
    backend = None
    if meta.is_file():
        try:
            backend = json.loads(meta.read_text()).get("sharded_backend")
        except ValueError:
            backend = None
    if backend != "torch_dist" or not (directory / ".metadata").is_file():
        found = backend or ("torch (mp_rank_* files)" if any(directory.glob("mp_rank_*")) else "unknown")
        raise ConfigError(f"checkpoint {directory}: format {found!r}; offline export reads torch_dist checkpoints "
                          "(Megatron-LM's default --ckpt-format). Convert with Megatron-LM's --ckpt-convert-format "
                          "torch_dist, or export during training instead (every format works there)")


def _common_state_bytes(directory: Path) -> bytes:
    legacy = directory / "common.pt"  # megatron-core <= 0.18
    if legacy.is_file():
        return legacy.read_bytes()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class RawBytes(DefaultLoadPlanner):
        """Keeps the pickled bytes: the default planner would unpickle them unrestricted."""

        def load_bytes(self, read_item, value):
            self.raw[read_item.dest_index.fqn] = value.read()

    key = "common_state/shard_0_1"  # megatron-core >= 0.19 stores the common state as this object
    planner = RawBytes(flatten_state_dict=False)
    planner.raw = {}
    dcp.load({key: io.BytesIO()}, storage_reader=FileSystemReader(str(directory)), planner=planner, no_dist=True)
    return planner.raw[key]


def _allowed_global(name: str):
    """The class a pickled name may resolve to: argparse.Namespace, or an Enum of Megatron's
    (or ``signal``'s). Anything else is refused."""
    if name == "argparse.Namespace":
        return argparse.Namespace
    module_name, _, attr = name.rpartition(".")
    if not module_name.startswith(_ENUM_MODULES):
        return None
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, enum.Enum) else None


def read_common_state(directory: Path) -> dict:
    """The checkpoint's common state (args, iteration, content metadata), loaded with
    ``weights_only=True`` and an allowlist of the classes it names."""
    raw = _common_state_bytes(Path(directory))
    allowed = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw)):
        cls = _allowed_global(name)
        if cls is None:
            raise ConfigError(f"checkpoint {directory}: its saved state names {name!r}, which is not on the allowlist "
                              "(argparse.Namespace and Megatron's enums); refusing to unpickle it")
        allowed.append((cls, name))
    with torch.serialization.safe_globals(allowed):
        state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    state = state[0] if isinstance(state, list) else state
    if "args" not in state:
        raise ConfigError(f"checkpoint {directory}: no saved arguments (not written by Megatron-LM's training loop); "
                          "offline export needs them to rebuild the model")
    return state


def _tokenizer_vocab(args) -> Optional[int]:
    """The vocabulary of the tokenizer the checkpoint's arguments describe (rebuilt the way
    Megatron-LM builds it), or None when it cannot be rebuilt here (e.g. its files are absent)."""
    try:
        from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    except ImportError:
        try:
            from megatron.training.tokenizer import build_tokenizer
        except ImportError:
            return None
    try:
        quiet = argparse.Namespace(**vars(args))
        quiet.rank = 1  # no banner
        return int(build_tokenizer(quiet).vocab_size)
    except Exception:  # noqa: BLE001 - files elsewhere, or a tokenizer type this version lacks
        return None


def _init_distributed(tp: Optional[int], pp: Optional[int], args) -> tuple:
    """One process group over the ranks the launcher started (or a single local rank), and a
    model-parallel layout: TP over all ranks when it divides the heads, else PP."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            from .utils import free_port

            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = dist.get_world_size()
    heads, groups = args.num_attention_heads, args.num_query_groups or args.num_attention_heads
    if tp is None and pp is None:
        tp = world if heads % world == 0 and (groups % world == 0) else 1
    tp = tp or 1
    pp = pp or world // tp
    if tp * pp != world:
        raise ConfigError(f"--tp {tp} x --pp {pp} must equal the number of ranks ({world})")
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
            raise ConfigError(f"model parallelism is already initialized with another layout than tp={tp}, pp={pp}")
        return tp, pp
    ps.initialize_model_parallel(tp, pp)
    from megatron.core.tensor_parallel import random as tp_random

    if torch.cuda.is_available():
        tp_random.model_parallel_cuda_manual_seed(getattr(args, "seed", 1234))
    else:
        tp_random.initialize_rng_tracker(inference_rng_tracker=True)
    return tp, pp


def build_model(args, tp: int, pp: int) -> list:
    """The model chunks of this rank, built from the checkpoint's arguments by Megatron-LM's own
    builders (the same code its pretrain uses), unwrapped, weights not yet loaded."""
    try:
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.training import argument_utils
    except ImportError as exc:
        raise ConfigError(f"offline export needs megatron.training with model builders (megatron-core >= 0.18, "
                          f"or a Megatron-LM checkout of that age): {exc}") from exc
    args = argparse.Namespace(**vars(args))
    # The loading layout replaces the training one, with everything Megatron derived from it.
    layout = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=1,
                  virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
                  expert_model_parallel_size=1, expert_tensor_parallel_size=tp,
                  tensor_parallel_num_weight_shards=None, gtp_weight_remat_size=1,
                  expert_tensor_parallel_num_weight_shards=None, expert_gtp_weight_remat_size=1)
    for name, value in layout.items():
        if hasattr(args, name):
            setattr(args, name, value)
    args.sequence_parallel = False if tp == 1 else args.sequence_parallel
    args.use_cpu_initialization = not torch.cuda.is_available()
    args.perform_initialization = False  # the checkpoint's weights replace them
    hybrid = getattr(args, "hybrid_layer_pattern", None) or getattr(args, "hybrid_override_pattern", None)
    model_config = (argument_utils.hybrid_config_from_args(args) if hybrid
                    else argument_utils.gpt_config_from_args(args))
    builder = model_config.get_builder_cls()(model_config)
    chunk = builder.build_model(ProcessGroupCollection.use_mpu_process_groups())
    if torch.cuda.is_available():
        chunk = chunk.cuda()
    return [chunk]  # params in the checkpoint's params_dtype, as Megatron-LM's Float16Module holds them


def load_weights(chunks: list, directory: Path, content_metadata: Optional[dict]) -> None:
    from megatron.core import dist_checkpointing

    def sharded(chunk):
        try:
            return chunk.sharded_state_dict(metadata=content_metadata or {})
        except TypeError:  # versions without the metadata argument
            return chunk.sharded_state_dict()

    state = dist_checkpointing.load({f"model{i}": sharded(c) for i, c in enumerate(chunks)}, str(directory))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{i}"], strict=False)


def load_checkpoint_model(checkpoint, iteration: Optional[int] = None, tp: Optional[int] = None,
                          pp: Optional[int] = None) -> tuple:
    """(chunks, saved args, iteration, common state) of a torch_dist checkpoint, on this rank."""
    directory, iteration = resolve_iteration_dir(checkpoint, iteration)
    check_torch_dist(directory)
    common = read_common_state(directory)
    args = common["args"]
    tp, pp = _init_distributed(tp, pp, args)
    chunks = build_model(args, tp, pp)
    load_weights(chunks, directory, common.get("content_metadata"))
    for chunk in chunks:
        chunk.eval()
    return chunks, args, int(common.get("iteration", iteration)), common


def export_checkpoint(checkpoint, recipe: Optional[str], output_dir: str, iteration: Optional[int] = None,
                      tp: Optional[int] = None, pp: Optional[int] = None, progress: bool = False, **overrides):
    """Export one saved checkpoint; returns the ExportResult (call on every rank). ``progress``:
    a bar over the export's units on rank 0's stderr."""
    from .config import ExportConfig
    from .exporter import Exporter

    # The recipe and the output directory first: a bad one is named before a checkpoint is loaded.
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.update(output_dir=output_dir, mode="sync")
    config = (ExportConfig.from_yaml(recipe, **overrides) if recipe
              else ExportConfig.from_dict(overrides, source="megatron-trt-ext export"))
    config.check_output_dir_writable()
    chunks, args, iteration, _ = load_checkpoint_model(checkpoint, iteration, tp, pp)
    tokenizer = _tokenizer_vocab(args)
    if config.vocab_size is None:
        if tokenizer is None:
            raise ConfigError(f"checkpoint {checkpoint}: its tokenizer ({getattr(args, 'tokenizer_type', None)}) "
                              "cannot be rebuilt here to know the vocabulary size; pass --vocab-size")
        config = dataclasses.replace(config, vocab_size=tokenizer)
    elif tokenizer is not None and config.vocab_size < tokenizer:
        raise ConfigError(f"--vocab-size {config.vocab_size} is smaller than the tokenizer's {tokenizer} ids")
    from .megatron_lm import with_run_tokenizer

    config = with_run_tokenizer(config, args)  # as the live export did (a HuggingFaceTokenizer's EOD is its eos)
    exporter = Exporter(chunks, config)
    from .progress import bar

    units = bar(len(exporter.units), f"export iteration {iteration}", progress and exporter.rank == 0, unit="tensor")
    try:
        return exporter.export(iteration, on_progress=units.update)
    finally:
        units.close()
        exporter.close()
