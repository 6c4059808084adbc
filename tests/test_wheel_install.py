"""The built wheel, installed into a fresh virtual environment, works without the checkout: the
package imports from the venv (not from the repository), a shipped recipe is found by name, an
export written from there passes `megatron-trt-ext verify`.

The fresh venv takes its dependencies (torch, megatron-core, transformers, ...) from the test
environment through a ``.pth`` file instead of installing them (no network, seconds instead of
minutes); the checkout itself is on no path and every command runs from a temporary directory.

Heavy (~30-60 s: a wheel build and three processes that import torch and megatron-core). What it
does not run: Megatron-LM's training loop and the offline export of its checkpoint
(`megatron-trt-ext run --cpu` then `export --cpu`), which need megatron-core >= 0.18's
``megatron.training`` and take minutes on CPU; tests/test_launch.py runs `run --cpu` from the
checkout.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs in the fresh venv: a tiny Llama-style Megatron-Core model on CPU (the package's CPU mode),
# exported with the shipped recipe named "bf16".
EXPORT = """
import sys
from megatron_trt_ext import cpu_mode

cpu_mode.stub_triton_only_modules()
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from megatron_trt_ext import ExportConfig, Exporter

cpu_mode.install()
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
parallel_state.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(1, inference_rng_tracker=True)
config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                           ffn_hidden_size=96, use_cpu_initialization=True, hidden_dropout=0.0,
                           attention_dropout=0.0, normalization="RMSNorm", gated_linear_unit=True,
                           activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False)
model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=128,
                 max_sequence_length=64, position_embedding_type="rope")
result = Exporter(model, ExportConfig.from_yaml("bf16", output_dir=sys.argv[1], vocab_size=100,
                                                mode="sync")).export(iteration=1)
print("EXPORTED", result.status, result.path)
"""


def _run(cmd, cwd, env, timeout=300):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (cmd, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout


@pytest.mark.heavy
def test_the_wheel_installed_in_a_fresh_venv_exports_and_verifies(tmp_path):
    from megatron_trt_ext.utils import free_port

    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, ROOT],
         tmp_path, os.environ, timeout=600)
    wheel = next(wheels.glob("megatron_trt_ext-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, os.environ)
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path, os.environ).strip())
    # the dependencies: this environment's site-packages and any PYTHONPATH entry, never the checkout
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    paths = [p for p in dict.fromkeys(paths) if p and Path(p).resolve() != ROOT]
    (purelib / "test_dependencies.pth").write_text("\n".join(paths) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], tmp_path, os.environ)

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    where = _run([python, "-c", "import megatron_trt_ext, sys; print(megatron_trt_ext.__file__); "
                  "print(any(p and __import__('pathlib').Path(p).resolve() == __import__('pathlib').Path(sys.argv[1]) "
                  "for p in sys.path))", ROOT], work, env).split()
    assert Path(where[0]).is_relative_to(venv), where  # the wheel's copy, not the checkout
    assert where[1] == "False"

    recipes = json.loads(_run(["megatron-trt-ext", "recipes", "--json"], work, env))
    assert "bf16" in [row["name"] for row in recipes]

    (work / "export.py").write_text(EXPORT)
    out = _run([python, "export.py", work / "exports", free_port()], work, env)
    status = next(line for line in out.splitlines() if line.startswith("EXPORTED")).split()
    assert status[1] == "complete", out
    report = json.loads(_run(["megatron-trt-ext", "verify", "--json", status[2]], work, env))
    assert report["status"] == "pass", report  # (exit status 0 too: _run checks it)
    assert [c["name"] for c in report["checks"] if c["ok"] is not True] == [], report["checks"]
