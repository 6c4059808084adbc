"""Live export from parallel training layouts (gloo processes on CPU).

Each case saves one single-rank model with dist_checkpointing, loads it re-sharded into the
training layout on N processes, exports there, and requires the exported files to be
byte-identical to the single-rank export of the same weights.
"""

import json
import time
from pathlib import Path

import pytest
import torch

from megatron_trt_ext import ExportConfig, Exporter
from tests.support.distributed import run_ranks
from tests.support.models import randomize
from tests.support.workers import BUILDERS

import sys
sys.path.insert(0, str(Path(__file__).resolve().parent))

WORKER = "tests.support.workers:export_layout"

# inference targets exported from every layout: HF + TRT-LLM TP1, TRT-LLM TP2, TRT-LLM PP2
TARGETS = [dict(inference_tp=1), dict(inference_tp=2, formats=["trtllm_checkpoint"]),
           dict(inference_pp=2, formats=["trtllm_checkpoint"])]

HF_ONLY = [dict(inference_tp=1, formats=["hf"])]


def _hybrid():
    """HybridModel and MuP (Gemma's embedding scale) arrived in megatron-core 0.19."""
    import importlib.util

    if importlib.util.find_spec("megatron.core.models.hybrid") is None:
        pytest.skip("HybridModel arrived in megatron-core 0.19 (scripts/test-mcore-latest runs this)")


def _mla():
    """Multi-latent attention builds without Transformer Engine from megatron-core 0.19 on."""
    import importlib.util

    if importlib.util.find_spec("megatron.core.transformer.mla_qk_norm_config") is None:
        pytest.skip("multi-latent attention builds without Transformer Engine from megatron-core 0.19 on")


CASES = {
    # name: (family, world size, layout, model kwargs, export vocab[, targets, requirement])
    "tp2": ("llama", 2, {"tp": 2}, {}, 120),
    "tp2_vocab_padding_across_shards": ("llama", 2, {"tp": 2}, {"vocab_size": 256}, 200),
    "pp2_tied": ("llama", 2, {"pp": 2}, {"tied": True}, 120),
    "tp2_pp2": ("llama", 4, {"tp": 2, "pp": 2}, {}, 120),
    "pp2_vpp2": ("llama", 2, {"pp": 2, "vpp": 2}, {"num_layers": 4}, 120),
    "dp2_gpt": ("gpt", 2, {}, {}, 120),
    "ep2_mixtral": ("mixtral", 2, {"ep": 2}, {}, 120),
    "ep2_tp2_mixtral": ("mixtral", 4, {"ep": 2, "tp": 2}, {}, 120),
    "tp2_qwen3": ("qwen3", 2, {"tp": 2}, {}, 120),
    "pp2_nemotron": ("nemotron", 2, {"pp": 2}, {}, 120),
    "tp2_starcoder2": ("starcoder2", 2, {"tp": 2}, {}, 120),
    "tp2_gemma": ("gemma", 2, {"tp": 2}, {}, 120, TARGETS, _hybrid),
    "pp2_hybrid_segments": ("hybrid", 2, {"pp": 2}, {"pattern": "*-|*-"}, 120, TARGETS, _hybrid),
    "pp2_vpp2_hybrid": ("hybrid", 2, {"pp": 2, "vpp": 2}, {"pattern": "*-|*-|*-|*-"}, 120, TARGETS, _hybrid),
    "tp2_nemotron_h": ("nemotron_h", 2, {"tp": 2}, {}, 120, HF_ONLY, _hybrid),
    # MoE families: EP x expert-TP, and PP (DeepSeek's MTP layer lives on the last stage)
    "ep2_tp2_qwen3_moe_every_layer": ("qwen3_moe", 4, {"ep": 2, "tp": 2}, {"num_layers": 4, "moe_layer_freq": 1}, 120),
    "pp2_qwen3_moe_dense_first": ("qwen3_moe", 2, {"pp": 2}, {"num_layers": 4, "moe_layer_freq": [0, 1, 1, 1]},
                                  120, HF_ONLY),
    "ep2_tp2_deepseek": ("deepseek", 4, {"ep": 2, "tp": 2}, {}, 120, HF_ONLY, _mla),
    "pp2_deepseek_mtp": ("deepseek", 2, {"pp": 2}, {"mtp": 1}, 120, HF_ONLY, _mla),
    "ep2_tp2_gpt_oss": ("gpt_oss", 4, {"ep": 2, "tp": 2, "etp": 1}, {}, 120, HF_ONLY),  # MoE biases need ETP 1
    "ep2_hybrid_qwen3_moe": ("hybrid", 2, {"ep": 2}, {"pattern": "*E*E", "qk_layernorm": True, "kv_channels": 16,
                                                      "num_moe_experts": 4, "moe_router_topk": 2,
                                                      "moe_ffn_hidden_size": 32, "moe_aux_loss_coeff": 0.0,
                                                      "moe_token_dispatcher_type": "allgather"},
                             120, HF_ONLY, _hybrid),
}


def reference(tmp: Path, family: str, model_kw: dict, vocab: int, targets: list) -> Path:
    """Single-rank model, saved as a distributed checkpoint and exported to each target. (A
    HybridModel's "|" marks pipeline segments, one per stage: one rank holds the whole pattern.)"""
    if "pattern" in model_kw:
        model_kw = dict(model_kw, pattern=model_kw["pattern"].replace("|", ""))
    model = BUILDERS[family](**model_kw)
    randomize(model, seed=17)
    from megatron.core import dist_checkpointing

    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    for i, target in enumerate(targets):
        Exporter(model, ExportConfig(output_dir=str(tmp / f"ref{i}"), vocab_size=vocab, **target)).export(1)
    return ckpt


# The probe's reference logits depend on how the forward pass was split over ranks (float32
# rounding), so they are compared with a tolerance (test_probe_from_pp2_equals_single_rank), not
# byte for byte.
PROBE = "verification.safetensors"


def exported_files(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", PROBE)}


def tensor_files(manifest: dict) -> dict:
    return {k: v for k, v in manifest["files"].items() if k != PROBE}


# Cases whose code paths another case already covers on both megatron-core versions (the
# launch and collectives are the same; only the family's tables differ): pinned version only.
_HEAVY_CASES = {"ep2_tp2_gpt_oss", "ep2_tp2_qwen3_moe_every_layer"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.heavy) if c in _HEAVY_CASES else c
                                  for c in CASES])
def test_layout_exports_equal_single_rank_export(megatron_world, tmp_path, case):
    family, world, layout, model_kw, vocab, *rest = CASES[case]
    targets = rest[0] if rest else TARGETS
    requirement = rest[1] if len(rest) > 1 else None
    if requirement:
        requirement()
    moe_trt = family in ("mixtral", "qwen3_moe")
    targets = [dict(t, **({"inference_moe_ep": 2} if moe_trt and t.get("inference_tp") == 2 else {}))
               for t in targets]
    ckpt = reference(tmp_path, family, model_kw, vocab, targets)
    exports = [dict(output_dir=str(tmp_path / f"dist{i}"), vocab_size=vocab, **t) for i, t in enumerate(targets)]
    outcome = run_ranks(world, WORKER, timeout_s=240, family=family, layout=layout,
                        checkpoint_dir=str(ckpt), exports=exports, model_kw=model_kw)
    for rank, (status, value) in outcome.items():
        assert status == "ok", f"rank {rank}: {status} {value}"
        assert [v[0] for v in value] == ["complete"] * len(targets), f"rank {rank}: {value}"
    for i in range(len(targets)):
        ref = tmp_path / f"ref{i}" / "iter_0000001"
        got = tmp_path / f"dist{i}" / "iter_0000001"
        ref_files, got_files = exported_files(ref), exported_files(got)
        assert sorted(ref_files) == sorted(got_files)
        for name in ref_files:
            assert ref_files[name] == got_files[name], f"target {i}: {name} differs"
        ref_manifest = json.loads((ref / "manifest.json").read_text())
        got_manifest = json.loads((got / "manifest.json").read_text())
        assert tensor_files(got_manifest) == tensor_files(ref_manifest)
        assert got_manifest["source"]["world_size"] == world


@pytest.mark.heavy
def test_async_export_from_tp2_pp2_equals_single_rank(megatron_world, tmp_path):
    """The background worker processes of four ranks form their own world, move the snapshots'
    slices and write: the same bytes as the single-rank export."""
    ckpt = reference(tmp_path, "llama", {}, 120, [dict(inference_tp=2)])
    outcome = run_ranks(4, WORKER, timeout_s=240, family="llama", layout={"tp": 2, "pp": 2}, checkpoint_dir=str(ckpt),
                        exports=[dict(output_dir=str(tmp_path / "dist0"), vocab_size=120, inference_tp=2,
                                      mode="async")], model_kw={})
    for rank, (status, value) in outcome.items():
        assert status == "ok" and value[0][0] == "complete", f"rank {rank}: {status} {value}"
    ref_files = exported_files(tmp_path / "ref0" / "iter_0000001")
    got_files = exported_files(tmp_path / "dist0" / "iter_0000001")
    assert sorted(ref_files) == sorted(got_files)
    for name in ref_files:
        assert ref_files[name] == got_files[name], name
    manifest = json.loads((tmp_path / "dist0" / "iter_0000001" / "manifest.json").read_text())
    assert manifest["config"]["mode"] == "async" and "stall_s" in manifest["timings"]


def test_writing_is_spread_over_ranks(megatron_world):
    """The plan alone: with TP2 every rank writes about half of the bytes, and DP replicas write
    without receiving anything."""
    from tests.support.plans import build_units

    def desc(rank, tp_rank, dp_main):
        out = {}
        for layer in range(4):
            name = f"decoder.layers.{layer}.self_attention.linear_proj.weight"
            out[name] = [(rank, (0, 32 * tp_rank), (64, 32), (64, 64), "float32", dp_main)]
        return out

    tp_units = build_units([desc(0, 0, True), desc(1, 1, True)])
    writers = [u.writer for u in tp_units]
    assert sorted(writers) == [0, 0, 1, 1]
    moved = sum(1 for u in tp_units for p in u.pieces if not u.local_to_writer(p))
    assert moved == 4  # one half of each tensor crosses, once

    dp = [{n: [(r, (0, 0), (64, 64), (64, 64), "float32", r == 0)] for n in
           (f"decoder.layers.{i}.mlp.linear_fc2.weight" for i in range(4))} for r in (0, 1)]
    dp_units = build_units(dp)
    assert sorted(u.writer for u in dp_units) == [0, 0, 1, 1]
    assert all(u.local_to_writer(p) for u in dp_units for p in u.pieces)


LAYOUT_4 = dict(family="llama", layout={"tp": 2, "pp": 2})


@pytest.mark.heavy
def test_failure_on_one_rank_fails_every_rank_with_its_name(megatron_world, tmp_path):
    ckpt = reference(tmp_path, "llama", {}, 120, [])
    out = tmp_path / "exports"
    outcome = run_ranks(4, WORKER, timeout_s=240, checkpoint_dir=str(ckpt), model_kw={},
                        exports=[dict(output_dir=str(out), vocab_size=120, timeout_s=30)],
                        inject={"disk_full_rank": 2}, **LAYOUT_4)
    messages = []
    for rank, (status, value) in outcome.items():
        assert status == "ok", f"rank {rank}: {status} {value}"
        assert value[0][0] == "failed"
        messages.append(value[0][2])
    assert all("failed on rank 2" in m and "No space left on device" in m for m in messages), messages
    assert not (out / "iter_0000001").exists()
    failed = json.loads((out / ".iter_0000001.failed" / "manifest.json").read_text())
    assert failed["status"] == "failed" and "rank 2" in failed["error"]


@pytest.mark.heavy
def test_lost_rank_ends_every_other_rank_within_the_timeout(megatron_world, tmp_path):
    ckpt = reference(tmp_path, "llama", {}, 120, [])
    out = tmp_path / "exports"
    start = time.monotonic()
    # the harness reports a rank still running after 120 s as "hung"
    outcome = run_ranks(4, WORKER, timeout_s=120, checkpoint_dir=str(ckpt), model_kw={},
                        exports=[dict(output_dir=str(out), vocab_size=120, timeout_s=20)],
                        inject={"die_rank": 3, "die_after_units": 3}, **LAYOUT_4)
    elapsed = time.monotonic() - start
    assert outcome[3] == ("lost", 17)
    for rank in (0, 1, 2):
        status, value = outcome[rank]
        assert status == "ok", f"rank {rank}: {status} {value}"  # returned, did not hang
        state, path, error = value[0]
        assert state == "failed", f"rank {rank}: {value}"
        assert "rank(s) [3] lost" in error, f"rank {rank}: {error}"
        assert path is not None and Path(path).is_dir(), f"rank {rank}: {path}"
    assert elapsed < 120
    assert not (out / "iter_0000001").exists() and not list(out.glob(".iter_*.partial"))
    record = json.loads((out / ".iter_0000001.failed" / "manifest.json").read_text())
    assert record["status"] == "failed" and "[3] lost" in record["error"]


@pytest.mark.heavy
def test_lost_worker_in_an_async_export_fails_every_rank_naming_it(megatron_world, tmp_path):
    """SIGKILL of rank 1's export worker in the middle of a 2-rank async export: rank 0's worker
    fails at once naming rank 1, rank 1's trainer records its worker's death, a failure record
    exists, and nothing waits for the timeout."""
    ckpt = reference(tmp_path, "llama", {"num_layers": 8}, 120, [])
    out = tmp_path / "exports"
    start = time.monotonic()
    outcome = run_ranks(2, WORKER, timeout_s=120, family="llama", layout={"tp": 2}, checkpoint_dir=str(ckpt),
                        model_kw={"num_layers": 8},
                        exports=[dict(output_dir=str(out), vocab_size=120, timeout_s=60, mode="async")],
                        inject={"kill_worker_rank": 1})
    assert time.monotonic() - start < 60
    for rank, (status, value) in outcome.items():
        assert status == "ok", f"rank {rank}: {status} {value}"
        assert value[0][0] == "failed", f"rank {rank}: {value}"
    assert "rank(s) [1] lost" in outcome[0][1][0][2], outcome[0]
    assert "died (exit code -9)" in outcome[1][1][0][2], outcome[1]
    assert not (out / "iter_0000001").exists()
    record = json.loads((out / ".iter_0000001.failed" / "manifest.json").read_text())
    assert record["status"] == "failed"


QUANT_MODEL = dict(hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, num_query_groups=2)


def export_quantized_from(tmp_path, layout, algo, kv_cache, target, reference_target=None, num_layers=2,
                          family="llama", model_kw=None):
    """Single-rank reference export (``reference_target``, default the quantized ``target``) to
    ref0/, the same weights exported quantized from ``layout`` on 2 ranks to dist0/."""
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is the quantization engine")
    model_kw = dict(QUANT_MODEL, num_layers=num_layers) if model_kw is None else model_kw
    quant = {"algorithm": algo, "kv_cache": kv_cache, "calibration": {"num_samples": 8, "seq_len": 32, "batch_size": 4}}
    target = dict(target, quantization=quant, dtype="float32")
    ckpt = reference(tmp_path, family, model_kw, 120, [reference_target or target])
    outcome = run_ranks(2, WORKER, timeout_s=240, family=family, layout=layout, checkpoint_dir=str(ckpt),
                        exports=[dict(output_dir=str(tmp_path / "dist0"), vocab_size=120, **target)],
                        model_kw=model_kw)
    for rank, (status, value) in outcome.items():
        assert status == "ok" and value[0][0] == "complete", f"rank {rank}: {status} {value}"
    return tmp_path / "ref0" / "iter_0000001", tmp_path / "dist0" / "iter_0000001"


@pytest.mark.parametrize("family,layout,layers", [
    pytest.param("llama", {"tp": 2}, 2, id="tp2"),
    pytest.param("llama", {"pp": 2}, 2, id="pp2", marks=pytest.mark.heavy),
    pytest.param("llama", {"pp": 2, "vpp": 2}, 4, id="pp2_vpp2", marks=pytest.mark.heavy),
    pytest.param("nemotron_h", {"tp": 2}, 4, id="tp2_nemotron_h"),
    pytest.param("nemotron_h", {"pp": 2}, 4, id="pp2_nemotron_h"),
    pytest.param("mixtral", {"ep": 2}, 2, id="ep2_mixtral", marks=pytest.mark.heavy)])
def test_fp8_export_from_parallel_layouts_equals_single_rank(megatron_world, tmp_path, family, layout, layers):
    """Calibrated on the training layout (ModelOpt max-reduces amax over TP ranks; pipeline
    layouts calibrate through Megatron's schedule): weights and weight scales are bit-equal to the
    single-rank export; activation and KV scales come from activations that a parallel forward
    computes in another order, so they agree to float32 rounding. Nemotron-H: each TP rank holds a
    slice of every in_proj component; the whole in_proj's statistics and scales are one."""
    from safetensors.torch import load_file

    if family == "nemotron_h":
        _hybrid()
        # (PP: one pipeline segment per stage; the single-rank reference drops the "|")
        ref, got = export_quantized_from(tmp_path, layout, "fp8", "fp8", dict(formats=["hf"]), family=family,
                                         model_kw={"pattern": "M*|-M"} if "pp" in layout else {})
    elif family == "mixtral":  # experts' input amax MAX-reduced over the EP ranks; TRT-LLM experts on 2 EP ranks
        ref, got = export_quantized_from(tmp_path, layout, "fp8", "fp8", dict(inference_tp=2, inference_moe_ep=2),
                                         family=family, model_kw={})
    else:
        ref, got = export_quantized_from(tmp_path, layout, "fp8", "fp8", dict(inference_tp=2), num_layers=layers)
    files = sorted(p.relative_to(ref) for p in ref.rglob("*.safetensors") if p.name != PROBE)
    assert files == sorted(p.relative_to(got) for p in got.rglob("*.safetensors") if p.name != PROBE)
    assert_same_probe(ref, got)
    activation_scales = ("input_scale", "k_scale", "v_scale", "activation_scaling_factor", "kv_cache_scaling_factor")
    for rel in files:
        a, b = load_file(str(ref / rel)), load_file(str(got / rel))
        assert sorted(a) == sorted(b)
        for name in a:
            if name.endswith(activation_scales):
                torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=0, msg=f"{rel}:{name}")
            else:
                assert torch.equal(a[name].view(torch.uint8) if a[name].dtype == torch.float8_e4m3fn else a[name],
                                   b[name].view(torch.uint8) if b[name].dtype == torch.float8_e4m3fn else b[name]), \
                    f"{rel}:{name}"


TRT_MODULES = {"attention.dense": ("self_attn.o_proj",), "mlp.fc": ("mlp.gate_proj",), "mlp.gate": ("mlp.up_proj",),
               "mlp.proj": ("mlp.down_proj",), "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}


def trt_linear(tensors: dict, module: str) -> dict:
    """A TensorRT-LLM checkpoint linear under the HF scale names test_quant's helpers read."""
    return {"x.weight": tensors[f"{module}.weight"], "x.weight_scale": tensors[f"{module}.weights_scaling_factor"],
            "x.pre_quant_scale": tensors[f"{module}.prequant_scaling_factor"]}


@pytest.mark.parametrize("algo", ["int8_sq", "int4_awq"])
@pytest.mark.heavy
def test_smoothed_exports_from_tp2_reconstruct_the_weights(megatron_world, tmp_path, algo):
    """SmoothQuant/AWQ calibrate per TP shard (ModelOpt then shares the smoothing scale across
    the TP group), so a TP2 export is a valid calibration of its own, not bit-equal to TP1. What
    must hold whatever the layout: every exported linear (TensorRT-LLM checkpoint, where each keeps
    its pre-quant scale), dequantized and multiplied back by its pre-quant scale, reconstructs the
    original weight to within half a quantization step. A pre-quant scale that does not belong to
    some shard's rows fails this by far."""
    from safetensors.torch import load_file

    import test_quant as tq

    ref, got = export_quantized_from(tmp_path, {"tp": 2}, algo, "none", dict(formats=["trtllm_checkpoint"]),
                                     reference_target=dict(dtype="float32", formats=["hf"]))
    original = load_file(str(ref / "hf" / "model.safetensors"))
    exported = load_file(str(got / "trtllm_checkpoint" / "rank0.safetensors"))
    for layer in range(2):
        for trt, hf in TRT_MODULES.items():
            weight = torch.cat([original[f"model.layers.{layer}.{m}.weight"] for m in hf])
            _check_reconstruction(algo, tq, trt_linear(exported, f"transformer.layers.{layer}.{trt}"), weight,
                                  f"{algo} layer {layer} {trt}")


def _check_reconstruction(algo, tq, linear, original, what):
    pqs = linear["x.pre_quant_scale"]
    smoothed = tq.dequantize(algo, linear, "x")
    step = tq.quant_step(algo, linear, "x", smoothed)
    error = (smoothed * pqs - original).abs()
    bound = (step / 2) * pqs + 1e-6 * original.abs()
    assert bool((error <= bound).all()), f"{what}: worst excess {float((error - bound).max()):.3e}"


@pytest.mark.heavy
def test_smoothquant_export_from_tp2_matches_tp1(megatron_world, tmp_path):
    """SmoothQuant's smoothing scale uses the activation amax and the weight's per-input-channel
    max, which ModelOpt reduces over the TP group: a TP2 calibration is TP1's up to float32
    rounding of the activation statistics. So pre-quant and activation scales agree to 1e-5 and
    the INT8 weights are the same grid, except rare elements one step away."""
    from safetensors.torch import load_file

    import test_quant as tq

    ref, got = export_quantized_from(tmp_path, {"tp": 2}, "int8_sq", "none", dict(formats=["trtllm_checkpoint"]))
    tp1 = load_file(str(ref / "trtllm_checkpoint" / "rank0.safetensors"))
    tp2 = load_file(str(got / "trtllm_checkpoint" / "rank0.safetensors"))
    assert sorted(tp1) == sorted(tp2)
    for name in tp1:
        if name.endswith(("prequant_scaling_factor", "activation_scaling_factor", "weights_scaling_factor")):
            torch.testing.assert_close(tp2[name], tp1[name], rtol=1e-5, atol=0, msg=name)
        elif name.endswith(".weight") and f"{name[:-7]}.weights_scaling_factor" in tp1:
            module = name[: -len(".weight")]
            a, b = trt_linear(tp1, module), trt_linear(tp2, module)
            tq.assert_same_grid("int8_sq", a, "x", tq.dequantize("int8_sq", b, "x"), tq.dequantize("int8_sq", a, "x"),
                                module)
        else:
            assert torch.equal(tp1[name], tp2[name]), name


def assert_same_probe(ref_dir: Path, got_dir: Path) -> None:
    """The same tokens; the same top-k to float32 rounding (ids may trade places only where their
    logits tie to that precision)."""
    from safetensors.torch import load_file

    ref, got = load_file(str(ref_dir / PROBE)), load_file(str(got_dir / PROBE))
    assert torch.equal(ref["tokens"], got["tokens"])
    torch.testing.assert_close(got["topk_values"], ref["topk_values"], rtol=1e-5, atol=1e-6)
    differ = ref["topk_ids"] != got["topk_ids"]
    if differ.any():
        gaps = (ref["topk_values"][..., :-1] - ref["topk_values"][..., 1:]).abs()
        near_tie = torch.zeros_like(differ)
        near_tie[..., :-1] |= gaps < 1e-5
        near_tie[..., 1:] |= gaps < 1e-5
        assert bool(near_tie[differ].all()), "top-k ids differ where the logits do not tie"


@pytest.mark.parametrize("case", ["pp2", "pp2_vpp2", "tp2"])
def test_probe_from_parallel_layouts_equals_single_rank(megatron_world, tmp_path, case):
    """The probe hands activations from stage to stage (PP, virtual PP) or gathers the
    vocabulary shards of a tensor-parallel output layer; rank 0 records what one rank would, and
    the export verifies."""
    from megatron_trt_ext.verification.check import verify

    layout, model_kw = {"pp2": ({"pp": 2}, {}), "pp2_vpp2": ({"pp": 2, "vpp": 2}, {"num_layers": 4}),
                        "tp2": ({"tp": 2}, {})}[case]
    target = dict(formats=["hf"], dtype="float32")
    if case == "pp2_vpp2":  # fewer sequences than virtual stages
        target["verification"] = {"num_sequences": 1, "seq_len": 16}
    ckpt = reference(tmp_path, "llama", model_kw, 120, [target])
    outcome = run_ranks(2, WORKER, timeout_s=240, family="llama", layout=layout, checkpoint_dir=str(ckpt),
                        exports=[dict(output_dir=str(tmp_path / "dist0"), vocab_size=120, **target)],
                        model_kw=model_kw)
    for rank, (status, value) in outcome.items():
        assert status == "ok" and value[0][0] == "complete", f"rank {rank}: {status} {value}"
    ref, got = tmp_path / "ref0" / "iter_0000001", tmp_path / "dist0" / "iter_0000001"
    assert json.loads((got / "manifest.json").read_text())["verification"]["status"] == "recorded"
    assert_same_probe(ref, got)
    report = verify(got, record=False)
    assert report.passed, report.lines()
