"""The tiny Megatron-Core Llama the demo trains (and the tests build): a one-rank gloo world and a
GQA/SwiGLU/RoPE model with real head ratios. Example code, not part of the installed package."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from megatron_trt_ext.utils import free_port


def init_single_process(seed: int = 1234) -> None:
    """A one-rank gloo world with Megatron's parallel state (TP=PP=1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from examples.cpu_shim import install

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
