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
    complete = complete_exports(root)
    return complete[-1] if complete else None


BUILD_LOCK = ".build.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_being_read(export: Path) -> bool:
    """Whether a live build process holds this export's lock (a stale lock does not count)."""
    lock = Path(export) / BUILD_LOCK
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        return False
    import socket

    return host != socket.gethostname() or _pid_alive(int(pid))


def write_build_lock(export: Path, pid: int) -> None:
    import socket

    tmp = Path(export) / (BUILD_LOCK + ".tmp")
    tmp.write_text(f"{socket.gethostname()} {pid}\n")
    os.replace(tmp, Path(export) / BUILD_LOCK)


class build_lock:
    """Marks an export as being read by a build, so retention leaves it alone."""

    def __init__(self, export: Path):
        self.export = Path(export)
        self.path = self.export / BUILD_LOCK

    def __enter__(self):
        write_build_lock(self.export, os.getpid())
        return self

    def __exit__(self, *exc):
        try:
            self.path.unlink()
        except OSError:
            pass


def complete_exports(root: Path) -> list:
    """Complete exports under ``root``, oldest first (by iteration)."""
    found = []
    for p in Path(root).glob("iter_*"):
        try:
            found.append((int(p.name[len("iter_"):]), p))
        except ValueError:
            continue
    return [p for _, p in sorted(found) if (p / MANIFEST).is_file()]


def apply_retention(root: Path, keep_last) -> list:
    """Delete complete exports beyond the newest ``keep_last``; never the newest complete one,
    never one a build is reading. Returns what was removed."""
    if not keep_last:
        return []
    exports = complete_exports(root)
    removed = []
    for old in exports[:-max(int(keep_last), 1)]:
        if is_being_read(old):
            continue
        doomed = old.parent / f".{old.name}.deleting"
        os.replace(old, doomed)  # the name disappears atomically, the bytes follow
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(old)
    return removed


def update_manifest(export: Path, **fields) -> dict:
    """Atomically merge ``fields`` into a published manifest (build results come later)."""
    data = read_manifest(export)
    data.update(fields)
    write_json(Path(export) / MANIFEST, data)
    return data


def verify_export(export: Path) -> list:
    """Recompute every tensor's sha256 and compare with the manifest; returns the problems found
    (an empty list means the export is complete and intact)."""
    import hashlib

    from safetensors import safe_open

    from .formats.safetensors_stream import tensor_bytes

    export = Path(export)
    try:
        manifest = read_manifest(export)
    except (OSError, ValueError) as exc:
        return [f"manifest.json unreadable: {exc}"]
    problems = [] if manifest.get("status") == "complete" else [f"status is {manifest.get('status')!r}"]
    for rel, entry in manifest.get("files", {}).items():
        path = export / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(entry["sha256"]):
                problems.append(f"{rel}: tensors differ from the manifest")
            for name in sorted(names & set(entry["sha256"])):
                if hashlib.sha256(tensor_bytes(f.get_tensor(name))).hexdigest() != entry["sha256"][name]:
                    problems.append(f"{rel}: {name} checksum mismatch")
    return problems
