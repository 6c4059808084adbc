"""`megatron-trt-ext ls ROOT`: the exports under a root, newest first, read from their manifests.

Complete exports (``iter_XXXXXXX`` with a manifest; "refit" when a serve-only run left only the
manifest recording a live refit), failed ones (``.iter_XXXXXXX.failed``, with
the error) and partial ones (``.iter_XXXXXXX.partial``: being written now, or left by a killed run
until the next attach cleans it up). Nothing is opened but manifests; sizes of partial exports
are summed from the files present.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from . import manifest as mf
from . import safe_fs
from .errors import ConfigError

_NAMES = re.compile(r"^(?:\.)?iter_(\d+)(?:\.(failed|partial))?$")

COLUMNS = ("iteration", "status", "formats", "recipe", "size", "stall", "verify", "build", "served")


def _manifest(path: Path) -> dict:
    try:
        data = json.loads((path / mf.MANIFEST).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):  # never follows links
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _recipe(manifest: dict) -> str:
    config = manifest.get("config") or {}
    algorithm = (config.get("quantization") or {}).get("algorithm", "none")
    recipe = config.get("recipe") or ""
    name = Path(recipe).name if recipe.endswith((".yaml", ".yml")) else ""
    what = algorithm if algorithm != "none" else manifest.get("dtype", "?")
    return f"{name} ({what})" if name else what


def entry(path: Path, iteration: int, kind: str) -> dict:
    """One row: the facts of one export directory."""
    manifest = _manifest(path)
    status = {"failed": "failed", "partial": "partial"}.get(kind, "complete")
    if kind == "complete" and manifest.get("status") != "complete":
        status = "partial"  # a directory named iter_* without a complete manifest is never done
    elif kind == "complete" and manifest.get("formats") == []:
        status = "refit"  # a serve-only run: the refit's record, no files (`publish.is_refit_record`)
    timings = manifest.get("timings") or {}
    verify = manifest.get("verify") or {}
    probe = manifest.get("verification") or {}
    return {
        "iteration": iteration,
        "status": status,
        "path": str(path),
        "formats": manifest.get("formats") or [],
        "recipe": _recipe(manifest) if manifest else "",
        "bytes": manifest.get("bytes_written") if status == "complete" else _tree_bytes(path),
        # sync exports: training waited for the whole run (the manifest is written before the
        # exporter adds its own stall figure)
        "stall_s": timings.get("stall_s", timings.get("total_s") if manifest.get("mode") == "sync" else None),
        "verify": verify.get("status") or ("not run" if probe.get("status") == "recorded" else "-"),
        "build": (manifest.get("build") or {}).get("status", "-"),
        "error": manifest.get("error"),
        "serve": _served(manifest.get("serve")),
    }


def _served(record) -> str:
    """The live refit at this export: the iteration the server then served and the refit time."""
    if not isinstance(record, dict):
        return "-"
    seconds = record.get("seconds")
    took = f" ({seconds:.2f} s)" if isinstance(seconds, (int, float)) else ""
    return f"{record.get('version')}{took}" if record.get("status") == "complete" else f"failed{took}"


def list_exports(root) -> list:
    """Rows for every export under ``root``, newest iteration first (complete before a failed or
    partial leftover of the same iteration)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{str(root)!r}: not a directory; pass an export root (the output_dir of the recipe)")
    rows = []
    for item in os.scandir(root):
        m = _NAMES.match(item.name)
        if not m or not safe_fs.is_real_dir(item.path):
            continue
        kind = m.group(2) or "complete"
        if kind == "complete" and item.name.startswith("."):
            continue
        rows.append(entry(Path(item.path), int(m.group(1)), kind))
    order = {"complete": 0, "refit": 0, "failed": 1, "partial": 2}
    rows.sort(key=lambda r: (-r["iteration"], order[r["status"]]))
    return rows


def _size(nbytes) -> str:
    if nbytes is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return "-"


def table(rows: list) -> str:
    """A plain text table, one export per line."""
    cells = [[str(r["iteration"]), r["status"], ",".join(r["formats"]) or "-", r["recipe"] or "-", _size(r["bytes"]),
              "-" if r["stall_s"] is None else f"{r['stall_s']:.3f} s", r["verify"], r["build"],
              r.get("serve", "-")] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(COLUMNS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)
