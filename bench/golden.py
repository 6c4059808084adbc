"""Fingerprints of the deployable outputs of every test model, to show that a refactor leaves them
unchanged (issue 18: "exports equal, tensor for tensor and config for config, the ones before").

    python -m bench.golden --out before.json      # on the old tree
    python -m bench.golden --out after.json       # on the new tree
    python -m bench.golden --compare before.json after.json

Each case builds a tiny model of one family with fixed seeds, exports it single-rank (probe off) in
bf16 (HF and, where the family has one, TensorRT-LLM) and in the quantized recipes listed, and
records, for the deployable outputs (``hf/`` and ``trtllm_checkpoint/``), the sha256 of every
tensor's bytes, its dtype and shape, and every JSON config file (the manifest and the side files
for `verify` are left out: they hold timings, paths and fingerprints).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [
    # (family, recipe or None, formats)
    ("llama", None, ["hf", "trtllm_checkpoint"]),
    ("llama", "fp8", ["hf", "trtllm_checkpoint"]),
    ("llama", "nvfp4", ["hf", "trtllm_checkpoint"]),
    ("llama", "w4a16_nvfp4", ["hf"]),
    ("llama", "int8_sq", ["trtllm_checkpoint"]),
    ("llama", "fp8_pc_pt", ["hf", "trtllm_checkpoint"]),
    ("gpt", None, ["hf", "trtllm_checkpoint"]),
    ("mixtral", None, ["hf", "trtllm_checkpoint"]),
    ("mixtral", "fp8", ["hf", "trtllm_checkpoint"]),
    ("qwen3", None, ["hf", "trtllm_checkpoint"]),
    ("nemotron", None, ["hf"]),
    ("starcoder2", None, ["hf"]),
    ("gemma", None, ["hf"]),
    ("qwen3_moe", None, ["hf"]),
    ("qwen3_moe", "nvfp4", ["hf"]),
    ("deepseek", None, ["hf"]),
    ("deepseek", "fp8", ["hf"]),
    ("gpt_oss", None, ["hf"]),
    ("hybrid", None, ["hf"]),
    ("nemotron_h", None, ["hf"]),
]


def _support():
    try:
        from examples import cpu_shim
        from tests.support import models, workers
    except ImportError:  # the tree before issue 18
        from megatron_trt_ext.testing import cpu_shim, models, workers
    cpu_shim.stub_triton_only_modules()  # before megatron.core is imported (0.19 imports Triton)
    return models, workers


def _fingerprint(root: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if not path.is_file() or path.relative_to(root).parts[0] not in ("hf", "trtllm_checkpoint"):
            continue
        if path.suffix == ".json":
            out[rel] = json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            tensors = {}
            with safe_open(str(path), framework="pt") as f:
                for name in sorted(f.keys()):
                    t = f.get_tensor(name).contiguous()
                    raw = t.reshape(-1).view(torch.uint8)
                    tensors[name] = [str(t.dtype), list(t.shape), hashlib.sha256(raw.numpy().tobytes()).hexdigest()]
            out[rel] = tensors
    return out


def run(out: str, only: list | None) -> None:
    from megatron_trt_ext import ExportConfig, Exporter

    models, workers = _support()
    models.init_single_process()
    results = {}
    for family, recipe, formats in CASES:
        key = f"{family}/{recipe or 'bf16'}"
        if only and key not in only:
            continue
        torch.manual_seed(0)
        try:
            model = workers.BUILDERS[family]()
        except Exception as exc:  # a family this megatron-core cannot build (HybridModel < 0.19)
            results[key] = {"skipped": f"{type(exc).__name__}: {exc}"[:200]}
            print(f"{key}: skipped ({type(exc).__name__})", flush=True)
            continue
        models.randomize(model, seed=1)
        with tempfile.TemporaryDirectory() as tmp:
            kw = dict(output_dir=tmp, formats=formats, vocab_size=120, mode="sync", verification={"enabled": False})
            if recipe:
                cfg = ExportConfig.from_yaml(str(ROOT / "recipes" / f"{recipe}.yaml"), **kw)
            else:
                cfg = ExportConfig(dtype="bfloat16", **kw)
            try:
                result = Exporter(model, cfg).export(iteration=1)
                results[key] = _fingerprint(Path(result.path))
                print(f"{key}: {sum(len(v) for v in results[key].values())} entries", flush=True)
            except Exception as exc:
                results[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"{key}: error {type(exc).__name__}: {exc}"[:300], flush=True)
    Path(out).write_text(json.dumps(results, indent=1, sort_keys=True))


def compare(before: str, after: str) -> int:
    a, b = json.loads(Path(before).read_text()), json.loads(Path(after).read_text())
    bad = 0
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            bad += 1
            print(f"DIFFERS: {key}")
            for f in sorted(set(a.get(key, {})) | set(b.get(key, {}))):
                if a.get(key, {}).get(f) != b.get(key, {}).get(f):
                    print(f"   {f}")
        else:
            print(f"equal: {key}")
    print(f"{len(set(a) | set(b)) - bad} equal, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--only", nargs="*")
    p.add_argument("--compare", nargs=2)
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    run(args.out, args.only)
