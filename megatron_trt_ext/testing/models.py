"""Tiny Megatron-Core GPTModels with real head ratios, for tests and the demo."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


from ..utils import free_port  # noqa: F401  (re-exported for the test helpers)


def init_single_process(seed: int = 1234) -> None:
    """A one-rank gloo world with Megatron's parallel state (TP=PP=1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from .cpu_shim import install

    install()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available())


def _config(**kw):
    from megatron.core.transformer import TransformerConfig

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                ffn_hidden_size=96, use_cpu_initialization=True, hidden_dropout=0.0,
                attention_dropout=0.0, params_dtype=torch.float32, layernorm_epsilon=1e-5)
    base.update(kw)
    return TransformerConfig(**base)


def tiny_llama(vocab_size: int = 128, max_seq: int = 64, tied: bool = False, rope_kwargs=None,
               model_kwargs=None, moe: bool = False, **config_kw):
    """Llama-style: RMSNorm, RoPE, SwiGLU, GQA (8 heads / 2 groups) unless overridden."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    kw = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
              add_bias_linear=False, bias_activation_fusion=False)
    if moe:  # Mixtral-style: 4 experts, top-2, softmax after top-k, no shared expert
        kw.update(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="allgather",
                  moe_aux_loss_coeff=0.0)
    kw.update(config_kw)
    cfg = _config(**kw)
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, normalization=cfg.normalization,
                                    moe_grouped_gemm=bool(getattr(cfg, "moe_grouped_gemm", False)))
    return GPTModel(cfg, spec, vocab_size=vocab_size, max_sequence_length=max_seq,
                    position_embedding_type="rope", share_embeddings_and_output_weights=tied,
                    **(rope_kwargs or {}), **(model_kwargs or {}))


def tiny_gpt(vocab_size: int = 128, max_seq: int = 64, tied: bool = True, model_kwargs=None, **config_kw):
    """GPT-2 style: LayerNorm with bias, learned positions, GeLU, biases, MHA."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    kw = dict(normalization="LayerNorm", gated_linear_unit=False, activation_func=F.gelu,
              add_bias_linear=True, num_query_groups=8, bias_activation_fusion=False)
    kw.update(config_kw)
    cfg = _config(**kw)
    return GPTModel(cfg, get_gpt_layer_local_spec(normalization=cfg.normalization), vocab_size=vocab_size,
                    max_sequence_length=max_seq, position_embedding_type="learned_absolute",
                    share_embeddings_and_output_weights=tied, **(model_kwargs or {}))


@torch.no_grad()
def randomize(model, seed: int = 0, scale: float = 0.05) -> None:
    """Give every parameter distinct random values (Megatron zero-inits biases and unit-inits
    norms, which would hide swapped or mis-laid-out tensors)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(scale * noise)


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [b, s, V_pad] of a single-rank GPTModel in eval mode."""
    was_training = model.training
    model.eval()
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    out = model(tokens, positions, attention_mask=None)
    model.train(was_training)
    return out


@torch.no_grad()
def sharpen_attention(model, factor: float = 3.0) -> None:
    """Scale the QKV projections so attention is as peaked as a trained model's: `randomize`
    gives nearly uniform attention, where a wrong RoPE theta or swapped q/k barely moves the
    logits (a trained model's attention would expose them at once)."""
    for chunk in (model if isinstance(model, (list, tuple)) else [model]):
        for layer in chunk.decoder.layers:
            layer.self_attention.linear_qkv.weight.mul_(factor)
