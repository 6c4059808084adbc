"""`ExportResult`: what one export produced, as every caller sees it (the exporter, the
background worker, the hook, the CLI). Its own module because all of them need it and none
of them should need the job that runs an export to name its outcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class ExportResult:
    """What one export produced. ``path`` and ``status`` are the same on every rank.

    ``status``: ``complete``, ``failed``, ``skipped`` (busy policy) or ``running`` (async, not
    finished yet; ``Exporter.wait()`` returns the final result).
    """

    iteration: int
    path: Optional[Path]
    status: str
    formats: list
    timings: dict = field(default_factory=dict)
    bytes_written: int = 0
    error: Optional[str] = None
    serve: Optional[dict] = None  # the live refit riding on this export (rank 0; the manifest's ``serve``)

    @property
    def ok(self) -> bool:
        return self.status == "complete"
