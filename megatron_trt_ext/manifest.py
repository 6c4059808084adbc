"""Export directories: atomic publication, manifest.json and the `latest` pointer.

An export is written into a hidden sibling (``.iter_XXXXXXX.partial``), its manifest is written last
with ``status: complete``, and only then the directory is renamed into place. So a directory named
``iter_XXXXXXX`` always holds a complete export; anything else is visibly partial or failed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .formats.files import write_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def export_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def start(root: Path, iteration: int) -> Path:
    """Create a fresh partial directory for this iteration."""
    tmp = root / f".{export_dir_name(iteration)}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, root: Path, iteration: int, manifest: dict) -> Path:
    """Write the complete manifest into ``tmp`` and rename it to its final name atomically."""
    manifest = {**manifest, "status": "complete"}
    write_json(tmp / MANIFEST, manifest)
    _fsync_dir(tmp)
    final = root / export_dir_name(iteration)
    if final.exists():
        # Re-export of an iteration (e.g. after a resume): move the old one aside first so the
        # final name never points at a half-replaced directory.
        old = root / f".{final.name}.replaced-{int(time.time())}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    update_latest(root, final.name)
    return final


def mark_failed(tmp: Path, root: Path, iteration: int, manifest: dict, error: str) -> Path:
    """Keep what a failed export wrote, visibly failed: ``.iter_XXXXXXX.failed/manifest.json``."""
    failed = root / f".{export_dir_name(iteration)}.failed"
    if failed.exists():
        shutil.rmtree(failed, ignore_errors=True)
    if tmp.exists():
        os.replace(tmp, failed)
    else:
        failed.mkdir(parents=True, exist_ok=True)
    try:
        write_json(failed / MANIFEST, {**manifest, "status": "failed", "error": error})
    except OSError:
        pass  # a full disk may prevent even this; the directory name still says "failed"
    return failed


def update_latest(root: Path, name: str) -> None:
    tmp = root / ".latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def latest_export(root: Path) -> Path | None:
    """The newest complete export under ``root`` (by the `latest` pointer, else by name)."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / MANIFEST).is_file():
            return candidate
    complete = sorted(p for p in root.glob("iter_*") if (p / MANIFEST).is_file())
    return complete[-1] if complete else None
