"""Checksum candidates on ~600 MiB in memory: sha256, BLAKE3, XXH3-128, one thread and two (issue 22;
figures in docs/performance.md). Needs ``pip install blake3`` (not a dependency).

    python -m bench.checksum_speed [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import threading
import time

N = 600 << 20
CHUNK = 4 << 20


def chunked(buf, h) -> str:
    """``h`` fed ``buf`` in `CHUNK`-byte updates, as the writers feed their chunks."""
    for i in range(0, N, CHUNK):
        h.update(buf[i:i + CHUNK])
    return h.hexdigest()


def two_threads(buf, make) -> None:
    """Two halves hashed at once, like two writer threads hashing two tensors."""
    half = N // 2

    def run(lo):
        h = make()
        for i in range(lo, lo + half, CHUNK):
            h.update(buf[i:i + CHUNK])

    threads = [threading.Thread(target=run, args=(lo,)) for lo in (0, half)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    import blake3
    import xxhash

    buf = memoryview(bytearray(os.urandom(1 << 20) * 600))
    candidates = {
        "sha256": lambda: chunked(buf, hashlib.sha256()),
        "xxh3_128": lambda: chunked(buf, xxhash.xxh3_128()),
        "xxh3_128_2thr": lambda: two_threads(buf, xxhash.xxh3_128),
        "blake3": lambda: chunked(buf, blake3.blake3()),
        "blake3_max_threads": lambda: blake3.blake3(buf, max_threads=blake3.blake3.AUTO).hexdigest(),
        "blake3_2thr": lambda: two_threads(buf, blake3.blake3),
        "sha256_2thr": lambda: two_threads(buf, hashlib.sha256),
    }
    results: dict = {k: [] for k in candidates}
    for _ in range(args.rounds):  # interleaved: every candidate once per round
        for name, fn in candidates.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            results[name].append((time.perf_counter() - t0, time.process_time() - c0))
    for name, rounds in results.items():
        wall = statistics.median(r[0] for r in rounds)
        cpu = statistics.median(r[1] for r in rounds)
        print(f"{name:20s} wall {wall:.3f}s  {N / 2**30 / wall:6.2f} GiB/s  cpu {cpu:.3f}s  "
              f"rounds {[round(r[0], 3) for r in rounds]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
