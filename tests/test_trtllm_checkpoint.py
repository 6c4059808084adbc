"""TensorRT-LLM checkpoint: names, shapes, dtypes and config, checked against the HF export of the
same model through the documented HF -> TensorRT-LLM mapping (written out independently here)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_trt_ext import ExportConfig, Exporter
from tests.support.models import randomize, tiny_gpt, tiny_llama

VOCAB = 120


def load_hf(hf_dir):
    tensors = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def expected_llama_rank(hf, cfg, tp, pp, tp_rank, pp_rank, tied, moe_tp=None, moe_ep=1):
    """The format notes' LLaMA table (and MoE section for Mixtral), applied literally."""
    L, nkv, d = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    per_stage = L // pp
    out = {}

    def col(t):
        return t.chunk(tp, dim=0)[tp_rank]

    def row(t):
        return t.chunk(tp, dim=1)[tp_rank]

    def kv(t):
        if nkv < tp:  # each KV head repeated tp / nkv times
            t = t.reshape(nkv, d, -1).repeat_interleave(tp // nkv, dim=0).reshape(nkv * (tp // nkv) * d, -1)
        return col(t)

    for layer in range(pp_rank * per_stage, (pp_rank + 1) * per_stage):
        h, t = f"model.layers.{layer}.", f"transformer.layers.{layer - pp_rank * per_stage}."
        out[t + "attention.qkv.weight"] = torch.cat([col(hf[h + "self_attn.q_proj.weight"]),
                                                      kv(hf[h + "self_attn.k_proj.weight"]),
                                                      kv(hf[h + "self_attn.v_proj.weight"])])
        out[t + "attention.dense.weight"] = row(hf[h + "self_attn.o_proj.weight"])
        if "num_local_experts" in cfg:
            # router float32 [E, H]; experts on moe_ep rank tp_rank % moe_ep, sliced by moe_tp rank
            # tp_rank // moe_ep; fc = cat(up (w3), gate (w1)) on dim -2; proj split on its last dim.
            E = cfg["num_local_experts"]
            moe_tp = moe_tp or tp // moe_ep
            mt, me = tp_rank // moe_ep, tp_rank % moe_ep
            local = range(me * E // moe_ep, (me + 1) * E // moe_ep)
            x = h + "block_sparse_moe."
            out[t + "mlp.router.weight"] = ("source", layer)  # float32: compared with the live model
            out[t + "mlp.fc.weight"] = torch.stack([torch.cat([
                hf[f"{x}experts.{e}.w3.weight"].chunk(moe_tp, dim=0)[mt],
                hf[f"{x}experts.{e}.w1.weight"].chunk(moe_tp, dim=0)[mt]]) for e in local])
            out[t + "mlp.proj.weight"] = torch.stack(
                [hf[f"{x}experts.{e}.w2.weight"].chunk(moe_tp, dim=1)[mt] for e in local])
        else:
            out[t + "mlp.fc.weight"] = col(hf[h + "mlp.gate_proj.weight"])
            out[t + "mlp.gate.weight"] = col(hf[h + "mlp.up_proj.weight"])
            out[t + "mlp.proj.weight"] = row(hf[h + "mlp.down_proj.weight"])
        out[t + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        out[t + "post_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = hf["model.embed_tokens.weight"]
    if pp_rank == pp - 1:
        out["transformer.ln_f.weight"] = hf["model.norm.weight"]
        head = hf["model.embed_tokens.weight"] if tied else hf["lm_head.weight"]
        pad = (-head.shape[0]) % tp
        head = torch.cat([head, head.new_zeros(pad, head.shape[1])])
        out["lm_head.weight"] = col(head)
    return out


def expected_gpt_rank(hf, cfg, tp, pp, tp_rank, pp_rank):
    """GPT-2 names (Conv1D, so transposed) -> TensorRT-LLM GPT names."""
    L, H = cfg["n_layer"], cfg["n_embd"]
    per_stage = L // pp
    out = {}
    col = lambda t: t.chunk(tp, dim=0)[tp_rank]  # noqa: E731
    row = lambda t: t.chunk(tp, dim=1)[tp_rank]  # noqa: E731
    for layer in range(pp_rank * per_stage, (pp_rank + 1) * per_stage):
        h, t = f"transformer.h.{layer}.", f"transformer.layers.{layer - pp_rank * per_stage}."
        qkv_w = hf[h + "attn.c_attn.weight"].t()
        qkv_b = hf[h + "attn.c_attn.bias"]
        out[t + "attention.qkv.weight"] = torch.cat([col(p) for p in qkv_w.split(H, dim=0)])
        out[t + "attention.qkv.bias"] = torch.cat([col(p) for p in qkv_b.split(H, dim=0)])
        out[t + "attention.dense.weight"] = row(hf[h + "attn.c_proj.weight"].t())
        out[t + "attention.dense.bias"] = hf[h + "attn.c_proj.bias"]
        out[t + "mlp.fc.weight"] = col(hf[h + "mlp.c_fc.weight"].t())
        out[t + "mlp.fc.bias"] = col(hf[h + "mlp.c_fc.bias"])
        out[t + "mlp.proj.weight"] = row(hf[h + "mlp.c_proj.weight"].t())
        out[t + "mlp.proj.bias"] = hf[h + "mlp.c_proj.bias"]
        for src, dst in (("ln_1", "input_layernorm"), ("ln_2", "post_layernorm")):
            out[t + dst + ".weight"] = hf[h + src + ".weight"]
            out[t + dst + ".bias"] = hf[h + src + ".bias"]
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = hf["transformer.wte.weight"]
        out["transformer.position_embedding.weight"] = hf["transformer.wpe.weight"]
    if pp_rank == pp - 1:
        out["transformer.ln_f.weight"] = hf["transformer.ln_f.weight"]
        out["transformer.ln_f.bias"] = hf["transformer.ln_f.bias"]
        head = hf["transformer.wte.weight"]
        head = torch.cat([head, head.new_zeros((-head.shape[0]) % tp, head.shape[1])])
        out["lm_head.weight"] = col(head)
    return out


CASES = [
    ("mixtral", lambda: tiny_llama(moe=True), 1, 1),
    ("mixtral_moe_tp2", lambda: tiny_llama(moe=True), 2, 1),
    ("mixtral_moe_ep2", lambda: tiny_llama(moe=True), 2, 1),
    ("mixtral_moe_ep2_tp2_pp2", lambda: tiny_llama(moe=True), 4, 2),
    ("llama_gqa", lambda: tiny_llama(), 1, 1),
    ("llama_gqa", lambda: tiny_llama(), 2, 1),
    ("llama_mqa_kv_dup", lambda: tiny_llama(num_query_groups=1), 2, 1),
    ("llama_gqa_kv_dup", lambda: tiny_llama(num_query_groups=2), 4, 1),
    ("llama_tied_pp2", lambda: tiny_llama(tied=True), 2, 2),
    ("llama_pp2", lambda: tiny_llama(), 1, 2),
    ("gpt", lambda: tiny_gpt(), 1, 1),
    ("gpt", lambda: tiny_gpt(), 2, 1),
    ("gpt_pp2", lambda: tiny_gpt(), 2, 2),
]


@pytest.mark.parametrize("name,build,tp,pp", CASES, ids=[f"{c[0]}-tp{c[2]}-pp{c[3]}" for c in CASES])
def test_trtllm_checkpoint_follows_documented_mapping(megatron_world, tmp_path, name, build, tp, pp):
    model = build()
    randomize(model, seed=11)
    moe_ep = 2 if "moe_ep2" in name else 1
    moe = {"inference_moe_ep": moe_ep} if name.startswith("mixtral") else {}
    cfg = ExportConfig(output_dir=str(tmp_path), vocab_size=VOCAB, inference_tp=tp, inference_pp=pp, **moe)
    result = Exporter(model, cfg).export(iteration=3)
    hf_cfg = json.loads((result.path / "hf" / "config.json").read_text())
    hf = load_hf(result.path / "hf")
    trt_dir = result.path / "trtllm_checkpoint"
    trt_cfg = json.loads((trt_dir / "config.json").read_text())

    assert sorted(p.name for p in trt_dir.glob("rank*.safetensors")) == sorted(
        f"rank{r}.safetensors" for r in range(tp * pp))
    assert trt_cfg["mapping"]["tp_size"] == tp and trt_cfg["mapping"]["pp_size"] == pp
    assert trt_cfg["mapping"]["world_size"] == tp * pp
    assert trt_cfg["dtype"] == "bfloat16" and trt_cfg["vocab_size"] == VOCAB
    assert trt_cfg["quantization"]["quant_algo"] is None
    is_gpt = name.startswith("gpt")
    if is_gpt:
        assert trt_cfg["architecture"] == "GPTForCausalLM"
        assert trt_cfg["position_embedding_type"] == "learned_absolute"
        assert trt_cfg["num_attention_heads"] == hf_cfg["n_head"]
        assert trt_cfg["hidden_size"] == hf_cfg["n_embd"]
        assert trt_cfg["intermediate_size"] == hf_cfg["n_inner"]
        assert trt_cfg["max_position_embeddings"] == hf_cfg["n_positions"]
    elif name.startswith("mixtral"):
        assert trt_cfg["architecture"] == "MixtralForCausalLM" and trt_cfg["hidden_act"] == "swiglu"
        assert trt_cfg["moe"]["num_experts"] == hf_cfg["num_local_experts"]
        assert trt_cfg["moe"]["top_k"] == hf_cfg["num_experts_per_tok"]
        assert trt_cfg["moe"]["normalization_mode"] == 1
        assert trt_cfg["mapping"]["moe_ep_size"] == moe_ep and trt_cfg["mapping"]["moe_tp_size"] == tp // moe_ep
        assert trt_cfg["intermediate_size"] == hf_cfg["intermediate_size"]
    else:
        assert trt_cfg["architecture"] == "LlamaForCausalLM"
        assert trt_cfg["position_embedding_type"] == "rope_gpt_neox"
        assert trt_cfg["hidden_act"] == "silu"
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                    "max_position_embeddings"):
            assert trt_cfg[key] == hf_cfg[key], key
        assert trt_cfg["head_size"] == hf_cfg["head_dim"]
        assert trt_cfg["norm_epsilon"] == hf_cfg["rms_norm_eps"]
        assert trt_cfg["rotary_base"] == hf_cfg["rope_theta"]
    assert trt_cfg["tie_word_embeddings"] == hf_cfg["tie_word_embeddings"]

    for pp_rank in range(pp):
        for tp_rank in range(tp):
            got = load_file(str(trt_dir / f"rank{pp_rank * tp + tp_rank}.safetensors"))
            if is_gpt:
                want = expected_gpt_rank(hf, hf_cfg, tp, pp, tp_rank, pp_rank)
            else:
                want = expected_llama_rank(hf, hf_cfg, tp, pp, tp_rank, pp_rank, hf_cfg["tie_word_embeddings"],
                                           moe_ep=moe_ep)
            assert sorted(got) == sorted(want), f"rank {pp_rank * tp + tp_rank}: names differ"
            for key, tensor in want.items():
                if isinstance(tensor, tuple):  # the MoE router stays float32, unrounded
                    tensor = model.decoder.layers[tensor[1]].mlp.router.weight.detach()
                assert got[key].dtype == (torch.float32 if key.endswith("router.weight") else torch.bfloat16), key
                assert got[key].shape == tensor.shape, key
                assert torch.equal(got[key], tensor), key
