"""Hugging Face checkpoint -> a live Megatron-Core model, through the family tables' inverses.

For a fine-tuning job that starts from a released model: `import_hf` reads the HF tensors, turns
them into Megatron's full (global) tensors with `arch.inverse.hf_to_megatron`, and copies into
each parameter the slice it holds, located by the model's own ``sharded_state_dict()`` metadata
(global offsets: the same plan the exporter reads, `plan.local_shards`). So the layout of the
model (TP, EP, stacked layers, Mamba components, gated halves) needs no code here.

Exact on every real tensor; Megatron's vocabulary padding rows are set to zero (the HF checkpoint
does not have them). Only unquantized checkpoints are read.

Any training layout: each rank builds from the HF tensors only the Megatron tensors it holds and
copies in its slices; the model facts the tables need (which a pipeline stage sees only in part:
one without MoE layers has no expert modules) are pooled over the ranks first, as `Exporter` does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch

from .arch import select_family
from .arch.convert import canonical_name, expected_sources, find_transform
from .arch.inverse import hf_to_megatron, hf_vocab_size
from .arch.spec import Context, Drop
from .errors import ExportError
from .model_info import merge_module_facts, module_facts, read_model_info, unwrap_chunks
from .plan import local_shards
from .source import canonical_namer


class SafetensorsDir(Mapping):
    """The tensors of an HF checkpoint directory, read one at a time when asked for."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._where = {}
        self._files = {}
        for file in sorted(self.path.glob("*.safetensors")):
            handle = safe_open(str(file), framework="pt")
            self._files[file.name] = handle
            for name in handle.keys():
                self._where[name] = file.name
        if not self._where:
            raise ExportError(f"{self.path}: no *.safetensors files")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._files[self._where[name]].get_tensor(name)

    def __contains__(self, name) -> bool:
        return name in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _hf_tensors(hf: Union[str, Path, Mapping]) -> tuple:
    """(tensors, config.json dict or None)."""
    if isinstance(hf, Mapping):
        return hf, None
    path = Path(hf)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    if config is not None and config.get("quantization_config"):
        raise ExportError(f"{path}: a quantized checkpoint; only unquantized HF checkpoints are imported")
    return SafetensorsDir(path), config


def _slices(offset: tuple, shape: tuple) -> tuple:
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def _model_info(chunks: list):
    """The model's facts, pooled over the ranks (a collective when torch.distributed is up)."""
    info = read_model_info(chunks)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        facts = [None] * dist.get_world_size()
        dist.all_gather_object(facts, module_facts(info))
        info = merge_module_facts(info, facts)
    return info


@torch.no_grad()
def import_hf(model: Any, hf: Union[str, Path, Mapping], family: str = "auto", strict: bool = True) -> dict:
    """Load the HF checkpoint ``hf`` (a directory of safetensors files with its config.json, or a
    mapping HF name -> tensor) into ``model`` (a Megatron-Core model or its list of virtual
    pipeline chunks, possibly wrapped), in place. Returns {Megatron name: (dtype, shape)} of what
    was loaded.

    ``family``: the family table (default: detected from the model, as the exporter does).
    ``strict``: HF tensors the model has no place for are an error (checked where one rank holds
    the whole model). Collective: every rank of the job calls it, each loads its own slices.
    Raises ExportError naming the tensor when the checkpoint does not fit the model.
    """
    chunks = unwrap_chunks(model)
    info = _model_info(chunks)
    spec = select_family(info, family)
    tensors, config = _hf_tensors(hf)
    ctx = Context(info=info, vocab_size=hf_vocab_size(spec, info, tensors))
    if config is not None:
        want = spec.hf_config(info, ctx, "bfloat16")["architectures"]
        if config.get("architectures") and config["architectures"] != want:
            raise ExportError(f"{hf}: architectures {config['architectures']} is not this model's family "
                              f"{spec.name!r} ({want})")
    local = {canonical_name(spec, name): pieces for name, pieces in local_shards(chunks, canonical_namer(info)).items()}
    local = {name: pieces for name, pieces in local.items() if not isinstance(find_transform(spec, name)[0], Drop)}
    whole = set(expected_sources(spec, info)) <= set(local)  # this rank holds every tensor: check them all
    full = hf_to_megatron(spec, ctx, tensors, strict=strict, only=None if whole else set(local))
    missing = sorted(set(local) - set(full))
    if missing:
        raise ExportError(f"family {spec.name!r}: model tensors no row of the table builds: {missing[:8]}")
    loaded = {}
    for name, pieces in local.items():
        value = full.pop(name)
        for piece in pieces:
            if tuple(piece.global_shape) != tuple(value.shape):
                raise ExportError(f"{name}: the model's global shape is {tuple(piece.global_shape)}, the HF "
                                  f"checkpoint gives {tuple(value.shape)}")
            piece.tensor.copy_(value[_slices(piece.offset, tuple(piece.tensor.shape))])
        loaded[name] = (value.dtype, tuple(value.shape))
    return loaded
