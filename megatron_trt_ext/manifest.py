"""Export directories as readers see them: names, the manifest, `latest`, and the locks that
say who may touch a directory.

An export is written into a hidden sibling (``.iter_XXXXXXX.partial``) by the one process that
holds the iteration's lock (``.iter_XXXXXXX.lock``, created with O_EXCL, naming host, pid and the
process start time); a build reading an export holds its ``.build.lock``. How a directory
becomes ``iter_XXXXXXX`` (atomically, manifest last), how a failure is recorded and how old
exports go is `publish`'s part. Nothing here follows a symbolic link planted under the root
(see `safe_fs`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from pathlib import Path

from safetensors import safe_open

from . import checksum, safe_fs
from .errors import ExportError
from .formats.safetensors_stream import tensor_bytes

logger = logging.getLogger("megatron_trt_ext")

__version__ = "0.1.0"  # the package's version, named as the producer in every manifest

# 2: per-tensor checksums listed under their algorithm's name (`checksum`: xxh3_128); 1: sha256.
# Readers take both.
SCHEMA_VERSION = 2
PRODUCER = {"name": "megatron-trt-ext", "version": __version__}
MANIFEST = "manifest.json"
_ITER_NAME = re.compile(r"^iter_(\d+)$")


def export_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def partial_path(root: Path, iteration: int) -> Path:
    return Path(root) / f".{export_dir_name(iteration)}.partial"


def failed_path(root: Path, iteration: int) -> Path:
    return Path(root) / f".{export_dir_name(iteration)}.failed"


def lock_path(root: Path, iteration: int) -> Path:
    return Path(root) / f".{export_dir_name(iteration)}.lock"


# ---------------------------------------------------------------------- process identity
def _start_ticks(pid: int):
    """The process start time (Linux), so a reused pid is not mistaken for the lock's owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_record(pid: int | None = None) -> dict:
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start": _start_ticks(pid), "created_unix": time.time()}


def owner_alive(owner: dict, age_s: float, stale_after_s: float) -> bool:
    """Whether the process an owner record names still runs. On this host: its pid (and start
    time) is checked. On another host: it counts as alive while the record was refreshed
    within ``stale_after_s``."""
    try:
        host, pid = owner["host"], int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return age_s < stale_after_s
    if host != socket.gethostname():
        return age_s < stale_after_s
    if not _pid_alive(pid):
        return False
    start = owner.get("start")
    return start is None or _start_ticks(pid) in (None, start)


def _read_owner(path: Path):
    """(owner dict, age in seconds) of a lock file, or (None, None) when there is none."""
    try:
        st = os.lstat(path)
        fd = safe_fs.open_existing(path, os.O_RDONLY)
    except OSError:
        return None, None
    try:
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        owner = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError):
        owner = {}
    return owner, max(0.0, time.time() - st.st_mtime)


# ---------------------------------------------------------------------- the iteration lock
class LockedError(ExportError):
    """Another live process holds the iteration's lock."""


class IterationLock:
    """One writer per export: an O_EXCL lock file per iteration under the root.

    A lock whose owner is gone (same host: pid dead or reused; other host: not refreshed for
    ``stale_after_s``) is taken over. Otherwise `acquire` raises ExportError naming the owner.
    """

    def __init__(self, root: Path, iteration: int, stale_after_s: float = 1200.0):
        self.path = lock_path(root, iteration)
        self.iteration = iteration
        self.stale_after_s = stale_after_s
        self.token = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> "IterationLock":
        record = json.dumps({**owner_record(), "token": self.token}).encode()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                owner, age = _read_owner(self.path)
                if owner is None:  # vanished meanwhile, or a planted link (never followed)
                    safe_fs.unlink_name(self.path)
                    continue
                # an empty record is a lock being written right now: young means alive
                if (owner and owner_alive(owner, age, self.stale_after_s)) or (not owner and age < 30):
                    raise LockedError(
                        f"iteration {self.iteration}: another process is exporting it into the same output_dir "
                        f"(host {owner.get('host')}, pid {owner.get('pid')}, lock {self.path}); two jobs (or a "
                        "restarted job and an orphaned export worker) must not share an output_dir. Give each "
                        "job its own output_dir, or delete the lock if that process is gone")
                logger.warning("taking over the stale export lock %s (owner %s)", self.path, owner)
                safe_fs.unlink_name(self.path)
                continue
            try:
                os.write(fd, record)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.held = True
            return self
        raise ExportError(f"iteration {self.iteration}: could not take the export lock {self.path}")

    def refresh(self) -> None:
        """Show other hosts that the owner is alive (long exports)."""
        if self.held:
            try:
                os.utime(self.path, follow_symlinks=False)
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner, _ = _read_owner(self.path)
        if owner and owner.get("token") == self.token:
            safe_fs.unlink_name(self.path)


def lock_is_live(root: Path, iteration: int, stale_after_s: float = 1200.0) -> bool:
    owner, age = _read_owner(lock_path(root, iteration))
    return owner is not None and owner_alive(owner, age, stale_after_s)


def iteration_of(name: str):
    """The iteration an export directory's name says (None: not an export's name)."""
    m = _ITER_NAME.match(name.strip())
    return int(m.group(1)) if m else None


def read_latest(root: Path):
    pointer = Path(root) / "latest"
    try:
        fd = safe_fs.open_existing(pointer, os.O_RDONLY)
    except OSError:
        return None
    try:
        name = os.read(fd, 256).decode(errors="replace").strip()
    finally:
        os.close(fd)
    candidate = Path(root) / name
    if iteration_of(name) is None or not safe_fs.is_real_dir(candidate) or not (candidate / MANIFEST).is_file():
        return None
    return candidate


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def latest_export(root: Path) -> Path | None:
    """The newest complete export under ``root`` (by the `latest` pointer, else by name)."""
    found = read_latest(root)
    if found is not None:
        return found
    complete = complete_exports(root)
    return complete[-1] if complete else None


BUILD_LOCK = ".build.lock"


def is_being_read(export: Path) -> bool:
    """Whether a live build process holds this export's lock (a stale lock does not count)."""
    owner, age = _read_owner(Path(export) / BUILD_LOCK)
    if owner is None:
        return False
    if "host" not in owner:
        return False
    return owner_alive(owner, age, stale_after_s=float("inf"))


def write_build_lock(export: Path, pid: int) -> None:
    safe_fs.write_json(Path(export) / BUILD_LOCK, owner_record(pid))


class build_lock:
    """Marks an export as being read by a build, so retention and re-exports leave it alone."""

    def __init__(self, export: Path):
        self.export = Path(export)
        self.path = self.export / BUILD_LOCK

    def __enter__(self):
        write_build_lock(self.export, os.getpid())
        return self

    def __exit__(self, *exc):
        safe_fs.unlink_name(self.path)


def complete_exports(root: Path) -> list:
    """Complete exports under ``root``, oldest first (by iteration); links are not exports."""
    found = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for entry in entries:
        iteration = iteration_of(entry.name)
        if iteration is None or not safe_fs.is_real_dir(entry.path):
            continue
        if (Path(entry.path) / MANIFEST).is_file():
            found.append((iteration, Path(entry.path)))
    return [p for _, p in sorted(found)]


def update_manifest(export: Path, **fields) -> dict:
    """Atomically merge ``fields`` into a published manifest (build results come later)."""
    data = read_manifest(export)
    data.update(fields)
    safe_fs.write_json(Path(export) / MANIFEST, data)
    return data


def verify_export(export: Path) -> list:
    """Recompute every tensor's checksum (with the algorithm its manifest names: sha256 in
    schema 1, xxh3_128 since) and compare; returns the problems found (an empty list means the
    export is complete and intact)."""
    export = Path(export)
    try:
        manifest = read_manifest(export)
    except (OSError, ValueError) as exc:
        return [f"manifest.json unreadable: {exc}"]
    problems = [] if manifest.get("status") == "complete" else [f"status is {manifest.get('status')!r}"]
    for rel, entry in manifest.get("files", {}).items():
        path = export / rel
        try:
            algorithm, sums = checksum.read_entry(entry)
        except ValueError as exc:
            problems.append(f"{rel}: {exc}")
            continue
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        ranges: dict = {}  # tensor -> [(rows or None, key)]: tensors written by several ranks have a sum per range
        for key in sums:
            name, rows = checksum.parse_key(key)
            ranges.setdefault(name, []).append((rows, key))
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(ranges):
                problems.append(f"{rel}: tensors differ from the manifest")
            for name in sorted(names & set(ranges)):
                parts = ranges[name]
                if any(rows is not None for rows, _ in parts):
                    rows_total = f.get_slice(name).get_shape()[0]
                    gap = checksum.rows_problem([r for r, _ in parts if r is not None], rows_total) \
                        if all(r is not None for r, _ in parts) else "listed whole and by rows"
                    if gap:
                        problems.append(f"{rel}: {name} checksums by rows: {gap}")
                        continue
                for rows, key in sorted(parts, key=lambda p: p[0] or (0, 0)):
                    tensor = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0]:rows[1]]
                    if checksum.hexdigest([tensor_bytes(tensor)], algorithm) != sums[key]:
                        problems.append(f"{rel}: {key} checksum mismatch ({algorithm})")
    return problems


def checksum_count(manifest: dict) -> int:
    """How many tensor checksums a manifest lists (either schema)."""
    count = 0
    for entry in manifest.get("files", {}).values():
        try:
            count += len(checksum.read_entry(entry)[1])
        except ValueError:
            pass
    return count
