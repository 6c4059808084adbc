"""Every check that needs a GPU, in one script (run by hand in a GPU session, never in CI).

    python -m bench.gpu_checks --only stall --out results.json
    python -m bench.gpu_checks --list

Each check is a function registered with ``@check("name")``: it gets a `Context` (device, sizes,
a scratch directory) and returns a JSON-able dict; the script writes ``{"device", "dry_run",
"checks": {name: result}}``. To add one, write a function below and register it.

Without CUDA the script runs a **dry run**: the same code paths on the CPU with tiny sizes, so the
script itself is exercised (and its JSON produced) before a GPU session spends its minutes on it.
Dry-run figures say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CHECKS: dict = {}


def check(name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        CHECKS[name] = fn
        return fn
    return register


@dataclass
class Context:
    device: str          # "cuda" or "cpu"
    dry_run: bool        # no CUDA: tiny sizes, CPU
    work: Path           # scratch directory on the disk to measure
    rounds: int
    model_size: dict = field(default_factory=dict)

    def describe_device(self) -> str:
        import torch

        if self.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
        return f"CPU (dry run, no CUDA), torch {torch.__version__}"


# Sizes: on a GPU a model that fits a few minutes of work (~1.5B parameters in bf16); on the CPU a toy.
GPU_LLAMA = dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
                 vocab_size=128256)
DRY_RUN_LLAMA = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8, num_query_groups=2,
                     vocab_size=512)


def build_llama(ctx: Context):
    """A Megatron-Core Llama on ``ctx.device`` with bf16 weights (a one-rank world)."""
    import torch

    from examples.cpu_shim import stub_triton_only_modules

    stub_triton_only_modules()
    from tests.support.models import init_single_process, randomize, tiny_llama

    init_single_process()
    model = tiny_llama(max_seq=4096, params_dtype=torch.bfloat16, **ctx.model_size)
    if ctx.device == "cuda":
        model = model.cuda()
    randomize(model, seed=11)
    return model


@check("stall")
def stall(ctx: Context) -> dict:
    """Async export stall (until the training stream is free) vs a plain device-to-host copy of
    the same weights into pinned memory, and the sync export time (HF + TensorRT-LLM, bf16)."""
    from bench.stall import stall_rounds
    from examples.cpu_shim import function_mode_paused

    model = build_llama(ctx)
    vocab = ctx.model_size["vocab_size"]
    with function_mode_paused():
        figures = stall_rounds(model, ctx.work, ctx.rounds, vocab_size=vocab)
    med = {k: sorted(v)[len(v) // 2] for k, v in figures.items() if isinstance(v, list)}
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "figures": figures,
        "median": med,
        "stall_over_copy": med["stall_s"] / med["copy_s"],
        "target_stall_over_copy": 1.2,
        "holds": med["stall_s"] / med["copy_s"] <= 1.2,
    }


@check("probe_cost")
def probe_cost(ctx: Context) -> dict:
    """The verification probe at its rule's size (`bench.probe_cost.measure`) against a plain
    device-to-host copy of the same weights into pinned memory: bf16 weights (a live reference) and
    float32 weights (rounded to bf16 in place for the pass: the rounding's copy measured alone)."""
    import torch

    from bench.probe_cost import measure
    from examples.cpu_shim import function_mode_paused, stub_triton_only_modules

    stub_triton_only_modules()
    from tests.support.models import init_single_process, randomize, tiny_llama

    init_single_process()
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("float32", torch.float32)):
        model = tiny_llama(max_seq=4096, params_dtype=dtype, **ctx.model_size)
        if ctx.device == "cuda":
            model = model.cuda()
        randomize(model, seed=11)
        with function_mode_paused():
            r = measure(model, ctx.model_size["vocab_size"], ctx.rounds, ctx.work / f"probe-{name}")
        out[name] = {k: r[k] for k in ("parameters", "weight_bytes", "rule_shape", "forward_flops", "reference",
                                       "rounding_copy_bytes", "probe_peak_device_bytes", "median", "over_copy")}
        del model
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    return out


QUANT_LLAMA = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                   kv_channels=64)


def _quant_models(ctx: Context) -> dict:
    """A tiny Llama and a tiny MoE (Mixtral-style, 4 experts top-2), float32, on the device."""
    from examples.cpu_shim import stub_triton_only_modules

    stub_triton_only_modules()
    from tests.support.models import init_single_process, randomize, tiny_llama

    init_single_process()
    models = {"llama": tiny_llama(**QUANT_LLAMA), "moe": tiny_llama(moe=True, **QUANT_LLAMA)}
    for seed, model in enumerate(models.values()):
        randomize(model, seed=20 + seed)
        if ctx.device == "cuda":
            model.cuda()
    return models


@check("quant_nvfp4_mxfp8")
def quant_nvfp4_mxfp8(ctx: Context) -> dict:
    """NVFP4 and MXFP8 calibration + export end to end on the device, tiny Llama and tiny MoE:
    logits of the exported checkpoint dequantized (transformers, float32) against ModelOpt's
    fake-quantized Megatron model with weight quantization (its NVFP4/MXFP8 kernels need CUDA;
    the dry run exports and dequantizes only)."""
    import torch

    from megatron_trt_ext import ExportConfig, Exporter
    from megatron_trt_ext.quant.dequant import load_dequantized
    from tests.support.models import megatron_logits
    from tests.support.oracle import modelopt_fake_quant

    out = {}
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(4))
    for name, model in _quant_models(ctx).items():
        for algo in ("nvfp4", "mxfp8"):
            t0 = time.perf_counter()
            exporter = Exporter(model, ExportConfig(
                output_dir=str(ctx.work / f"{name}_{algo}"), formats=["hf"], dtype="bfloat16", mode="sync",
                verification={"enabled": False}, quantization={"algorithm": algo, "calibration": {
                    "num_samples": 8, "seq_len": 64, "batch_size": 4}}))
            result = exporter.export(1)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                got = load_dequantized(result.path / "hf")(tokens).logits.float()
            row = {"export_s": seconds, "ok": result.ok}
            if ctx.device == "cuda":
                reference = modelopt_fake_quant(model, exporter, weight_only=True)
                want = megatron_logits(reference, tokens.cuda()).float().cpu()[..., :got.shape[-1]]
                rel = float((got - want).abs().max() / want.abs().max())
                row.update(rel_logit_diff_vs_modelopt=rel, target=1e-2, holds=rel < 1e-2)
            else:
                plain = megatron_logits(model, tokens).float()[..., :got.shape[-1]]
                row["rel_logit_diff_vs_unquantized"] = float((got - plain).abs().max() / plain.abs().max())
            out[f"{name}/{algo}"] = row
    return out


@check("fp8_trained_te")
def fp8_trained_te(ctx: Context) -> dict:
    """Transformer Engine FP8 parameters (fp8_model_init, per-tensor current scaling): the export
    keeps their E4M3 bytes and scale_inv (the format contract `quant.fp8_source` reads)."""
    try:
        import transformer_engine.pytorch as te
    except ImportError as exc:
        return {"skipped": f"transformer_engine not installed ({exc}); tests/test_fp8_native.py covers the "
                           "format contract with stand-ins"}
    import torch

    from megatron_trt_ext.quant.fp8_source import fp8_shard

    with te.fp8_model_init(enabled=True):
        linear = te.Linear(256, 512, bias=False, params_dtype=torch.bfloat16, device="cuda")
    shard = fp8_shard(linear.weight)
    if shard is None:
        return {"holds": False, "why": f"{type(linear.weight).__name__} does not carry _data/_scale_inv"}
    dequantized = linear.weight.dequantize().float().cpu()
    ours = shard.data.cpu().view(torch.float8_e4m3fn).float() * shard.scale.cpu()[:, :1]
    return {"tensor_class": type(linear.weight).__name__, "holds": bool(torch.equal(ours, dequantized))}


FAMILY_BUILDERS = {  # name -> (builder from tests.support, what it needs)
    "llama": ("models.tiny_llama", None),
    "gpt": ("models.tiny_gpt", None),
    "mixtral": ("models.tiny_llama:moe", None),
    "qwen3": ("families.tiny_qwen3", None),
    "nemotron": ("families.tiny_nemotron", None),
    "starcoder2_window": ("families.tiny_starcoder2:window", None),
    "gemma": ("families.tiny_gemma", "megatron-core >= 0.19 (MuP embedding multiplier)"),
    "hybrid_llama": ("families.tiny_hybrid", "megatron-core >= 0.19 (HybridModel)"),
    "qwen3_moe": ("families.tiny_qwen3_moe", None),
    "deepseek_v3": ("families.tiny_deepseek", "megatron-core >= 0.19 (MLA without Transformer Engine)"),
    "gpt_oss": ("families.tiny_gpt_oss", None),
    "nemotron_h": ("families.tiny_nemotron_h", "mamba_ssm and causal_conv1d (Megatron's Mamba kernels)"),
}


def _family_model(name: str):
    import importlib

    from tests.support import families as fam  # noqa: F401 (the builders' module)

    path, _ = FAMILY_BUILDERS[name]
    module, _, variant = path.partition(":")
    mod_name, fn_name = module.split(".")
    build = getattr(importlib.import_module(f"tests.support.{mod_name}"), fn_name)
    kwargs = {"moe": True} if variant == "moe" else {"window": 5} if variant == "window" else {}
    return build(**kwargs)


@check("families")
def families(ctx: Context) -> dict:
    """Every family's tiny model on the device (Megatron's CUDA kernels, Mamba included where
    installed), exported async from the device-resident weights (HF, float32) and compared with
    transformers' logits on the same device (max |diff| / logit scale; target < 1e-4, as on CPU).
    Families this machine cannot build are reported with the reason. The dry run does llama only."""
    import importlib.util

    import torch

    from megatron_trt_ext import ExportConfig, Exporter
    from examples.cpu_shim import stub_triton_only_modules

    stub_triton_only_modules()
    from tests.support.models import init_single_process, megatron_logits, randomize

    init_single_process()
    import transformers

    names = list(FAMILY_BUILDERS) if ctx.device == "cuda" else ["llama"]
    tokens = torch.randint(0, 120, (2, 40), generator=torch.Generator().manual_seed(9))
    out = {}
    for name in names:
        need = FAMILY_BUILDERS[name][1]
        if name == "nemotron_h" and importlib.util.find_spec("mamba_ssm") is None:
            out[name] = {"skipped": f"needs {need}, not installed here"}
            continue
        try:
            model = _family_model(name)
        except Exception as exc:  # noqa: BLE001 - a family this megatron-core cannot build
            out[name] = {"skipped": f"cannot build here ({type(exc).__name__}: {exc}); needs {need or 'n/a'}"}
            continue
        randomize(model, seed=5, scale=0.1)
        if ctx.device == "cuda":
            model.cuda()
        t0 = time.perf_counter()
        exporter = Exporter(model, ExportConfig(output_dir=str(ctx.work / name), formats=["hf"], dtype="float32",
                                                vocab_size=120, mode="async", verification={"enabled": False}))
        exporter.export(1)
        result = exporter.wait()
        exporter.close()
        row = {"export_s": time.perf_counter() - t0, "ok": result.ok}
        if result.ok:
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(result.path / "hf"), dtype=torch.float32)
            hf = hf.to(ctx.device).eval()
            want = megatron_logits(model, tokens.to(ctx.device))[..., :120].float()
            with torch.no_grad():
                got = hf(tokens.to(ctx.device)).logits.float()
            rel = float((got - want).abs().max() / want.abs().max())
            row.update(rel_logit_diff=rel, holds=rel < 1e-4)
        else:
            row["error"] = result.error
        out[name] = row
    return out


VLLM_FORMATS = ("fp8", "nvfp4", "mxfp8", "fp8_pb_wo")


def _vllm_python():
    """A Python that has vLLM: this one, ``$MTE_VLLM_PYTHON`` or ``.venv-vllm`` (None: none)."""
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for candidate in (os.environ.get("MTE_VLLM_PYTHON"), str(Path(__file__).parents[1] / ".venv-vllm/bin/python")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _greedy(model, prompts: list, steps: int) -> list:
    """The transformers reference as tests/serve computes it: greedy loop, vLLM's log-probs."""
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids, lps = list(prompt), []
            for _ in range(steps):
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                if len(ids) == len(prompt):
                    plp = [None] + [float(lp[i - 1, prompt[i]]) for i in range(1, len(prompt))]
                token = int(lp[-1].argmax())
                lps.append(float(lp[-1, token]))
                ids.append(token)
            out.append({"tokens": ids[len(prompt):], "logprobs": lps, "prompt_logprobs": plp})
    return out


@check("vllm_quantized")
def vllm_quantized(ctx: Context) -> dict:
    """vLLM (GPU kernels) on the fp8, nvfp4, mxfp8 and fp8_pb_wo HF exports of a tiny Llama: greedy
    tokens and log-probs against transformers on the dequantized export (activation quantization
    makes them differ a little: target max |logprob diff| < 0.1, prompt-position top-1 equal). The
    dry run exports and computes the reference only: vLLM's quantized kernels need a GPU."""
    import os
    import subprocess

    from megatron_trt_ext import ExportConfig, Exporter
    from megatron_trt_ext.quant.dequant import load_dequantized

    model = _quant_models(ctx)["llama"]
    prompts = [[3, 17, 42, 5, 99, 64, 7, 21, 11], [100, 2, 0, 58, 33, 8]]
    dirs, out = {}, {}
    for algo in VLLM_FORMATS:
        t0 = time.perf_counter()
        result = Exporter(model, ExportConfig(
            output_dir=str(ctx.work / f"vllm_{algo}"), formats=["hf"], dtype="bfloat16", mode="sync",
            vocab_size=128, verification={"enabled": False}, quantization={
                "algorithm": algo, "calibration": {"num_samples": 8, "seq_len": 64, "batch_size": 4}})).export(1)
        dirs[algo] = result.path / "hf"
        out[algo] = {"export_s": time.perf_counter() - t0, "want": _greedy(load_dequantized(dirs[algo]), prompts, 6)}
    python = _vllm_python()
    if ctx.device != "cuda" or python is None:
        why = "needs a GPU" if ctx.device != "cuda" else "needs vLLM (MTE_VLLM_PYTHON or .venv-vllm)"
        return {algo: {"export_s": row["export_s"], "vllm": f"skipped: {why}"} for algo, row in out.items()}
    root = Path(__file__).parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    for algo in VLLM_FORMATS:  # one process per format: one refused format must not hide the others
        one = ctx.work / f"vllm_spec_{algo}.json"
        one.write_text(json.dumps([{"dir": str(dirs[algo]), "prompts": prompts, "max_tokens": 6,
                                    "kwargs": {"dtype": "bfloat16"}}]))
        done = subprocess.run([python, "-m", "tests.serve.vllm_run", str(one)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=900)
        lines = [l for l in done.stdout.splitlines() if l.startswith("VLLM_RESULTS ")]
        row, want = out[algo], out[algo].pop("want")
        if done.returncode or not lines:
            row.update(ok=False, error=(done.stderr or done.stdout)[-1500:])
            continue
        got = json.loads(lines[-1][len("VLLM_RESULTS "):])[0]
        diffs = [abs(a - b) for g, w in zip(got, want) for a, b in
                 zip(g["logprobs"] + g["prompt_logprobs"][1:], w["logprobs"] + w["prompt_logprobs"][1:])]
        same_tokens = all(g["tokens"] == w["tokens"] for g, w in zip(got, want))
        row.update(max_logprob_diff=max(diffs), greedy_tokens_equal=same_tokens, target=0.1,
                   holds=max(diffs) < 0.1)
    return out


# ---------------------------------------------------------------------- live refit over vLLM's NCCL
_NCCL_REFIT = """
import json, sys
from safetensors.torch import load_file
from megatron_trt_ext.serve.nccl import refit_tensors
spec = json.loads(sys.argv[1])
r = refit_tensors(spec["url"], list(load_file(spec["file"]).items()), spec["version"], stream_timeout=300)
print("REFIT " + json.dumps({"seconds": r.seconds, "steps": r.steps, "tensors": r.tensors, "bytes": r.bytes}))
"""


@check("vllm_nccl_refit")
def vllm_nccl_refit(ctx: Context) -> dict:
    """`serve: {transport: nccl}`: a stock vLLM server started with ``{"backend": "nccl"}`` on GPU 1
    serves export A of a tiny Llama; the trainer side (GPU 0) refits it to export B over vLLM's NCCL
    weight transfer (`serve.nccl.refit_tensors`). Target: served prompt log-probs equal
    transformers on B within 1e-3 (float32) and the server reports version 2. Needs 2 GPUs (NCCL
    refuses two ranks on one GPU) and vLLM; the dry run exports and computes the reference only."""
    import os
    import signal
    import subprocess
    import urllib.request

    import torch

    from examples.cpu_shim import stub_triton_only_modules

    stub_triton_only_modules()
    from megatron_trt_ext.utils import free_port
    from tests.serve import support
    from tests.support.models import init_single_process, randomize, tiny_llama

    init_single_process()
    dirs = {}
    for name, seed, iteration in (("a", 1, 1), ("b", 2, 2)):
        model = tiny_llama(**support.SHAPES)
        randomize(model, seed=seed)
        dirs[name] = support.export_hf(model, ctx.work / f"nccl_{name}", iteration)
    want = support.transformers_greedy(dirs["b"])
    python = _vllm_python()
    if ctx.device != "cuda" or torch.cuda.device_count() < 2 or python is None:
        why = ("no GPU" if ctx.device != "cuda" else "needs 2 GPUs (trainer and server on different GPUs)"
               if torch.cuda.device_count() < 2 else "needs vLLM (MTE_VLLM_PYTHON or .venv-vllm)")
        return {"exports": sorted(dirs), "reference_prompts": len(want), "vllm": f"skipped: {why}"}
    root = Path(__file__).parents[1]
    port = free_port()
    env = dict(support.vllm_env(), CUDA_VISIBLE_DEVICES="1")
    log = (ctx.work / "nccl_server.log").open("w")
    server = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(dirs["a"]), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--enforce-eager", "--skip-tokenizer-init",
         "--max-model-len", "64", "--gpu-memory-utilization", "0.3",
         "--weight-transfer-config", '{"backend": "nccl"}'],
        cwd=ctx.work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    handle = support.Server.__new__(support.Server)  # its HTTP helpers, on the process started above
    handle.model_dir, handle.port, handle.url = str(dirs["a"]), port, f"http://127.0.0.1:{port}"
    handle.log_path, handle.proc = ctx.work / "nccl_server.log", server
    try:
        out = {"server_start_s": handle.wait_ready(600)}
        spec = {"url": handle.url, "file": str(dirs["b"] / "model.safetensors"), "version": "2"}
        done = subprocess.run([python, "-c", _NCCL_REFIT, json.dumps(spec)], cwd=root, capture_output=True,
                              text=True, timeout=600, env=dict(support.vllm_env(), CUDA_VISIBLE_DEVICES="0"))
        lines = [l for l in done.stdout.splitlines() if l.startswith("REFIT ")]
        if done.returncode or not lines:
            return {**out, "ok": False, "error": (done.stderr or done.stdout)[-2000:], "server_log": handle.log()[-2000:]}
        out["refit"] = json.loads(lines[-1][len("REFIT "):])
        with urllib.request.urlopen(handle.url + "/weight_info", timeout=30) as response:
            out["version"] = json.load(response)["weight_version"]
        diffs = [abs(a - b) for p, w in zip(support.PROMPTS, want)
                 for a, b in zip(handle.prompt_logprobs(p)[1:], w["prompt_logprobs"][1:])]
        out.update(max_logprob_diff=max(diffs), target=1e-3, holds=max(diffs) < 1e-3 and out["version"] == "2")
        return out
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated checks to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--out", default="gpu_checks.json", help="where to write the JSON results")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    args = p.parse_args(argv)
    if args.list:
        for name, fn in CHECKS.items():
            print(f"{name}: {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        p.error(f"unknown check(s) {unknown}; known: {sorted(CHECKS)}")

    import torch

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="mte-gpu-checks-"))
    ctx = Context(device="cuda" if cuda else "cpu", dry_run=not cuda, work=work,
                  rounds=args.rounds if cuda else min(args.rounds, 2),
                  model_size=GPU_LLAMA if cuda else DRY_RUN_LLAMA)
    results = {"device": ctx.describe_device(), "dry_run": ctx.dry_run, "checks": {}}
    if ctx.dry_run:
        print("no CUDA device: dry run on the CPU with tiny sizes (exercises the script; the figures mean nothing)")
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                results["checks"][name] = {"ok": True, **CHECKS[name](ctx)}
            except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
                results["checks"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            results["checks"][name]["seconds"] = time.perf_counter() - t0
            print(f"{name}: {json.dumps(results['checks'][name], default=str)[:400]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in results["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
