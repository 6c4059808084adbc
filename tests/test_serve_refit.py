"""Live refit from the training side (issue 19, item 2), without vLLM: a fake server
(`tests.support.fake_vllm`, real HTTP and a real `serve.reader`) must receive exactly the tensors of
the HF export written beside it, from one rank and from two, in sync and async modes; a dead or
dying server is a failed refit that is recorded and never fails the export or training."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import ExportConfig, Exporter
from megatron_trt_ext.errors import ConfigError, ExportError
from megatron_trt_ext.listing import list_exports, table
from megatron_trt_ext.megatron_lm import add_export_args, config_from_args
from megatron_trt_ext.metrics import log_line
from megatron_trt_ext.serve.options import ServeOptions
from tests.support.distributed import run_ranks
from tests.support.fake_vllm import FakeVLLM
from tests.support.models import medium_llama, randomize, tiny_llama

# Sockets, writer threads and a fake server: nothing here depends on the megatron-core version
# beyond what test_exporter covers on both; pinned version only (the CI time budget).
pytestmark = pytest.mark.heavy

DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.fixture
def server():
    fake = FakeVLLM()
    yield fake
    fake.close()


def hf_tensors(export: Path) -> dict:
    out = {}
    for f in sorted((export / "hf").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert got[name].contiguous().view(torch.uint8).equal(tensor.contiguous().view(torch.uint8)), name


# ---------------------------------------------------------------------- options
def test_serve_options_are_parsed_once_and_bad_values_name_the_key():
    config = ExportConfig(formats=[], serve={"url": "http://10.0.0.5:8000", "every_n_saves": 2, "timeout_s": 60})
    assert config.serve == ServeOptions("http://10.0.0.5:8000", 2, 60)
    assert ExportConfig(serve="http://h:1").serve.url == "http://h:1"  # shorthand
    assert not ExportConfig().serve.enabled
    recorded = {k: v for k, v in config.to_dict().items() if k != "recipe"}  # what the manifest records
    assert ExportConfig.from_dict(recorded).serve == config.serve
    with pytest.raises(ConfigError, match="formats.*or set serve"):
        ExportConfig(formats=[])  # no format and nothing served: nothing to do
    for url in ("localhost:8000", "http://h", "ftp://h:1", "http://h:1/v1", "http://h:99999", 5):
        with pytest.raises(ConfigError, match=r"serve\.url.*http://HOST:PORT"):
            ExportConfig(serve={"url": url})
    with pytest.raises(ConfigError, match=r"serve: unknown option.*'adress'"):
        ExportConfig(serve={"adress": "http://h:1"})
    with pytest.raises(ConfigError, match=r"serve\.timeout_s"):
        ExportConfig(serve={"url": "http://h:1", "timeout_s": 0})
    with pytest.raises(ConfigError, match=r"serve\.every_n_saves.*multiple"):
        ExportConfig(every_n_saves=2, serve={"url": "http://h:1", "every_n_saves": 3})
    with pytest.raises(ConfigError, match=r"serve\.timeout_s.*shorter than timeout_s"):
        ExportConfig(timeout_s=60, serve={"url": "http://h:1", "timeout_s": 60})


def test_megatron_lm_flag_joins_the_recipe_serve_section(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("formats: [hf]\nserve:\n  every_n_saves: 2\n  timeout_s: 30\n")
    parser = add_export_args(argparse.ArgumentParser())
    args = parser.parse_args(["--export-recipe", str(recipe), "--export-serve-url", "http://127.0.0.1:8000"])
    assert config_from_args(args).serve == ServeOptions("http://127.0.0.1:8000", 2, 30)
    args = parser.parse_args(["--export-dir", str(tmp_path), "--export-formats", "hf"])
    assert not config_from_args(args).serve.enabled
    args = parser.parse_args(["--export-dir", str(tmp_path), "--export-serve-url", "127.0.0.1:8000"])
    with pytest.raises(ConfigError, match=r"serve.*url.*http://HOST:PORT.*--export"):
        config_from_args(args)


# ---------------------------------------------------------------------- one rank
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_server_receives_exactly_the_hf_export(megatron_world, tmp_path, server, mode):
    model = tiny_llama()
    randomize(model, seed=41)
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"], mode=mode,
                                            serve={"url": server.url, "timeout_s": 60}))
    try:
        exporter.export(7)
        result = exporter.wait()
    finally:
        exporter.close()
    assert result.ok
    assert_same_tensors(server.received["7"], hf_tensors(result.path))
    assert server.version == "7" and not server.paused
    record = json.loads((result.path / "manifest.json").read_text())["serve"]
    assert record["status"] == "complete" and record["version"] == "7" and record["url"] == server.url
    assert record["bytes"] == sum(t.numel() * t.element_size() for t in server.received["7"].values())
    assert record["error"] is None and record["seconds"] > 0
    assert result.serve == record
    assert "served iteration 7 (refit" in log_line(result)
    assert table(list_exports(tmp_path)).splitlines()[0].split()[-1] == "served"
    assert list_exports(tmp_path)[0]["serve"].startswith("7 (")


def test_serve_only_writes_no_tensor_file(megatron_world, tmp_path, server):
    model = tiny_llama()
    randomize(model, seed=42)
    reference = Exporter(model, ExportConfig(output_dir=str(tmp_path / "ref"), vocab_size=120, formats=["hf"],
                                             mode="sync")).export(3)
    result = Exporter(model, ExportConfig(output_dir=str(tmp_path / "served"), vocab_size=120, formats=[],
                                          mode="sync", serve={"url": server.url})).export(3)
    assert result.ok
    assert [p.name for p in result.path.iterdir()] == ["manifest.json"]
    assert_same_tensors(server.received["3"], hf_tensors(reference.path))


def test_refits_follow_serve_every_n_saves(megatron_world, tmp_path, server):
    model = tiny_llama()
    randomize(model, seed=43)
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"], mode="sync",
                                            serve={"url": server.url, "every_n_saves": 2}))
    results = [exporter.on_checkpoint_saved(it) for it in (10, 20, 30, 40)]
    assert all(r.ok for r in results)
    assert sorted(server.received) == ["20", "40"]
    assert [r.serve is not None for r in results] == [False, True, False, True]
    rows = {e["iteration"]: e["serve"] for e in list_exports(tmp_path)}
    assert rows[10] == rows[30] == "-" and rows[40].startswith("40 (")


# ---------------------------------------------------------------------- failures
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_dead_server_is_a_failed_refit_and_training_goes_on(megatron_world, tmp_path, mode, caplog):
    model = tiny_llama()
    randomize(model, seed=44)
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"], mode=mode,
                                            serve={"url": DEAD, "timeout_s": 10}))
    try:
        for iteration in (1, 2):  # the hook's path: never raises, the next save exports again
            exporter.on_checkpoint_saved(iteration)
            result = exporter.wait()
            assert result.ok and result.iteration == iteration
            record = json.loads((result.path / "manifest.json").read_text())["serve"]
            assert record["status"] == "failed" and "get_world_size" in record["error"]
            assert "refit failed" in log_line(result)
            assert hf_tensors(result.path)  # the file export is complete all the same
    finally:
        exporter.close()
    assert [e["serve"].split()[0] for e in list_exports(tmp_path)] == ["failed", "failed"]


def test_strict_raises_a_failed_refit(megatron_world, tmp_path):
    model = tiny_llama()
    randomize(model, seed=45)
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"], mode="sync",
                                            strict=True, serve={"url": DEAD, "timeout_s": 10}))
    with pytest.raises(ExportError, match="refit at iteration 1 failed"):
        exporter.on_checkpoint_saved(1)
    assert exporter.last_result.ok  # the export itself is complete


def test_server_dying_mid_refit_is_recorded_and_left_paused(megatron_world, tmp_path):
    fake = FakeVLLM(fail_after=3)
    try:
        model = tiny_llama()
        randomize(model, seed=46)
        exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"],
                                                mode="sync", serve={"url": fake.url, "timeout_s": 20}))
        result = exporter.on_checkpoint_saved(5)
        assert result.ok and result.serve["status"] == "failed" and "update_weights" in result.serve["error"]
        assert fake.paused and fake.version.startswith("incomplete: refit to 5 failed")
        fake.fail_after = -1  # the server is healthy again: the next refit makes it whole and resumes it
        result = exporter.on_checkpoint_saved(6)
        assert result.serve["status"] == "complete" and fake.version == "6" and not fake.paused
        assert_same_tensors(fake.received["6"], hf_tensors(result.path))
    finally:
        fake.close()


# ---------------------------------------------------------------------- two ranks
@pytest.mark.parametrize("layout,mode", [({"pp": 2}, "sync"), ({"tp": 2}, "async")])
def test_two_writer_ranks_stream_exactly_the_hf_export(megatron_world, tmp_path, server, layout, mode):
    from megatron.core import dist_checkpointing

    model = tiny_llama()
    randomize(model, seed=47)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    exports = [dict(output_dir=str(tmp_path / "out"), vocab_size=120, formats=["hf"], mode=mode,
                    serve={"url": server.url, "timeout_s": 60})]
    outcome = run_ranks(2, "tests.support.workers:export_layout", timeout_s=240, family="llama", layout=layout,
                        checkpoint_dir=str(ckpt), exports=exports, model_kw={})
    for rank, (status, value) in outcome.items():
        assert status == "ok" and value[0][0] == "complete", f"rank {rank}: {status} {value}"
    export = tmp_path / "out" / "iter_0000001"
    assert_same_tensors(server.received["1"], hf_tensors(export))
    record = json.loads((export / "manifest.json").read_text())["serve"]
    assert record["status"] == "complete" and server.version == "1"


def test_a_due_refit_is_not_lost_with_a_replaced_save(megatron_world, tmp_path, server):
    """busy_policy skip: save 2 (due for a refit) waits in the slot while export 1 runs and is
    replaced by save 3 (not due): the refit moves to save 3 instead of being dropped."""
    import os
    import signal
    import time

    from megatron_trt_ext import attach

    model = medium_llama()  # a tiny model's export can end before the worker is stopped
    randomize(model, seed=48)
    handle = attach(model, ExportConfig(output_dir=str(tmp_path), vocab_size=4000, formats=["hf"], timeout_s=60,
                                        serve={"url": server.url, "every_n_saves": 2, "timeout_s": 30}))
    try:
        for iteration in (1, 2, 3):
            assert handle.on_checkpoint_saved(iteration=iteration).status == "running"
            if iteration == 1:  # hold the first export, deterministically
                background = handle.exporter._background
                deadline = time.monotonic() + 60
                while background.running != 1 and time.monotonic() < deadline:
                    background.poll()
                    time.sleep(0.01)
                worker = background.proc
                os.kill(worker.pid, signal.SIGSTOP)
                background.poll()  # a Done sent before the stop would be here
                assert background.running == 1, "export 1 ended before the worker was stopped: nothing held"
        os.kill(worker.pid, signal.SIGCONT)
    finally:
        handle.detach()
    by_iteration = {r.iteration: r.status for r in handle.exporter.results if r.status != "running"}
    assert by_iteration == {1: "complete", 2: "skipped", 3: "complete"}
    assert sorted(server.received) == ["3"] and server.version == "3"
    assert_same_tensors(server.received["3"], hf_tensors(tmp_path / "iter_0000003"))


# ---------------------------------------------------------------------- review gaps
class ThreadComm:
    """The two collectives `RefitSink` uses, between threads of this process (ranks without
    processes, so a sink's timing can be measured cheaply)."""

    def __init__(self, world_size: int):
        import threading

        self.world_size, self.slots = world_size, [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=120)

    def bind(self, rank: int):
        comm = self

        class Bound:
            def all_gather_object(self, obj):
                comm.barrier.wait()
                comm.slots[rank] = obj
                comm.barrier.wait()
                out = list(comm.slots)
                comm.barrier.wait()
                return out

            def gather_object(self, obj):
                out = self.all_gather_object(obj)
                return out if rank == 0 else None

        return Bound()


def test_other_ranks_learn_at_once_when_the_server_fails_after_answering(server):
    """The server answers /get_world_size, then fails (here: /pause errors). Rank 0 learns it over
    HTTP; rank 1's writer, waiting for a server worker that will never connect, must be told by
    rank 0 and stop, not wait out serve.timeout_s (30 s here) holding up the export."""
    import threading
    import time

    from megatron_trt_ext.serve.sink import RefitSink

    def refuse(path, body):
        if path == "/pause":
            raise RuntimeError("engine core died")

    server.post = refuse
    comm = ThreadComm(2)
    records, took = {}, {}

    def rank(r):
        started = time.perf_counter()
        sink = RefitSink(comm.bind(r), r, ServeOptions(server.url, 1, 30), "9")
        for i in range(12):  # more than the stream's queue holds: put() must not block either
            sink.put(f"model.layers.{r}.w{i}", torch.ones(4, 4))
        records[r] = sink.finish(comm.bind(r))
        took[r] = time.perf_counter() - started

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert records[1] is None and records[0]["status"] == "failed"
    assert "failed at pause" in records[0]["error"]
    assert max(took.values()) < 10, f"ranks took {took} s: rank 1 waited for the server's timeout"


def test_a_refit_record_is_never_latest_nor_counted_by_keep_last(megatron_world, tmp_path, server):
    """A serve-only export (formats empty) leaves iter_N holding only its manifest: a record of
    the refit, not an export. `latest` keeps naming the newest export with files, and keep_last
    keeps that many real exports (refit records are kept to keep_last among themselves)."""
    from megatron_trt_ext.manifest import latest_export, read_latest

    model = tiny_llama()
    randomize(model, seed=49)
    files = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"], mode="sync",
                                         keep_last=2))
    for iteration in (1, 2):
        assert files.export(iteration).ok
    served = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=[], mode="sync",
                                          keep_last=2, serve={"url": server.url}))
    for iteration in (3, 4, 5):
        assert served.export(iteration).serve["status"] == "complete"
    assert read_latest(tmp_path).name == latest_export(tmp_path).name == "iter_0000002"
    assert hf_tensors(tmp_path / "iter_0000001") and hf_tensors(tmp_path / "iter_0000002")
    left = sorted(p.name for p in tmp_path.glob("iter_*"))
    assert left == ["iter_0000001", "iter_0000002", "iter_0000004", "iter_0000005"]
    rows = {r["iteration"]: (r["status"], r["serve"].split()[0]) for r in list_exports(tmp_path)}
    assert rows == {5: ("refit", "5"), 4: ("refit", "4"), 2: ("complete", "-"), 1: ("complete", "-")}
    assert files.export(6).ok  # the next real export is latest again and pushes out the oldest one
    assert read_latest(tmp_path).name == "iter_0000006" and not (tmp_path / "iter_0000001").exists()
