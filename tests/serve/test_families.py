"""vLLM as a verified consumer: every family's bf16 HF export loads in vLLM (float32, eager) and gives
transformers' greedy tokens and log-probabilities (within 2e-4) on the same export. The exports
are built by the package's Exporter from randomized Megatron models with vLLM-sized heads; all of
them run in one vLLM child process. ``fp8_pc_pt`` (the one quantized format whose kernels run on
an AVX2 CPU, with a bf16 KV cache) is compared with transformers on the dequantized weights, with
its per-token FP8 activations applied by hooks: same greedy tokens, log-probs within 0.25 (vLLM runs
ModelOpt checkpoints in bf16 only; see the test).

`scripts/test-serve`'s environment has neither ModelOpt nor megatron-core 0.19 (it stays small), so
the fp8_pc_pt export and the families that need 0.19 (Gemma, DeepSeek-V3 with CPU-sized MLA,
Nemotron-H) are built by the main test environment in a child process (`main_export`); without
it (``MTE_MAIN_PYTHON`` or .venv, and ``MTE_MCORE_019`` or .venv/mcore-0.19.2) they are skipped,
naming what is missing."""

import json
import os
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.serve import support
from tests.support import families as fam
from tests.support.models import randomize, tiny_gpt, tiny_llama

support.require_vllm()

S = support.SHAPES
MOE = dict(moe_ffn_hidden_size=128)
FAMILIES = {
    # name: (builder, HF architecture)
    "llama": (lambda: tiny_llama(**S), "LlamaForCausalLM"),
    "mixtral": (lambda: tiny_llama(moe=True, moe_ffn_hidden_size=128, **S), "MixtralForCausalLM"),
    "qwen3": (lambda: fam.tiny_qwen3(**S), "Qwen3ForCausalLM"),
    "qwen3_moe": (lambda: fam.tiny_qwen3_moe(**S, **MOE), "Qwen3MoeForCausalLM"),
    "starcoder2": (lambda: fam.tiny_starcoder2(**S), "Starcoder2ForCausalLM"),
    "nemotron": (lambda: fam.tiny_nemotron(**S), "NemotronForCausalLM"),
    "gpt2": (lambda: tiny_gpt(**{**S, "num_query_groups": 4}), "GPT2LMHeadModel"),
    "gpt_oss": (lambda: fam.tiny_gpt_oss(**S, **MOE), "GptOssForCausalLM"),
}


@pytest.fixture(scope="module")
def served(megatron_world, tmp_path_factory):
    """Per family: (architecture in config.json, transformers' outputs, vLLM's outputs)."""
    root = tmp_path_factory.mktemp("families")
    dirs, refs, archs = [], {}, {}
    for name, (build, _) in FAMILIES.items():
        model = build()
        randomize(model, seed=zlib.crc32(name.encode()) % 1000)
        hf_dir = support.export_hf(model, root / name)
        archs[name] = json.loads((hf_dir / "config.json").read_text())["architectures"]
        refs[name] = support.transformers_greedy(hf_dir)
        dirs.append(hf_dir)
    got = dict(zip(FAMILIES, support.vllm_offline(dirs, root)))
    return {name: (archs[name], refs[name], got[name]) for name in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_serves_the_export_as_transformers_computes_it(served, family):
    architecture, want, got = served[family]
    assert architecture == [FAMILIES[family][1]]
    support.assert_same_outputs(got, want, family)


# ---------------------------------------------------------------------- fp8_pc_pt
E4M3_MAX = 448.0
FP8_TOLERANCE = 0.25


def dequantized_copy(quant_dir, out):
    """A plain float32 HF directory with the fp8_pc_pt export's weights dequantized (weight *
    per-channel scale); returns it and the quantized modules."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    tensors = {}
    for path in sorted(quant_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    modules = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
    plain = {k: v.float() for k, v in tensors.items() if not k.endswith(("_scale", "_scale_2"))}
    for m in modules:
        plain[f"{m}.weight"] = tensors[f"{m}.weight"].float() * tensors[f"{m}.weight_scale"].float().reshape(-1, 1)
    save_file(plain, str(out / "model.safetensors"))
    config = json.loads((quant_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json",):
        if (quant_dir / extra).exists():
            shutil.copy(quant_dir / extra, out / extra)
    return out, modules


def per_token_fp8(module, args):
    """The activation side of fp8_pc_pt: each token's input rounded to E4M3 with scale amax/448."""
    import torch

    x = args[0]
    scale = (x.abs().amax(-1, keepdim=True).float() / E4M3_MAX).clamp_min(1e-12)
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype),


def fp8_reference(plain_dir, modules):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(plain_dir), dtype=torch.float32).eval()
    for m in modules:
        model.get_submodule(m).register_forward_pre_hook(per_token_fp8)
    return support.greedy(model)


def main_python() -> str:
    python = os.environ.get("MTE_MAIN_PYTHON") or str(support.ROOT / ".venv/bin/python")
    if not Path(python).exists():
        pytest.skip(f"needs the main test environment's Python ({python}; set MTE_MAIN_PYTHON): it builds "
                    "exports this environment cannot (ModelOpt, megatron-core 0.19)")
    return python


def mcore_019() -> str:
    path = os.environ.get("MTE_MCORE_019") or str(support.ROOT / ".venv/mcore-0.19.2")
    if not (Path(path) / "megatron/core").is_dir():
        pytest.skip(f"needs megatron-core 0.19 ({path}; scripts/test-mcore-latest installs it, or set "
                    "MTE_MCORE_019): Gemma, DeepSeek-V3 and Nemotron-H models are built with it")
    return path


def main_exports(cases: list, tmp: Path, pythonpath: str = "") -> list:
    """HF export directories built by the main environment (`tests.serve.main_export`)."""
    spec = tmp / "main_export.json"
    spec.write_text(json.dumps([{**c, "out": str(tmp / c["family"])} for c in cases]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(support.ROOT)) if p),
               MTE_SKIP_HEAVY="1")
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run([main_python(), "-m", "tests.serve.main_export", str(spec)], cwd=support.ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [l for l in done.stdout.splitlines() if l.startswith("EXPORTS ")]
    assert done.returncode == 0 and lines, f"main_export failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return [Path(d) for d in json.loads(lines[-1][len("EXPORTS "):])]


MCORE_019 = {"gemma": "GemmaForCausalLM", "deepseek": "DeepseekV3ForCausalLM", "nemotron_h": "NemotronHForCausalLM"}


@pytest.fixture(scope="module")
def served_019(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore019")
    cases = [{"family": name, "seed": zlib.crc32(name.encode()) % 1000} for name in MCORE_019]
    dirs = main_exports(cases, root, mcore_019())
    archs = [json.loads((d / "config.json").read_text())["architectures"] for d in dirs]
    refs = [support.transformers_greedy(d) for d in dirs]
    # this CPU has AMX tiles, so vLLM picks its AMX MLA backend, which takes bf16 weights only: the
    # reference CPU MLA backend runs the float32 comparison
    got = support.vllm_offline([d for n, d in zip(MCORE_019, dirs) if n != "deepseek"], root)
    got.insert(list(MCORE_019).index("deepseek"),
               support.vllm_offline([dirs[list(MCORE_019).index("deepseek")]], root, attention_backend="CPU_MLA")[0])
    return {name: (a, r, g) for name, a, r, g in zip(MCORE_019, archs, refs, got)}


@pytest.mark.parametrize("family", list(MCORE_019))
def test_vllm_serves_the_families_built_with_megatron_core_019(served_019, family):
    architecture, want, got = served_019[family]
    assert architecture == [MCORE_019[family]]
    support.assert_same_outputs(got, want, family)


def test_vllm_serves_fp8_pc_pt_with_a_bf16_kv_cache(tmp_path):
    (hf_dir,) = main_exports([{"family": "llama", "seed": 19, "quantization": {"algorithm": "fp8_pc_pt"}}], tmp_path)
    qc = json.loads((hf_dir / "config.json").read_text())["quantization_config"]
    assert "FP8_PER_CHANNEL_PER_TOKEN" in json.dumps(qc), qc
    plain, modules = dequantized_copy(hf_dir, tmp_path / "plain")
    assert modules, "no quantized linear in the export"
    want = fp8_reference(plain, modules)
    # vLLM runs ModelOpt checkpoints in bf16/fp16 only, and its CPU FP8 path is not reproduced exactly
    # by per-token fake quantization: seen 2026-12-06, max gap 0.13-0.16 to this reference and 0.155
    # to vLLM's own bf16 run of the dequantized weights (bf16 alone: 0.018). The same greedy tokens
    # and a gap well below what misread scales give (> 1) are what is checked, not 2e-4.
    got = support.vllm_offline([hf_dir], tmp_path, dtype="bfloat16", kv_cache_dtype="bfloat16")[0]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["tokens"] == w["tokens"], f"fp8_pc_pt, prompt {i}: greedy tokens {g['tokens']} != {w['tokens']}"
        pairs = list(zip(g["logprobs"], w["logprobs"])) + list(zip(g["prompt_logprobs"][1:], w["prompt_logprobs"][1:]))
        worst = max(abs(a - b) for a, b in pairs)
        print(f"fp8_pc_pt prompt {i}: worst logprob gap {worst:.2e}")
        assert worst < FP8_TOLERANCE, f"fp8_pc_pt, prompt {i}: logprobs differ by {worst:.2e}"
