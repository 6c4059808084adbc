"""What the verification probe costs per model size (issue 22), beside one memory copy of the weights.

Per size (Llama-style, float32 live weights, a bf16 HF export, one rank), interleaved rounds of:

* ``copy``: a plain copy of every weight into preallocated host buffers (`bench.stall.plain_copy`;
  pinned, device-to-host on a GPU): what an async export's stall is held against;
* ``probe``: the exporter's own probe call (`Exporter._probe`, what each export runs while training
  waits) at the size the rule gives the model (`verification.spec.probe_size`); float32 weights and
  an unquantized export, so it rounds the weights to bf16 in place for the pass
  (`probe.rounded_to_export`) and computes in float32;
* ``probe_4x32``: the same at the probe's size before the rule (4 x 32 tokens);
* ``live``: the probe without the rounding (`run_probe` with no ``rounding``: the live weights);
* ``rounding``: entering and leaving `probe.rounded_to_export` alone (the copy of the rounded
  tensors, the rounding, the restore), no forward pass.

Medians, and each as a multiple of the copy.

    python -m bench.probe_cost [--sizes tiny,125m,350m] [--rounds 5] [--json F]

`measure` is shared with `bench.gpu_checks` (``--only probe_cost``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from bench.goals import median

SIZES = {  # name: (layers, hidden, ffn, heads, query groups, vocabulary); 125m/350m as bench.vs_modelopt
    "tiny": (2, 64, 96, 8, 2, 128),
    "125m": (12, 768, 2048, 12, 4, 32768),
    "350m": (24, 1024, 3072, 16, 4, 32768),
}


def build(size: str, device: str = "cpu", **override):
    """A Megatron-Core Llama of ``size`` (float32 weights) on ``device``; its vocabulary."""
    import torch

    from tests.support.models import randomize, tiny_llama

    layers, hidden, ffn, heads, groups, vocab = SIZES[size]
    model = tiny_llama(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                       num_query_groups=groups, vocab_size=vocab, max_seq=4096, params_dtype=torch.float32,
                       **override)
    if device == "cuda":
        model = model.cuda()
    randomize(model, seed=3)
    return model, vocab


@contextmanager
def shim_on():
    """The CPU shim's function mode on for a block, when the shim is installed and a bench paused
    it (`cpu_mode.function_mode_paused`, so its per-call overhead stays out of copies and writes):
    Megatron's layers ask for CUDA buffers in the forward pass, and without the shim the probe
    fails (recorded in the manifest, never raised). Nothing on a GPU."""
    import torch.overrides

    from megatron_trt_ext import cpu_mode

    mode = cpu_mode._state["mode"]
    if mode is None or mode in torch.overrides._get_current_function_mode_stack():
        yield
        return
    mode.__enter__()
    try:
        yield
    finally:
        mode.__exit__(None, None, None)


def probe_under_shim(exporter) -> None:
    """``exporter``'s probe (every export's, sync and async) run under `shim_on`."""
    original = exporter._probe

    def probe(batches):
        with shim_on():
            return original(batches)

    exporter._probe = probe


def rounded_copy_bytes(chunks: list, rounding) -> int:
    """Bytes `probe.rounded_to_export` holds while the probe runs: a copy of each tensor it rounds
    (float32 views not kept in float32 by the export; overlapping views once per view, as it does)."""
    import torch

    from megatron_trt_ext.plan import local_shards

    return sum(piece.tensor.numel() * piece.tensor.element_size()
               for name, pieces in local_shards(chunks, rounding.rename).items() if name not in rounding.keep
               for piece in pieces
               if piece.tensor.dtype in (torch.float32, torch.float64) and piece.tensor.dtype != rounding.dtype)


def _timer(cuda: bool):
    import torch

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    return timed


def measure(model, vocab_size: int, rounds: int, work: Path) -> dict:
    """Interleaved rounds of the five candidates above on ``model``; every figure per round."""
    import torch

    from bench.stall import plain_copy
    from megatron_trt_ext import ExportConfig, Exporter
    from megatron_trt_ext.verification import probe as probe_mod
    from megatron_trt_ext.verification.spec import VerificationOptions, probe_size

    cuda = any(p.is_cuda for p in model.parameters())
    params = [p.detach() for p in model.parameters()]
    exporter = Exporter(model, ExportConfig(output_dir=str(work), vocab_size=vocab_size, formats=["hf"],
                                            dtype="bfloat16", mode="sync"))
    probe_under_shim(exporter)
    rule = exporter.probe_options
    count = probe_mod.parameter_count(exporter.units)
    size = probe_size(rule, count, exporter.info.max_position_embeddings)
    rounding = probe_mod.Rounding(torch.bfloat16, exporter.rename, exporter.job.keep_source)
    copy, timed = plain_copy(params, pinned=cuda), _timer(cuda)

    def probe(options):
        exporter.probe_options = options
        record = exporter._probe(None)
        assert record.ok, record.meta.get("error")
        return record

    def live():
        with shim_on():
            record = probe_mod.run_probe(exporter.chunks, rule, vocab_size, exporter.info.padded_vocab_size,
                                         exporter.comm, str(params[0].dtype)[6:], parameters=count,
                                         max_positions=exporter.info.max_position_embeddings)
        assert record.ok and record.meta["reference"] == probe_mod.LIVE, record.meta

    def rounding_only():
        with probe_mod.rounded_to_export(exporter.chunks, rounding):
            pass

    candidates = {"copy": copy, "probe": lambda: probe(rule), "probe_4x32":
                  lambda: probe(VerificationOptions(num_sequences=4, seq_len=32)), "live": live,
                  "rounding": rounding_only}
    if cuda:  # device memory the probe adds at its peak (activations, the rounding's copy)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    first = probe(rule)  # float32 weights: as exported (rounded); bf16 weights: live, nothing to round
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    rounds_weights = first.meta["reference"] == probe_mod.AS_EXPORTED
    if not rounds_weights:  # bf16 weights: the probe rounds nothing
        del candidates["rounding"]
    saved_bytes = rounded_copy_bytes(exporter.chunks, rounding) if rounds_weights else 0
    for fn in candidates.values():  # warm-up
        fn()
    out = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            out[name].append(copy() if name == "copy" else timed(fn))
    exporter.probe_options = rule
    return {"parameters": count, "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "rule_shape": [size.num_sequences, size.seq_len], "forward_flops": size.record()["forward_flops"],
            "rounding_copy_bytes": saved_bytes, "probe_peak_device_bytes": peak, "reference": first.meta["reference"],
            "torch_threads": torch.get_num_threads(), "figures": out,
            "median": {name: median(v) for name, v in out.items()},
            "over_copy": {name: median(v) / median(out["copy"]) for name, v in out.items()}}


def report(size: str, r: dict) -> None:
    m, x = r["median"], r["over_copy"]
    n, s = r["rule_shape"]
    print(f"{size}: {r['parameters'] / 1e6:.1f}M parameters, {r['weight_bytes'] / 2**20:.0f} MiB of weights, rule "
          f"{n} x {s} tokens ({r['forward_flops'] / 1e9:.1f} GFLOP), reference {r['reference']} (the rounding "
          f"holds a {r['rounding_copy_bytes'] / 2**20:.0f} MiB copy), "
          f"{r['torch_threads']} torch threads")
    for name in r["figures"]:
        rounds = ", ".join(f"{v:.3f}" for v in r["figures"][name])
        print(f"  {name:<11} {m[name]:8.3f} s  {x[name]:6.2f}x copy   rounds {rounds}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda v: v.split(","), default=list(SIZES), help=f"of {sorted(SIZES)}")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default=None)
    p.add_argument("--json")
    args = p.parse_args(argv)
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown {unknown}; choose from {sorted(SIZES)}")

    import torch

    from examples.cpu_shim import function_mode_paused, stub_triton_only_modules

    stub_triton_only_modules()
    from tests.support.models import init_single_process

    init_single_process()
    print(f"CPU, torch {torch.__version__}, {args.rounds} interleaved rounds, bf16 HF export of float32 weights\n")
    results = {}
    for size in args.sizes:
        model, vocab = build(size)
        work = Path(tempfile.mkdtemp(dir=args.dir, prefix="mte-probe-cost-"))
        try:
            with function_mode_paused():
                results[size] = measure(model, vocab, args.rounds, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report(size, results[size])
        del model
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
