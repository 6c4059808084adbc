"""Hugging Face checkpoint layout: config.json, safetensors shards (+ index), generation_config.json
and, with a tokenizer, its files and special-token ids (`megatron_trt_ext.tokenizer`)."""

from __future__ import annotations

from pathlib import Path

from .. import tokenizer as tok
from .files import FileSet, write_json
from .safetensors_stream import nbytes_of


def plan_shards(specs: list, max_shard_bytes: int) -> dict:
    """Assign tensors (in stream order) to shards of at most ``max_shard_bytes`` (one tensor may exceed)."""
    shards: list = [[]]
    size = 0
    for name, dtype, shape in specs:
        nbytes = nbytes_of(dtype, shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape))
        size += nbytes
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    n = len(shards)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": s for i, s in enumerate(shards)}


class HFWriter:
    """One HF checkpoint directory, filled from a stream of HF-named tensors (by any rank)."""

    def __init__(self, directory: Path, specs: list, max_shard_bytes: int, config: dict, create: bool = True,
                 pool=None, tokenizer: "tok.TokenizerFacts | None" = None):
        self.directory = Path(directory)
        # the tokenizer's ids replace what the model class would default to (all three, None included)
        self.config = {**config, **tokenizer.ids} if tokenizer is not None else config
        self.tokenizer = tokenizer
        self.files = plan_shards(specs, max_shard_bytes)
        self.fileset = FileSet(self.directory, self.files, metadata={"format": "pt"}, create=create, pool=pool)

    def write(self, name: str, tensor, rows: tuple | None = None) -> None:
        self.fileset.write(name, tensor, rows=rows)

    def close(self) -> dict:
        return self.fileset.close()

    def finalize(self) -> None:
        """Index, config and tokenizer files: once, after every rank closed its writes."""
        if len(self.files) > 1:
            weight_map = {name: fname for fname, specs in self.files.items() for name, _, _ in specs}
            total = sum(nbytes_of(dtype, shape) for specs in self.files.values() for _, dtype, shape in specs)
            write_json(self.directory / "model.safetensors.index.json",
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_json(self.directory / "config.json", self.config)
        generation = {"_from_model_config": True, "do_sample": False}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if self.config.get(key) is not None:
                generation[key] = self.config[key]
        write_json(self.directory / "generation_config.json", generation)
        if self.tokenizer is not None:
            tok.copy_files(self.tokenizer, self.directory)

    def abort(self) -> None:
        self.fileset.abort()
