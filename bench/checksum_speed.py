"""Checksum candidates on ~600 MiB in memory: sha256, BLAKE3, XXH3-128, one thread and two (issue 22;
figures in docs/performance.md). Needs ``pip install blake3`` (not a dependency).

    python -m bench.checksum_speed
"""
import xxhash, blake3
N = 600 << 20
buf = memoryview(bytearray(os.urandom(1 << 20) * 600))
CH = 4 << 20
def chunked(h):
    for i in range(0, N, CH):
        h.update(buf[i:i+CH])
    return h.hexdigest()
def two_threads(mk):
    # two tensors hashed in parallel, like two writer threads
    half = N // 2
    def run(lo):
        h = mk()
        for i in range(lo, lo + half, CH):
            h.update(buf[i:i+CH])
    ts = [threading.Thread(target=run, args=(lo,)) for lo in (0, half)]
    [t.start() for t in ts]; [t.join() for t in ts]
cands = {
 "sha256": lambda: chunked(hashlib.sha256()),
 "xxh3_128": lambda: chunked(xxhash.xxh3_128()),
 "xxh3_128_2thr": lambda: two_threads(xxhash.xxh3_128),
 "blake3": lambda: chunked(blake3.blake3()),
 "blake3_max_threads": lambda: blake3.blake3(buf, max_threads=blake3.blake3.AUTO).hexdigest(),
 "blake3_2thr": lambda: two_threads(blake3.blake3),
 "sha256_2thr": lambda: two_threads(hashlib.sha256),
}
res = {k: [] for k in cands}
for r in range(5):
    for k, f in cands.items():
        c0 = time.process_time(); t0 = time.perf_counter(); f(); res[k].append((time.perf_counter() - t0, time.process_time() - c0))
for k, v in res.items():
    w = statistics.median(x[0] for x in v); c = statistics.median(x[1] for x in v)
    print(f"{k:20s} wall {w:.3f}s  {N/2**30/w:6.2f} GiB/s  cpu {c:.3f}s  rounds {[round(x[0],3) for x in v]}")
