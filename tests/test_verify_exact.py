"""`verify`'s exact checks (issue 20): weight fingerprints recorded at export and recomputed from
the HF files read back through the inverse tables, and hf/config.json derived again from the
recorded Megatron facts. Each wrong export fails naming the tensor or the key, on models whose
logits would hardly notice (no tuning to the shape: the fingerprints do not depend on luck)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import manifest as mf
from megatron_trt_ext.verification import fingerprint as fp
from megatron_trt_ext.verification.check import verify
from tests.support import corrupt
from tests.support.models import randomize, tiny_gpt, tiny_llama
from tests.test_verify import edit_hf_config, export, rewrite_hf_tensors

pytest.importorskip("transformers", reason="verify loads the HF export with transformers")


def check(report, name):
    return next(c for c in report.data["checks"] if c["name"] == name)


def _families():
    from tests.support import families as fam
    from tests.test_verify import _family_cases

    return {
        "llama": (lambda: tiny_llama(num_query_groups=2), None),
        "gpt": (lambda: tiny_gpt(tied=False), None),
        "mixtral": (lambda: tiny_llama(moe=True), None),
        "qwen3_moe": (fam.tiny_qwen3_moe, None),
        "starcoder2_window": (lambda: fam.tiny_starcoder2(window=5), None),
        **{k: _family_cases()[k] for k in ("deepseek_v3", "nemotron_h")},
    }


def build(family, seed=81):
    make, needs = _families()[family]
    if needs and not needs[0]():
        pytest.skip(f"{needs[1]} (scripts/test-mcore-latest runs it)")
    model = make()
    randomize(model, seed=seed, scale=0.1)
    return model


def good_export(family, dtype, tmp_path):
    # with TensorRT-LLM too where it has the family: its float32 routers change how units convert
    formats = ["hf", "trtllm_checkpoint"] if family in ("llama", "gpt", "mixtral") else ["hf"]
    result = export(build(family), tmp_path, dtype=dtype, verification={"enabled": False}, formats=formats)
    report = verify(result.path, record=False)
    assert report.passed, report.lines()
    assert check(report, "weights")["ok"] is True and check(report, "config")["ok"] is True
    assert "exactly" in check(report, "weights")["detail"]
    return result.path


def fails_naming(path, check_name, *needles):
    report = verify(path, record=False)
    assert not report.passed, report.lines()
    detail = check(report, check_name)
    assert detail["ok"] is False, report.lines()
    for needle in needles:
        assert needle in detail["detail"], (needle, detail["detail"])
    return detail["detail"]


def _layer0(tensors, fragment):
    return next(n for n in sorted(tensors) if ".0." in n and fragment in n)


# ---------------------------------------------------------------------- weights
FAMILIES_DTYPES = [(f, d) for f in ("llama", "gpt", "mixtral", "qwen3_moe", "deepseek_v3", "nemotron_h")
                   for d in ("bfloat16", "float32")]


@pytest.mark.parametrize("family,dtype", FAMILIES_DTYPES)
def test_swapped_rows_fail_naming_the_tensor(megatron_world, tmp_path, family, dtype):
    path = good_export(family, dtype, tmp_path)
    hf = load_file(str(path / "hf" / "model.safetensors"))
    # the first of: q_proj (MLA: q_b_proj or q_proj), GPT-2's fused c_attn, a Mamba in_proj
    target = next(n for fragment in ("q_proj.weight", "q_b_proj.weight", "c_attn.weight", "in_proj.weight") for n in sorted(hf)
                  if ".0." in n and n.endswith(fragment))

    def swap(tensors):
        t = tensors[target].clone()
        t[[1, 2]] = t[[2, 1]]
        tensors[target] = t

    rewrite_hf_tensors(path, swap)
    assert not mf.verify_export(path)  # the checksums were rewritten: only the meaning is wrong
    fails_naming(path, "weights", "layers.0.", "row")


@pytest.mark.parametrize("family,dtype", [("llama", "bfloat16"), ("mixtral", "float32"), ("qwen3_moe", "bfloat16")])
def test_up_and_gate_swapped_fail(megatron_world, tmp_path, family, dtype):
    path = good_export(family, dtype, tmp_path)

    def swap(tensors):
        gate = _layer0(tensors, "gate_proj.weight") if any("gate_proj" in n for n in tensors) else \
            _layer0(tensors, "w1.weight")
        up = gate.replace("gate_proj", "up_proj").replace("w1.", "w3.")
        tensors[gate], tensors[up] = tensors[up].clone(), tensors[gate].clone()

    rewrite_hf_tensors(path, swap)
    fails_naming(path, "weights", "decoder.layers.0.mlp")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_transposed_square_matrix_fails(megatron_world, tmp_path, dtype):
    path = good_export("llama", dtype, tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"

    def transpose(tensors):
        assert tensors[name].shape[0] == tensors[name].shape[1]
        tensors[name] = tensors[name].t().contiguous()

    rewrite_hf_tensors(path, transpose)
    fails_naming(path, "weights", "decoder.layers.1.self_attention.linear_proj.weight")


@pytest.mark.parametrize("family,dtype", [("mixtral", "bfloat16"), ("qwen3_moe", "float32")])
def test_swapped_experts_fail_naming_both(megatron_world, tmp_path, family, dtype):
    path = good_export(family, dtype, tmp_path)
    hf = load_file(str(path / "hf" / "model.safetensors"))
    first = _layer0(hf, "experts.0.")
    second = first.replace("experts.0.", "experts.1.")

    def swap(tensors):
        tensors[first], tensors[second] = tensors[second].clone(), tensors[first].clone()

    rewrite_hf_tensors(path, swap)
    detail = fails_naming(path, "weights", "experts")
    assert "2 tensors" in detail or detail.count("experts") >= 2


def test_fingerprints_are_listed_and_checksummed(megatron_world, tmp_path):
    path = good_export("llama", "bfloat16", tmp_path)
    manifest = mf.read_manifest(path)
    assert manifest["fingerprints"]["file"] == fp.FILE_NAME and manifest["fingerprints"]["tensors"] > 10
    assert set(manifest["files"][fp.FILE_NAME]["xxh3_128"]) == set(load_file(str(path / fp.FILE_NAME)))
    assert manifest["model_info"]["rotary_base"] == 10000


def test_old_exports_without_fingerprints_verify_as_before(megatron_world, tmp_path):
    path = good_export("llama", "bfloat16", tmp_path)
    corrupt.drop_fingerprints(path)
    report = verify(path, record=False)
    assert report.passed, report.lines()
    assert check(report, "weights")["ok"] is None and "no fingerprints recorded" in check(report, "weights")["detail"]
    assert check(report, "config")["ok"] is None


def test_fingerprints_see_one_ulp_and_ignore_summation_order():
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(300, 70, generator=gen).to(torch.bfloat16)
    recorded = fp.fingerprint("w", t)
    assert fp.compare("w", recorded, t.clone()) is None
    bumped = t.clone()
    bumped[123, 45] = (bumped[123, 45].float() * (1 + 2 ** -7)).to(torch.bfloat16)  # one bfloat16 ulp
    assert not torch.equal(bumped, t)
    problem = fp.compare("w", recorded, bumped)
    assert problem is not None and "row 123" in problem
    assert fp.compare("other name", recorded, t) is not None  # the vectors depend on the name


@pytest.mark.parametrize("algorithm", [fp.PREFIX, fp.BLOCKS])
def test_block_hashes_see_one_bit_anywhere_and_name_the_rows(algorithm):
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(1500, 700, generator=gen).to(torch.bfloat16)  # 2 MiB: blocks of 748 rows, 3 blocks
    recorded = fp.block_hashes(t, algorithm)
    step = fp.block_rows(700, torch.bfloat16)
    assert step == (1 << 20) // 1400 and recorded.digests.numel() == -(-1500 // step)
    assert fp.compare("w", recorded, t.clone()) is None
    assert fp.compare("w", recorded, t.float()) is None  # a float32 read-back of the same values
    for row in (0, step - 1, step, 1499):
        flipped = t.clone()
        flipped.view(torch.int16)[row, 123] ^= 1  # the lowest bit of one element
        problem = fp.compare("w", recorded, flipped)
        first = row // step * step
        assert problem is not None and f"first rows {first}:{min(first + step, 1500)}" in problem, problem
    swapped = t.clone()
    swapped[:, [3, 4]] = swapped[:, [4, 3]]
    want = "3 of 3 row blocks differ" if algorithm == fp.BLOCKS else "differ from row block 0 of 3 on"
    assert want in fp.compare("w", recorded, swapped)  # every row changed
    assert "shape" in fp.compare("w", recorded, t[:, :699])


def _raw(t):
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_prefix_hashes_are_the_xxh3_128_of_each_prefix_and_the_last_is_the_checksum():
    import xxhash

    from megatron_trt_ext import checksum
    from megatron_trt_ext.formats.safetensors_stream import checksum_of

    gen = torch.Generator().manual_seed(5)
    t = torch.randn(1000, 1100, generator=gen).to(torch.bfloat16)  # blocks of 476 rows: 3, the last short
    step, raw = fp.block_rows(1100, torch.bfloat16), _raw(t)
    ends = [min(k + step, 1000) * 2200 for k in range(0, 1000, step)]
    oracle = [xxhash.xxh3_128_intdigest(raw[:end]) & (2 ** 64 - 1) for end in ends]
    got = [int(d) & (2 ** 64 - 1) for d in fp.block_hashes(t).digests]
    assert got == oracle and len(got) == 3
    assert checksum.ALGORITHM == "xxh3_128" and int(checksum_of(t), 16) & (2 ** 64 - 1) == oracle[-1]


@pytest.mark.parametrize("shape", [(1000, 1100), (3, 600000), (5000, 3)])  # short last block; rows over a block; tiny rows
def test_hashes_taken_from_a_write_checksum_state_equal_their_own_pass(shape):
    from megatron_trt_ext import checksum
    from megatron_trt_ext.formats.safetensors_stream import checksum_of, chunks

    gen = torch.Generator().manual_seed(7)
    t = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    own = fp.block_hashes(t)
    acc = fp.BlockHashes(t.shape, t.dtype)
    assert acc.can_follow(checksum.ALGORITHM) and not fp.BlockHashes(t.shape, torch.float32, torch.bfloat16).can_follow(
        checksum.ALGORITHM) and not fp.BlockHashes(t.shape, t.dtype, algorithm=fp.BLOCKS).can_follow(checksum.ALGORITHM)
    state = checksum.new()
    for _, data in chunks(t, acc.step):  # as the writer feeds it
        acc.follow(state, data)
    followed = acc.result()
    assert torch.equal(followed.digests, own.digests) and followed.algorithm == fp.PREFIX
    assert state.hexdigest() == checksum_of(t)  # and the checksum is the one written to the manifest


def test_the_fingerprints_file_is_the_same_bytes_every_time_and_version_1_and_2_files_still_load(tmp_path):
    import xxhash
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(6)
    t = torch.randn(40, 24, generator=gen).bfloat16()
    entries = {"a.weight": fp.block_hashes(t), "b.weight": fp.fingerprint("b.weight", t[0]),
               "c.weight": "why not"}
    # safetensors writes a metadata map in no fixed order: the layouts of one model must give one file
    assert len({fp.save(entries)[0] for _ in range(8)}) == 1
    (tmp_path / "v3.safetensors").write_bytes(fp.save(entries)[0])
    loaded = fp.load(tmp_path / "v3.safetensors")
    assert sorted(loaded) == ["a.weight", "b.weight"] and fp.compare("a.weight", loaded["a.weight"], t) is None
    assert loaded["a.weight"].algorithm == fp.PREFIX
    assert fp.compare("b.weight", loaded["b.weight"], t[0]) is None
    # a file of version 2: an XXH3-64 of each block alone (one block here), as 0.x wrote it
    digest = torch.tensor([xxhash.xxh3_64_intdigest(_raw(t))], dtype=torch.uint64).view(torch.int64)
    layout = {"version": 2, "hash_block_bytes": 1 << 20, "hashed": {"a.weight": ["bfloat16", [40, 24]]}}
    save_file({"a.weight::xxh3_64": digest}, str(tmp_path / "v2.safetensors"),
              metadata={"fingerprints": json.dumps(layout, sort_keys=True)})
    v2 = fp.load(tmp_path / "v2.safetensors")
    assert v2["a.weight"].algorithm == fp.BLOCKS and fp.compare("a.weight", v2["a.weight"], t) is None
    assert "1 of 1 row blocks differ" in fp.compare("a.weight", v2["a.weight"], t.index_fill(0, torch.tensor([3]), 0))
    newer = {**layout, "version": fp.VERSION + 1}  # a newer megatron-trt-ext's file: refused, naming the fix
    save_file({"a.weight::xxh3_64": digest}, str(tmp_path / "v9.safetensors"),
              metadata={"fingerprints": json.dumps(newer, sort_keys=True)})
    with pytest.raises(ValueError, match="upgrade"):
        fp.load(tmp_path / "v9.safetensors")
    rows, cols = fp.fingerprint("w", t)  # a file written before block hashes: vectors, {"version": "1"}
    save_file({"w::rows": rows, "w::cols": cols}, str(tmp_path / "v1.safetensors"), metadata={"version": "1"})
    old = fp.load(tmp_path / "v1.safetensors")
    assert fp.compare("w", old["w"], t) is None and "row 3" in fp.compare("w", old["w"], t.index_fill(0, torch.tensor([3]), 0))


def test_unquantized_exports_record_hashes_and_vectors_where_hashes_cannot_be_exact(megatron_world, tmp_path):
    path = good_export("llama", "bfloat16", tmp_path)
    recorded = fp.load(path / fp.FILE_NAME)
    kinds = {name: isinstance(value, fp.Hashes) for name, value in recorded.items()}
    assert kinds["decoder.layers.0.self_attention.linear_qkv.weight"] and kinds["embedding.word_embeddings.weight"]
    assert not kinds["decoder.final_layernorm.weight"]  # 1-D: vectors (TensorRT-LLM may store w + 1)
    assert mf.read_manifest(path)["fingerprints"]["version"] == fp.VERSION == 3
    # the embedding's HF tensor holds its very bytes: its hashes came off the write's checksum state,
    # so the last one is the manifest's checksum of that tensor (low 64 bits)
    embed = recorded["embedding.word_embeddings.weight"]
    assert embed.algorithm == fp.PREFIX
    sums = {}
    for entry in mf.read_manifest(path)["files"].values():
        sums.update(entry.get("xxh3_128", {}))
    assert int(sums["model.embed_tokens.weight"], 16) & (2 ** 64 - 1) == int(embed.digests[-1]) & (2 ** 64 - 1)
    # the gated fc1 is written as gate_proj and up_proj, two runs of its rows: hashed as two runs by their writes
    fc1 = recorded["decoder.layers.0.mlp.linear_fc1.weight"]
    half = fc1.shape[0] // 2
    assert fc1.starts == (0, half)
    assert int(sums["model.layers.0.mlp.up_proj.weight"], 16) & (2 ** 64 - 1) == int(fc1.digests[-1]) & (2 ** 64 - 1)
    assert recorded["decoder.layers.0.self_attention.linear_qkv.weight"].starts == (0,)  # regrouped: hashed alone


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("family,field,value", [
    ("llama", "rope_theta", 20000.0), ("llama", "rms_norm_eps", 1e-6), ("starcoder2_window", "sliding_window", 7),
    ("llama", "tie_word_embeddings", True), ("gpt", "layer_norm_epsilon", 1e-6)])
def test_a_wrong_config_key_fails_naming_it(megatron_world, tmp_path, family, field, value):
    path = good_export(family, "bfloat16", tmp_path)
    config = json.loads((path / "hf" / "config.json").read_text())
    assert config.get(field) != value
    edit_hf_config(path, **{field: value})
    detail = fails_naming(path, "config", field)
    assert f"config.json has {value!r}" in detail


def test_a_wrong_rope_theta_fails_the_config_check_and_the_logits_check_stays(megatron_world, tmp_path):
    result = export(build("llama"), tmp_path)
    config = json.loads((result.path / "hf" / "config.json").read_text())
    edit_hf_config(result.path, rope_theta=20000.0, rope_parameters={**config["rope_parameters"], "rope_theta": 20000.0})
    detail = fails_naming(result.path, "config", "rope_theta", "rope_parameters.rope_theta")
    assert "10000" in detail


# ---------------------------------------------------------------------- quantized
def fp8_export(tmp_path, algorithm="fp8"):
    pytest.importorskip("modelopt.torch.quantization", reason="quantized exports need nvidia-modelopt")
    model = tiny_llama(hidden_size=256, ffn_hidden_size=512)
    randomize(model, seed=64)
    result = export(model, tmp_path, dtype="bfloat16", verification={"enabled": False}, quantization={
        "algorithm": algorithm, "calibration": {"num_samples": 8, "seq_len": 32, "batch_size": 4}})
    report = verify(result.path, record=False)
    assert report.passed, report.lines()
    assert "within the quantization rounding" in check(report, "weights")["detail"]
    return result.path


def test_fp8_swapped_rows_and_a_moved_scale_fail(megatron_world, tmp_path):
    path = fp8_export(tmp_path)
    hf = load_file(str(path / "hf" / "model.safetensors"))
    scales = {n: float(t) for n, t in hf.items() if n.endswith(".weight_scale")}
    # a scale moved onto the layer-0 tensor whose own scale differs most from it (a few percent)
    src, dst = max(((a, b) for a in sorted(scales) for b in sorted(scales) if ".0." in b),
                   key=lambda p: abs(scales[p[0]] / scales[p[1]] - 1))
    assert abs(scales[src] / scales[dst] - 1) > 0.05

    def move(tensors):
        tensors[dst] = tensors[src].clone()

    rewrite_hf_tensors(path, move)
    dst_module = dst.split(".")[-2]
    megatron = {"q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv", "o_proj": "linear_proj",
                "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2"}[dst_module]
    fails_naming(path, "weights", "layers.0.", megatron)


@pytest.mark.parametrize("algorithm", ["fp8", "nvfp4", "int4_awq"])
def test_quantized_swapped_rows_fail(megatron_world, tmp_path, algorithm):
    path = fp8_export(tmp_path, algorithm)
    name = "model.layers.0.mlp.down_proj.weight"

    def swap(tensors):
        t = tensors[name].clone()
        t[[3, 100]] = t[[100, 3]]  # packed 4-bit rows hold pairs of weight rows: still a swap
        tensors[name] = t

    rewrite_hf_tensors(path, swap)
    fails_naming(path, "weights", "decoder.layers.0.mlp.linear_fc2.weight", "row")
