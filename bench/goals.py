"""Shared helpers of the benchmarks: medians, fsync of what another tool wrote, and one printed
line per goal with its target beside it, so every bench reports the same way."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path


def median(values) -> float:
    return statistics.median(values)


def raw_write(directory: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    """Seconds to write and fsync ``nbytes`` to a new file in ``directory``: plain sequential
    64 MiB writes, then one fsync, the way any tool writes one file (the data is made before the
    clock starts)."""
    block = os.urandom(min(chunk, max(nbytes, 1)))
    path = Path(directory) / "raw_write.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[:min(len(block), left)])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory`` and the directories themselves: what our exports do
    before they count as written, applied to another tool's output for a fair comparison."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def goal_line(label: str, value: float, target: float, lower_is_better: bool = True, unit: str = "x") -> dict:
    """Print ``label: value (target <= / >= target): holds | DOES NOT HOLD``; return it as a dict."""
    holds = value <= target if lower_is_better else value >= target
    sign = "<=" if lower_is_better else ">="
    print(f"  {label:<58} {value:7.2f}{unit}   target {sign} {target:.2f}{unit}   "
          f"{'holds' if holds else 'DOES NOT HOLD'}")
    return {"goal": label, "value": value, "target": f"{sign} {target}", "holds": holds}


# The Llama-style models the export benches compare on: name -> (layers, hidden, ffn, heads,
# query groups); vocabulary from the command line (32768 by default), GQA.
LLAMA_SIZES = {
    "125m": (12, 768, 2048, 12, 4),
    "350m": (24, 1024, 3072, 16, 4),
    "debug": (2, 256, 512, 4, 2),  # for trying a bench out, not for figures
}


def llama_model(size: str, vocab: int):
    """(model, parameter count) of a `LLAMA_SIZES` model with float32 weights, randomized (seed 3)."""
    import torch

    from tests.support.models import randomize, tiny_llama

    layers, hidden, ffn, heads, groups = LLAMA_SIZES[size]
    model = tiny_llama(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                       num_query_groups=groups, vocab_size=vocab, max_seq=4096, params_dtype=torch.float32)
    randomize(model, seed=3)
    return model, sum(p.numel() for p in model.parameters())


def cpu_seconds() -> float:
    """CPU time of this process, all threads (the kernel's writeback threads are not counted)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def interleaved(names: list, rounds: int, run_one, after=None) -> tuple:
    """``rounds`` rounds of ``run_one(name) -> seconds`` over ``names``, in a different shuffled
    order every round (seeded), ``after(name)`` (not counted) behind each; returns
    ({name: [seconds]}, {name: [CPU seconds]})."""
    import random

    times: dict = {}
    cpu: dict = {}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        for name in order:
            c0 = cpu_seconds()
            seconds = run_one(name)
            cpu.setdefault(name, []).append(cpu_seconds() - c0)
            times.setdefault(name, []).append(seconds)
            if after is not None:
                after(name)
    return times, cpu


def compare_dirs(ours: Path, theirs: Path) -> dict:
    """Two safetensors directories compared bit for bit, tensor by tensor under their names:
    ``identical``, the tensor count, names that ``differ`` (dtype, shape or bytes), names found
    only in one (``only_ours``, ``only_theirs``) and the dtypes ``theirs`` wrote."""
    import torch

    a, b = safetensors_dir(ours), safetensors_dir(theirs)
    differ = sorted(k for k in set(a) & set(b)
                    if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]))
    only_ours, only_theirs = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    return {"identical": not (differ or only_ours or only_theirs), "tensors": len(a), "differ": differ,
            "only_ours": only_ours, "only_theirs": only_theirs, "dtypes": sorted({str(t.dtype) for t in b.values()})}


@contextlib.contextmanager
def scratch_dir(parent, prefix: str):
    """A fresh directory under ``parent`` (None: the system's temp dir), removed afterwards."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def safetensors_dir(directory: Path) -> dict:
    """Every tensor of every safetensors file under ``directory``."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(directory).rglob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def llama_heading(size: str, params: int, rounds: int) -> str:
    """The line that opens a `LLAMA_SIZES` model's figures."""
    layers, hidden, ffn, heads, groups = LLAMA_SIZES[size]
    return (f"== {size}: Llama-style, {params / 1e6:.0f}M parameters ({layers} layers, hidden {hidden}, FFN {ffn}, "
            f"GQA {heads}/{groups}), float32 live weights, bfloat16 export; {rounds} interleaved rounds, medians, "
            "fsync included for every candidate")


def run_sizes(args, run_size, versions: str = "") -> int:
    """Every ``args.sizes`` through ``run_size(size, args)`` with the CPU shim's function mode
    paused (its per-call overhead stays out of the timings), between a line on the machine and
    one on its load at the end; the figures also to ``args.json`` when given."""
    import json

    import megatron.core
    import torch

    from examples.cpu_shim import function_mode_paused

    print(f"CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start); torch {torch.__version__}, megatron-core "
          f"{megatron.core.__version__.split('+')[0]}{versions}")
    figures = {}
    with function_mode_paused():
        for size in args.sizes:
            figures[size] = run_size(size, args)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def llama_bench_parser(doc: str):
    """The options every `LLAMA_SIZES` bench takes (--sizes, --vocab, --rounds, --dir, --json);
    parse with `parse_llama_args`."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda v: v.split(","), default=["125m", "350m"], help=f"of {sorted(LLAMA_SIZES)}")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default=None, help="a directory on the disk to measure (default: a temp dir)")
    p.add_argument("--json", help="also write the figures to this file")
    return p


def parse_llama_args(p, argv):
    """``p``'s arguments, refusing sizes `LLAMA_SIZES` does not have; then the CPU stand-in for
    Megatron-Core's Triton-only modules, which must come before ``megatron.core`` is imported."""
    args = p.parse_args(argv)
    unknown = [s for s in args.sizes if s not in LLAMA_SIZES]
    if unknown:
        p.error(f"--sizes: unknown {unknown}; choose from {sorted(LLAMA_SIZES)}")
    from examples.cpu_shim import stub_triton_only_modules

    stub_triton_only_modules()
    return args
