"""The launcher runs the Megatron-LM the user points at: the script's own tree comes first on
sys.path before anything imports `megatron`, as `python pretrain_gpt.py` would have it."""

import os
import subprocess
import sys
from pathlib import Path

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
