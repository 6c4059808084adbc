"""The main job end to end, shortened: train, export on save, generate with transformers."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


import pytest


# the fp8 run adds ModelOpt calibration, which does not depend on the megatron-core version
@pytest.mark.parametrize("recipe", ["bf16.yaml", pytest.param("fp8.yaml", marks=pytest.mark.heavy)])
def test_demo_trains_exports_and_generates(tmp_path, recipe):
    proc = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--steps", "200", "--save-every", "100",
         "--workdir", str(tmp_path / "run"), "--recipe", str(ROOT / "recipes" / recipe)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: the exported Hugging Face model generates" in proc.stdout
    exports = sorted(p.name for p in (tmp_path / "run" / "exports").glob("iter_*"))
    assert exports[-1] == "iter_0000200"
    # every save exported, or was skipped visibly (busy_policy: skip) while the previous one ran
    assert exports == ["iter_0000100", "iter_0000200"] or "skipped" in proc.stderr
    assert (tmp_path / "run" / "exports" / "latest").read_text().strip() == "iter_0000200"
