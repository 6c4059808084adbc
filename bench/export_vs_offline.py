"""Benchmark: what an export costs training, against a raw disk write and the offline route.

One run, one process, this machine, a Llama-style model of about 310M parameters in bfloat16
(single rank; see bench/distributed_export.py for TP2 x PP2):

(a) training stall of an async export vs the same export in sync mode;
(b) export throughput vs a plain write (+fsync) of the same number of bytes to the same disk;
(c) the in-process export vs the offline route (dist_checkpointing.save, load back into a fresh
    model, convert, write), without the offline job's start-up, so a lower bound for it;
(d) peak extra RSS of the trainer (sync export; async snapshot) and of the async worker;
(e) the verification probe (reference logits, inside the stall): its time against the async
    stall, and the stall of the same async export with the probe off.

    .venv/bin/python -m bench.export_vs_offline [--layers 16] [--dir /path/on/the/disk] [--probe-only]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench.distributed_export import PeakRss, _rss
from bench.goals import raw_write


def worker_peak(proc, stop) -> int:
    import psutil

    peak = 0
    p = psutil.Process(proc.pid)
    while not stop():
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.002)
    return peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dir", default=None, help="a directory on the disk to measure (default: a temp dir)")
    p.add_argument("--probe-only", action="store_true", help="only (e): the probe against the async stall")
    args = p.parse_args(argv)

    import threading

    import torch

    from examples.cpu_shim import stub_triton_only_modules

    stub_triton_only_modules()
    from megatron.core import dist_checkpointing

    from megatron_trt_ext import ExportConfig, Exporter
    from tests.support.models import init_single_process, tiny_llama

    init_single_process()
    kw = dict(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=16,
              num_query_groups=4, vocab_size=args.vocab, max_seq=4096, params_dtype=torch.bfloat16)
    model = tiny_llama(**kw)
    params = sum(p.numel() for p in model.parameters())
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="mte-bench-"))
    cfg = dict(vocab_size=args.vocab - 100, formats=["hf", "trtllm_checkpoint"], dtype="bfloat16")
    if args.probe_only:
        try:
            return probe_cost(model, params, work, cfg)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    try:
        # (a)+(d) sync
        sync = Exporter(model, ExportConfig(output_dir=str(work / "sync"), mode="sync", **cfg))
        base = _rss()
        with PeakRss() as peak:
            sync_result = sync.export(1)
        sync_extra = peak.peak - base
        nbytes = sync_result.bytes_written
        largest = max(u.nbytes for u in sync.units)

        # (a)+(d) async
        before = _rss()
        async_exp = Exporter(model, ExportConfig(output_dir=str(work / "async"), mode="async", **cfg))
        snapshot_extra = _rss() - before
        stop = {"v": False}
        holder = {}
        t = threading.Thread(target=lambda: holder.update(
            peak=worker_peak(async_exp._background.proc, lambda: stop["v"])))
        t.start()
        with PeakRss() as trainer_peak:
            base = _rss()
            running = async_exp.export(2)
            done = async_exp.wait()
        stop["v"] = True
        t.join()
        async_exp.close()
        assert done.ok, done.error

        # (b) raw write of the same bytes
        raw_s = raw_write(work, nbytes)

        # (c) offline route: save, load back into a fresh model, convert, write
        ckpt = work / "ckpt"
        ckpt.mkdir()
        t0 = time.perf_counter()
        dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
        save_s = time.perf_counter() - t0
        fresh = tiny_llama(**kw)
        t1 = time.perf_counter()
        state = dist_checkpointing.load(fresh.sharded_state_dict(), str(ckpt))
        fresh.load_state_dict(state, strict=False)
        load_s = time.perf_counter() - t1
        offline = Exporter(fresh, ExportConfig(output_dir=str(work / "offline"), mode="sync", **cfg))
        t2 = time.perf_counter()
        offline.export(3)
        offline_convert_s = time.perf_counter() - t2
        offline_s = save_s + load_s + offline_convert_s
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mib = 2 ** 20
    print(f"model: Llama-style, {params / 1e6:.0f}M parameters, bfloat16, single rank, CPU; export HF + "
          f"TensorRT-LLM checkpoint = {nbytes / mib:.0f} MiB; largest tensor {largest / mib:.0f} MiB\n")
    print("(a) training stall per export")
    print(f"    sync export                 {sync_result.timings['stall_s']:8.3f} s")
    print(f"    async export (snapshot)     {running.timings['stall_s']:8.3f} s   "
          f"= {running.timings['stall_s'] / sync_result.timings['stall_s']:.1%} of sync; "
          f"background total {done.timings['total_s']:.3f} s")
    print("(b) throughput")
    print(f"    export (sync)               {nbytes / mib / sync_result.timings['total_s']:8.0f} MiB/s")
    print(f"    raw write + fsync           {nbytes / mib / raw_s:8.0f} MiB/s   "
          f"-> export at {raw_s / sync_result.timings['total_s']:.0%} of raw write bandwidth")
    print("(c) against the offline route")
    print(f"    in-process export           {sync_result.timings['total_s']:8.3f} s")
    print(f"    offline: save {save_s:.2f} + load {load_s:.2f} + convert/write {offline_convert_s:.2f} "
          f"= {offline_s:.3f} s   -> in-process is {offline_s / sync_result.timings['total_s']:.1f}x faster "
          "(offline job start-up not counted)")
    print("(d) peak extra RSS")
    print(f"    sync export, trainer        {sync_extra / mib:8.0f} MiB  ({sync_extra / largest:.1f} x largest tensor)")
    print(f"    async, trainer snapshot     {snapshot_extra / mib:8.0f} MiB  (shared host buffers, allocated "
          f"once at attach; = this rank's weights)")
    print(f"    async, trainer during export{(trainer_peak.peak - base) / mib:8.0f} MiB")
    print(f"    async, worker process peak  {holder.get('peak', 0) / mib:8.0f} MiB RSS (shared snapshot pages "
          "included)")
    probe_s = running.timings.get("probe_s", done.timings.get("probe_s", 0.0))
    print("(e) verification probe (4 x 32 tokens, top-8), inside the async stall")
    print(f"    probe                       {probe_s:8.3f} s   = {probe_s / running.timings['stall_s']:.0%} of the "
          f"async stall, {probe_s / sync_result.timings['stall_s']:.1%} of the sync stall")
    return 0


def probe_cost(model, params: int, work: Path, cfg: dict, repeats: int = 2) -> int:
    """(e) alone: async exports with the probe on and off, the stall and the probe's part of it
    (median of ``repeats`` exports each; the first export of each exporter warms up)."""
    from statistics import median

    from megatron_trt_ext import ExportConfig, Exporter

    rows = {}
    for enabled in (True, False):
        exporter = Exporter(model, ExportConfig(output_dir=str(work / f"probe_{enabled}"), mode="async",
                                                keep_last=1, verification={"enabled": enabled}, **cfg))
        stalls, probes = [], []
        try:
            for i in range(repeats + 1):
                running = exporter.export(i + 1)
                assert exporter.wait().ok
                if i:
                    stalls.append(running.timings["stall_s"])
                    probes.append(exporter.last_result.timings.get("probe_s", 0.0))
        finally:
            exporter.close()
        rows[enabled] = (median(stalls), median(probes))
    (stall_on, probe_s), (stall_off, _) = rows[True], rows[False]
    print(f"model: Llama-style, {params / 1e6:.0f}M parameters, single rank, CPU; async export, median of {repeats}")
    print(f"(e) async stall with the probe  {stall_on:8.3f} s  (probe {probe_s:.3f} s = {probe_s / stall_on:.0%} "
          "of the stall)")
    print(f"    async stall, probe off      {stall_off:8.3f} s   -> the probe adds {stall_on - stall_off:.3f} s "
          f"({(stall_on - stall_off) / stall_off:+.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
