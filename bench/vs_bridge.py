"""Sync HF export time and CPU time against Megatron-Bridge's own HF export of the same live model.

One process, Llama-style models of 125M and 350M parameters (fp32 live weights, bf16 output, the
same models as bench/vs_modelopt.py), interleaved rounds per size in a shuffled order per round;
every candidate writes a fresh directory and is timed until its bytes are fsynced:

* ours: ``Exporter(..., formats=["hf"], dtype="bfloat16", mode="sync")`` with the verification
  probe off (finite checks and checksums on, as by default), timed around ``export(i)``;
* Megatron-Bridge 0.6.2: ``AutoBridge.from_hf_config(LlamaConfig(...))`` (a config matching the
  Megatron model; no HF weights or tokenizer anywhere), then ``save_hf_pretrained([model], dir,
  weight_dtype=torch.bfloat16, show_progress=False)``, which writes config.json and the bf16
  safetensors; then an fsync of every file it wrote (Bridge itself does not fsync), inside the
  timed region. Bridge is imported on the CPU with the test stand-ins of tests/support/bridge_shim.py.

Measured per export: wall seconds (perf_counter) and CPU seconds of this process, all threads
(getrusage RUSAGE_SELF user + system; the kernel's writeback threads are not counted). Medians over
the rounds; the ratios of medians "ours CPU / Bridge CPU" (target <= 1.0x) and "ours wall / Bridge
wall" (reported). Before timing, one untimed run of each: both outputs are loaded back and every
tensor compared bit for bit under its HF name (names that differ are printed). ``--dir D`` writes on
D's disk (default: a temp dir), ``--json F`` also writes the figures to F, ``--sizes debug`` is a
2-layer model for trying the script out.

    PYTHONPATH=.:.venv/bridge-0.6.2:.venv/mcore-0.19.2 python -m bench.vs_bridge [--rounds 5] [--sizes 125m,350m]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.goals import (compare_dirs, fsync_tree, goal_line, interleaved, llama_bench_parser, llama_heading, llama_model,
                         median, parse_llama_args, run_sizes, scratch_dir)

def llama_config(model, vocab: int):
    """The transformers LlamaConfig of the Megatron model (what Bridge's Llama mapping reads)."""
    from transformers import LlamaConfig

    cfg = model.config
    return LlamaConfig(
        architectures=["LlamaForCausalLM"], hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.kv_channels, vocab_size=vocab,
        rms_norm_eps=cfg.layernorm_epsilon, rope_theta=float(model.rotary_base),
        max_position_embeddings=model.max_position_embeddings, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, hidden_act="silu", torch_dtype="bfloat16")


class Candidates:
    """The two timed exports. Each call writes a fresh directory and returns seconds (fsync included)."""

    def __init__(self, model, work: Path, vocab: int):
        import importlib

        from megatron.bridge.models.conversion.auto_bridge import AutoBridge

        importlib.import_module("megatron.bridge.models.llama.llama_bridge")  # registers LlamaForCausalLM -> GPTModel

        from megatron_trt_ext import ExportConfig, Exporter

        self.model, self.work, self.iteration = model, work, 0
        self.ours = Exporter(model, ExportConfig(output_dir=str(work / "ours_hf"), formats=["hf"], vocab_size=vocab,
                                                 dtype="bfloat16", mode="sync", verification={"enabled": False}))
        self.bridge = AutoBridge.from_hf_config(llama_config(model, vocab))
        self.bytes = {}

    def run(self, name: str) -> float:
        import torch

        self.iteration += 1
        if name == "ours_hf":
            t0 = time.perf_counter()
            result = self.ours.export(self.iteration)
            seconds = time.perf_counter() - t0
            assert result.ok, result.error
            self.last_path, self.hf_dir = result.path, result.path / "hf"
        else:
            target = self.work / f"bridge_hf_{self.iteration}"
            t0 = time.perf_counter()
            self.bridge.save_hf_pretrained([self.model], str(target), show_progress=False, weight_dtype=torch.bfloat16)
            fsync_tree(target)
            seconds = time.perf_counter() - t0
            self.last_path = self.hf_dir = target
        self.bytes[name] = sum(p.stat().st_size for p in self.hf_dir.rglob("*") if p.is_file())
        return seconds

    def cleanup(self) -> None:
        shutil.rmtree(self.last_path, ignore_errors=True)

    def warm_up(self) -> dict:
        """One untimed run of each; Bridge's tensors compared with ours, and the files each wrote."""
        self.run("ours_hf")
        ours_dir, ours_files = self.hf_dir, sorted(p.name for p in self.hf_dir.iterdir())
        self.run("bridge_hf")
        same = compare_dirs(ours_dir, self.hf_dir)
        same["files"] = {"ours_hf": ours_files, "bridge_hf": sorted(p.name for p in self.hf_dir.iterdir())}
        self.cleanup()
        shutil.rmtree(ours_dir.parent, ignore_errors=True)
        return same


def run_size(size: str, args) -> dict:
    """Build one model, run the interleaved rounds; its figures as a dict (printed as it goes)."""
    model, params = llama_model(size, args.vocab)
    with scratch_dir(args.dir, "mte-vs-bridge-") as work:
        c = Candidates(model, work, vocab=args.vocab)
        same = c.warm_up()
        print(f"\n{size}: Bridge's tensors vs ours ({same['tensors']} tensors, Bridge wrote {same['dtypes']}): "
              f"{'identical, bit for bit' if same['identical'] else 'DIFFERENT'}")
        for key in ("differ", "only_ours", "only_theirs"):
            if same[key]:
                print(f"  {key}: {', '.join(same[key])}")
        print(f"  files: ours {same['files']['ours_hf']}; Bridge {same['files']['bridge_hf']}")
        names = ["ours_hf", "bridge_hf"]
        times, cpu = interleaved(names, args.rounds, c.run, after=lambda name: c.cleanup())

    med = {k: median(v) for k, v in times.items()}
    med_cpu = {k: median(v) for k, v in cpu.items()}
    mib = 2 ** 20
    print(f"\n{llama_heading(size, params, args.rounds)}\n")
    print(f"{'candidate':<12} {'wall s':>7} {'CPU s':>6}  {'MiB':>5}  {'rounds wall (s) / CPU (s)':<40}")
    for name in names:
        print(f"{name:<12} {med[name]:7.3f} {med_cpu[name]:6.2f}  {c.bytes[name] / mib:5.0f}  "
              f"{' '.join(f'{t:.2f}' for t in times[name])} / {' '.join(f'{t:.2f}' for t in cpu[name])}")
    print(f"\ngoal at {size} (ratios of medians from this run):")
    goals = [goal_line("CPU s: ours sync HF / Bridge save_hf_pretrained", med_cpu["ours_hf"] / med_cpu["bridge_hf"],
                       1.0)]
    wall = med["ours_hf"] / med["bridge_hf"]
    print(f"  {'wall s: ours sync HF / Bridge save_hf_pretrained':<58} {wall:7.2f}x   (reported)")
    return {"times": times, "cpu_s": cpu, "medians": med, "cpu_medians": med_cpu, "bytes": c.bytes,
            "goals": goals, "wall_ratio": wall, "same_tensors": same, "params": params}


def main(argv=None) -> int:
    p = llama_bench_parser(__doc__)
    args = parse_llama_args(p, argv)

    from tests.support.bridge_shim import install as install_bridge_shim
    from tests.support.models import init_single_process

    install_bridge_shim()  # Bridge importable on the CPU (its package __init__ skipped, inert stand-ins)
    init_single_process()
    from megatron.bridge.package_info import __version__ as bridge_version

    return run_sizes(args, run_size, f", Megatron-Bridge {bridge_version.split('+')[0]}")


if __name__ == "__main__":
    raise SystemExit(main())
