"""Groups of planned safetensors files (HF shards, TensorRT-LLM rank files) and JSON helpers."""

from __future__ import annotations

from pathlib import Path

from ..safe_fs import make_dir, write_json  # noqa: F401  (write_json re-exported for the writers)
from .safetensors_stream import SafetensorsFileWriter


class FileSet:
    """Several planned safetensors files in one directory.

    Args:
        directory: where the files live.
        files: {file name: [(tensor name, dtype, shape), ...]}.
        create: create the directory and the files (one process); others only write into them.
        pool: a `write_pool.WritePool` shared by the files (checks, hashes and writes in its threads).
    """

    def __init__(self, directory: Path, files: dict, metadata: dict | None = None, create: bool = True,
                 pool=None):
        self.directory = Path(directory)
        if create:
            make_dir(self.directory, exist_ok=True)
        self.writers = {}
        self.route = {}
        try:
            for fname, specs in files.items():
                self.writers[fname] = SafetensorsFileWriter(str(self.directory / fname), specs, metadata, create, pool)
                for name, _, _ in specs:
                    self.route.setdefault(name, fname)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor, fname: str | None = None, rows: tuple | None = None) -> None:
        """Write ``name``; ``fname`` picks the file when names repeat across files (rank files);
        ``rows``: ``tensor`` is only rows (first, stop) of it (`SafetensorsFileWriter.write`)."""
        fname = fname or self.route.get(name)
        if fname not in self.writers:
            raise KeyError(f"{self.directory}: tensor {name!r} is not in the planned files")
        self.writers[fname].write(name, tensor, rows=rows)

    def close(self) -> dict:
        """Close this process's handles; returns {file: {tensor: checksum}} of what it wrote."""
        return {fname: w.close() for fname, w in self.writers.items()}

    def missing(self, written: dict) -> dict:
        """{file: [tensor, ...]} planned but absent from ``written`` ({file: {tensor: sha}})."""
        out = {}
        for fname, w in self.writers.items():
            gone = w.missing(set(written.get(fname, {})))
            if gone:
                out[fname] = gone
        return out

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
