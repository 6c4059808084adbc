"""The built wheel, installed into a fresh virtual environment, works without the checkout: the
package imports from the venv (not from the repository), a shipped recipe is found by name, an
export written from there passes `megatron-trt-ext verify`; where megatron-core ships Megatron-LM's
training loop (``megatron.training``, >= 0.18), README's Megatron-LM command runs from the venv
(`megatron-trt-ext run --cpu`, a recipe by name, saves 2 iterations apart from the start, each one
exported) and `megatron-trt-ext export --cpu` exports the saved checkpoint offline, byte-equal to
the live export, and `verify` passes it.

The fresh venv takes its dependencies (torch, megatron-core, transformers, ...) from the test
environment through a ``.pth`` file instead of installing them (no network, seconds instead of
minutes); the checkout itself is on no path and every command runs from a temporary directory.
One venv per module (`installed`): the wheel is built once per suite.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
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


@dataclasses.dataclass
class Venv:
    root: Path
    python: Path
    env: dict  # for commands run in it: its bin/ first on PATH, no PYTHONPATH, no launcher variables


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Venv:
    """The wheel built from the checkout (~10 s), installed without dependencies into a fresh venv."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, ROOT],
         tmp_path, os.environ, timeout=600)
    wheel = next(wheels.glob("megatron_trt_ext-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, os.environ)
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path, os.environ).strip())
    # the dependencies: any PYTHONPATH entry first (as here: scripts/test-mcore-latest puts the newer
    # megatron-core there), then this environment's site-packages; never the checkout
    paths = [*os.environ.get("PYTHONPATH", "").split(os.pathsep), sysconfig.get_paths()["purelib"],
             sysconfig.get_paths()["platlib"]]
    paths = [p for p in dict.fromkeys(paths) if p and Path(p).resolve() != ROOT]
    (purelib / "test_dependencies.pth").write_text("\n".join(paths) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], tmp_path, os.environ)
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
            "CUDA_VISIBLE_DEVICES")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    where = json.loads(_run([python, "-c", WHERE, ROOT], tmp_path, env))
    assert Path(where["package"]).is_relative_to(venv), where  # the wheel's copy, not the checkout
    assert not where["checkout_on_path"], where
    assert where["megatron_core"] == importlib.util.find_spec("megatron.core").origin  # the suite's version
    return Venv(venv, python, env)


WHERE = """
import importlib.util, json, sys
from pathlib import Path
import megatron_trt_ext
print(json.dumps({"package": megatron_trt_ext.__file__,
                  "checkout_on_path": any(p and Path(p).resolve() == Path(sys.argv[1]) for p in sys.path),
                  "megatron_core": importlib.util.find_spec("megatron.core").origin}))
"""


@pytest.mark.heavy
def test_the_wheel_installed_in_a_fresh_venv_exports_and_verifies(installed, tmp_path):
    """Heavy (~20-50 s after the venv: three processes that import torch and megatron-core)."""
    from megatron_trt_ext.utils import free_port

    work, env = tmp_path, installed.env
    recipes = json.loads(_run(["megatron-trt-ext", "recipes", "--json"], work, env))
    assert "bf16" in [row["name"] for row in recipes]

    (work / "export.py").write_text(EXPORT)
    out = _run([installed.python, "export.py", work / "exports", free_port()], work, env)
    status = next(line for line in out.splitlines() if line.startswith("EXPORTED")).split()
    assert status[1] == "complete", out
    report = json.loads(_run(["megatron-trt-ext", "verify", "--json", status[2]], work, env))
    assert report["status"] == "pass", report  # (exit status 0 too: _run checks it)
    assert [c["name"] for c in report["checks"] if c["ok"] is not True] == [], report["checks"]


def same_export(live: Path, offline: Path) -> None:
    """Byte-equal files, but for the manifest (times, source) and the probe's recorded reference
    logits (computed by each run's own forward pass)."""
    skip = ("manifest.json", "verification.safetensors")
    names = sorted(str(p.relative_to(live)) for p in live.rglob("*") if p.is_file() and p.name not in skip)
    assert names and names == sorted(str(p.relative_to(offline)) for p in offline.rglob("*")
                                     if p.is_file() and p.name not in skip)
    for name in names:
        assert (live / name).read_bytes() == (offline / name).read_bytes(), name


@pytest.mark.skipif(importlib.util.find_spec("megatron.training") is None,
                    reason="Megatron-LM's training loop (megatron.training) ships in megatron-core >= 0.18's wheel: "
                           "scripts/test-mcore-latest runs this")
def test_the_wheel_runs_megatron_lm_exports_every_save_and_the_checkpoint_offline(installed, tmp_path):
    """README's command from the venv: `megatron-trt-ext run --cpu` on a script in the shape of
    pretrain_gpt.py with no CPU code (examples/pretrain_tiny.py, copied: no checkout on the path),
    one process, no rendezvous variables, the default busy policy (skip), the recipe by name, a save
    every 2 iterations from the start: the first saves come while the export workers still start and
    are queued, so every save is exported. Then `export --cpu` of the saved checkpoint and `verify`.
    The only end-to-end run of the CPU mode (~60-120 s, most of it imports: the training process and
    the processes Megatron's checkpoint writer and the export worker spawn, which re-import the
    script; then the offline export's and verify's)."""
    work, env = tmp_path, installed.env
    shutil.copy(ROOT / "examples" / "pretrain_tiny.py", work / "pretrain_tiny.py")
    done = subprocess.run(["megatron-trt-ext", "run", "--cpu", "pretrain_tiny.py", "--train-iters", "6",
                           "--save", "ckpt", "--save-interval", "2", "--export-recipe", "bf16",
                           "--export-dir", "exports"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    log = done.stderr
    assert "CPU TRIAL MODE" in log and "--distributed-backend gloo" in log
    first = next(line for line in log.splitlines() if "megatron-trt-ext launcher: megatron.training" in line)
    assert first.endswith(f" from {Path(importlib.util.find_spec('megatron.core').origin).parent}"), first
    saves = ["iter_0000002", "iter_0000004", "iter_0000006"]
    assert sorted(p.name for p in (work / "ckpt").glob("iter_*")) == saves
    from megatron_trt_ext import manifest as mf

    assert [p.name for p in mf.complete_exports(work / "exports")] == saves  # none dropped or skipped
    assert "skipped" not in log and "replaced" not in log, log[-5000:]
    for name in saves:  # the recipe the wheel ships
        recipe = Path(mf.read_manifest(work / "exports" / name)["config"]["recipe"])
        assert recipe.name == "bf16.yaml" and recipe.is_relative_to(installed.root), recipe

    result = json.loads(_run(["megatron-trt-ext", "export", "--cpu", "ckpt", "--recipe", "bf16",
                              "--output-dir", "offline"], work, env).splitlines()[-1])
    assert (result["status"], result["iteration"]) == ("complete", 6)
    same_export(work / "exports" / "iter_0000006", work / "offline" / "iter_0000006")
    report = json.loads(_run(["megatron-trt-ext", "verify", "--json", "offline/iter_0000006"], work, env))
    assert report["status"] == "pass", report
