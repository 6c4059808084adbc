"""Publication: how an export directory comes to exist, complete or failed, and how old ones go.

An export is written into ``.iter_XXXXXXX.partial`` (`start`, under the iteration's lock). Its
manifest is written last with ``status: complete``, and only then the directory takes its final
name: a rename, or an atomic exchange when the iteration already exists (a resumed run
re-saving it), so ``iter_XXXXXXX`` and ``latest`` always name a complete export. A failed export
leaves ``.iter_XXXXXXX.failed/manifest.json`` (`record_failure`). Retention (``keep_last``) and
the clean-up at attach remove what is no longer wanted, never the newest complete export and
never one a build is reading. What the names, manifests and locks are is `manifest`'s part.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from pathlib import Path

from . import checksum, safe_fs
from .errors import ExportError
from .manifest import (MANIFEST, IterationLock, complete_exports, export_dir_name, failed_path, is_being_read,
                       iteration_of, lock_is_live, lock_path, partial_path, read_latest)
from .verification import fingerprint
from .verification.probe import FILE_NAME as PROBE_FILE

logger = logging.getLogger("megatron_trt_ext")


# ---------------------------------------------------------------------- one export's life
def start(root: Path, iteration: int, lock: IterationLock) -> Path:
    """Under the iteration's lock: a fresh partial directory (a leftover one, or an older
    failure record of this iteration, belongs to a dead attempt and goes)."""
    assert lock.held
    tmp = partial_path(root, iteration)
    safe_fs.remove_tree(tmp)
    safe_fs.remove_tree(failed_path(root, iteration))
    safe_fs.make_dir(tmp)
    return tmp


def rename_into_place(tmp: Path, root: Path, iteration: int, manifest: dict) -> Path:
    """Write the complete manifest into ``tmp`` and give it its final name atomically.

    Re-exporting an existing iteration swaps the two directories in one step (``renameat2``
    exchange), so the final name never misses a manifest; an old export that a live build is
    reading is left in place and this export fails instead.
    """
    manifest = {**manifest, "status": "complete"}
    safe_fs.write_json(tmp / MANIFEST, manifest)
    safe_fs.fsync_dir(tmp)
    final = Path(root) / export_dir_name(iteration)
    if safe_fs.lexists(final) and not safe_fs.is_real_dir(final):
        safe_fs.unlink_name(final)  # a planted link or file holds the name: it goes, never followed
    if not safe_fs.lexists(final):
        os.rename(tmp, final)
    else:
        if is_being_read(final):
            raise ExportError(f"iteration {iteration} already exists at {final} and a live build process is "
                              "reading it; it was not replaced (build it later, or export again after the build)")
        if safe_fs.exchange(tmp, final):
            old = tmp  # the previous export now has the partial name
        else:  # file systems without RENAME_EXCHANGE (e.g. NFS): a short window without the name
            old = Path(root) / f".{final.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
        if is_being_read(old):  # a build took the lock meanwhile: keep its files, clean up later
            os.rename(old, Path(root) / f".{final.name}.replaced-{uuid.uuid4().hex[:8]}")
        else:
            _remove_quietly(old)
    safe_fs.fsync_dir(root)
    if is_refit_record(manifest):  # a serve-only run wrote no files: `latest` names exports with files
        return final
    try:
        update_latest(root, final.name)
    except OSError as exc:  # the export is complete; `latest` keeps naming an older complete one
        logger.error("export %s is complete but `latest` could not be updated: %s", final, exc)
    return final


def record_failure(root: Path, iteration: int, manifest: dict, error: str, partial: Path | None = None):
    """Leave ``.iter_XXXXXXX.failed/manifest.json`` saying why. ``partial`` (the lock holder's
    own partial directory) is removed first, which frees the space a full disk needs for the
    record. The first record of an attempt wins; returns its path, or None when the disk cannot
    take even that (then the error is logged, and the caller raises it anyway)."""
    root = Path(root)
    failed = failed_path(root, iteration)
    try:
        if partial is not None:
            _remove_quietly(partial)
        if safe_fs.is_real_dir(failed) and safe_fs.lexists(failed / MANIFEST):
            return failed
        staging = root / f".{export_dir_name(iteration)}.failed-{uuid.uuid4().hex[:8]}.tmp"
        safe_fs.make_dir(staging)
        try:
            safe_fs.write_json(staging / MANIFEST, {**manifest, "status": "failed", "error": error})
            if safe_fs.lexists(failed) and not safe_fs.is_real_dir(failed):
                safe_fs.unlink_name(failed)
            try:
                os.rename(staging, failed)  # fails when another rank's record is already there
            except OSError:
                if not safe_fs.lexists(failed / MANIFEST):
                    raise
        finally:
            _remove_quietly(staging)
        return failed
    except OSError as exc:
        logger.error("export of iteration %d failed and the failure could not be recorded under %s (%s): %s",
                     iteration, root, exc, error)
        return None


def _remove_quietly(path: Path) -> None:
    try:
        safe_fs.remove_tree(path)
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)


def checksums(gathered: list) -> dict:
    """Every rank's checksums, {file under the export: {tensor: checksum}}. ``gathered``: each
    rank's (error, checksums, timings)."""
    files: dict = {}
    for _, sums, _ in gathered:
        for fname, tensors in sums.items():
            files.setdefault(fname, {}).update(tensors)
    return files


def add_probe(tmp: Path, meta: dict, files: dict, verification) -> None:
    """The probe's record (`verification.probe.ProbeRecord`, None when off) into the manifest,
    and its file next to it when the probe ran."""
    meta["verification"] = verification.meta if verification is not None else {"status": "off"}
    if verification is not None and verification.ok:
        safe_fs.write_bytes(tmp / PROBE_FILE, verification.data)
        files[PROBE_FILE] = checksum.of_safetensors(verification.data)  # the manifest's algorithm


def add_fingerprints(tmp: Path, meta: dict, files: dict) -> None:
    """Every rank's weight fingerprints (gathered under their file's name with the checksums)
    into one file next to the manifest, listed with its checksums (`verification.fingerprint`)."""
    entries = files.pop(fingerprint.FILE_NAME, None)
    if not entries:
        return
    data, sums, skipped = fingerprint.save(entries)
    safe_fs.write_bytes(tmp / fingerprint.FILE_NAME, data)
    files[fingerprint.FILE_NAME] = sums
    meta["fingerprints"] = {"file": fingerprint.FILE_NAME, "version": fingerprint.VERSION,
                            "tensors": len(entries) - len(skipped), "skipped": skipped}


def check_written(files: dict, writers: dict) -> None:
    """Every planned tensor was written. ``writers``: format folder -> its `FileSet` (or None)."""
    for prefix, writer in writers.items():
        if writer is not None:
            missing = writer.missing({k[len(prefix) + 1:]: v for k, v in files.items() if k.startswith(prefix + "/")})
            if missing:
                raise ExportError(f"{prefix}: planned tensors never written: {missing}")


def finish(tmp: Path, root: Path, iteration: int, meta: dict, files: dict, rank_timings: list) -> int:
    """The complete manifest (checksums, every rank's timings, size) into ``tmp``, then its final
    name. Returns the bytes written."""
    bytes_written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    per_rank = dict(enumerate(rank_timings))
    meta.update(files={k: checksum.entry(v) for k, v in sorted(files.items())},
                timings={**per_rank[0], "per_rank": per_rank}, bytes_written=bytes_written)
    rename_into_place(tmp, root, iteration, meta)
    return bytes_written


def update_latest(root: Path, name: str) -> None:
    """Point `latest` at ``name`` unless it already names a newer complete export (two exporters
    of one root, or a re-export of an older iteration, never move it backwards)."""
    root = Path(root)
    current = read_latest(root)
    if current is not None and iteration_of(current.name) > iteration_of(name):
        return
    safe_fs.write_atomic(root / "latest", (name + "\n").encode())


# ---------------------------------------------------------------------- clean-up
def cleanup_leftovers(root: Path, stale_after_s: float = 1200.0) -> list:
    """What interrupted runs left under the root: partial directories whose lock owner is gone
    (with their stale locks), half-deleted and replaced exports no live build reads, temporary
    files. Run at attach, by one rank. Returns what was removed."""
    root = Path(root)
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        name, path = entry.name, Path(entry.path)
        m = re.match(r"^\.iter_(\d+)\.(partial|lock)$", name)
        if m:
            iteration = int(m.group(1))
            if lock_is_live(root, iteration, stale_after_s):
                continue
            doomed = [partial_path(root, iteration), lock_path(root, iteration)]
        elif re.match(r"^\.iter_\d+\.(deleting|replaced|failed-).*", name) and not is_being_read(path):
            doomed = [path]
        elif name.startswith((".latest.tmp", ".write-probe", ".latest.")) or (
                name.startswith(".") and ".tmp-" in name):
            doomed = [path]
        else:
            continue
        for p in doomed:
            if safe_fs.lexists(p):
                _remove_quietly(p)
                removed.append(p)
    return removed


def is_refit_record(manifest: dict) -> bool:
    """A serve-only export run (``formats: []``) leaves ``iter_N`` with its manifest alone: the
    record of a live refit, not an export. It is listed (`listing`), but never `latest` and never
    counted against the exports' ``keep_last``."""
    return isinstance(manifest, dict) and manifest.get("formats") == []


def _is_record_dir(path: Path) -> bool:
    try:
        return is_refit_record(json.loads((Path(path) / MANIFEST).read_text()))
    except (OSError, ValueError):
        return False  # unreadable: counted as an export, as before


def apply_retention(root: Path, keep_last) -> list:
    """Delete complete exports beyond the newest ``keep_last``; never the newest complete one,
    never one a build is reading. Refit records (`is_refit_record`) are kept to ``keep_last``
    among themselves, so they never push an export with files out. Never raises: a deletion
    that fails is logged and retried by the next export's pass. Returns what was removed."""
    if not keep_last:
        return []
    removed = []
    try:
        complete = complete_exports(root)
        records = [p for p in complete if _is_record_dir(p)]
        exports = [p for p in complete if p not in records]
        keep = max(int(keep_last), 1)
        for old in exports[:-keep] + records[:-keep]:
            if is_being_read(old):
                continue
            doomed = old.parent / f".{old.name}.deleting-{uuid.uuid4().hex[:8]}"
            os.rename(old, doomed)  # the name disappears atomically, the bytes follow
            _remove_quietly(doomed)
            removed.append(old)
    except OSError as exc:
        logger.warning("retention under %s stopped early: %s", root, exc)
    return removed
