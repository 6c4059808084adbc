"""Export metrics: one line in the training log per export (sync and async), scalars in
Megatron-LM's TensorBoard and W&B writers at the export's iteration, and never a failure because
of them. (tests/test_megatron_training.py checks the same through Megatron-LM's real loop.)"""

import logging

import pytest

from megatron_trt_ext import ExportConfig, Exporter
from megatron_trt_ext import metrics
from tests.support.models import randomize, tiny_llama


class FakeTensorBoard:
    def __init__(self):
        self.scalars, self.flushed = [], 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushed += 1


class FakeWandb:
    def __init__(self):
        self.logged, self.metrics = [], []

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, data, step=None, commit=None):
        self.logged.append((data, step, commit))


class Broken:
    def add_scalar(self, *args):
        raise RuntimeError("writer closed")


def exporter(tmp_path, mode):
    model = tiny_llama()
    randomize(model, seed=71)
    return Exporter(model, ExportConfig(output_dir=str(tmp_path / mode), vocab_size=120, mode=mode, formats=["hf"]))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_one_log_line_per_export(megatron_world, tmp_path, caplog, mode):
    exp = exporter(tmp_path, mode)
    with caplog.at_level(logging.INFO, logger="megatron_trt_ext"):
        try:
            exp.export(iteration=3)
            result = exp.wait()
        finally:
            exp.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("export iteration 3:")]
    assert len(lines) == 1, lines
    own = result.timings["export_s"] if mode == "async" else result.timings["total_s"]
    assert lines[0].startswith(f"export iteration 3: complete, stall {result.timings['stall_s']:.3f} s, "
                               f"{own:.2f} s, {result.bytes_written} bytes, ")
    assert "MB/s" in lines[0] and str(result.path) in lines[0]


def test_the_log_line_measures_the_export_not_the_wait_for_the_worker():
    """An async save that waited for the worker (its start-up) reports the export's own seconds and
    bandwidth, and says separately when it was done after the save."""
    from megatron_trt_ext.result import ExportResult

    result = ExportResult(100, "/x/iter_0000100", "complete", ["hf"],
                          {"stall_s": 0.026, "export_s": 0.10, "total_s": 8.13}, 366340)
    line = metrics.log_line(result)
    assert line.startswith("export iteration 100: complete, stall 0.026 s, 0.10 s, 366340 bytes, 3.7 MB/s, ")
    assert line.endswith("done 8.13 s after the save")
    assert metrics.scalars(result)["export/throughput_MBps"] == pytest.approx(366340 / 1e6 / 0.10)


def test_a_failed_export_is_logged_as_failed(megatron_world, tmp_path, caplog, monkeypatch):
    from megatron_trt_ext.formats import hf as hf_mod

    exp = exporter(tmp_path, "sync")
    monkeypatch.setattr(hf_mod.HFWriter, "write", lambda self, n, t: (_ for _ in ()).throw(OSError(28, "disk full")))
    with caplog.at_level(logging.INFO, logger="megatron_trt_ext"), pytest.raises(Exception, match="disk full"):
        exp.export(iteration=4)
    lines = [r for r in caplog.records if r.getMessage().startswith("export iteration 4:")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "failed" in lines[0].getMessage() and "disk full" in lines[0].getMessage()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_megatron_lm_writers_receive_the_scalars(megatron_world, tmp_path, monkeypatch, mode):
    tensorboard, wandb = FakeTensorBoard(), FakeWandb()
    monkeypatch.setattr(metrics, "megatron_writers", lambda: (tensorboard, wandb))
    exp = exporter(tmp_path, mode)
    try:
        exp.export(iteration=7)
        result = exp.wait()
    finally:
        exp.close()
    assert result.ok
    got = {tag: (value, step) for tag, value, step in tensorboard.scalars}
    assert set(got) == {"export/ok", "export/stall_s", "export/seconds", "export/seconds_since_save", "export/bytes",
                        "export/throughput_MBps"}
    assert {step for _, step in got.values()} == {7}
    assert got["export/ok"][0] == 1.0 and got["export/bytes"][0] == result.bytes_written > 0
    assert got["export/stall_s"][0] == result.timings["stall_s"] > 0
    own = result.timings["export_s"] if mode == "async" else result.timings["total_s"]
    assert got["export/seconds"][0] == own and got["export/seconds_since_save"][0] == result.timings["total_s"]
    assert got["export/throughput_MBps"][0] == pytest.approx(result.bytes_written / 1e6 / own)
    assert tensorboard.flushed == 1
    # W&B: its own step axis, joined to the current row without committing it
    (data, step, commit), = wandb.logged
    assert data["export/iteration"] == 7 and data["export/bytes"] == result.bytes_written
    assert step is None and commit is False
    assert ("export/*", "export/iteration") in wandb.metrics


def test_writers_are_looked_up_only_in_a_running_megatron_lm(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "megatron.training.global_vars", raising=False)
    assert metrics.megatron_writers() == (None, None)


def test_a_broken_writer_never_fails_the_export(megatron_world, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "megatron_writers", lambda: (Broken(), None))
    result = exporter(tmp_path, "sync").export(iteration=8)
    assert result.ok
