"""Benchmark: live export from a TP2 x PP2 training layout (4 gloo ranks on CPU).

Reports, per rank, the export time and the peak extra host memory (RSS above the level before
the export) as a multiple of the largest single tensor of the model, for a ~300M-parameter
Llama-style model in bfloat16.

    .venv/bin/python -m bench.distributed_export [--layers 16] [--hidden 1024]

Goal 2 of issue #13: every rank's peak extra memory <= 2x the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time

from bench.goals import goal_line


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRss:
    """Samples this process's RSS every few milliseconds in a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def bench_rank(rank: int, world_size: int, out: str, model_kw: dict, layout: dict, repeats: int) -> dict:
    import gc

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_trt_ext import ExportConfig, Exporter
    from tests.support.workers import build

    ps.initialize_model_parallel(layout["tp"], layout["pp"])
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    model = build("llama", **layout, **model_kw)[0]
    params = sum(p.numel() for p in model.parameters())
    exporter = Exporter(model, ExportConfig(output_dir=out, vocab_size=model_kw["vocab_size"] - 100,
                                            inference_tp=2, timeout_s=600))
    largest = max(u.nbytes for u in exporter.units)
    runs = []
    for i in range(repeats):
        gc.collect()
        base = _rss()
        t0 = time.perf_counter()
        with PeakRss() as peak:
            result = exporter.export(iteration=i + 1)
        runs.append({"seconds": time.perf_counter() - t0, "peak_extra_bytes": peak.peak - base,
                     "bytes_written": result.bytes_written, "stages": result.timings})
    return {"rank": rank, "local_params": params, "largest_tensor_bytes": largest, "runs": runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    import torch

    from tests.support.distributed import run_ranks

    model_kw = dict(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                    num_attention_heads=args.heads, num_query_groups=args.groups, vocab_size=args.vocab,
                    max_seq=4096, params_dtype=torch.bfloat16)
    layout = {"tp": 2, "pp": 2}
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_ranks(4, "bench.distributed_export:bench_rank", timeout_s=3000, out=tmp,
                            model_kw=model_kw, layout=layout, repeats=args.repeats)
    failed = {r: v for r, v in outcome.items() if v[0] != "ok"}
    if failed:
        print(json.dumps(failed, indent=2, default=str))
        return 1
    ranks = [outcome[r][1] for r in sorted(outcome)]
    total_params = sum(r["local_params"] for r in ranks)
    largest = ranks[0]["largest_tensor_bytes"]
    print(f"TP2 x PP2 (4 gloo ranks, CPU), Llama-style, about {total_params / 1e6:.0f}M parameters "
          f"(sum over ranks, bf16); largest tensor {largest / 2**20:.1f} MiB; "
          f"export: HF + TensorRT-LLM TP2, bf16\n")
    print(f"{'rank':>4}  {'run':>3}  {'seconds':>7}  {'peak extra MiB':>14}  {'x largest tensor':>16}  "
          f"{'gather_s':>8}  {'convert_s':>9}  {'write_s':>7}")
    for r in ranks:
        for i, run in enumerate(r["runs"]):
            st = run["stages"]
            print(f"{r['rank']:>4}  {i:>3}  {run['seconds']:>7.2f}  {run['peak_extra_bytes'] / 2**20:>14.1f}  "
                  f"{run['peak_extra_bytes'] / largest:>16.2f}  {st['gather_s']:>8.2f}  {st['convert_s']:>9.2f}  "
                  f"{st['write_s']:>7.2f}")
    written = ranks[0]["runs"][-1]["bytes_written"]
    print(f"\nbytes written per export: {written / 2**20:.0f} MiB")
    print("\nGoal 2 (peak extra memory of every rank, every export, as a multiple of the largest tensor):")
    worst = max((run["peak_extra_bytes"] / largest, r["rank"]) for r in ranks for run in r["runs"])
    goal_line(f"worst rank ({worst[1]}): peak extra RSS / largest tensor", worst[0], 2.0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": ranks, "model": model_kw | {"params_dtype": "bfloat16"}}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
