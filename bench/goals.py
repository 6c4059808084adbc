"""Shared helpers of the benchmarks: medians, fsync of what another tool wrote, and one printed
line per goal with its target beside it, so every bench reports the same way."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def median(values) -> float:
    return statistics.median(values)


def raw_write(directory: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    """Seconds to write and fsync ``nbytes`` to a new file in ``directory``: plain sequential
    64 MiB writes, then one fsync, the way any tool writes one file (the data is made before the
    clock starts)."""
    block = os.urandom(min(chunk, max(nbytes, 1)))
    path = Path(directory) / "raw_write.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[:min(len(block), left)])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory`` and the directories themselves: what our exports do
    before they count as written, applied to another tool's output for a fair comparison."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def goal_line(label: str, value: float, target: float, lower_is_better: bool = True, unit: str = "x") -> dict:
    """Print ``label: value (target <= / >= target): holds | DOES NOT HOLD``; return it as a dict."""
    holds = value <= target if lower_is_better else value >= target
    sign = "<=" if lower_is_better else ">="
    print(f"  {label:<58} {value:7.2f}{unit}   target {sign} {target:.2f}{unit}   "
          f"{'holds' if holds else 'DOES NOT HOLD'}")
    return {"goal": label, "value": value, "target": f"{sign} {target}", "holds": holds}
