"""attach(): every Nth dist_checkpointing.save exports; detach() restores the original save.

These tests pin mode="sync" to check the trigger itself; test_async.py covers the default mode."""

import json
import logging

import pytest

import megatron.core.dist_checkpointing as dist_checkpointing
from megatron.core.dist_checkpointing import serialization

from megatron_trt_ext import ConfigError, ExportConfig, attach
from megatron_trt_ext.hook import iteration_from_path
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
    assert handle.exporter.save_counts == {1: 1, 3: 2}
