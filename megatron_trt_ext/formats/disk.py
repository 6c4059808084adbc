"""Positional writes and an early-writeback hint, the two system calls the writers need.

`pwrite` carries its own offset, so several threads can fill one file without sharing a file
position. `start_writeback` asks the kernel to start sending a just-written range to the disk
now (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait): otherwise dirty pages
sit in memory until the final fsync, and the whole disk write happens after the last tensor is
converted instead of alongside the conversion. It is only a hint: the fsync at close is what
makes the data durable, and where the call does not exist or fails nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` (bytes-like) at ``offset``; pwrite may write less than asked."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"pwrite wrote {written} bytes at offset {offset}")
        view = view[written:]
        offset += written


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing ``[offset, offset + nbytes)`` of ``fd`` to disk without waiting (a hint)."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)
