"""Manifest checksums: schema 2 names its algorithm (xxh3_128); schema 1 exports (sha256) keep
verifying, and a damaged tensor is found under either."""

import hashlib
import json

import pytest
from safetensors import safe_open

from megatron_trt_ext import ExportConfig, Exporter
from megatron_trt_ext import checksum
from megatron_trt_ext import manifest as mf
from megatron_trt_ext.formats.safetensors_stream import tensor_bytes
from tests.support.models import randomize, tiny_llama


def _as_schema_1(export) -> None:
    """Rewrite a manifest the way megatron-trt-ext wrote it before xxh3 (sha256 per tensor,
    ``schema_version: 1``), the checksums computed here from the files."""
    manifest = mf.read_manifest(export)
    for rel in manifest["files"]:
        with safe_open(str(export / rel), framework="pt") as f:
            manifest["files"][rel] = {"sha256": {name: hashlib.sha256(tensor_bytes(f.get_tensor(name))).hexdigest()
                                                 for name in f.keys()}}
    manifest["schema_version"] = 1
    (export / mf.MANIFEST).write_text(json.dumps(manifest))


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def export(megatron_world, tmp_path):
    model = tiny_llama()
    randomize(model, seed=4)
    config = ExportConfig(output_dir=str(tmp_path), vocab_size=120, verification={"enabled": False})
    result = Exporter(model, config).export(3)
    assert result.ok
    return result.path


def test_new_manifests_name_their_algorithm_and_old_sha256_ones_still_verify(export):
    manifest = mf.read_manifest(export)
    assert manifest["schema_version"] == mf.SCHEMA_VERSION == 2
    assert all(list(entry) == ["xxh3_128"] for entry in manifest["files"].values())
    assert mf.verify_export(export) == []
    count = mf.checksum_count(manifest)

    _as_schema_1(export)
    assert mf.verify_export(export) == []
    assert mf.checksum_count(mf.read_manifest(export)) == count > 10
    _flip_last_byte(export / "hf" / "model.safetensors")
    problems = mf.verify_export(export)
    assert len(problems) == 1 and "hf/model.safetensors" in problems[0] and "(sha256)" in problems[0]


def test_a_checksum_algorithm_this_version_does_not_know_is_reported_not_skipped(export):
    manifest = mf.read_manifest(export)
    rel = "hf/model.safetensors"
    manifest["files"][rel] = {"blake9": manifest["files"][rel]["xxh3_128"]}
    (export / mf.MANIFEST).write_text(json.dumps(manifest))
    problems = mf.verify_export(export)
    assert len(problems) == 1 and rel in problems[0] and "blake9" in problems[0] and "upgrade" in problems[0]


def test_checksum_helpers_match_the_libraries():
    data = [b"abc" * 1000, b"", bytes(range(256))]
    joined = b"".join(data)
    assert checksum.hexdigest(data) == checksum.hexdigest([joined])
    assert checksum.hexdigest(data, "sha256") == hashlib.sha256(joined).hexdigest()
    assert checksum.read_entry(checksum.entry({"t": "x"})) == ("xxh3_128", {"t": "x"})
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        checksum.new("md4")
