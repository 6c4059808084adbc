"""Write paths for a ~1 GiB export on one disk (issue 22; figures in docs/performance.md).

1 MiB chunks from a 64 MiB source buffer into a new file, fsync counted. page: pwrite +
sync_file_range hint (what the writers do); fadvise: same + posix_fadvise(DONTNEED) after each
64 MiB range is written back; direct: O_DIRECT, copied into a 4 MiB aligned bounce buffer.
Interleaved rounds, medians.

    python -m bench.write_paths DIR [ROUNDS]
"""

import ctypes, mmap, os, sys, time, statistics, resource
N = 1 << 30; CH = 1 << 20
src = bytearray(os.urandom(1 << 20) * 64)  # 64 MiB source, cycled
srcv = memoryview(src)
libc = ctypes.CDLL(None, use_errno=True)
sfr = libc.sync_file_range; sfr.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF); return u.ru_utime + u.ru_stime
def page(path, fadvise=False):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    off = 0
    while off < N:
        os.pwrite(fd, srcv[off % len(src): off % len(src) + CH], off)
        off += CH
        if off % (64 << 20) == 0:
            sfr(fd, off - (64 << 20), 64 << 20, 2)
            if fadvise and off >= (128 << 20):  # the range before: written back by now (or wait for it)
                sfr(fd, off - (128 << 20), 64 << 20, 1 | 2 | 4)
                os.posix_fadvise(fd, off - (128 << 20), 64 << 20, os.POSIX_FADV_DONTNEED)
    os.fsync(fd)
    if fadvise:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
def direct(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    B = 4 << 20
    bounce = mmap.mmap(-1, B)  # page aligned
    bv = memoryview(bounce)
    off = 0
    while off < N:
        s = off % len(src)
        bv[:B] = srcv[s:s + B]
        os.pwrite(fd, bv, off)
        off += B
    os.fsync(fd)
    os.close(fd)
d = sys.argv[1]; rounds = int(sys.argv[2])
res = {}
for r in range(rounds):
    for name, f in [("page", lambda p: page(p)), ("fadvise", lambda p: page(p, True)), ("direct", direct)][r % 3:] + [("page", lambda p: page(p)), ("fadvise", lambda p: page(p, True)), ("direct", direct)][:r % 3]:
        path = os.path.join(d, f"mte-dio-{os.getpid()}.bin")
        c0 = cpu(); t0 = time.perf_counter(); f(path); t = time.perf_counter() - t0; c = cpu() - c0
        os.unlink(path)
        res.setdefault(name, []).append((t, c))
for k, v in res.items():
    w = statistics.median(x[0] for x in v); c = statistics.median(x[1] for x in v)
    print(f"{d} {k:8s} median {w:.2f}s ({N/2**30/w:.2f} GiB/s) cpu {c:.2f}s rounds {[round(x[0],2) for x in v]}")
