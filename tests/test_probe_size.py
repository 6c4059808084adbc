"""The probe's size rule (issue 22): what the recipe leaves unset shrinks for large models, what it
sets is never overridden, and the size an export used is the one the manifest records and the
probe file holds (so `verify` runs the same tokens).

The rule as documented (docs/verification.md): seq_len 32 (at most max_position_embeddings);
tokens = min(128, max(64, floor(2^36 / (2 x parameters)))); num_sequences = max(1, tokens // seq_len).
The expected shapes below are worked out by hand from that text, not taken from the code."""

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import ConfigError, ExportConfig, Exporter
from megatron_trt_ext import manifest as mf
from megatron_trt_ext.verification import probe as probe_mod
from megatron_trt_ext.verification.spec import VerificationOptions, probe_size

VOCAB = 120

# parameters -> (num_sequences, seq_len), 2^36 = 68_719_476_736:
RULE_CASES = [
    (1_000_000, 4, 32),         # 2^36 / 2e6 = 34359 tokens, capped at 128 -> 4 x 32
    (125_000_000, 4, 32),       # 2^36 / 2.5e8 = 274.9 -> 128 -> 4 x 32
    (268_435_456, 4, 32),       # 2^28: 2^36 / 2^29 = 128 exactly -> 4 x 32
    (268_435_457, 3, 32),       # one more: 127.99 -> 127 tokens -> 3 x 32
    (350_000_000, 3, 32),       # 2^36 / 7e8 = 98.2 -> 98 -> 3 x 32
    (536_870_913, 2, 32),       # 2^29 + 1: 63.99 -> floor 64 -> 2 x 32
    (70_000_000_000, 2, 32),    # 0.49 -> floor 64 -> 2 x 32
    (405_000_000_000, 2, 32),
]


@pytest.mark.parametrize("parameters, sequences, seq_len", RULE_CASES)
def test_unset_sizes_follow_the_rule(parameters, sequences, seq_len):
    size = probe_size(VerificationOptions.from_dict({}), parameters, max_positions=4096)
    assert (size.num_sequences, size.seq_len) == (sequences, seq_len)
    assert size.record()["forward_flops"] == 2 * parameters * sequences * seq_len
    assert (size.record()["num_sequences"], size.record()["seq_len"]) == ("rule", "rule")


def test_short_models_and_unknown_counts():
    options = VerificationOptions.from_dict({})
    # max_position_embeddings 16: seq_len 16; 125M parameters -> 128 tokens -> 8 x 16
    assert (probe_size(options, 125_000_000, 16).num_sequences, probe_size(options, 125_000_000, 16).seq_len) == (8, 16)
    # an unknown count (older callers) is sized as a small model: 4 x 32
    assert (probe_size(options, None).num_sequences, probe_size(options, None).seq_len) == (4, 32)


@pytest.mark.parametrize("parameters", [1_000_000, 350_000_000, 70_000_000_000])
def test_what_the_recipe_sets_is_never_overridden(parameters):
    both = probe_size(VerificationOptions.from_dict({"num_sequences": 7, "seq_len": 5}), parameters, 4096)
    assert (both.num_sequences, both.seq_len) == (7, 5)
    assert (both.record()["num_sequences"], both.record()["seq_len"]) == ("recipe", "recipe")
    many = probe_size(VerificationOptions.from_dict({"num_sequences": 16}), parameters, 4096)
    assert (many.num_sequences, many.seq_len) == (16, 32)
    # seq_len set, num_sequences by the rule over that length: 70B -> 64 tokens -> 8 x 8; small -> 128 -> 16 x 8
    short = probe_size(VerificationOptions.from_dict({"seq_len": 8}), parameters, 4096)
    assert short.seq_len == 8 and short.num_sequences == (8 if parameters == 70_000_000_000 else
                                                          12 if parameters == 350_000_000 else 16)
    # a sequence longer than the whole budget: one sequence of it, never cut
    long = probe_size(VerificationOptions.from_dict({"seq_len": 1000}), parameters, 4096)
    assert (long.num_sequences, long.seq_len) == (1, 1000)


def test_unset_sizes_round_trip_through_the_config():
    with pytest.raises(ConfigError, match="verification.top_k"):  # only the sizes may be left to the rule
        ExportConfig(verification={"top_k": None})
    with pytest.raises(ConfigError, match="verification.seq_len"):
        ExportConfig(verification={"seq_len": 0})
    config = ExportConfig(verification={"top_k": 4})
    assert (config.verification.num_sequences, config.verification.seq_len) == (None, None)
    recorded = config.to_dict()["verification"]  # what the manifest's config says: unset, sized by the rule
    assert (recorded["num_sequences"], recorded["seq_len"]) == (None, None)
    again = ExportConfig(verification=recorded)
    assert (again.verification.num_sequences, again.verification.seq_len) == (None, None)


@pytest.mark.parametrize("recipe, shape, origin", [
    ({}, (2, 32), ("rule", "rule")),                                        # 600M counted: 2 x 32
    ({"num_sequences": 5, "seq_len": 16}, (5, 16), ("recipe", "recipe")),  # set: kept as set
])
def test_an_export_records_its_size_and_verify_uses_its_tokens(megatron_world, tmp_path, monkeypatch, recipe, shape,
                                                              origin):
    pytest.importorskip("transformers", reason="verify loads the HF export with transformers")
    from megatron_trt_ext.verification.check import verify
    from tests.support.models import randomize, tiny_llama

    counted, real_count = [], probe_mod.parameter_count

    def as_if_600m(units):  # the tiny model stands for a 600M one: 2^36 / 1.2e9 = 57 -> 64 tokens
        counted.append(real_count(units))
        return 600_000_000

    monkeypatch.setattr(probe_mod, "parameter_count", as_if_600m)
    model = tiny_llama()
    randomize(model, seed=3)
    config = ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB, mode="sync", formats=["hf"],
                          verification={"top_k": 4, **recipe})
    result = Exporter(model, config).export(iteration=1)
    entry = mf.read_manifest(result.path)["verification"]
    assert entry["status"] == "recorded" and entry["probe_shape"] == list(shape)
    assert entry["size"]["parameters"] == 600_000_000
    assert (entry["size"]["num_sequences"], entry["size"]["seq_len"]) == origin
    # the real count the exporter passed: every exported tensor of the tiny model (tied: one table)
    assert counted == [sum(p.numel() for p in model.parameters())]
    assert load_file(str(result.path / "verification.safetensors"))["tokens"].shape == torch.Size(shape)
    report = verify(result.path, record=False)
    assert report.passed, report.data


def test_the_probe_cost_bench_measures_each_candidate(megatron_world, tmp_path):
    """`bench.probe_cost.measure` (also `bench.gpu_checks --only probe_cost`) on a toy model: the
    probe it times is recorded, at the rule's size, with the weights rounded (float32 model)."""
    from bench.probe_cost import build, measure

    model, vocab = build("tiny")
    result = measure(model, vocab, 1, tmp_path)
    assert result["reference"] == "as_exported" and result["rule_shape"] == [4, 32]
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert set(result["median"]) == {"copy", "probe", "probe_4x32", "live", "rounding"}
    assert all(v > 0 for v in result["median"].values())
