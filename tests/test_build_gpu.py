"""A real TensorRT-LLM engine build from an export (needs a GPU and the real tensorrt_llm)."""

import importlib.util

import pytest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is None,
                       reason="TensorRT-LLM is not installed (its wheels come from NVIDIA's index; not "
                              "installable on this workplace's machines)"),
]


def test_real_engine_build(megatron_world, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from megatron_trt_ext import ExportConfig, Exporter
    from megatron_trt_ext.engines.options import BuildOptions
    from megatron_trt_ext.engines.runner import build_export
    from tests.support.models import tiny_llama

    model = tiny_llama().cuda()
    path = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, mode="sync")).export(1).path
    record = build_export(path, BuildOptions(max_batch_size=1, max_input_len=16, max_seq_len=32,
                                             max_num_tokens=32, devices=[0]))
    assert record["status"] in ("complete", "no_tensorrt_backend"), record
    if record["status"] == "complete":
        assert (path / "trtllm_engine" / "rank0.engine").is_file()
