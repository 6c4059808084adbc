"""Tiny Megatron-Core GPTModels with real head ratios, for tests (the demo's Llama and the one-rank
world come from `examples.tiny_model`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from examples.tiny_model import _config, init_single_process, tiny_llama  # noqa: F401 (re-exported)
from megatron_trt_ext.utils import free_port  # noqa: F401  (re-exported for the test helpers)


def medium_llama():
    """~10M parameters: an export takes long enough that a test can catch it running (a save
    arriving meanwhile, a worker stopped in the middle)."""
    return tiny_llama(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                      ffn_hidden_size=1024, vocab_size=4096)


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
