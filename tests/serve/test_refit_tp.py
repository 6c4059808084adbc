"""Live refit of a server with inference tensor parallelism 2 (two vLLM workers, gloo on CPU):
each worker runs our backend's `receive_weights`, connects to the writer and receives the full HF
tensors, and vLLM's loaders keep each rank's shard. Afterwards the server answers as transformers
on the new export (seen: 1.5e-6; before the refit: 2.7 away). One server start (~20-30 s idle,
~190 s on a loaded 2-core machine): the price of the only TP > 1 check that runs on CPU."""

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.serve import support
from tests.support.models import randomize, tiny_llama

support.require_vllm()

from megatron_trt_ext.serve.client import VLLMServer, refit  # noqa: E402
from megatron_trt_ext.utils import free_port  # noqa: E402


class TPServer(support.Server):
    """The README's server command with ``--tensor-parallel-size 2``."""

    def __init__(self, model_dir, port, log):  # noqa: D107 - same as support.Server plus TP
        self.model_dir, self.port, self.url = str(model_dir), port, f"http://127.0.0.1:{port}"
        self.log_path = log
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--skip-tokenizer-init", "--max-model-len", "64", "--tensor-parallel-size", "2",
               "--distributed-executor-backend", "mp", "--weight-transfer-config", '{"backend": "megatron_trt_ext"}']
        self.proc = subprocess.Popen(cmd, cwd=log.parent, env=support.vllm_env(), stdout=log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.heavy
def test_a_tensor_parallel_server_is_refitted_whole(megatron_world, tmp_path):
    dirs = {}
    for name, seed, iteration in (("a", 1, 100), ("b", 2, 200)):
        model = tiny_llama(**support.SHAPES)
        randomize(model, seed=seed)
        dirs[name] = support.export_hf(model, tmp_path / name, iteration)
    want = support.transformers_greedy(dirs["b"])
    server = TPServer(dirs["a"], free_port(), tmp_path / "server.log")
    try:
        server.wait_ready()
        assert VLLMServer(server.url).world_size() == 2  # so the writer waits for both workers
        before = [server.prompt_logprobs(p) for p in support.PROMPTS]
        result = refit(server.url, iter(load_file(str(dirs["b"] / "model.safetensors")).items()), 200)
        assert result.version == "200" and VLLMServer(server.url).weight_version() == "200"
        for prompt, got, old, ref in zip(support.PROMPTS, [server.prompt_logprobs(p) for p in support.PROMPTS],
                                         before, want):
            gap = max(abs(a - b) for a, b in zip(old[1:], ref["prompt_logprobs"][1:]))
            worst = max(abs(a - b) for a, b in zip(got[1:], ref["prompt_logprobs"][1:]))
            assert gap > 1e-2 and worst < support.TOLERANCE, f"prompt {prompt}: {worst:.2e} after, {gap:.2e} before"
    finally:
        server.stop()
