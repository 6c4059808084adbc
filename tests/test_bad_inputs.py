"""Every bad path, file, directory or address a user gives (issue 21), through the user's own entry
points: the Megatron-LM flags at the launcher's attach (`_attach_to_run`, once the model exists and
before the first iteration) and the `megatron-trt-ext export` command before it loads a checkpoint.
Each fails with a ConfigError (exit status 2 for the command) that names the key or flag, the value
and the fix, and nothing is written.

The same checks at the API level (ExportConfig, attach) are in test_config.py, test_recipes.py,
test_tokenizer_export.py (a tokenizer transformers cannot load, one larger than the export) and
test_faults.py (calibration files)."""

import argparse
import importlib.util
import os

import pytest

from megatron_trt_ext import ConfigError, cli
from megatron_trt_ext.megatron_lm import _attach_to_run, add_export_args
from tests.support.models import tiny_llama


def _paths(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "unwritable.yaml").write_text(f"formats: [hf]\noutput_dir: {tmp_path / 'a_file' / 'exports'}\n")
    return tmp_path


# (flags, the words the message must hold: key or flag, value, fix); {t} is the test's directory.
FLAG_CASES = {
    "recipe name unknown": (["--export-recipe", "fp9"], ["recipe", "'fp9'", "the name of a shipped one: bf16"]),
    "recipe file missing": (["--export-recipe", "{t}/nope/mine.yaml"],
                            ["recipe", "{t}/nope/mine.yaml", "No such file", "give the path of a YAML recipe"]),
    "recipe is a directory": (["--export-recipe", "{t}/empty"],
                              ["recipe", "{t}/empty", "a directory", "give the path of a YAML recipe"]),
    "export dir under a file": (["--export-dir", "{t}/a_file/exports"],
                                ["output_dir", "{t}/a_file/exports", "choose a writable directory"]),
    "export dir is a file": (["--export-dir", "{t}/a_file"],
                             ["output_dir", "{t}/a_file", "choose a writable directory"]),
    "recipe's output_dir unwritable": (["--export-recipe", "{t}/unwritable.yaml"],
                                       ["output_dir", "{t}/a_file/exports", "choose a writable directory"]),
    "tokenizer dir missing": (["--export-tokenizer-dir", "{t}/nope"],
                              ["tokenizer_dir", "{t}/nope", "not a directory", "save_pretrained"]),
    "tokenizer dir is a file": (["--export-tokenizer-dir", "{t}/a_file"],
                                ["tokenizer_dir", "{t}/a_file", "not a directory", "save_pretrained"]),
    "tokenizer dir without tokenizer files": (["--export-tokenizer-dir", "{t}/empty"],
                                              ["tokenizer_dir", "{t}/empty", "holds no tokenizer file",
                                               "save_pretrained"]),
    "HuggingFaceTokenizer model dir without tokenizer files": (
        ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{t}/empty"],
        ["tokenizer_dir", "--tokenizer-model '{t}/empty'", "holds no tokenizer file", "save_pretrained"]),
    "serve url without scheme": (["--export-serve-url", "localhost:8000"],
                                 ["url", "'localhost:8000'", "http://127.0.0.1:8000"]),
    "serve url of another scheme": (["--export-serve-url", "ftp://host:21"],
                                    ["url", "'ftp://host:21'", "http://127.0.0.1:8000"]),
}


def _megatron_args(tmp_path, flags):
    parser = argparse.ArgumentParser()  # the Megatron-LM arguments the hooks read, then the --export-* flags
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--tokenizer-type", default="NullTokenizer")
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--load", default=None)
    args = add_export_args(parser).parse_args(flags)
    if args.export_dir is None and not (args.export_recipe or "").endswith("unwritable.yaml"):
        args.export_dir = str(tmp_path / "exports")  # where the case is not about the export dir
    args.rank = 0
    return args


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_each_bad_megatron_lm_input_fails_at_attach_naming_key_value_and_fix(megatron_world, tmp_path, case):
    t = _paths(tmp_path)
    flags, words = FLAG_CASES[case]
    args = _megatron_args(t, [f.format(t=t) for f in flags])
    with pytest.raises(ConfigError) as err:
        _attach_to_run(tiny_llama(), args)
    message = str(err.value)
    for word in words:
        assert word.format(t=t) in message, message
    assert len(message) < 1000
    assert not (t / "exports").exists() or not any((t / "exports").iterdir())


# `megatron-trt-ext export`: bad input fails before a checkpoint is loaded (exit status 2).
EXPORT_CASES = {
    "checkpoint missing": (["{t}/nope"], ["checkpoint", "{t}/nope", "give a Megatron-LM --save directory"]),
    "checkpoint without tracker file": (["{t}/empty"], ["{t}/empty", "latest_checkpointed_iteration.txt",
                                                         "pass --iteration N"]),
    "iteration missing": (["{t}/empty", "--iteration", "3"], ["iteration 3", "iter_0000003 is missing"]),
    "recipe name unknown": (["{t}/ckpt/iter_0000001", "--recipe", "fp9"],
                            ["recipe", "'fp9'", "the name of a shipped one: bf16"]),
    "output dir under a file": (["{t}/ckpt/iter_0000001", "--output-dir", "{t}/a_file/out"],
                                ["output_dir", "{t}/a_file/out", "choose a writable directory"]),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_each_bad_export_command_input_fails_before_loading(tmp_path, capsys, case):
    t = _paths(tmp_path)
    (t / "ckpt" / "iter_0000001").mkdir(parents=True)  # no checkpoint in it: a load would fail otherwise
    args, words = EXPORT_CASES[case]
    argv = ["export", *[a.format(t=t) for a in args]]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(t / "out")]
    assert cli.main(argv) == 2
    message = capsys.readouterr().err
    for word in words:
        assert word.format(t=t) in message, message
    assert not (t / "out").exists() or not any((t / "out").iterdir())


def test_export_cpu_without_megatron_training_is_named(tmp_path, capsys, monkeypatch):
    """`export --cpu` needs Megatron-LM's model builders; without them: exit 2 before CPU mode starts."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "megatron.training" else real(name, *a))
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert cli.main(["export", "--cpu", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "export --cpu: megatron.training is not importable" in message and "megatron-core >= 0.18" in message
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # CPU mode did not start
