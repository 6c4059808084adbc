"""Megatron-Bridge's own training loop with exports switched on by one callback
(``pretrain(cfg, forward_step, callbacks=[ExportCallback(...)])``): exports at every 2nd persistent
save (non-persistent saves neither export nor count), a resumed run exports where an uninterrupted
one does, and the export's logits equal the final model's.

Bridge 0.6.2 runs here through tests.support.bridge_shim (it declares Python 3.12 and
pins transformers <= 5.12.1; its training loop needs neither). scripts/test-mcore-latest installs
it next to megatron-core 0.19.2."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("megatron.bridge") is None:
    pytest.skip("Megatron-Bridge is installed next to megatron-core 0.19.2 by scripts/test-mcore-latest",
                allow_module_level=True)

import torch  # noqa: E402

from megatron_trt_ext import manifest as mf  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "scripts" / "tiny_bridge_pretrain.py"
ROOT = Path(__file__).resolve().parent.parent


def train(tmp: Path, iters: int, *extra) -> None:
    from megatron_trt_ext.utils import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp / "ckpt"), str(tmp / "exports"), str(iters),
                           *map(str, extra)], capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp))
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-4000:])


def exports(tmp: Path) -> list:
    return [int(p.name[len("iter_"):]) for p in mf.complete_exports(tmp / "exports")]


def test_bridge_callback_exports_persistent_saves_with_the_model_s_logits(tmp_path):
    train(tmp_path, 8, "--logits", tmp_path / "logits.pt")
    assert exports(tmp_path) == [4, 8]  # saves 2, 4, 6, 8; non-persistent ones at 3, 6 do not count
    assert (tmp_path / "ckpt" / "non_persistent").is_dir()
    import transformers

    oracle = torch.load(tmp_path / "logits.pt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exports" / "iter_0000008" / "hf"),
                                                           dtype=torch.float32).eval()
    assert hf.config.vocab_size == 100  # the tokenizer's ids (the table is padded to 128)
    with torch.no_grad():
        logits = hf(oracle["tokens"]).logits
    expected = oracle["logits"][..., :100]
    assert float((logits - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_bridge_resume_exports_where_the_uninterrupted_run_does(tmp_path):
    train(tmp_path, 6)
    assert exports(tmp_path) == [4]  # after an odd count of saves (2, 4, 6)
    from megatron.core import dist_checkpointing

    from megatron_trt_ext.hook import STATE_KEY

    common = dist_checkpointing.load_common_state_dict(str(tmp_path / "ckpt" / "iter_0000006"))
    assert common[STATE_KEY] == {"saves_seen": 3}  # the count, inside the checkpoint
    train(tmp_path, 8, "--resume")
    assert exports(tmp_path) == [4, 8]  # counting afresh after the resume would export none
