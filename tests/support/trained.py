"""Tiny Megatron models trained for a few dozen steps on a task where attention matters, for the
verification probe's tests and threshold measurements (`megatron_trt_ext/verification/thresholds.py`).

A randomly initialised model is a weak probe: its attention is nearly uniform, so a wrong RoPE base
or swapped q/k projections barely move its logits. These models learn "the token two positions
back, plus one" (with a few random tokens mixed in, so the model must read the position, not guess
a counter): attention sharply on one relative position through RoPE, and an MLP that maps ids. The
shapes are not the other tests' (hidden 96, 4 heads of 24, ffn 160, vocabulary 112 exported as
104) so nothing here was tuned on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VOCAB = 112  # the model's (padded) vocabulary
EXPORT_VOCAB = 104  # what the exports keep
SEQ = 48


def task_batch(gen: torch.Generator, batch: int, seq: int = SEQ) -> torch.Tensor:
    """[batch, seq + 1] ids in [0, EXPORT_VOCAB): t[i] = t[i-2] + 1 (mod), 10% of them random."""
    out = torch.randint(0, EXPORT_VOCAB, (batch, seq + 1), generator=gen)
    noise = torch.rand((batch, seq + 1), generator=gen) < 0.1
    for i in range(2, seq + 1):
        follow = (out[:, i - 2] + 1) % EXPORT_VOCAB
        out[:, i] = torch.where(noise[:, i], out[:, i], follow)
    return out


def train(model, steps: int = 60, lr: float = 3e-3, seed: int = 0) -> list:
    """Adam on the task, next-token loss; returns the loss of every step (the caller checks it
    learned). The model is left in train mode with its trained float32 weights."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        batch = task_batch(gen, 16)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        logits = model(tokens, positions, attention_mask=None)
        loss = F.cross_entropy(logits[..., :EXPORT_VOCAB].reshape(-1, EXPORT_VOCAB).float(), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    opt.zero_grad(set_to_none=True)
    return losses


def dense(**kw):
    """Qwen2-style (biases on q/k/v), multi-head (q and k have one shape, so they can be swapped)."""
    from tests.support.models import tiny_llama

    return tiny_llama(vocab_size=VOCAB, hidden_size=96, num_attention_heads=4, num_query_groups=4, kv_channels=24,
                      ffn_hidden_size=160, add_qkv_bias=True, **kw)


def moe(**kw):
    """Mixtral-style: 4 experts, top-2, grouped-query attention (4 heads, 2 groups)."""
    from tests.support.models import tiny_llama

    return tiny_llama(vocab_size=VOCAB, hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=24,
                      ffn_hidden_size=160, moe=True, **kw)


def windowed(**kw):
    """Starcoder2 with a 6-token sliding window (biases everywhere, LayerNorm)."""
    from tests.support.families import tiny_starcoder2

    return tiny_starcoder2(vocab_size=VOCAB, window=6, hidden_size=96, num_attention_heads=4, num_query_groups=2,
                           kv_channels=24, ffn_hidden_size=160, **kw)


BUILDERS = {"dense": dense, "moe": moe, "windowed": windowed}


def trained(kind: str, steps: int = 60):
    """(model, losses) of one of BUILDERS, seeded, trained."""
    torch.manual_seed(11)
    model = BUILDERS[kind]()
    return model, train(model, steps=steps)
