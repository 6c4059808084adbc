"""Export layout, manifest, checksums, live-model safety, naming aliases, the streaming writer."""

import json
import warnings

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_trt_ext import ConfigError, ExportConfig, Exporter
from megatron_trt_ext.arch import FAMILIES
from megatron_trt_ext.arch.convert import canonical_name, megatron_to_hf
from megatron_trt_ext.formats.safetensors_stream import SafetensorsFileWriter, tensor_bytes
from tests.support.models import randomize, tiny_gpt, tiny_llama


def test_export_layout_and_manifest(megatron_world, tmp_path):
    model = tiny_llama()
    randomize(model, seed=1)
    result = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120)).export(iteration=100)
    assert result.ok and result.path == tmp_path / "iter_0000100"
    names = {str(p.relative_to(result.path)) for p in result.path.rglob("*") if p.is_file()}
    assert names == {"manifest.json", "hf/config.json", "hf/generation_config.json", "hf/model.safetensors",
                     "trtllm_checkpoint/config.json", "trtllm_checkpoint/rank0.safetensors",
                     "verification.safetensors", "fingerprints.safetensors"}
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["iteration"] == 100
    assert manifest["schema_version"] == 2 and manifest["formats"] == ["hf", "trtllm_checkpoint"]
    assert manifest["bytes_written"] == result.bytes_written > 0
    assert {"gather_s", "convert_s", "write_s", "total_s"} <= set(manifest["timings"])
    # every tensor's checksum is the XXH3-128 of the bytes stored in the file, named as such
    for rel, sums in manifest["files"].items():
        stored = load_file(str(result.path / rel))
        assert list(sums) == ["xxh3_128"] and set(stored) == set(sums["xxh3_128"])
        for name, tensor in stored.items():
            assert xxhash.xxh3_128(tensor_bytes(tensor)).hexdigest() == sums["xxh3_128"][name]
    assert (tmp_path / "latest").read_text().strip() == "iter_0000100"
    assert not list(tmp_path.glob(".*partial"))


def test_export_never_modifies_the_live_model(megatron_world, tmp_path):
    model = tiny_llama()
    randomize(model, seed=2)
    before = {n: (p.detach().clone(), p.data_ptr(), p.requires_grad, p.dtype) for n, p in model.named_parameters()}
    model.train()
    Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, dtype="bfloat16",
                                 inference_tp=2)).export(iteration=1)
    assert model.training
    for n, p in model.named_parameters():
        value, ptr, grad, dtype = before[n]
        assert torch.equal(p.detach(), value) and p.data_ptr() == ptr
        assert p.requires_grad == grad and p.dtype == dtype == torch.float32


def test_padded_vocab_is_exported_with_one_warning(megatron_world, tmp_path):
    model = tiny_llama(vocab_size=128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), formats=["hf"]))
        exporter.export(iteration=1)
        exporter.export(iteration=2)
    vocab_warnings = [w for w in caught if "vocab_size not set" in str(w.message)]
    assert len(vocab_warnings) == 1
    cfg = json.loads((tmp_path / "iter_0000002" / "hf" / "config.json").read_text())
    assert cfg["vocab_size"] == 128
    with pytest.raises(ConfigError, match="vocab_size=200"):
        Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=200))


def test_wrapped_models_and_chunk_lists_are_accepted(megatron_world, tmp_path):
    class Wrapper(torch.nn.Module):  # DDP / Float16Module both expose .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_gpt()
    randomize(model, seed=4)
    plain = Exporter(model, ExportConfig(output_dir=str(tmp_path / "a"), vocab_size=120)).export(1)
    wrapped = Exporter(Wrapper(Wrapper(model)), ExportConfig(output_dir=str(tmp_path / "b"), vocab_size=120)).export(1)
    listed = Exporter([model], ExportConfig(output_dir=str(tmp_path / "c"), vocab_size=120)).export(1)
    for other in (wrapped, listed):
        for rel in ("hf/model.safetensors", "trtllm_checkpoint/rank0.safetensors"):
            assert (plain.path / rel).read_bytes() == (other.path / rel).read_bytes()


def test_reexport_of_an_iteration_replaces_it_atomically(megatron_world, tmp_path):
    model = tiny_llama()
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"]))
    first = exporter.export(iteration=5)
    randomize(model, seed=9)
    second = exporter.export(iteration=5)
    assert first.path == second.path
    stored = load_file(str(second.path / "hf" / "model.safetensors"))
    assert torch.equal(stored["model.norm.weight"], model.decoder.final_layernorm.weight.to(torch.bfloat16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005", "latest"]


def test_failed_export_is_visible_and_never_looks_complete(megatron_world, tmp_path, monkeypatch):
    from megatron_trt_ext.formats import hf as hf_mod

    model = tiny_llama()
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120))

    def boom(self, name, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_mod.HFWriter, "write", boom)
    with pytest.raises(Exception, match="No space left on device"):
        exporter.export(iteration=7)
    assert not (tmp_path / "iter_0000007").exists()
    failed = json.loads((tmp_path / ".iter_0000007.failed" / "manifest.json").read_text())
    assert failed["status"] == "failed" and "No space left" in failed["error"]
    assert exporter.last_result.status == "failed"


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_local_spec_names_convert_like_transformer_engine_names(megatron_world, tmp_path, family):
    """A plain state_dict() uses the local spec's norm names; the exporter reads the sharded state
    dict, which uses Transformer Engine's fused names. Both spellings map to the same HF tensors."""
    model = tiny_llama() if family == "llama" else tiny_gpt(tied=False)
    randomize(model, seed=5)
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path), vocab_size=120, formats=["hf"]))
    spec = FAMILIES[family]
    local_names = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    assert any("input_layernorm" in k for k in local_names)
    assert canonical_name(spec, "decoder.layers.3.input_layernorm.weight") == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    from_local = dict(megatron_to_hf(spec, exporter.ctx, local_names.items()))
    from megatron_trt_ext.gather import exchange
    from megatron_trt_ext.plan import local_shards
    local = local_shards(exporter.chunks)
    stream = ((u.name, exchange(u, local, exporter.comm)) for u in exporter.units)
    from_sharded = dict(megatron_to_hf(spec, exporter.ctx, stream))
    assert sorted(from_local) == sorted(from_sharded)
    for name in from_local:
        assert torch.equal(from_local[name], from_sharded[name]), name


def test_streaming_writer_produces_standard_safetensors(tmp_path):
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.int32),
               "scalar": torch.tensor(2.5)}
    path = tmp_path / "x.safetensors"
    writer = SafetensorsFileWriter(str(path), [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    for name in ("scalar", "a", "b"):  # any order
        writer.write(name, tensors[name])
    writer.close()
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)


def test_streaming_writer_refuses_wrong_or_missing_tensors(tmp_path):
    writer = SafetensorsFileWriter(str(tmp_path / "y.safetensors"),
                                   [("w", torch.float32, (2, 2)), ("v", torch.float32, (2,))])
    with pytest.raises(ValueError, match="planned"):
        writer.write("w", torch.zeros(2, 3))
    with pytest.raises(KeyError):
        writer.write("nope", torch.zeros(2))
    writer.write("w", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="written twice"):
        writer.write("w", torch.zeros(2, 2))
    assert writer.missing(set(writer.close())) == ["v"]


def test_verify_export_detects_a_flipped_byte(megatron_world, tmp_path):
    from megatron_trt_ext.manifest import verify_export

    result = Exporter(tiny_llama(), ExportConfig(output_dir=str(tmp_path), vocab_size=120)).export(2)
    assert verify_export(result.path) == []
    target = result.path / "trtllm_checkpoint" / "rank0.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor's data
    target.write_bytes(bytes(data))
    problems = verify_export(result.path)
    assert len(problems) == 1 and "rank0.safetensors" in problems[0] and "checksum mismatch" in problems[0]
