"""Live refit options (recipe section ``serve:``): pure validation, no torch, no network.

Parsed once at attach, so a bad URL fails there, naming the key and the fix, not at the first save.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import asdict, dataclass
from typing import ClassVar, Optional

from ..errors import ConfigError, check_int_fields, parse_section, short_repr


@dataclass
class ServeOptions:
    """Refit a running vLLM server (started with our weight-transfer backend) at saves.

    Args:
        url: the server, ``http://HOST:PORT``; unset: no refit.
        every_n_saves: refit at every Nth save, counted on the exports' save count (a multiple of
            the config's ``every_n_saves``: refits ride on export runs).
        timeout_s: longest wait for one HTTP step and for the stream (connects, each frame).
        transport: ``"tcp"`` (the host transport: every writer rank streams over sockets; CPU or
            GPU, across nodes) or ``"nccl"`` (vLLM's NCCL weight transfer: rank 0 joins the
            server's NCCL group and broadcasts; needs CUDA and vLLM on the training side and a
            server started with ``{"backend": "nccl"}``; see `serve.nccl`).
    """

    url: Optional[str] = None
    every_n_saves: int = 1
    timeout_s: int = 300
    transport: str = "tcp"

    LIMITS: ClassVar[dict] = {"every_n_saves": 10**9, "timeout_s": 7 * 24 * 3600}

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @classmethod
    def from_dict(cls, data, source: str = "serve") -> "ServeOptions":
        if isinstance(data, str):  # shorthand: serve: http://HOST:PORT
            data = {"url": data}
        return parse_section(cls, data, source, 'a mapping such as {url: "http://HOST:PORT", every_n_saves: 1}')

    def validate(self, source: str = "serve") -> None:
        if self.url is not None:
            if not isinstance(self.url, str):
                raise ConfigError(f"{source}.url: expected a string such as \"http://HOST:PORT\", got "
                                  f"{short_repr(self.url)}")
            try:
                parsed = urllib.parse.urlsplit(self.url)
                port = parsed.port
            except ValueError:
                parsed, port = None, None
            if (parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname or port is None
                    or parsed.path.strip("/") or parsed.query):
                raise ConfigError(f"{source}.url: {short_repr(self.url)} is not http://HOST:PORT; give the address "
                                  "of the vLLM server (e.g. \"http://127.0.0.1:8000\")")
        check_int_fields(self, self.LIMITS, source)
        if self.transport not in ("tcp", "nccl"):
            raise ConfigError(f"{source}.transport: {short_repr(self.transport)} is not a transport; choose \"tcp\" "
                              "(sockets from every writer rank) or \"nccl\" (vLLM's NCCL weight transfer, GPU)")

    def to_dict(self) -> dict:
        return asdict(self)
