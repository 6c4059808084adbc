"""vLLM as a verified consumer: every family's bf16 HF export loads in vLLM (float32, eager) and gives
transformers' greedy tokens and log-probabilities (within 2e-4) on the same export. The exports
are built by the package's Exporter from randomized Megatron models with vLLM-sized heads; all of
them run in one vLLM child process."""

import zlib

import pytest

from tests.serve import support
from tests.support import families as fam
from tests.support.models import randomize, tiny_gpt, tiny_llama

support.require_vllm()

S = support.SHAPES
MOE = dict(moe_ffn_hidden_size=128)
FAMILIES = {
    # name: (builder, HF architecture)
    "llama": (lambda: tiny_llama(**S), "LlamaForCausalLM"),
    "mixtral": (lambda: tiny_llama(moe=True, moe_ffn_hidden_size=128, **S), "MixtralForCausalLM"),
    "qwen3": (lambda: fam.tiny_qwen3(**S), "Qwen3ForCausalLM"),
    "qwen3_moe": (lambda: fam.tiny_qwen3_moe(**S, **MOE), "Qwen3MoeForCausalLM"),
    "starcoder2": (lambda: fam.tiny_starcoder2(**S), "Starcoder2ForCausalLM"),
    "nemotron": (lambda: fam.tiny_nemotron(**S), "NemotronForCausalLM"),
    "gpt2": (lambda: tiny_gpt(**{**S, "num_query_groups": 4}), "GPT2LMHeadModel"),
}


@pytest.fixture(scope="module")
def served(megatron_world, tmp_path_factory):
    """Per family: (architecture in config.json, transformers' outputs, vLLM's outputs)."""
    import json

    root = tmp_path_factory.mktemp("families")
    dirs, refs, archs = [], {}, {}
    for name, (build, _) in FAMILIES.items():
        model = build()
        randomize(model, seed=zlib.crc32(name.encode()) % 1000)
        hf_dir = support.export_hf(model, root / name)
        archs[name] = json.loads((hf_dir / "config.json").read_text())["architectures"]
        refs[name] = support.transformers_greedy(hf_dir)
        dirs.append(hf_dir)
    got = dict(zip(FAMILIES, support.vllm_offline(dirs, root)))
    return {name: (archs[name], refs[name], got[name]) for name in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_serves_the_export_as_transformers_computes_it(served, family):
    architecture, want, got = served[family]
    assert architecture == [FAMILIES[family][1]]
    support.assert_same_outputs(got, want, family)
