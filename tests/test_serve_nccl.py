"""The NCCL transport (`serve.nccl`) on CPU: what it declares to vLLM (update and init info), the
relay that puts many writers' tensors back into the declared order, and the refusals (no CUDA at
attach, a server started with another backend). The broadcast itself needs GPUs:
`bench/gpu_checks.py --only vllm_nccl_refit`."""

import pytest
import torch

from megatron_trt_ext import ExportConfig, Exporter
from megatron_trt_ext.errors import ConfigError
from megatron_trt_ext.serve import nccl
from megatron_trt_ext.serve.client import RefitError, VLLMServer
from megatron_trt_ext.serve.writer import TensorWriter
from tests.support.models import tiny_llama

# The NCCL transport's bookkeeping: independent of the megatron-core version; pinned version only.
pytestmark = pytest.mark.heavy

SPECS = [("model.embed_tokens.weight", torch.bfloat16, (120, 8)), ("model.layers.0.mlp.up_proj.weight",
         torch.bfloat16, (16, 8)), ("model.layers.0.input_layernorm.weight", torch.float32, (8,)),
         ("model.layers.0.self_attn.k_scale", torch.float32, ()), ("lm_head.weight", torch.float8_e4m3fn, (120, 8))]


def tensor(spec, seed):
    name, dtype, shape = spec
    return name, torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_update_info_declares_names_dtypes_and_shapes_in_broadcast_order():
    info = nccl.update_info(SPECS)
    assert info["names"] == [n for n, _, _ in SPECS]
    assert info["shapes"] == [[120, 8], [16, 8], [8], [], [120, 8]]
    # vLLM's worker rebuilds each dtype with getattr(torch, name)
    assert [getattr(torch, d) for d in info["dtype_names"]] == [d for _, d, _ in SPECS]
    with pytest.raises(ValueError, match="declared twice"):
        nccl.update_info(SPECS + SPECS[:1])
    with pytest.raises(ValueError, match="nothing to broadcast"):
        nccl.update_info([])


def test_init_info_puts_the_trainer_at_rank_0_and_the_workers_after_it():
    worker, trainer = nccl.init_info("10.0.0.2", 29600, 4)
    assert worker == {"master_address": "10.0.0.2", "master_port": 29600, "rank_offset": 1, "world_size": 5,
                      "packed": False}
    assert trainer == {"master_address": "10.0.0.2", "master_port": 29600, "world_size": 5}
    with pytest.raises(ValueError):
        nccl.init_info("h", 1, 0)


def test_in_order_releases_each_tensor_when_its_turn_comes():
    order = nccl.InOrder(SPECS)
    items = [tensor(s, i) for i, s in enumerate(SPECS)]
    assert order.add(*items[2]) == [] and order.add(*items[1]) == []
    assert [n for n, _ in order.add(*items[0])] == [n for n, _, _ in SPECS[:3]]
    assert order.held_bytes == 0 and order.peak_bytes == 16 * 8 * 2 + 8 * 4
    assert order.missing() == [SPECS[3][0], SPECS[4][0]]
    with pytest.raises(ValueError, match="arrived twice"):
        order.add(*items[1])
    with pytest.raises(ValueError, match="declared torch.float32"):
        order.add(SPECS[3][0], torch.zeros((), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"declared .*\(120, 8\)"):
        order.add(SPECS[4][0], torch.zeros(8, 120).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="does not declare"):
        order.add("model.layers.9.weight", torch.zeros(1))


def test_relay_reads_many_writers_and_sends_in_the_declared_order():
    """Two writer ranks, each with its own share (one tensor a frame, so they interleave): rank 0
    broadcasts every tensor exactly, in plan order."""
    items = [tensor(s, i) for i, s in enumerate(SPECS)]
    shares = [items[1::2], items[0::2]]
    writers = [TensorWriter(iter(share), "3", "tok", frame_bytes=1, bind="127.0.0.1").start() for share in shares]
    sent = []
    totals = nccl.relay([w.address() for w in writers], "tok", nccl.InOrder(SPECS),
                        lambda n, t: sent.append((n, t)), timeout=30)
    assert [n for n, _ in sent] == [n for n, _, _ in SPECS] and totals["tensors"] == len(SPECS)
    for (name, got), (_, want) in zip(sent, items):
        assert got.dtype == want.dtype and got.reshape(-1).view(torch.uint8).equal(want.reshape(-1).view(torch.uint8)), name
    for w in writers:
        w.wait(10)


def test_relay_refuses_a_stream_that_ends_short():
    items = [tensor(s, i) for i, s in enumerate(SPECS)]
    writer = TensorWriter(iter(items[:3]), "3", "tok", bind="127.0.0.1").start()
    with pytest.raises(ValueError, match=f"without 2 declared tensors, first '{SPECS[3][0]}'"):
        nccl.relay([writer.address()], "tok", nccl.InOrder(SPECS), lambda n, t: None, timeout=30)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_nccl_transport_is_refused_at_attach_without_cuda(megatron_world, tmp_path):
    config = ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"],
                          serve={"url": "http://127.0.0.1:8000", "transport": "nccl"})
    with pytest.raises(ConfigError, match=r"serve\.transport: \"nccl\" needs CUDA.*transport: \"tcp\""):
        Exporter(tiny_llama(), config)
    with pytest.raises(ConfigError, match=r"serve\.transport: 'udp' is not a transport"):
        ExportConfig(formats=[], serve={"url": "http://127.0.0.1:8000", "transport": "udp"})


def test_a_server_without_the_nccl_backend_is_refused_before_it_is_touched(monkeypatch):
    calls = []

    def call(self, method, path, body=None, timeout=None):
        calls.append(path)
        if path.startswith("/server_info"):
            return {"vllm_config": {"weight_transfer_config": {"backend": "megatron_trt_ext"}}}
        raise AssertionError(f"{path} must not be called")

    monkeypatch.setattr(VLLMServer, "call", call)
    server = VLLMServer("http://127.0.0.1:8000")
    assert nccl.server_backend(server) == "megatron_trt_ext"
    calls.clear()
    with pytest.raises(RefitError, match=r"failed at server_info.*'megatron_trt_ext'.*\"backend\": \"nccl\"") as caught:
        nccl.refit(server, ["127.0.0.1:1"], "tok", "5", SPECS)
    assert caught.value.step == "server_info" and calls == ["/server_info?config_format=json"]


def test_the_backend_is_unknown_when_the_server_does_not_say(monkeypatch):
    def call(self, method, path, body=None, timeout=None):
        raise ConnectionError("HTTP 404")

    monkeypatch.setattr(VLLMServer, "call", call)
    assert nccl.server_backend(VLLMServer("http://127.0.0.1:8000")) is None
    nccl.check_backend(VLLMServer("http://127.0.0.1:8000"))  # not knowable: not refused


def test_rank_0_is_the_only_reader_of_the_writers_with_nccl(monkeypatch):
    """With transport nccl, every writer serves one reader (rank 0's relay), whatever the
    server's world size, and rank 0 drives `nccl.refit` with the plan's specs."""
    from megatron_trt_ext.serve import sink as sink_module
    from megatron_trt_ext.serve.options import ServeOptions

    seen = {}

    def fake_refit(server, addresses, token, version, specs, on_stream_error=None):
        seen.update(specs=specs, version=version)
        got = []
        nccl.relay(addresses, token, nccl.InOrder(specs), lambda n, t: got.append(n), timeout=30)
        seen["sent"] = got
        raise RefitError("stop here", "update_weights", server.url, "paused")

    monkeypatch.setattr(VLLMServer, "world_size", lambda self: 4)
    monkeypatch.setattr(nccl, "refit", fake_refit)

    class OneRank:
        def all_gather_object(self, obj):
            return [obj]

        def gather_object(self, obj):
            return [obj]

    sink = sink_module.RefitSink(OneRank(), 0, ServeOptions("http://127.0.0.1:9", 1, 30, "nccl"), "8", specs=SPECS)
    assert sink.writer.readers == 1
    for i, spec in enumerate(SPECS):
        sink.put(*tensor(spec, i))
    record = sink.finish(OneRank())
    assert seen["specs"] == SPECS and seen["sent"] == [n for n, _, _ in SPECS]
    assert record["status"] == "failed" and "stop here" in record["error"]

