"""The launcher runs the Megatron-LM the user points at: the script's own tree comes first on
sys.path before anything imports `megatron`, as `python pretrain_gpt.py` would have it."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_trt_ext import launch

ROOT = Path(__file__).resolve().parent.parent

# A Megatron-LM checkout in miniature: `megatron` is a namespace package there too (Megatron-LM
# ships no megatron/__init__.py), with the training modules the hooks patch.
TRAINING = {
    "__init__.py": "",
    "arguments.py": "def parse_args(*a, **k):\n    return None\n",
    "checkpointing.py": "def save_checkpoint(*a, **k):\n    return None\n",
    "training.py": "def setup_model_and_optimizer(*a, **k):\n    return None\n"
                   "def save_checkpoint(*a, **k):\n    return None\n",
}
SCRIPT = """
import sys
import megatron.training
open(sys.argv[1], "w").write(megatron.training.__file__)
"""


def _checkout(tmp_path: Path) -> Path:
    training = tmp_path / "Megatron-LM" / "megatron" / "training"
    training.mkdir(parents=True)
    for name, text in TRAINING.items():
        (training / name).write_text(text)
    script = tmp_path / "Megatron-LM" / "pretrain_gpt.py"
    script.write_text(SCRIPT)
    return script


def test_the_script_runs_with_its_own_megatron_training(tmp_path):
    script = _checkout(tmp_path)
    out = tmp_path / "imported.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "megatron_trt_ext.launch", str(script), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    own = script.parent / "megatron" / "training"
    assert Path(out.read_text()).parent == own
    # the first log line says which megatron runs
    first = next(line for line in done.stderr.splitlines() if "megatron-trt-ext launcher" in line)
    assert f"megatron.training from {own}" in first and "megatron.core" in first


# ---------------------------------------------------------------------------------- CPU trial mode
# Run by the launcher WITHOUT --cpu: the package imported, a model attached, no CPU mode anywhere.
PRODUCTION_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
import megatron_trt_ext
from megatron_trt_ext import ExportConfig, attach
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

dist.init_process_group("gloo")  # from the MASTER_* / RANK / WORLD_SIZE the launcher set
parallel_state.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(1, inference_rng_tracker=True)
config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=32)
handle = attach(model, ExportConfig(mode="sync", output_dir=sys.argv[2], vocab_size=64, formats=["hf"]))
handle.detach()
json.dump({"cpu_mode_imported": "megatron_trt_ext.cpu_mode" in sys.modules,
           "current_device": torch.cuda.current_device.__module__,
           "function_modes": len(torch.overrides._get_current_function_mode_stack()),
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
           "rank": os.environ["RANK"], "world_size": os.environ["WORLD_SIZE"]}, open(sys.argv[1], "w"))
"""


def _without_launcher_env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _needs_triton() -> bool:
    """megatron-core 0.19 imports Triton for GPTModel (a Triton-only module); without Triton only
    CPU mode's stand-in makes it importable."""
    core = importlib.util.find_spec("megatron.core")
    ops = Path(list(core.submodule_search_locations)[0]) / "transformer/moe/ops/paged_stash.py"
    return importlib.util.find_spec("triton") is None and ops.is_file()


@pytest.mark.skipif(_needs_triton(), reason="this megatron-core imports Triton for GPTModel and Triton is not "
                                            "installed: only CPU mode could run it (the pinned megatron-core runs this)")
def test_without_cpu_flag_no_cpu_mode_and_one_process_gets_a_rendezvous(tmp_path):
    script = _checkout(tmp_path)
    script.write_text(PRODUCTION_SCRIPT)
    out = tmp_path / "facts.json"
    env = {**_without_launcher_env(), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "megatron_trt_ext.launch", str(script), str(out),
                           str(tmp_path / "exports")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(out.read_text())
    assert facts == {"cpu_mode_imported": False, "current_device": "torch.cuda", "function_modes": 0,
                     "cuda_visible_devices": "unset", "rank": "0", "world_size": "1"}
    assert "CPU TRIAL MODE" not in done.stderr
    line = next(line for line in done.stderr.splitlines() if "not under torchrun" in line)
    assert "MASTER_ADDR=127.0.0.1 MASTER_PORT=" in line and "RANK=0 WORLD_SIZE=1 LOCAL_RANK=0" in line


def test_single_process_env_fills_only_what_no_launcher_set():
    env = {"MASTER_PORT": "1234"}
    added = launch.single_process_env(env)
    assert added == {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    assert env["MASTER_PORT"] == "1234"  # the user's own port stands
    fresh = {}
    assert int(launch.single_process_env(fresh)["MASTER_PORT"]) > 0
    under_torchrun = {"RANK": "3", "WORLD_SIZE": "8"}
    assert launch.single_process_env(under_torchrun) == {} and under_torchrun == {"RANK": "3", "WORLD_SIZE": "8"}


def test_modelopt_without_requests_is_reported():
    def find_spec(installed):
        return lambda name: object() if name in installed else None

    problem = launch.modelopt_import_problem(find_spec({"modelopt", "huggingface_hub"}))
    assert "requests" in problem and "huggingface_hub" not in problem and "megatron-trt-ext[quant]" in problem
    assert launch.modelopt_import_problem(find_spec({"modelopt", "requests", "huggingface_hub"})) is None
    assert launch.modelopt_import_problem(find_spec(set())) is None  # no ModelOpt: nothing to drop


def test_cpu_flags_leave_the_users_own_values():
    from megatron_trt_ext import cpu_mode

    added = cpu_mode.cpu_flags(["--num-layers", "2", "--distributed-backend=gloo", "--no-rope-fusion"])
    assert added == ["--transformer-impl", "local", "--use-cpu-initialization",
                     "--no-gradient-accumulation-fusion", "--no-persist-layer-norm"]


def test_unknown_launcher_option_is_a_clear_error(capsys):
    assert launch.main(["--cpuu", "pretrain_gpt.py"]) == 2
    assert "'--cpuu' is unknown" in capsys.readouterr().err


# The end-to-end `megatron-trt-ext run --cpu` (examples/pretrain_tiny.py, a recipe by name, saves 2
# iterations apart from the start, each one exported under the default busy policy) runs from the
# installed wheel, with the offline `export --cpu` of its checkpoint: tests/test_wheel_install.py.


def test_export_without_cpu_flag_never_starts_cpu_mode(tmp_path):
    """`megatron-trt-ext export` (no --cpu) leaves CUDA alone: CPU mode is neither imported nor active."""
    probe = ("import sys, torch; from megatron_trt_ext.cli import main; "
             "rc = main(['export', 'no-such-checkpoint', '--output-dir', 'out']); "
             "print(rc, 'megatron_trt_ext.cpu_mode' in sys.modules, torch.cuda.current_device.__module__)")
    env = {**_without_launcher_env(), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.split() == ["2", "False", "torch.cuda"], done.stderr[-3000:]
    assert "no-such-checkpoint" in done.stderr and "CPU TRIAL MODE" not in done.stderr
