"""ExportConfig and recipe files: clear errors naming the option (and the file) and the fix."""

from pathlib import Path

import pytest

from megatron_trt_ext import ConfigError, ExportConfig

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = ExportConfig()
    assert cfg.formats == ["hf", "trtllm_checkpoint"] and cfg.dtype == "bfloat16"
    assert cfg.max_shard_size_bytes == 5 * 10**9


@pytest.mark.parametrize("kwargs,names", [
    ({"formats": ["hf", "onnx"]}, ["formats", "onnx", "trtllm_checkpoint"]),
    ({"formats": []}, ["formats"]),
    ({"formats": ["hf", "hf"]}, ["formats", "twice"]),
    ({"dtype": "fp64"}, ["dtype", "fp64", "bfloat16"]),
    ({"inference_tp": 0}, ["inference_tp", "between 1 and"]),
    ({"inference_pp": "2"}, ["inference_pp", "expected int", "str"]),
    ({"every_n_saves": True}, ["every_n_saves", "expected int"]),
    ({"vocab_size": 0}, ["vocab_size"]),
    ({"family": "mamba"}, ["family", "mamba", "llama"]),
    ({"max_shard_size": "lots"}, ["max_shard_size", "2GB"]),
    ({"tokenizer_dir": "/no/such/dir"}, ["tokenizer_dir", "/no/such/dir"]),
])
def test_bad_values_name_the_option(kwargs, names):
    with pytest.raises(ConfigError) as err:
        ExportConfig(**kwargs)
    for name in names:
        assert name in str(err.value)


def test_row_ranges_are_on_by_default_and_null_turns_them_off(tmp_path):
    assert ExportConfig().split_rows_over == "auto" and ExportConfig().split_rows_over_bytes is None
    recipe = tmp_path / "r.yaml"
    recipe.write_text("split_rows_over: null\n")
    assert ExportConfig.from_yaml(recipe).split_rows_over is None
    recipe.write_text("split_rows_over: 2GB\n")
    assert ExportConfig.from_yaml(recipe).split_rows_over_bytes == 2 * 10**9
    with pytest.raises(ConfigError, match="split_rows_over"):
        ExportConfig(split_rows_over="sometimes")


@pytest.mark.parametrize("text,value", [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1024", 1024)])
def test_shard_size_parsing(text, value):
    assert ExportConfig(max_shard_size=text).max_shard_size_bytes == value


def test_unwritable_output_dir_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = ExportConfig(output_dir=str(blocker / "sub"))
    with pytest.raises(ConfigError, match="output_dir: cannot write to"):
        cfg.check_output_dir_writable()


def test_recipe_with_unknown_key_names_key_and_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("formats: [hf]\ninference_tpp: 2\n")
    with pytest.raises(ConfigError) as err:
        ExportConfig.from_yaml(recipe)
    assert "inference_tpp" in str(err.value) and str(recipe) in str(err.value)
    assert "inference_tp" in str(err.value)  # the suggestion


def test_recipe_with_wrong_type_names_key_and_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dtype: bfloat16\ninference_tp: two\n")
    with pytest.raises(ConfigError) as err:
        ExportConfig.from_yaml(recipe)
    assert "inference_tp" in str(err.value) and str(recipe) in str(err.value)


def test_recipe_must_be_a_mapping_and_is_loaded_safely(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- hf\n- trtllm_checkpoint\n")
    with pytest.raises(ConfigError, match="mapping"):
        ExportConfig.from_yaml(listing)
    evil = tmp_path / "evil.yaml"
    evil.write_text("formats: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ExportConfig.from_yaml(evil)
    with pytest.raises(ConfigError, match="cannot read"):
        ExportConfig.from_yaml(tmp_path / "missing.yaml")


def test_keyword_overrides_win_over_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dtype: float16\ninference_tp: 2\n")
    cfg = ExportConfig.from_yaml(recipe, output_dir="elsewhere", inference_tp=4)
    assert (cfg.dtype, cfg.inference_tp, cfg.output_dir) == ("float16", 4, "elsewhere")
    with pytest.raises(ConfigError, match="bogus"):
        ExportConfig.from_yaml(recipe, bogus=1)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_shipped_recipes_load(recipe, tmp_path):
    cfg = ExportConfig.from_yaml(recipe, output_dir=str(tmp_path))
    assert cfg.recipe == str(recipe)
    assert cfg.quantization.refusal(cfg.formats) is None  # every shipped recipe writes what some engine loads


def test_sections_are_parsed_once_into_their_typed_options():
    """A recipe's mappings and the typed objects give the same config; readers see the typed one."""
    from megatron_trt_ext.engines.options import BuildOptions
    from megatron_trt_ext.quant.spec import QuantSpec
    from megatron_trt_ext.verification.spec import VerificationOptions

    given = {"quantization": {"algorithm": "fp8", "kv_cache": "fp8"}, "build": {"max_batch_size": 2},
             "verification": {"enabled": False}}
    cfg = ExportConfig(**given)
    assert isinstance(cfg.quantization, QuantSpec) and cfg.quantization.algorithm == "fp8"
    assert isinstance(cfg.build, BuildOptions) and cfg.build.max_batch_size == 2
    assert isinstance(cfg.verification, VerificationOptions) and cfg.verification.enabled is False
    typed = ExportConfig(quantization=QuantSpec.from_dict(given["quantization"]),
                         build=BuildOptions(max_batch_size=2), verification=VerificationOptions(enabled=False))
    assert typed == cfg and typed.to_dict() == cfg.to_dict()
    assert cfg.to_dict()["quantization"]["kv_cache"] == "fp8" and cfg.to_dict()["build"]["max_batch_size"] == 2


def test_typed_sections_are_checked_like_mappings():
    from megatron_trt_ext.engines.options import BuildOptions
    from megatron_trt_ext.quant.spec import QuantSpec

    with pytest.raises(ConfigError, match="quantization.algorithm: unknown 'fp9'"):
        ExportConfig(quantization=QuantSpec(algorithm="fp9"))
    with pytest.raises(ConfigError, match="build.max_batch_size"):
        ExportConfig(build=BuildOptions(max_batch_size=0))
    with pytest.raises(ConfigError, match="build: expected a mapping of build options, got list"):
        ExportConfig(build=[1])


def test_config_is_frozen_after_validation_and_replace_revalidates():
    import dataclasses

    cfg = ExportConfig(formats="hf", max_shard_size="2GB")
    assert cfg.formats == ["hf"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vocab_size = 100
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.quantization = {"algorithm": "fp8"}
    changed = dataclasses.replace(cfg, vocab_size=100, max_shard_size="1GB")
    assert (changed.vocab_size, changed.max_shard_size_bytes, cfg.vocab_size) == (100, 10**9, None)
    with pytest.raises(ConfigError, match="vocab_size"):
        dataclasses.replace(cfg, vocab_size=0)


def test_recipe_round_trip_keeps_every_value(tmp_path):
    import yaml

    cfg = ExportConfig(formats=["hf"], dtype="float16", quantization={"algorithm": "fp8"}, keep_last=2,
                       max_shard_size="1GB", build={"max_seq_len": 4096})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "recipe"}))
    again = ExportConfig.from_yaml(recipe)
    assert {**again.to_dict(), "recipe": None} == cfg.to_dict()


def test_family_names_are_the_family_tables():
    """`family:` is validated without importing the tables; the two lists must name the same families."""
    from megatron_trt_ext.arch import FAMILIES as TABLES
    from megatron_trt_ext.config import FAMILIES

    assert FAMILIES[0] == "auto" and sorted(FAMILIES[1:]) == sorted(TABLES)
