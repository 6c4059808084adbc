"""Groups of planned safetensors files (HF shards, TensorRT-LLM rank files) and JSON helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .safetensors_stream import SafetensorsFileWriter


def write_json(path: Path, data: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FileSet:
    """Several safetensors files written together; each tensor name routes to one file."""

    def __init__(self, directory: Path, files: dict, metadata: dict | None = None):
        """``files``: {file name: [(tensor name, dtype, shape), ...]}"""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.writers = {}
        self.route = {}
        try:
            for fname, specs in files.items():
                self.writers[fname] = SafetensorsFileWriter(str(self.directory / fname), specs, metadata)
                for name, _, _ in specs:
                    self.route.setdefault(name, fname)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor, fname: str | None = None) -> None:
        """Write ``name``; ``fname`` picks the file when names repeat across files (rank files)."""
        fname = fname or self.route.get(name)
        if fname not in self.writers:
            raise KeyError(f"{self.directory}: tensor {name!r} is not in the planned files")
        self.writers[fname].write(name, tensor)

    def close(self) -> dict:
        """Close every file; returns {file: {tensor: sha256}}."""
        for w in self.writers.values():
            w.close()
        return {fname: dict(w.checksums) for fname, w in self.writers.items()}

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()

    @property
    def total_bytes(self) -> int:
        return sum(w.total_bytes for w in self.writers.values())
