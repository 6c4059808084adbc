"""attach(): every Nth dist_checkpointing.save exports; detach() restores the original save.

These tests pin mode="sync" to check the trigger itself; test_async.py covers the default mode."""

import json
import logging

import pytest

import megatron.core.dist_checkpointing as dist_checkpointing
from megatron.core.dist_checkpointing import serialization

from megatron_trt_ext import ConfigError, ExportConfig, attach
from megatron_trt_ext.hook import STATE_KEY, iteration_from_path
from tests.support.models import tiny_llama


def save(model, directory):
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))


def exported(root):
    return sorted(p.name for p in root.glob("iter_*"))


def test_every_nth_save_exports_and_detach_restores(megatron_world, tmp_path):
    original = dist_checkpointing.save
    model = tiny_llama()
    out = tmp_path / "exports"
    handle = attach(model, ExportConfig(mode="sync", output_dir=str(out), vocab_size=120, every_n_saves=2, formats=["hf"]))
    assert dist_checkpointing.save is not original and serialization.save is dist_checkpointing.save
    for it in (10, 20, 30, 40):
        save(model, tmp_path / "ckpt" / f"iter_{it:07d}")
    assert exported(out) == ["iter_0000020", "iter_0000040"]
    # the checkpoint itself is written untouched by the hook
    assert (tmp_path / "ckpt" / "iter_0000030" / "metadata.json").is_file()
    handle.detach()
    assert dist_checkpointing.save is original and serialization.save is original
    save(model, tmp_path / "ckpt" / "iter_0000050")
    save(model, tmp_path / "ckpt" / "iter_0000060")
    assert exported(out) == ["iter_0000020", "iter_0000040"]


def test_handles_detach_in_any_order(megatron_world, tmp_path):
    original = dist_checkpointing.save
    model = tiny_llama()
    a = attach(model, ExportConfig(mode="sync", output_dir=str(tmp_path / "a"), vocab_size=120, formats=["hf"]))
    b = attach(model, ExportConfig(mode="sync", output_dir=str(tmp_path / "b"), vocab_size=120, formats=["trtllm_checkpoint"]))
    save(model, tmp_path / "ckpt" / "iter_0000001")
    a.detach()
    save(model, tmp_path / "ckpt" / "iter_0000002")
    assert exported(tmp_path / "a") == ["iter_0000001"]
    assert exported(tmp_path / "b") == ["iter_0000001", "iter_0000002"]
    b.detach()
    assert dist_checkpointing.save is original


def test_explicit_callback_for_frameworks_with_events(megatron_world, tmp_path):
    model = tiny_llama()
    handle = attach(model, ExportConfig(mode="sync", output_dir=str(tmp_path), vocab_size=120, formats=["hf"]))
    try:
        result = handle.on_checkpoint_saved(iteration=1234, checkpoint_dir="/somewhere/step-1234")
        assert result.ok and result.path.name == "iter_0001234"
        manifest = json.loads((result.path / "manifest.json").read_text())
        assert manifest["iteration"] == 1234
    finally:
        handle.detach()


def test_path_without_iteration_is_logged_or_raised(megatron_world, tmp_path, caplog):
    model = tiny_llama()
    handle = attach(model, ExportConfig(mode="sync", output_dir=str(tmp_path), vocab_size=120, formats=["hf"]))
    try:
        with caplog.at_level(logging.ERROR, logger="megatron_trt_ext"):
            assert handle.on_checkpoint_saved(checkpoint_dir="/ckpt/latest") is None
        assert "no iteration in the path" in caplog.text
    finally:
        handle.detach()
    strict = attach(model, ExportConfig(mode="sync", output_dir=str(tmp_path), vocab_size=120, strict=True))
    try:
        with pytest.raises(ConfigError, match="iteration=..."):
            strict.on_checkpoint_saved(checkpoint_dir="/ckpt/latest")
    finally:
        strict.detach()


def test_failed_export_does_not_stop_training_unless_strict(megatron_world, tmp_path, monkeypatch):
    from megatron_trt_ext.formats import hf as hf_mod

    def boom(self, name, tensor):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(hf_mod.HFWriter, "write", boom)
    model = tiny_llama()
    handle = attach(model, ExportConfig(mode="sync", output_dir=str(tmp_path / "x"), vocab_size=120))
    try:
        save(model, tmp_path / "ckpt" / "iter_0000003")  # must not raise
        assert handle.last_result.status == "failed" and "Permission denied" in handle.last_result.error
        assert (tmp_path / "ckpt" / "iter_0000003" / "metadata.json").is_file()
    finally:
        handle.detach()
    strict = attach(model, ExportConfig(mode="sync", output_dir=str(tmp_path / "y"), vocab_size=120, strict=True))
    try:
        with pytest.raises(Exception, match="Permission denied"):
            save(model, tmp_path / "ckpt" / "iter_0000004")
    finally:
        strict.detach()


def test_save_count_survives_resume(megatron_world, tmp_path):
    model = tiny_llama()
    cfg = ExportConfig(mode="sync", output_dir=str(tmp_path), vocab_size=120, every_n_saves=3, formats=["hf"])
    first = attach(model, cfg)
    first.on_checkpoint_saved(iteration=1)
    first.on_checkpoint_saved(iteration=2)
    state = first.exporter.state_dict()
    first.detach()
    resumed = attach(model, cfg)
    resumed.exporter.load_state_dict(state)
    try:
        assert resumed.on_checkpoint_saved(iteration=3).ok
    finally:
        resumed.detach()


@pytest.mark.parametrize("path,iteration", [
    ("/ckpt/iter_0000100", 100), ("/ckpt/iter_0000100/", 100), ("ckpt/iter_12", 12), ("/ckpt/latest", None),
])
def test_iteration_from_path(path, iteration):
    assert iteration_from_path(path) == iteration


def test_only_checkpoint_saves_under_the_save_root_count(megatron_world, tmp_path):
    """Frameworks save more than checkpoints through dist_checkpointing.save: ModelOpt's state
    inside a checkpoint (iter_N/modelopt_state) and non-persistent saves elsewhere. Neither
    exports nor counts toward every_n_saves."""
    model = tiny_llama()
    out = tmp_path / "exports"
    ckpt = tmp_path / "ckpt"
    handle = attach(model, ExportConfig(mode="sync", output_dir=str(out), vocab_size=120, every_n_saves=2,
                                        formats=["hf"]), save_root=ckpt)
    try:
        save(model, ckpt / "iter_0000001")
        save(model, ckpt / "iter_0000001" / "modelopt_state")
        save(model, ckpt / "non_persistent" / "iter_0000002")
        save(model, ckpt / "iter_0000003")
    finally:
        handle.detach()
    assert exported(out) == ["iter_0000003"]
    assert handle.exporter.saves_seen == 2


def test_counting_saves_keeps_no_record_per_save(megatron_world, tmp_path):
    """A long run saves thousands of times: what the trigger keeps must not grow with them."""
    model = tiny_llama()
    handle = attach(model, ExportConfig(mode="sync", output_dir=str(tmp_path), vocab_size=120, every_n_saves=10**9,
                                        formats=["hf"]))
    try:
        for iteration in range(1, 3001):
            handle.on_checkpoint_saved(iteration=iteration)
        grown = {name: len(value) for name, value in vars(handle.exporter).items()
                 if isinstance(value, (dict, list, set)) and len(value) >= 1000}
        assert grown == {}
        assert handle.exporter.saves_seen == 3000
    finally:
        handle.detach()


def attach_every_2nd(model, ckpt, **attach_kwargs):
    """A handle exporting every 2nd save under ``ckpt`` (sync, hf)."""
    return attach(model, ExportConfig(mode="sync", output_dir=str(ckpt.parent / "exports"), vocab_size=120,
                                        every_n_saves=2, formats=["hf"]), save_root=ckpt, **attach_kwargs)


def test_resume_after_an_odd_save_count_exports_where_the_uninterrupted_run_does(megatron_world, tmp_path):
    """Saves 1..3 (save 2 exports), the job stops, a new process resumes from save 3: saves 4 and 6
    export, as in a run never interrupted. The count lives in the checkpoint itself."""
    model = tiny_llama()
    ckpt = tmp_path / "ckpt"
    first = attach_every_2nd(model, ckpt, save_state=True)
    try:
        for it in (10, 20, 30):
            save(model, ckpt / f"iter_{it:07d}")
    finally:
        first.detach()
    assert exported(tmp_path / "exports") == ["iter_0000020"]
    resumed = attach_every_2nd(model, ckpt, save_state=True)
    try:
        resumed.resume_from(ckpt / "iter_0000030")
        for it in (40, 50, 60):
            save(model, ckpt / f"iter_{it:07d}")
    finally:
        resumed.detach()
    assert exported(tmp_path / "exports") == ["iter_0000020", "iter_0000040", "iter_0000060"]
    assert dist_checkpointing.load_common_state_dict(str(ckpt / "iter_0000050"))[STATE_KEY] == {"saves_seen": 5}


def test_a_loop_keeping_the_count_in_its_own_checkpoint_resumes_it(megatron_world, tmp_path):
    """Without save_state nothing is added to the checkpoint (a model loads it strictly); the loop
    stores checkpoint_state() with its own state and hands it back on resume."""
    model = tiny_llama()
    ckpt = tmp_path / "ckpt"

    def loop_save(handle, it):
        directory = ckpt / f"iter_{it:07d}"
        directory.mkdir(parents=True)
        dist_checkpointing.save({"model": model.sharded_state_dict(), STATE_KEY: handle.checkpoint_state()},
                                str(directory))

    first = attach_every_2nd(model, ckpt)
    try:
        for it in (1, 2, 3):
            loop_save(first, it)
        plain = tmp_path / "plain" / "iter_0000001"
        save(model, plain)
        assert STATE_KEY not in dist_checkpointing.load_common_state_dict(str(plain))
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(plain))
        model.load_state_dict(loaded)  # strict: nothing was added
    finally:
        first.detach()
    resumed = attach_every_2nd(model, ckpt)
    try:
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt / "iter_0000003"))
        resumed.load_state_dict(state[STATE_KEY])
        for it in (4, 5, 6):
            loop_save(resumed, it)
    finally:
        resumed.detach()
    assert exported(tmp_path / "exports") == ["iter_0000002", "iter_0000004", "iter_0000006"]
