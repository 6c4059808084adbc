"""Mamba-2 mixers of a hybrid model: their global sizes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MambaFacts:
    """Global sizes of the Mamba-2 mixers (Megatron keeps them global; per-rank sizes are the
    ``*_local_tp`` ones)."""

    d_inner: int
    num_heads: int
    head_dim: int
    num_groups: int
    state_dim: int
    conv_kernel: int
    chunk_size: int
    norm_epsilon: float = 1e-5  # Megatron's gated mixer norm fixes its epsilon at 1e-5


def read_mamba_facts(layers: list):
    """The first mixer's sizes (all are alike), or None when this rank holds no Mamba layer."""
    mixer = next((layer.mixer for layer in layers if hasattr(layer, "mixer")), None)
    if mixer is None:
        return None
    return MambaFacts(d_inner=int(mixer.d_inner), num_heads=int(mixer.nheads), head_dim=int(mixer.headdim),
                      num_groups=int(mixer.ngroups), state_dim=int(mixer.d_state), conv_kernel=int(mixer.d_conv),
                      chunk_size=int(getattr(mixer, "chunk_size", 128)))
