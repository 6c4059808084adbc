"""Live refit of a stock vLLM OpenAI server through our weight-transfer backend: the refitted server
answers as a fresh load of the new export, reports the version, and a broken stream or a killed
server gives a clear error and never a server answering with half of two checkpoints. One server
for the module (its start dominates the time); the kill test is last."""

import os
import signal
import time

import pytest
from safetensors.torch import load_file

from tests.serve import support
from tests.support.models import randomize, tiny_llama

support.require_vllm()

from megatron_trt_ext.serve.client import RefitError, VLLMServer, refit  # noqa: E402
from megatron_trt_ext.utils import free_port  # noqa: E402

TIMINGS = {}


@pytest.fixture(scope="module")
def exports(megatron_world, tmp_path_factory):
    """Two saves of one tiny Llama (different weights): A (iteration 100) and B (200)."""
    root = tmp_path_factory.mktemp("refit")
    dirs = {}
    for name, seed, iteration in (("a", 1, 100), ("b", 2, 200)):
        model = tiny_llama(**support.SHAPES)
        randomize(model, seed=seed)
        started = time.perf_counter()
        dirs[name] = support.export_hf(model, root / name, iteration)
        TIMINGS[f"export_{name}_s"] = round(time.perf_counter() - started, 2)
    fresh = support.vllm_offline([dirs["a"], dirs["b"]], root)
    return dirs, dict(zip("ab", fresh)), root


@pytest.fixture(scope="module")
def server(exports):
    dirs, _, root = exports
    server = support.Server(dirs["a"], free_port(), root / "server.log")
    try:
        TIMINGS["server_start_s"] = round(server.wait_ready(), 2)
        yield server
    finally:
        server.stop()
        print(f"\nserve timings: {TIMINGS}")


def tensors_of(hf_dir):
    """What the HF export wrote, as the (hf_name, tensor) stream a save would send."""
    return list(load_file(str(hf_dir / "model.safetensors")).items())


def served(server):
    return [server.prompt_logprobs(p) for p in support.PROMPTS]


def assert_serves(server, fresh, what):
    for got, want in zip(served(server), fresh, strict=True):
        worst = max(abs(a - b) for a, b in zip(got[1:], want["prompt_logprobs"][1:], strict=True))
        assert worst < support.TOLERANCE, f"{what}: prompt logprobs differ from a fresh load by {worst:.2e}"


def test_served_before_refit_is_export_a(server, exports):
    _, fresh, _ = exports
    assert_serves(server, fresh["a"], "before any refit")
    # and B really differs, so the refit test below can fail
    gap = max(abs(a - b) for a, b in zip(fresh["a"][0]["prompt_logprobs"][1:], fresh["b"][0]["prompt_logprobs"][1:]))
    assert gap > 1e-2


def test_refit_serves_the_new_export_and_its_version(server, exports):
    dirs, fresh, _ = exports
    result = refit(server.url, iter(tensors_of(dirs["b"])), 200)
    TIMINGS["refit_s"] = round(result.seconds, 3)
    TIMINGS["refit_steps_s"] = result.steps
    assert (result.version, result.previous) == ("200", "default")
    assert result.tensors == len(tensors_of(dirs["b"])) and result.bytes > 0
    control = VLLMServer(server.url)
    assert control.weight_version() == "200" and not control.is_paused()
    assert_serves(server, fresh["b"], "after refit to B")


def test_broken_stream_leaves_the_server_paused_and_saying_so(server, exports):
    dirs, fresh, _ = exports

    def breaks_midway():
        for i, item in enumerate(tensors_of(dirs["a"])):
            if i == 7:
                raise RuntimeError("conversion failed on this rank")
            yield item

    with pytest.raises(RefitError, match="failed at update_weights.*conversion failed on this rank") as caught:
        refit(server.url, breaks_midway(), 300, frame_bytes=1)  # one tensor a frame: some layers applied
    assert caught.value.state == "paused" and server.url in str(caught.value)
    control = VLLMServer(server.url)
    assert control.is_paused()
    assert control.weight_version().startswith("incomplete: refit to 300 failed at update_weights")
    # the next complete refit makes it whole and serving again
    result = refit(server.url, iter(tensors_of(dirs["a"])), 100)
    assert control.weight_version() == "100" and not control.is_paused() and result.previous.startswith("incomplete")
    assert_serves(server, fresh["a"], "after a broken refit and a complete one")


def test_a_server_killed_mid_refit_is_a_clear_error(server, exports):
    dirs, _, _ = exports

    def kills_the_server():
        for i, item in enumerate(tensors_of(dirs["b"])):
            if i == 5:
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait(30)
            yield item

    started = time.perf_counter()
    with pytest.raises(RefitError) as caught:
        refit(server.url, kills_the_server(), 400, frame_bytes=1, timeout=10, stream_timeout=60)
    assert time.perf_counter() - started < 60
    error = caught.value
    assert error.step == "update_weights" and error.state == "unknown" and error.server == server.url
    assert f"refit of {server.url} to version 400 failed at update_weights" in str(error)
