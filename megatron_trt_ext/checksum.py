"""Per-tensor checksums of an export and how the manifest names their algorithm.

The checksum only has to catch a torn, truncated or flipped file, not an adversary, so it is a
hash made for speed: XXH3-128 (``xxhash``) hashes 8-9 GiB/s on one core of the development
machine against sha256's 1 GiB/s, which was half of an export's CPU time (BLAKE3, the other
candidate, 3.5 GiB/s there; see docs/performance.md). Its 128 bits make an accidental match of
a damaged tensor as unlikely as sha256's.

The manifest lists each file's checksums under the algorithm's name, ``{"xxh3_128": {tensor:
hex}}``; manifests of schema 1 hold ``{"sha256": {...}}``. Readers go through `read_entry`, so
both verify.

A tensor that several ranks write, a row range each (`plan.SplitPolicy`), has one checksum per
range, under ``range_key`` (``"name@rows 0:4096"``): XXH3 states cannot be combined, and each
range is hashed by the rank that writes it. `verify` hashes the same rows.
"""

from __future__ import annotations

import hashlib

import torch
import xxhash

ALGORITHM = "xxh3_128"
_HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


_ROWS = "@rows "


def range_key(name: str, first: int, stop: int) -> str:
    """The manifest key of rows ``first:stop`` of tensor ``name``."""
    return f"{name}{_ROWS}{first}:{stop}"


def parse_key(key: str) -> tuple:
    """(tensor name, (first, stop) or None for the whole tensor) of a manifest key."""
    name, sep, rows = key.rpartition(_ROWS)
    if not sep:
        return key, None
    first, _, stop = rows.partition(":")
    return name, (int(first), int(stop))


def rows_problem(ranges: list, rows: int) -> str:
    """Why row ranges do not cover ``rows`` rows exactly once, or ""."""
    at = 0
    for first, stop in sorted(ranges):
        if first != at or stop <= first:
            return f"rows {at}:{first} missing" if first > at else f"rows {first}:{stop} overlap or are empty"
        at = stop
    return "" if at == rows else f"rows {at}:{rows} missing"


def new(algorithm: str = ALGORITHM):
    """An incremental hasher (``update`` / ``hexdigest``) of ``algorithm``."""
    try:
        return _HASHES[algorithm]()
    except KeyError:
        raise ValueError(f"unknown checksum algorithm {algorithm!r} (known: {sorted(_HASHES)})") from None


def hexdigest(buffers, algorithm: str = ALGORITHM) -> str:
    """The checksum of the concatenation of ``buffers`` (bytes-like objects)."""
    digest = new(algorithm)
    for data in buffers:
        digest.update(data)
    return digest.hexdigest()


def of_safetensors(data: bytes, algorithm: str = ALGORITHM) -> dict:
    """{tensor: checksum} of a small safetensors file held in memory (the probe's record)."""
    from safetensors.torch import load

    return {name: hexdigest([_bytes_of(t)], algorithm) for name, t in load(data).items()}


def _bytes_of(tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def entry(sums: dict, algorithm: str = ALGORITHM) -> dict:
    """A file's manifest entry: its {tensor: checksum} under the algorithm's name."""
    return {algorithm: dict(sums)}


def read_entry(file_entry: dict) -> tuple:
    """(algorithm, {tensor: checksum}) of a file's manifest entry, old (sha256) or new.
    Raises ValueError when it names no algorithm this version knows."""
    found = [name for name in _HASHES if name in file_entry]
    if len(found) != 1:
        raise ValueError(f"checksums under {sorted(file_entry)}; this version reads one of {sorted(_HASHES)} "
                         "(a manifest written by a newer megatron-trt-ext: upgrade to verify it)")
    return found[0], file_entry[found[0]]
