"""`importer.import_hf`, single rank: an HF export read back into a freshly built model of the
same shape exports the same files again (export(import(x)) == x), for the families' variants;
a checkpoint of another family or shape is refused naming what does not fit."""

import zlib

import pytest
import torch

from megatron_trt_ext import ExportError
from megatron_trt_ext.importer import import_hf
from tests.support.models import randomize
from tests.test_round_trip import VARIANTS, build, exporter_of

IMPORTED = ["llama_gqa", "llama_mqa_biases", "gpt_tied", "mixtral", "qwen3_tied_mha", "nemotron_untied_biases",
            "starcoder2", "gemma", "qwen3_moe_dense_first", "gpt_oss", "deepseek_v3_mtp_tied", "hybrid_llama",
            "hybrid_qwen3_moe", "nemotron_h"]


def export_files(model, path, dtype):
    exporter = exporter_of(model, path, dtype)
    try:
        out = exporter.export(iteration=1).path / "hf"
    finally:
        exporter.close()
    return out, {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("variant", IMPORTED)
def test_export_of_import_is_the_export(megatron_world, tmp_path, variant, dtype):
    hf_dir, files = export_files(build(variant), tmp_path / "a", dtype)
    fresh = VARIANTS[variant][0]()
    randomize(fresh, seed=zlib.crc32(variant.encode()) % 1000 + 1)  # other values everywhere
    _, before = export_files(fresh, tmp_path / "before", dtype)
    assert before["model.safetensors"] != files["model.safetensors"]
    loaded = import_hf(fresh, hf_dir)
    assert "embedding.word_embeddings.weight" in loaded
    assert not fresh.embedding.word_embeddings.weight[120:].any()  # the padding rows: zero
    _, again = export_files(fresh, tmp_path / "b", dtype)
    assert sorted(again) == sorted(files)
    for name, data in files.items():
        assert again[name] == data, name


def test_a_checkpoint_of_another_family_or_shape_is_refused(megatron_world, tmp_path):
    hf_dir, _ = export_files(build("llama_gqa"), tmp_path / "llama", "bfloat16")
    with pytest.raises(ExportError, match="LlamaForCausalLM.*'qwen3'"):
        import_hf(VARIANTS["qwen3"][0](), hf_dir)
    wider = VARIANTS["llama_mqa_biases"][0]()  # one KV head: q/k/v of other shapes, biases
    with pytest.raises(ExportError, match="cannot build Megatron tensor 'decoder.layers.0.self_attention.linear_qkv"):
        import_hf(wider, hf_dir)
    tensors = {"model.embed_tokens.weight": torch.zeros(120, 64)}
    with pytest.raises(ExportError, match="cannot build Megatron tensor"):
        import_hf(VARIANTS["llama_gqa"][0](), tensors)


def import_layout(rank: int, world_size: int, family: str, layout: dict, hf_dir: str, output_dir: str,
                  model_kw: dict) -> str:
    """Rank body: build ``family`` in ``layout``, import the HF checkpoint, export it again."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_trt_ext import ExportConfig, Exporter
    from tests.support.workers import build as build_layout

    ps.initialize_model_parallel(layout.get("tp", 1), layout.get("pp", 1), layout.get("vpp"),
                                 expert_model_parallel_size=layout.get("ep", 1))
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    chunks = build_layout(family, **layout, **model_kw)
    import_hf(chunks, hf_dir)
    exporter = Exporter(chunks if layout.get("vpp") else chunks[0],
                        ExportConfig(output_dir=output_dir, formats=["hf"], dtype="bfloat16", vocab_size=120,
                                     verification={"enabled": False}))
    try:
        return exporter.export(iteration=1).status
    finally:
        exporter.close()


LAYOUTS = {
    # name: (family, world size, layout, model kwargs)
    "tp2_llama": ("llama", 2, {"tp": 2}, {}),
    "pp2_llama_tied": ("llama", 2, {"pp": 2}, {"tied": True}),
    "ep2_mixtral": ("mixtral", 2, {"ep": 2}, {}),
    # the first stage has no MoE layer: the model facts are pooled over the ranks
    "pp2_qwen3_moe_dense_first": ("qwen3_moe", 2, {"pp": 2}, {"num_layers": 4, "moe_layer_freq": [0, 0, 1, 1]}),
}


@pytest.mark.heavy
@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_import_into_a_parallel_layout(megatron_world, tmp_path, case):
    """Each rank loads only its slices (located by the sharded state dict's global offsets); the
    export of the imported model equals the checkpoint's."""
    from tests.support.distributed import run_ranks
    from tests.support.workers import BUILDERS

    family, world, layout, model_kw = LAYOUTS[case]
    model = BUILDERS[family](**model_kw)
    randomize(model, seed=31)
    hf_dir, files = export_files(model, tmp_path / "ref", "bfloat16")
    outcome = run_ranks(world, "tests.test_importer:import_layout", timeout_s=240, family=family, layout=layout,
                        hf_dir=str(hf_dir), output_dir=str(tmp_path / "dist"), model_kw=model_kw)
    for rank, (status, value) in outcome.items():
        assert (status, value) == ("ok", "complete"), f"rank {rank}: {status} {value}"
    got = tmp_path / "dist" / "iter_0000001" / "hf"
    assert {p.name: p.read_bytes() for p in sorted(got.iterdir()) if p.is_file()} == files
