"""Benchmark: how long training waits at a save for each quantization recipe, beside bf16.

One process, a Llama-shaped model (about 150M parameters, float32 on this CPU machine), async
mode: the stall is what `Exporter.export` takes before training may go on (calibration, then
the snapshot copy into shared memory); conversion and writing happen in the background worker.
The verification probe is off, so the figures are calibration plus copy. Each recipe's stall is
reported as a ratio to the bf16 stall measured in the same run, and as its parts:

* ``calibration``: the statistics the recipe needs (none for weight-only formats; forward
  pre-hooks on the live model for max-calibrated ones; ModelOpt on a deep copy for SmoothQuant /
  AWQ, whose replica is then what the snapshot copies);
* and, for fp8's statistics alone: the hooks on the live model, the way this project gathered
  them before (ModelOpt's ``mtq.quantize`` on a deep copy: what the hooks replaced), and the bare
  forward passes.

    .venv/bin/python -m bench.quant_stall [--layers 8] [--samples 16] [--seq 256] [--repeat 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

RECIPES = [  # (label, quantization section or None, formats)
    ("bf16", None, ["hf"]),
    ("fp8_pb_wo (weights only)", {"algorithm": "fp8_pb_wo"}, ["hf"]),
    ("mxfp8 (weights only)", {"algorithm": "mxfp8"}, ["hf"]),
    ("w4a16_nvfp4 (weights only)", {"algorithm": "w4a16_nvfp4"}, ["hf"]),
    ("fp8 + fp8 KV (hooks)", {"algorithm": "fp8", "kv_cache": "fp8"}, ["hf"]),
    ("nvfp4 + fp8 KV (hooks)", {"algorithm": "nvfp4", "kv_cache": "fp8"}, ["hf"]),
    ("int8_sq (ModelOpt, replica)", {"algorithm": "int8_sq"}, ["trtllm_checkpoint"]),
    ("int4_awq (ModelOpt, replica)", {"algorithm": "int4_awq"}, ["hf"]),
]


def build(layers: int):
    import torch

    from tests.support.models import init_single_process, randomize, tiny_llama

    init_single_process()
    model = tiny_llama(vocab_size=32000, max_seq=512, num_layers=layers, hidden_size=1024, ffn_hidden_size=4096,
                       num_attention_heads=8, num_query_groups=8, kv_channels=128)
    randomize(model, seed=3)
    return model, sum(p.numel() for p in model.parameters()), torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="exports per recipe; the best is reported")
    args = parser.parse_args()
    from megatron_trt_ext import ExportConfig, Exporter

    model, params, torch = build(args.layers)
    calib = {"num_samples": args.samples, "seq_len": args.seq, "batch_size": 4}
    print(f"model: {params / 1e6:.0f}M parameters (float32), {args.layers} layers; calibration "
          f"{args.samples} x {args.seq} tokens; torch threads {torch.get_num_threads()}")
    rows = []
    for label, quant, formats in RECIPES:
        with tempfile.TemporaryDirectory() as out:
            quantization = dict(quant, calibration=calib) if quant else None
            exporter = Exporter(model, ExportConfig(output_dir=out, formats=formats, dtype="bfloat16", vocab_size=32000,
                                                    mode="async", verification={"enabled": False},
                                                    quantization=quantization))
            stalls = []
            for i in range(args.repeat):
                result = exporter.export(i + 1)
                stalls.append(result.timings["stall_s"])
                final = exporter.wait()
                assert final.ok, final.error
            exporter.close()
        rows.append((label, min(stalls)))
    alone = calibration_alone(model, calib, args.repeat)
    base = rows[0][1]
    print(f"\n{'recipe':34s} {'stall (s)':>10s} {'x bf16':>8s}")
    for label, stall in rows:
        print(f"{label:34s} {stall:10.2f} {stall / base:8.2f}")
    print("\nfp8 + fp8 KV statistics alone (best of %d):" % args.repeat)
    for label, seconds in alone.items():
        print(f"  {label:44s} {seconds:8.2f} s  {seconds / alone['forward passes only']:5.2f} x forward")


def calibration_alone(model, calib: dict, repeat: int) -> dict:
    """fp8's statistics the way this project gathers them (hooks on the live model) and the way it
    did before (ModelOpt's mtq.quantize on a deep copy), beside the bare forward passes."""
    import torch

    from megatron_trt_ext import ExportConfig, Exporter
    from megatron_trt_ext.forward import run_forward
    from megatron_trt_ext.quant.calibrate import _calibrate_live, _calibrate_replica, calibration_batches

    with tempfile.TemporaryDirectory() as out:
        exporter = Exporter(model, ExportConfig(output_dir=out, formats=["hf"], vocab_size=32000, mode="sync",
                                                verification={"enabled": False},
                                                quantization={"algorithm": "fp8", "kv_cache": "fp8",
                                                              "calibration": calib}))
        batches = calibration_batches(exporter.quant.calibration, None, exporter.vocab_size,
                                      torch.device("cpu"))
        local = exporter._local_shards(exporter.chunks)
        runs = {"forward passes only": lambda: run_forward(exporter.chunks, batches),
                "hooks on the live model (now)": lambda: _calibrate_live(
                    exporter.chunks, exporter.quant, exporter.info, local, batches, None, exporter.comm),
                "deep copy + mtq.quantize (before)": lambda: _calibrate_replica(
                    exporter.chunks, exporter.quant, exporter.info, batches, None)}
        best = {label: float("inf") for label in runs}
        for _ in range(repeat):
            for label, run in runs.items():
                t0 = time.perf_counter()
                run()
                best[label] = min(best[label], time.perf_counter() - t0)
    return best


if __name__ == "__main__":
    main()
