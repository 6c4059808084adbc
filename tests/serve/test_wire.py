"""The host transport on its own (no vLLM needed): many writers stream at once into one reader,
every tensor arrives exact; a stale token, a writer that fails and a reader that stops are errors
that name the writer, on both ends."""

import threading

import pytest
import torch

from megatron_trt_ext.serve import reader, wire
from megatron_trt_ext.serve.writer import TensorWriter


def stream(prefix, n, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(len(prefix))
    return [(f"{prefix}.{i}.weight", torch.randn(3 + i, 5, generator=gen).to(dtype)) for i in range(n)]


def test_many_writers_stream_into_one_reader_exactly():
    sent = {"w0": stream("model.layers.0", 6), "w1": stream("model.layers.1", 4, torch.float32), "w2": []}
    writers = [TensorWriter(iter(items), "7", "tok", frame_bytes=100).start() for items in sent.values()]
    got = {}
    totals = reader.receive([w.address() for w in writers], "tok", got.update)
    stats = [w.wait(10) for w in writers]
    want = dict(kv for items in sent.values() for kv in items)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert totals["tensors"] == 10 and totals["writers"] == 3 and sum(s["tensors"] for s in stats) == 10
    assert stats[0]["frames"] > 1  # batched by size


def test_a_stale_token_gets_nothing():
    writer = TensorWriter(iter(stream("x", 2)), "1", "right", connect_timeout=5).start()
    with pytest.raises(wire.WireError, match="wrong or stale refit token"):
        reader.receive([writer.address()], "stale", lambda batch: pytest.fail("no batch may arrive"), timeout=5)
    got = {}
    reader.receive([writer.address()], "right", got.update, timeout=5)  # the writer still waits for its reader
    assert len(got) == 2 and writer.wait(5)["tensors"] == 2


def test_a_failing_writer_is_named_and_nothing_is_acknowledged():
    def fails():
        yield from stream("y", 2)
        raise RuntimeError("rank 3 could not convert")

    good = TensorWriter(iter(stream("z", 3)), "1", "t", frame_bytes=1).start()
    bad = TensorWriter(fails(), "1", "t", frame_bytes=1).start()
    with pytest.raises(wire.WireError, match=f"writer {bad.address()} stopped: RuntimeError: rank 3 could not"):
        reader.receive([good.address(), bad.address()], "t", lambda batch: None, timeout=10)
    with pytest.raises(RuntimeError, match="rank 3"):
        bad.wait(10)
    with pytest.raises(wire.WireError, match="without acknowledging"):
        good.wait(10)  # its stream was whole, but the refit was not: no success on either end


def test_a_reader_that_fails_to_apply_fails_the_writer():
    writer = TensorWriter(iter(stream("q", 3)), "1", "t", frame_bytes=1).start()

    def apply(batch):
        raise KeyError("no such parameter in the served model")

    with pytest.raises(KeyError):
        reader.receive([writer.address()], "t", apply, timeout=10)
    with pytest.raises((wire.WireError, OSError)):
        writer.wait(10)


def test_a_cut_stream_is_not_a_whole_one():
    """A writer whose connection drops between frames: the reader sees no end frame and fails."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def half_writer():
        conn, _ = listener.accept()
        wire.recv_frame(conn)  # the hello
        wire.send_frame(conn, wire.DATA, 0, wire.encode_batch(stream("c", 1), "1"))
        conn.close()

    threading.Thread(target=half_writer, daemon=True).start()
    with pytest.raises(wire.WireError, match=f"{address}.*connection closed"):
        reader.receive([address], "t", lambda batch: None, timeout=10)
    listener.close()


def test_a_called_off_refit_stops_its_writers_at_once():
    """Rank 0 calls the refit off (`writer.call_off`): a writer still waiting for server workers,
    and one blocked on a reader that stopped reading, both stop now with the reason, not at their
    timeouts (60 s here); a wrong token calls nothing off."""
    import time

    from megatron_trt_ext.serve.writer import call_off

    waiting = TensorWriter(iter(stream("a", 2)), "1", "tok", connect_timeout=60, io_timeout=60).start()
    big = [(f"t{i}", torch.zeros(1 << 20)) for i in range(64)]  # 256 MB: more than the socket buffers
    stalled = TensorWriter(iter(big), "1", "tok", connect_timeout=60, io_timeout=60).start()
    sock = __import__("socket").create_connection(wire.parse_address(stalled.address()))
    wire.send_json(sock, wire.HELLO, 0, {"token": "tok", "rank": 0})  # connects, then never reads
    time.sleep(0.5)
    call_off([waiting.address(), stalled.address()], "stale", "no")
    assert waiting.running and stalled.running
    started = time.perf_counter()
    call_off([waiting.address(), stalled.address()], "tok", "the server failed at pause")
    for writer in (waiting, stalled):
        with pytest.raises(wire.WireError, match="called off: the server failed at pause"):
            writer.wait(10)
    assert time.perf_counter() - started < 5
    sock.close()
