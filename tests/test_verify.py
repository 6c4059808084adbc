"""Reference logits recorded at export time (the probe) and `megatron-trt-ext verify`: it passes on
good exports of every family, dtype and CPU quantization recipe, and fails, naming the check, on
a corrupted tensor, swapped q/k projections, a dropped vocabulary row and a wrong RoPE theta."""

import json
import os
import subprocess
import sys

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

from megatron_trt_ext import ConfigError, ExportConfig, Exporter
from megatron_trt_ext import manifest as mf
from megatron_trt_ext.cli import main as cli
from megatron_trt_ext.formats.safetensors_stream import tensor_bytes
from tests.support.models import megatron_logits, randomize, sharpen_attention, tiny_gpt, tiny_llama
from megatron_trt_ext.verification.check import verify
from megatron_trt_ext.verification.thresholds import THRESHOLDS

transformers = pytest.importorskip("transformers", reason="verify loads the HF export with transformers")

VOCAB = 120  # the models' tables are padded to 128
PROBE = "verification.safetensors"


def export(model, tmp_path, iteration=1, **kw):
    kw.setdefault("formats", ["hf"])
    config = ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB, mode="sync", **kw)
    return Exporter(model, config).export(iteration=iteration)


def sharp(build, seed):
    """A test model whose attention is as peaked as a trained model's (see sharpen_attention)."""
    model = build()
    randomize(model, seed=seed)
    sharpen_attention(model)
    return model


def failed_checks(report) -> list:
    return [c["name"] for c in report.data["checks"] if c["ok"] is False]


def rewrite_hf_tensors(export_dir, edit) -> None:
    """Apply ``edit`` to hf/model.safetensors' tensors, then fix the manifest's checksums, so only
    a check of what the tensors mean can catch it."""
    path = export_dir / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    manifest = mf.read_manifest(export_dir)
    manifest["files"]["hf/model.safetensors"] = {
        "xxh3_128": {name: xxhash.xxh3_128(tensor_bytes(t)).hexdigest() for name, t in tensors.items()}}
    (export_dir / "manifest.json").write_text(json.dumps(manifest))


def edit_hf_config(export_dir, **fields) -> None:
    path = export_dir / "hf" / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


# ---------------------------------------------------------------------- the probe
def test_probe_records_the_live_models_top_k_logits(megatron_world, tmp_path):
    model = tiny_llama()
    randomize(model, seed=61)
    with torch.no_grad():  # padding rows with the largest logits: they must never be recorded
        model.output_layer.weight[VOCAB:] *= 50.0
    model.train()
    model.decoder.final_layernorm.eval()  # a submodule the trainer keeps in eval stays so
    rng = torch.get_rng_state()
    # float32: the reference is the live weights exactly (bf16/fp16 ones round them first,
    # tests/test_verify_probe.py)
    result = export(model, tmp_path, dtype="float32")
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model.decoder.layers[0].training and not model.decoder.final_layernorm.training

    manifest = mf.read_manifest(result.path)
    entry = manifest["verification"]
    assert entry["status"] == "recorded" and entry["file"] == PROBE
    assert (entry["top_k"], entry["probe_shape"], entry["vocab_size"]) == (8, [4, 32], VOCAB)
    assert entry["model_dtype"] == "float32" and entry["tokens_from"].startswith("synthetic")
    assert set(manifest["files"][PROBE]["xxh3_128"]) == {"tokens", "topk_values", "topk_ids"}
    assert "probe_s" in manifest["timings"]

    stored = load_file(str(result.path / PROBE))
    tokens = stored["tokens"]
    assert tokens.dtype == torch.int64 and tokens.shape == (4, 32)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < VOCAB
    # an independent forward pass of the live model on the stored tokens
    logits = megatron_logits(model, tokens)
    assert int(logits.argmax(-1).min()) >= VOCAB  # the padding rows do dominate the raw logits
    values, ids = logits[..., :VOCAB].float().topk(8)
    assert stored["topk_values"].dtype == torch.float32
    assert torch.equal(stored["topk_ids"], ids)
    torch.testing.assert_close(stored["topk_values"], values, rtol=1e-6, atol=1e-6)

    torch.manual_seed(999)  # the probe draws from its own generator, never the global RNG
    again = export(model, tmp_path, iteration=2, dtype="float32")
    assert torch.equal(load_file(str(again.path / PROBE))["tokens"], tokens)


def test_probe_takes_real_calibration_tokens_when_the_recipe_has_them(megatron_world, tmp_path):
    pytest.importorskip("modelopt.torch.quantization", reason="quantized exports need nvidia-modelopt")
    model = tiny_llama(hidden_size=256, ffn_hidden_size=512)
    randomize(model, seed=62)
    rows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(5))
    config = ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB, mode="sync", formats=["hf"],
                          quantization={"algorithm": "fp8", "calibration": {"source": "iterator", "num_samples": 8,
                                                                           "seq_len": 32, "batch_size": 4}},
                          verification={"num_sequences": 3, "seq_len": 16, "top_k": 4})
    result = Exporter(model, config, calibration_data=lambda: iter([rows[:4], rows[4:]])).export(iteration=1)
    entry = mf.read_manifest(result.path)["verification"]
    assert entry["tokens_from"].startswith("calibration data (iterator)")
    stored = load_file(str(result.path / PROBE))
    assert torch.equal(stored["tokens"], rows[:3, :16])
    assert stored["topk_values"].shape == (3, 16, 4)
    assert verify(result.path, record=False).passed


def test_probe_options_are_validated_and_it_can_be_turned_off(megatron_world, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['topk'\].*top_k"):
        ExportConfig(verification={"topk": 3})
    with pytest.raises(ConfigError, match="verification.num_sequences"):
        ExportConfig(verification={"num_sequences": True})
    with pytest.raises(ConfigError, match="num_sequences x seq_len"):
        ExportConfig(verification={"num_sequences": 1024, "seq_len": 4096})
    with pytest.raises(ConfigError, match=r"verification.seq_len=100.*max_position_embeddings \(64\)"):
        Exporter(tiny_llama(), ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB, verification={"seq_len": 100}))
    result = export(tiny_llama(), tmp_path, verification={"enabled": False})
    assert not (result.path / PROBE).exists()
    assert mf.read_manifest(result.path)["verification"] == {"status": "off"}
    report = verify(result.path)
    assert report.passed and report.data["metrics"] is None
    assert [c["ok"] for c in report.data["checks"] if c["name"] == "logits"] == [None]


def test_async_exports_take_the_probe_inside_the_stall(megatron_world, tmp_path):
    model = tiny_llama()
    randomize(model, seed=72)
    sync = export(model, tmp_path / "sync")
    exporter = Exporter(model, ExportConfig(output_dir=str(tmp_path / "async"), vocab_size=VOCAB, mode="async",
                                            formats=["hf"]))
    try:
        running = exporter.export(iteration=1)
        with torch.no_grad():  # training goes on at once: the probe saw the weights of the save
            for p in model.parameters():
                p.add_(0.5)
        done = exporter.wait()
    finally:
        exporter.close()
    assert done.ok and 0 < done.timings["probe_s"] <= running.timings["stall_s"]
    assert (done.path / PROBE).read_bytes() == (sync.path / PROBE).read_bytes()
    assert mf.read_manifest(done.path)["files"][PROBE] == mf.read_manifest(sync.path)["files"][PROBE]


def test_a_failing_probe_never_fails_the_export(megatron_world, tmp_path, monkeypatch, caplog):
    from megatron_trt_ext import forward

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(forward, "run_forward", broken)
    result = export(tiny_llama(), tmp_path)
    assert result.ok and not (result.path / PROBE).exists()
    entry = mf.read_manifest(result.path)["verification"]
    assert entry["status"] == "failed" and "out of memory (injected)" in entry["error"]
    assert any("verification probe failed" in r.getMessage() for r in caplog.records)
    report = verify(result.path, record=False)
    assert report.passed  # checksums hold; the logits were not recorded, and the report says why
    logits = next(c for c in report.data["checks"] if c["name"] == "logits")
    assert logits["ok"] is None and "out of memory (injected)" in logits["detail"]


# ---------------------------------------------------------------------- verify passes
GOOD = {
    "llama_bf16": (tiny_llama, "bfloat16"),
    "llama_fp32": (tiny_llama, "float32"),
    "llama_fp16": (tiny_llama, "float16"),
    "qwen2_bias_bf16": (lambda: tiny_llama(add_qkv_bias=True), "bfloat16"),
    "gpt_bf16": (tiny_gpt, "bfloat16"),
    "gpt_fp32": (lambda: tiny_gpt(tied=False), "float32"),
    "mixtral_bf16": (lambda: tiny_llama(moe=True), "bfloat16"),
    "mixtral_fp32": (lambda: tiny_llama(moe=True), "float32"),
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_verify_passes_on_good_exports(megatron_world, tmp_path, case):
    build, dtype = GOOD[case]
    result = export(sharp(build, seed=63), tmp_path, dtype=dtype, formats=["hf", "trtllm_checkpoint"])
    report = verify(result.path)
    assert report.passed, report.lines()
    assert [c["name"] for c in report.data["checks"]] == ["checksums", "config", "weights", "trtllm weights",
                                                          "vocabulary", "logits"]
    assert all(c["ok"] for c in report.data["checks"]), report.lines()  # the exact checks ran, and passed
    assert report.data["thresholds"]["for"] == dtype
    assert mf.read_manifest(result.path)["verify"]["status"] == "pass"


@pytest.mark.parametrize("algorithm", ["fp8", "int4_awq", "w4a8_awq", "nvfp4", "mxfp8", "fp8_pc_pt"])
def test_verify_passes_on_quantized_exports(megatron_world, tmp_path, algorithm):
    pytest.importorskip("modelopt.torch.quantization", reason="quantized exports need nvidia-modelopt")
    model = tiny_llama(hidden_size=256, ffn_hidden_size=512)  # AWQ's 128-wide groups divide it
    randomize(model, seed=64)
    result = export(model, tmp_path, dtype="bfloat16", quantization={
        "algorithm": algorithm, "kv_cache": "fp8", "calibration": {"num_samples": 8, "seq_len": 32, "batch_size": 4}})
    report = verify(result.path)
    assert report.passed, report.lines()
    assert report.data["thresholds"]["for"] == algorithm
    # the dequantized weights differ from the live model's: the looser limits are needed, and used
    assert report.data["metrics"]["max_rel_logit_diff"] > THRESHOLDS["bfloat16"].max_rel_logit_diff / 100


# ---------------------------------------------------------------------- verify fails, and says why
def test_a_corrupted_tensor_fails_its_checksum(megatron_world, tmp_path):
    result = export(sharp(tiny_llama, seed=65), tmp_path)
    path = result.path / "hf" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's data
    path.write_bytes(bytes(data))
    report = verify(result.path)
    assert not report.passed and "checksums" in failed_checks(report)
    detail = next(c["detail"] for c in report.data["checks"] if c["name"] == "checksums")
    assert "hf/model.safetensors" in detail and "checksum mismatch" in detail
    assert mf.read_manifest(result.path)["verify"]["status"] == "fail"


def test_swapped_q_and_k_projections_fail_the_weights_and_the_logits(megatron_world, tmp_path):
    model = sharp(lambda: tiny_llama(num_query_groups=8), seed=66)  # MHA: q and k have one shape

    def swap(tensors):
        q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
        tensors[q], tensors[k] = tensors[k].clone(), tensors[q].clone()

    result = export(model, tmp_path)
    assert verify(result.path, record=False).passed
    rewrite_hf_tensors(result.path, swap)
    report = verify(result.path)
    assert failed_checks(report) == ["weights", "logits"], report.lines()
    assert "max |logit diff| / logit scale" in report.lines()[-1]
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in report.lines()[3]


def test_a_dropped_vocabulary_row_fails(megatron_world, tmp_path):
    result = export(sharp(tiny_llama, seed=67), tmp_path)

    def drop_last_row(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name][: VOCAB - 1].clone()

    rewrite_hf_tensors(result.path, drop_last_row)
    edit_hf_config(result.path, vocab_size=VOCAB - 1)
    report = verify(result.path)
    assert "checksums" not in failed_checks(report) and "vocabulary" in failed_checks(report)
    detail = next(c["detail"] for c in report.data["checks"] if c["name"] == "vocabulary")
    assert f"vocab_size {VOCAB - 1}" in detail and f"recorded {VOCAB}" in detail


def test_a_wrong_rope_theta_fails_the_logits(megatron_world, tmp_path):
    result = export(sharp(tiny_llama, seed=68), tmp_path)
    config = json.loads((result.path / "hf" / "config.json").read_text())
    assert config["rope_theta"] == 10000
    edit_hf_config(result.path, rope_theta=500000.0,
                   rope_parameters={**config["rope_parameters"], "rope_theta": 500000.0})
    report = verify(result.path)
    assert failed_checks(report) == ["config", "logits"], report.lines()
    assert "rope_theta: config.json has 500000.0" in report.lines()[2]


# ---------------------------------------------------------------------- the command line
def test_cli_exit_status_json_all_and_ls(megatron_world, tmp_path, capsys):
    root = tmp_path / "exports"
    exporter = Exporter(sharp(tiny_llama, seed=69), ExportConfig(output_dir=str(root), vocab_size=VOCAB,
                                                                 formats=["hf"], mode="sync"))
    good, bad = exporter.export(iteration=10), exporter.export(iteration=20)
    edit_hf_config(bad.path, rope_theta=500000.0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})

    capsys.readouterr()
    assert cli(["verify", str(good.path), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "pass"
    assert cli(["verify", str(bad.path), "--no-record"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert cli(["verify", "--all", str(root), "--json"]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [(r["iteration"], r["status"]) for r in reports] == [(10, "pass"), (20, "fail")]
    for argv in (["verify", str(tmp_path)], ["verify", str(tmp_path / "missing")], ["verify"],
                 ["verify", str(good.path), "--all", str(root)], ["verify", "--all", str(tmp_path / "missing")],
                 ["verify", str(good.path), "--device", "cuda:7"], ["verify", str(good.path), "--device", "gpu"]):
        assert cli(argv) == 2, argv
        assert "error:" in capsys.readouterr().err

    assert cli(["ls", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["iteration"], r["status"], r["verify"]) for r in rows] == [(20, "complete", "fail"),
                                                                         (10, "complete", "pass")]


def test_cli_stdout_is_only_the_json_report(megatron_world, tmp_path):
    result = export(sharp(tiny_llama, seed=70), tmp_path)
    done = subprocess.run([sys.executable, "-m", "megatron_trt_ext.cli", "verify", str(result.path), "--json",
                           "--progress"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["status"] == "pass"
    assert "verify" in done.stderr  # the forced progress bar went to stderr


def test_ls_lists_complete_failed_and_partial_exports_newest_first(megatron_world, tmp_path, capsys):
    from megatron_trt_ext.listing import list_exports, table
    from megatron_trt_ext.publish import record_failure

    root = tmp_path / "exports"
    done = export(tiny_llama(), root, iteration=1)
    record_failure(root, 2, {"iteration": 2, "formats": ["hf"], "dtype": "bfloat16", "config": {}},
                   "export of iteration 2 failed on rank 0: OSError: disk full")
    (root / ".iter_0000003.partial" / "hf").mkdir(parents=True)
    (root / ".iter_0000003.partial" / "hf" / "model.safetensors").write_bytes(b"x" * 1000)
    (root / "iter_0000004").symlink_to(done.path)  # a link is never an export
    rows = list_exports(root)
    assert [(r["iteration"], r["status"]) for r in rows] == [(3, "partial"), (2, "failed"), (1, "complete")]
    assert rows[0]["bytes"] == 1000 and "disk full" in rows[1]["error"]
    assert rows[2]["bytes"] == done.bytes_written and rows[2]["verify"] == "not run"
    assert rows[2]["stall_s"] == mf.read_manifest(done.path)["timings"]["total_s"]  # sync: the whole export
    lines = table(rows).splitlines()
    assert lines[0].split() == ["iteration", "status", "formats", "recipe", "size", "stall", "verify", "build",
                                "served"]
    assert [line.split()[:2] for line in lines[1:]] == [["3", "partial"], ["2", "failed"], ["1", "complete"]]
    assert cli(["ls", str(tmp_path / "nowhere")]) == 2


# the families of issues 10 and 11, and the recipes added in issue 12
def _has(module: str, attribute: str = None) -> bool:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    if attribute is None:
        return True
    owner, _, field = attribute.partition(".")
    obj = getattr(mod, owner, None)
    return obj is not None and (not field or field in getattr(obj, "__dataclass_fields__", {}))


def _family_cases():
    from tests.support import families as fam

    hybrid = (lambda: _has("megatron.core.models.hybrid.hybrid_model"), "HybridModel arrived in megatron-core 0.19")
    return {
        "qwen3": (fam.tiny_qwen3, None), "nemotron": (fam.tiny_nemotron, None),
        "starcoder2_window": (lambda: fam.tiny_starcoder2(window=5), None),
        "gemma": (fam.tiny_gemma, (lambda: _has("megatron.core.transformer", "TransformerConfig.use_mup"),
                                   "Gemma's embedding scale is MuP's multiplier (megatron-core >= 0.19)")),
        "hybrid_llama": (fam.tiny_hybrid, hybrid),
        "qwen3_moe": (fam.tiny_qwen3_moe, None),
        "deepseek_v3": (fam.tiny_deepseek, (lambda: _has("megatron.core.transformer.mla_qk_norm_config"),
                                            "multi-latent attention builds without Transformer Engine from "
                                            "megatron-core 0.19 on")),
        "gpt_oss": (fam.tiny_gpt_oss, None),
        "nemotron_h": (fam.tiny_nemotron_h, hybrid),
    }


@pytest.mark.parametrize("family", ["qwen3", "nemotron", "starcoder2_window", "gemma", "hybrid_llama", "qwen3_moe",
                                    "deepseek_v3", "gpt_oss", "nemotron_h"])
def test_verify_passes_on_every_family(megatron_world, tmp_path, family):
    build, needs = _family_cases()[family]
    if needs and not needs[0]():
        pytest.skip(f"{needs[1]} (scripts/test-mcore-latest runs it)")
    model = build()
    randomize(model, seed=66, scale=0.1)
    # GPT-OSS in bfloat16 exceeds the bfloat16 limits on this random tiny model (max 0.12, KL
    # 3.4e-4: its 4 random experts tie often, so rounding moves tokens to other experts); its float32
    # export is checked against the float32 limits instead (see README, Verification)
    result = export(model, tmp_path, dtype="float32" if family == "gpt_oss" else "bfloat16")
    report = verify(result.path)
    assert report.passed, report.lines()
    logits = next(c for c in report.data["checks"] if c["name"] == "logits")
    # (Nemotron-H: Megatron's Mamba forward runs on CPU with the test-only reference scan,
    # `testing.families.allow_mamba_build`)
    assert logits["ok"] is True, logits


@pytest.mark.parametrize("quantization", [
    {"algorithm": "fp8_pb_wo"}, {"algorithm": "w4a16_nvfp4"},
    {"algorithm": "fp8", "kv_cache": "fp8", "overrides": [{"modules": "*.mlp.*", "algorithm": "nvfp4"}]},
], ids=["fp8_pb_wo", "w4a16_nvfp4", "mixed_fp8_nvfp4"])
def test_verify_passes_on_the_newer_recipes(megatron_world, tmp_path, quantization):
    pytest.importorskip("modelopt.torch.quantization", reason="quantized exports need nvidia-modelopt")
    model = tiny_llama(hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                       kv_channels=64)  # 128x128 blocks divide every linear
    randomize(model, seed=64)
    result = export(model, tmp_path, dtype="bfloat16", quantization={
        **quantization, "calibration": {"num_samples": 8, "seq_len": 32, "batch_size": 4}})
    report = verify(result.path)
    assert report.passed, report.lines()
    assert report.data["thresholds"]["for"] == ("nvfp4" if "overrides" in quantization else quantization["algorithm"])
