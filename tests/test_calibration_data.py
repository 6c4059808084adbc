"""What calibration reads: synthetic ids from the exported vocabulary only (never the padding rows
the export trims), and user data that every export can read afresh (a one-shot iterator would be
used up by the first export, taking batches from training on the way)."""

import pytest
import torch

from megatron_trt_ext import ConfigError, ExportConfig, Exporter
from megatron_trt_ext.quant import calibrate as calibrate_mod
from tests.support.models import randomize, tiny_llama

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is the quantization engine (extra 'quant')")

VOCAB = 100  # the tiny Llama's padded vocabulary is 128: ids 100..127 are padding the export trims


def _model():
    model = tiny_llama()
    randomize(model, seed=5)
    return model


def _config(tmp_path, calibration: dict, **kw) -> ExportConfig:
    return ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB, dtype="float32", mode="sync", formats=["hf"],
                        quantization={"algorithm": "fp8", "kv_cache": "none", "calibration": calibration}, **kw)


@pytest.fixture
def seen_batches(monkeypatch):
    """The token batches each export's calibration ran on."""
    seen = []
    real = calibrate_mod.calibrate

    def spy(*args, **kwargs):
        seen.append([b.clone() for b in kwargs["batches"]])
        return real(*args, **kwargs)
    monkeypatch.setattr(calibrate_mod, "calibrate", spy)
    return seen


def test_synthetic_calibration_draws_ids_of_the_exported_vocabulary(megatron_world, tmp_path, seen_batches):
    model = _model()
    assert model.vocab_size == 128
    cfg = _config(tmp_path, {"source": "synthetic", "num_samples": 64, "seq_len": 32, "batch_size": 16})
    assert Exporter(model, cfg).export(1).ok
    tokens = torch.cat([b.reshape(-1) for b in seen_batches[0]])
    assert tokens.numel() == 64 * 32
    assert int(tokens.min()) >= 0 and int(tokens.max()) < VOCAB  # 2048 uniform draws from 128 ids: ~440 would be >= 100


def test_the_oracle_calibrates_on_the_exporters_batches(megatron_world, tmp_path, seen_batches):
    from tests.support.oracle import calibration_tokens

    exporter = Exporter(_model(), _config(tmp_path, {"source": "synthetic", "num_samples": 8, "seq_len": 16}))
    assert exporter.export(1).ok
    expected = calibration_tokens(exporter)
    assert len(expected) == len(seen_batches[0])
    assert all(torch.equal(a, b) for a, b in zip(expected, seen_batches[0]))


ITERATOR = {"source": "iterator", "num_samples": 4, "seq_len": 16, "batch_size": 2}


def _rows(n: int = 6) -> list:
    gen = torch.Generator().manual_seed(9)
    return [torch.randint(0, VOCAB, (2, 16), generator=gen) for _ in range(n)]


@pytest.mark.parametrize("one_shot", [lambda rows: iter(rows), lambda rows: (r for r in rows)],
                         ids=["iterator", "generator"])
def test_a_one_shot_iterator_is_refused_at_attach_naming_the_fix(megatron_world, tmp_path, one_shot):
    rows = _rows()
    data = one_shot(rows)
    with pytest.raises(ConfigError, match=r"calibration_data.*lambda: iter\("):
        Exporter(_model(), _config(tmp_path, ITERATOR), calibration_data=data)
    assert next(data) is rows[0]  # refusing it took nothing from it


@pytest.mark.parametrize("kind", ["callable", "list"])
def test_every_export_calibrates_on_the_same_data(megatron_world, tmp_path, seen_batches, kind):
    rows = _rows()
    data = (lambda: iter(rows)) if kind == "callable" else rows
    exporter = Exporter(_model(), _config(tmp_path, ITERATOR), calibration_data=data)
    assert exporter.export(1).ok and exporter.export(2).ok
    first, second = seen_batches
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(torch.cat(first), torch.cat(rows[:2]))
