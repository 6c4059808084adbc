"""File-system primitives that never follow a symbolic link planted under the export root.

Every file the package creates under ``output_dir`` is opened with ``O_EXCL | O_NOFOLLOW`` (a
name that already exists as a link or a stale file is unlinked first, never written through),
every directory is made with ``mkdir`` (which does not follow links) and removed without
following links, and renames replace names, not what they point to. ``output_dir`` itself may
be a link: the rule covers what lies under it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
from pathlib import Path

_CREATE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def lexists(path) -> bool:
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False


def is_real_dir(path) -> bool:
    """A directory that is not a symbolic link."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def unlink_name(path) -> None:
    """Remove a file or link name (never what a link points to); a missing name is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def open_new(path, mode: int = 0o644, access: int = os.O_WRONLY) -> int:
    """A new file descriptor for writing ``path`` (``access``: O_WRONLY or O_RDWR); an existing
    file or link of that name is replaced, never followed. Directories are not replaced."""
    try:
        return os.open(path, _CREATE | access, mode)
    except FileExistsError:
        if is_real_dir(path):
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way", str(path)) from None
        unlink_name(path)
        return os.open(path, _CREATE | access, mode)


def open_existing(path, flags: int = os.O_RDWR) -> int:
    """Open an existing file for update without following a link."""
    return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))


def write_bytes(path, data: bytes, fsync: bool = True) -> None:
    fd = open_new(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data: bytes, fsync: bool = True) -> None:
    """Write to a private temporary name, then rename over ``path`` (replacing a link named
    ``path``, not its target)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_bytes(tmp, data, fsync)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_name(tmp)
        raise


def write_json(path, data: dict, fsync: bool = True) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), fsync)


def make_dir(path, exist_ok: bool = False) -> Path:
    """Create a directory; a link or file of that name is removed first (never followed)."""
    path = Path(path)
    try:
        os.mkdir(path)
    except FileExistsError:
        if is_real_dir(path):
            if exist_ok:
                return path
            raise
        unlink_name(path)
        os.mkdir(path)
    return path


def remove_tree(path) -> None:
    """Remove a directory tree, or just the name when it is a link or a file. Links inside are
    removed, never followed (Python's rmtree walks with file descriptors)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=False)
    else:
        unlink_name(path)


def fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a, b) -> bool:
    """Atomically swap two names (Linux ``renameat2(RENAME_EXCHANGE)``). Returns False where the
    system or file system cannot (the caller then falls back to two renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), f"{a} <-> {b}")
