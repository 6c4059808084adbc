"""Goal 3: the async export's training stall against one plain copy of the rank's weights, and
the background export's CPU time beside the sync export's, in one run, interleaved rounds.

Per round: a plain copy of every weight into preallocated (already touched) host buffers; an
async export (the stall: until training may go on; on CUDA until the training stream is free,
since the snapshot copies run on a side stream that the training stream waits for), then its
background completion; a sync export of the same model. Medians over rounds. The exports run the
verification probe (on by default, sized by its rule); ``--probe-off`` adds, in each round, an
async export of a second exporter with the probe off, so the probe's share of the stall is
measured side by side (issue 22).

`stall_rounds` is shared with `bench.gpu_checks` (there the plain copy is device-to-host into
pinned memory).

    python -m bench.stall [--rounds 5] [--layers 16] [--dir D] [--probe-off]
    python -m bench.stall --layers 12 --hidden 768 --ffn 2048 --heads 12 --probe-off   # 125M
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from bench.goals import goal_line, median


def plain_copy(params: list, pinned: bool):
    """A function copying ``params`` into host buffers allocated (and touched) once."""
    import torch

    buffers = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pinned) for p in params]
    for b in buffers:
        b.zero_()
    on_cuda = any(p.device.type == "cuda" for p in params)

    def copy() -> float:
        t0 = time.perf_counter()
        for b, p in zip(buffers, params):
            b.copy_(p, non_blocking=on_cuda)
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return copy


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _async_round(exporter, iteration: int) -> tuple:
    """(stall s, background export s, its worker's CPU s, the result) of one async export."""
    import torch

    worker = exporter._background.proc.pid
    w0 = _cpu_of(worker)
    t0 = time.perf_counter()
    exporter.export(iteration)
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()  # the training stream waits for the snapshot
    stall = time.perf_counter() - t0
    done = exporter.wait()
    assert done.ok, done.error
    return stall, done.timings["total_s"], _cpu_of(worker) - w0, done


def stall_rounds(model, work: Path, rounds: int, vocab_size: int, formats=("hf", "trtllm_checkpoint"),
                 probe_off: bool = False) -> dict:
    """Interleaved rounds of plain copy / async export / (``probe_off``: async export without the
    probe) / sync export; every figure per round. The probe's time inside each stall is
    ``probe_s`` (the export's own timing)."""
    import torch

    from bench.probe_cost import probe_under_shim
    from megatron_trt_ext import ExportConfig, Exporter
    from megatron_trt_ext import manifest as mf

    cfg = dict(vocab_size=vocab_size, formats=list(formats), dtype="bfloat16")
    params = [p.detach() for p in model.parameters()]
    copy = plain_copy(params, pinned=torch.cuda.is_available())
    sync = Exporter(model, ExportConfig(output_dir=str(work / "sync"), mode="sync", **cfg))
    background = Exporter(model, ExportConfig(output_dir=str(work / "async"), mode="async", **cfg))
    without = (Exporter(model, ExportConfig(output_dir=str(work / "async-off"), mode="async",
                                            verification={"enabled": False}, **cfg)) if probe_off else None)
    out = {"copy_s": [], "stall_s": [], "probe_s": [], "background_s": [], "background_cpu_s": [], "sync_s": [],
           "sync_cpu_s": [], "snapshot_bytes": background._background.snapshot_bytes,
           "weight_bytes": sum(p.numel() * p.element_size() for p in params)}
    if probe_off:
        out.update(stall_probe_off_s=[], background_probe_off_s=[])
    for exporter in (sync, background):  # on CPU the probe's forward pass needs the shim (paused here)
        probe_under_shim(exporter)
    try:
        copy()  # warm-up of every path: first-touch of buffers, worker start-up
        for exporter in filter(None, (background, without)):
            exporter.export(0)
            warm = exporter.wait()
            assert warm.ok, warm.error
            if exporter is background:  # a failed probe is recorded, not raised: it would not be measured
                probe = mf.read_manifest(warm.path)["verification"]
                assert probe["status"] == "recorded", probe
                out["probe_shape"] = tuple(probe["probe_shape"])
        for i in range(1, rounds + 1):
            out["copy_s"].append(copy())
            stall, total, cpu, done = _async_round(background, i)
            out["stall_s"].append(stall)
            out["probe_s"].append(done.timings.get("probe_s", 0.0))
            out["background_s"].append(total)
            out["background_cpu_s"].append(cpu)
            if without is not None:
                stall, total, _, off = _async_round(without, i)
                out["stall_probe_off_s"].append(stall)
                out["background_probe_off_s"].append(total)
                shutil.rmtree(off.path, ignore_errors=True)
            c0, t0 = _cpu_self(), time.perf_counter()
            result = sync.export(i)
            out["sync_s"].append(time.perf_counter() - t0)
            out["sync_cpu_s"].append(_cpu_self() - c0)
            for r in (done, result):
                shutil.rmtree(r.path, ignore_errors=True)
    finally:
        background.close()
        if without is not None:
            without.close()
    return out


def report(figures: dict, device: str) -> list:
    m = {k: median(v) for k, v in figures.items() if isinstance(v, list)}
    gib = 2 ** 30
    print(f"{'round':>5} {'copy s':>7} {'stall s':>8} {'background s':>12} {'bg CPU s':>9} {'sync s':>7} {'sync CPU s':>10}")
    for i in range(len(figures["copy_s"])):
        print(f"{i + 1:>5} {figures['copy_s'][i]:>7.3f} {figures['stall_s'][i]:>8.3f} {figures['background_s'][i]:>12.2f} "
              f"{figures['background_cpu_s'][i]:>9.2f} {figures['sync_s'][i]:>7.2f} {figures['sync_cpu_s'][i]:>10.2f}")
    print(f"\nweights {figures['weight_bytes'] / gib:.2f} GiB, snapshot {figures['snapshot_bytes'] / gib:.2f} GiB; medians: "
          f"plain copy {m['copy_s']:.3f} s, stall {m['stall_s']:.3f} s; background export {m['background_s']:.2f} s "
          f"wall, {m['background_cpu_s']:.2f} s CPU; sync export {m['sync_s']:.2f} s wall, {m['sync_cpu_s']:.2f} s CPU")
    print(f"\nGoal 3 ({device}):")
    goals = [goal_line("async stall / plain copy of the same weights", m["stall_s"] / m["copy_s"], 1.2)]
    print(f"  the probe inside that stall: {m['probe_s']:.3f} s = {m['probe_s'] / m['copy_s']:.2f}x the plain copy "
          "(reported)")
    if "stall_probe_off_s" in m:
        off = m["stall_probe_off_s"] / m["copy_s"]
        goals.append(goal_line("async stall with the probe off / plain copy", off, 1.2))
        print(f"  stall probe on - off: {m['stall_s'] - m['stall_probe_off_s']:.3f} s = "
              f"{(m['stall_s'] - m['stall_probe_off_s']) / m['copy_s']:.2f}x the plain copy (reported)")
    print(f"  background export CPU / sync export CPU: {m['background_cpu_s'] / m['sync_cpu_s']:.2f} "
          f"({m['background_cpu_s']:.2f} s vs {m['sync_cpu_s']:.2f} s; reported, no target)")
    return goals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default=None)
    p.add_argument("--probe-off", action="store_true", help="also an async export with the probe off, each round")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import torch

    from examples.cpu_shim import function_mode_paused, stub_triton_only_modules

    stub_triton_only_modules()
    from tests.support.models import init_single_process, randomize, tiny_llama

    init_single_process()
    model = tiny_llama(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                       num_attention_heads=args.heads, num_query_groups=4, vocab_size=args.vocab, max_seq=4096,
                       params_dtype=torch.float32)
    randomize(model, seed=5)
    params = sum(p.numel() for p in model.parameters())
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="mte-stall-"))
    try:
        with function_mode_paused():
            figures = stall_rounds(model, work, args.rounds, vocab_size=args.vocab, probe_off=args.probe_off)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"model: Llama-style, {params / 1e6:.0f}M parameters, float32 live weights, bf16 export (HF + "
          f"TensorRT-LLM), one rank, CPU, torch {torch.__version__}; {args.rounds} interleaved rounds; probe "
          f"{' x '.join(map(str, figures['probe_shape']))} tokens\n")
    goals = report(figures, "CPU")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "goals": goals}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
