"""Quantized live refit (issue 19, item 2): an ``fp8_pc_pt`` export run with ``serve:`` set streams
the recipe's quantized tensors and their scales (FP8 weights, per-channel ``weight_scale``, what the
HF export writes) into a running vLLM server started on another fp8_pc_pt export of the model;
afterwards the server answers as a fresh vLLM load of the new export.

``fp8_pc_pt`` is the one quantized format whose kernels run on this CPU (AVX2), in bf16 with a bf16
KV cache (vLLM runs ModelOpt checkpoints in bf16/fp16 only). The exports need ModelOpt, so the main
test environment builds them (`test_families.main_exports`): the second one, with the server's
URL in its ``serve:`` section, is the training side's real path (`serve.sink.RefitSink`)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.serve import support
from tests.serve.test_families import main_exports
from megatron_trt_ext.utils import free_port

support.require_vllm()

FP8 = {"algorithm": "fp8_pc_pt"}
VLLM_KWARGS = dict(dtype="bfloat16", kv_cache_dtype="bfloat16")


def served(server) -> list:
    return [server.prompt_logprobs(p) for p in support.PROMPTS]


def worst_gap(got: list, fresh: list) -> float:
    return max(abs(a - b) for g, f in zip(got, fresh, strict=True)
               for a, b in zip(g[1:], f["prompt_logprobs"][1:], strict=True))


@pytest.mark.heavy  # three processes: the vLLM server, the main environment's export, vLLM offline
def test_fp8_pc_pt_refit_serves_what_a_fresh_load_of_the_export_serves(tmp_path):
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
    (first,) = main_exports([{"family": "llama", "seed": 31, "quantization": FP8}], tmp_path / "a")
    server = support.Server(first, free_port(), tmp_path / "server.log", dtype="bfloat16",
                            extra=("--kv-cache-dtype", "bfloat16"))
    try:
        server.wait_ready()
        before = served(server)
        (second,) = main_exports([{"family": "llama", "seed": 32, "quantization": FP8,
                                   "serve": {"url": server.url, "timeout_s": 120}}], tmp_path / "b")
        record = json.loads((second.parent / "manifest.json").read_text())["serve"]
        assert (record["status"], record["version"]) == ("complete", "1"), record
        after = served(server)
    finally:
        server.stop()
    written = {k: v for path in second.glob("*.safetensors") for k, v in load_file(str(path)).items()}
    assert any(t.dtype == torch.float8_e4m3fn for t in written.values()) and any(
        name.endswith(".weight_scale") for name in written), "not an FP8 export with scales"
    # every tensor the HF export wrote went to the server, FP8 weights and their scales included
    assert record["bytes"] == sum(t.numel() * t.element_size() for t in written.values()), record
    fresh_first, fresh_second = support.vllm_offline([first, second], tmp_path, **VLLM_KWARGS)
    gap_models = worst_gap(before, fresh_second)
    assert gap_models > 0.1, "the two exports answer alike: the refit check below could not fail"
    gap_before, gap_after = worst_gap(before, fresh_first), worst_gap(after, fresh_second)
    print(f"\nfp8_pc_pt refit: server vs fresh load, before {gap_before:.3e}, after {gap_after:.3e} "
          f"(the two exports differ by {gap_models:.3e})")
    assert gap_before == 0.0, f"the server on the first export differs from a fresh load by {gap_before:.3e}"
    assert gap_after == 0.0, f"after the refit the server differs from a fresh load by {gap_after:.3e}"
