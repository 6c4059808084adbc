"""Build HF exports in the main test environment, for the vLLM suite: what .venv-vllm cannot build
itself (scripts/test-serve installs neither ModelOpt nor megatron-core 0.19).

    python -m tests.serve.main_export SPEC.json

SPEC is ``[{"family": NAME, "out": DIR, "seed": n, "quantization": {...} or null}]``; prints
``EXPORTS [hf_dir, ...]``. Run by `test_families` with the main environment's Python (and
megatron-core 0.19 on PYTHONPATH for the families that need it).
"""

import json
import sys

from tests.serve.support import SHAPES, VOCAB

MOE = dict(moe_ffn_hidden_size=128)


def build(family: str):
    from tests.support import families as fam
    from tests.support.models import tiny_llama

    if family == "llama":
        return tiny_llama(**SHAPES)
    if family == "gemma":
        return fam.tiny_gemma(**SHAPES)
    if family == "deepseek":  # vLLM's CPU MLA wants kv_lora_rank + rope dim = 576
        return fam.tiny_deepseek(hidden_size=256, num_attention_heads=4, kv_lora_rank=512, qk_pos_emb_head_dim=64,
                                 qk_head_dim=64, v_head_dim=64, ffn_hidden_size=384,
                                 moe_shared_expert_intermediate_size=128, **MOE)
    if family == "nemotron_h":
        return fam.tiny_nemotron_h(**SHAPES, mamba_head_dim=64)
    raise ValueError(f"unknown family {family!r}")


def main(spec: list) -> list:
    from examples.cpu_shim import stub_triton_only_modules

    stub_triton_only_modules()
    from megatron_trt_ext import ExportConfig, Exporter
    from tests.support.models import init_single_process, randomize

    init_single_process(seed=1234)
    dirs = []
    for case in spec:
        model = build(case["family"])
        randomize(model, seed=case.get("seed", 0))
        config = ExportConfig(output_dir=case["out"], formats=["hf"], dtype="bfloat16", vocab_size=VOCAB,
                              mode="sync", quantization=case.get("quantization"),
                              serve=case.get("serve"))
        dirs.append(str(Exporter(model, config).export(iteration=1).path / "hf"))
    return dirs


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print("EXPORTS " + json.dumps(main(json.load(f))))
