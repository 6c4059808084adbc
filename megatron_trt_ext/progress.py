"""Progress bars for long CLI operations: on stderr only, so stdout stays machine-readable.

Shown when stderr is a terminal, or when forced (``--progress``); never in training (the exporter
logs instead). tqdm comes with transformers; without it there are no bars.
"""

from __future__ import annotations

import sys
from typing import Optional


class _Silent:
    """The same calls as a tqdm bar, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wanted(forced: Optional[bool] = None) -> bool:
    """Bars on: forced by the flag, else when stderr is a terminal."""
    if forced is not None:
        return forced
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def bar(total: Optional[int], desc: str, enabled: bool, unit: str = "step"):
    """A tqdm bar on stderr when ``enabled`` (and tqdm is installed), else a silent stand-in."""
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
