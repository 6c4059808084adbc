"""Megatron-LM flags: parsing, recipe + overrides, errors that name the flag, attach_from_args."""

import argparse
from pathlib import Path

import pytest

from megatron_trt_ext import ConfigError
from megatron_trt_ext.megatron_lm import add_export_args, attach_from_args, config_from_args
from tests.support.models import tiny_llama

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "bf16.yaml"


def parse(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab-size", type=int, default=None)  # Megatron-LM's own flag
    return add_export_args(parser).parse_args(list(argv))


def test_export_is_off_without_dir_or_recipe():
    assert config_from_args(parse()) is None


def test_flags_override_the_recipe():
    args = parse("--export-recipe", str(RECIPE), "--export-dir", "/tmp/x", "--export-formats", "hf",
                 "--export-interval", "5", "--export-inference-tp", "2", "--export-mode", "sync",
                 "--export-keep-last", "3", "--export-vocab-size", "32000")
    cfg = config_from_args(args)
    assert (cfg.output_dir, cfg.formats, cfg.every_n_saves, cfg.inference_tp, cfg.mode, cfg.keep_last,
            cfg.vocab_size) == ("/tmp/x", ["hf"], 5, 2, "sync", 3, 32000)
    assert cfg.recipe == str(RECIPE)


def test_bad_flag_values_are_named():
    with pytest.raises(ConfigError, match="formats.*onnx.*--export-"):
        config_from_args(parse("--export-dir", "/tmp/x", "--export-formats", "hf,onnx"))
    with pytest.raises(SystemExit):  # argparse's own choice check
        parse("--export-dir", "/tmp/x", "--export-mode", "later")


def test_attach_from_args(megatron_world, tmp_path):
    assert attach_from_args(tiny_llama(), parse()) is None
    handle = attach_from_args(tiny_llama(), parse("--export-dir", str(tmp_path), "--export-mode", "sync",
                                                  "--export-formats", "hf"), tokenizer_vocab=120)
    try:
        assert handle.on_checkpoint_saved(iteration=4).ok
    finally:
        handle.detach()
    assert (tmp_path / "iter_0000004" / "hf" / "config.json").is_file()


def test_the_tokenizer_size_is_the_default_and_the_floor():
    """Megatron-LM's tokenizer decides the exported rows (NullTokenizer's EOD is its last id);
    a recipe or flag may ask for more rows, never fewer."""
    assert config_from_args(parse("--export-dir", "/tmp/x"), tokenizer_vocab=101).vocab_size == 101
    assert config_from_args(parse("--export-dir", "/tmp/x", "--export-vocab-size", "128"),
                            tokenizer_vocab=101).vocab_size == 128
    with pytest.raises(ConfigError, match="smaller than the tokenizer's 101 ids"):
        config_from_args(parse("--export-dir", "/tmp/x", "--export-vocab-size", "100"), tokenizer_vocab=101)


def test_export_flags_chain_after_the_script_s_own_provider():
    """Megatron-LM's pretrain_gpt.py passes add_modelopt_args as its extra_args_provider: the
    export flags come on top, never instead; adding them twice is harmless."""
    from megatron_trt_ext.megatron_lm import chain_export_args

    def modelopt_like(parser):
        parser.add_argument("--export-quant-cfg")
        return parser

    parser = chain_export_args(chain_export_args(modelopt_like))(argparse.ArgumentParser())
    args = parser.parse_args(["--export-quant-cfg", "fp8", "--export-dir", "/tmp/x"])
    assert (args.export_quant_cfg, args.export_dir) == ("fp8", "/tmp/x")


def test_resume_after_an_odd_save_count_exports_where_the_uninterrupted_run_does(megatron_world, tmp_path,
                                                                               monkeypatch):
    """The save hook puts the handle's state into the args Megatron-LM saves with each checkpoint;
    a run resumed from the 3rd save (every 2nd exports) exports at saves 4 and 6. Megatron-LM's
    functions are stand-ins here (tests/test_megatron_training.py runs the real loop)."""
    import copy
    import sys
    import types

    from megatron_trt_ext import megatron_lm
    from megatron_trt_ext.hook import STATE_KEY

    checkpoints = {}  # iteration -> the args saved with it (Megatron-LM pickles them into the checkpoint)
    live = {}
    training = types.ModuleType("megatron.training")
    training.get_args = lambda: live["args"]
    training.get_tokenizer = lambda: types.SimpleNamespace(vocab_size=120)
    checkpointing = types.ModuleType("megatron.training.checkpointing")
    checkpointing.load_args_from_checkpoint = lambda args: (args, checkpoints[args.iteration])
    monkeypatch.setitem(sys.modules, "megatron.training", training)
    monkeypatch.setitem(sys.modules, "megatron.training.checkpointing", checkpointing)

    def save_checkpoint(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far,
                        checkpointing_context=None, non_persistent_ckpt=False):
        if not non_persistent_ckpt:
            checkpoints[iteration] = copy.deepcopy(live["args"])

    save = megatron_lm._wrap_save(save_checkpoint)
    flags = ("--export-dir", str(tmp_path / "exports"), "--export-interval", "2", "--export-mode", "sync",
             "--export-formats", "hf")

    def run(iterations, **resumed):
        live["args"] = args = parse(*flags)
        vars(args).update({"load": None, "iteration": 0, **resumed})
        handle = megatron_lm._attach_to_run(tiny_llama(), args)
        monkeypatch.setattr(megatron_lm._State, "handle", handle)
        try:
            for iteration in iterations:
                save(iteration, None, None, None, 0)
                save(iteration + 5, None, None, None, 0, non_persistent_ckpt=True)  # neither counts nor exports
        finally:
            handle.detach()

    run((10, 20, 30))
    assert sorted(p.name for p in (tmp_path / "exports").glob("iter_*")) == ["iter_0000020"]
    assert getattr(checkpoints[30], STATE_KEY) == {"saves_seen": 3}
    run((40, 50, 60), load=str(tmp_path / "ckpt"), iteration=30)
    assert sorted(p.name for p in (tmp_path / "exports").glob("iter_*")) == [
        "iter_0000020", "iter_0000040", "iter_0000060"]
