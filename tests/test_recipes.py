"""Shipped recipes: package data addressable by name (a path still works), listed by the CLI, and in
the wheel (with nothing test-only beside them)."""

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from megatron_trt_ext import ConfigError, ExportConfig, recipes
from megatron_trt_ext.megatron_lm import add_export_args, config_from_args

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.stem for p in (ROOT / "megatron_trt_ext" / "recipes").glob("*.yaml"))


def test_every_shipped_recipe_loads_by_name(tmp_path):
    assert recipes.names() == SHIPPED and "fp8" in SHIPPED and "bf16" in SHIPPED
    for name in SHIPPED:
        by_name = ExportConfig.from_yaml(name, output_dir=str(tmp_path))
        by_file = ExportConfig.from_yaml(ROOT / "megatron_trt_ext" / "recipes" / f"{name}.yaml",
                                         output_dir=str(tmp_path))
        assert by_name.to_dict() | {"recipe": None} == by_file.to_dict() | {"recipe": None}, name
    assert ExportConfig.from_yaml("fp8.yaml", output_dir=str(tmp_path)).quantization.algorithm == "fp8"


def test_a_file_of_ones_own_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("fp8").write_text("formats: [hf]\ndtype: float16\n")
    cfg = ExportConfig.from_yaml("fp8", output_dir=str(tmp_path))
    assert (cfg.dtype, cfg.formats, cfg.quantization.algorithm) == ("float16", ["hf"], "none")


def test_an_unknown_recipe_names_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe 'fp9': cannot read it .*shipped one: .*bf16.*fp8"):
        ExportConfig.from_yaml("fp9", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"nope/fp8.yaml.*cannot read it"):
        ExportConfig.from_yaml(tmp_path / "nope" / "fp8.yaml", output_dir=str(tmp_path))


def test_megatron_lm_flag_takes_a_recipe_name(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab-size", type=int, default=None)
    args = add_export_args(parser).parse_args(["--export-recipe", "nvfp4", "--export-dir", str(tmp_path),
                                               "--export-serve-url", "http://127.0.0.1:8000"])
    cfg = config_from_args(args)
    assert cfg.quantization.algorithm == "nvfp4" and cfg.serve.url == "http://127.0.0.1:8000"


def test_cli_lists_the_shipped_recipes():
    done = subprocess.run([sys.executable, "-m", "megatron_trt_ext.cli", "recipes", "--json"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert sorted(rows) == SHIPPED
    for name, row in rows.items():
        data = yaml.safe_load((ROOT / "megatron_trt_ext" / "recipes" / f"{name}.yaml").read_text())
        assert row["formats"] == data["formats"], name
        assert row["algorithm"] == (data.get("quantization") or {}).get("algorithm", "none"), name
        assert row["about"], name  # each recipe says what it is and what loads it
    table = subprocess.run([sys.executable, "-m", "megatron_trt_ext.cli", "recipes"], capture_output=True, text=True,
                           timeout=120, cwd=ROOT).stdout
    assert all(any(line.startswith(name + " ") for line in table.splitlines()) for name in SHIPPED)


def test_the_wheel_ships_the_recipes_and_nothing_test_only(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("megatron_trt_ext-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"megatron_trt_ext/recipes/{n}.yaml" for n in SHIPPED} <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "examples/", "bench/"))
                or "/testing/" in n or n.endswith("cpu_shim.py")]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[vllm.general_plugins]" in text and "megatron_trt_ext.serve.plugin:register" in text
