"""Rotary position embeddings: base, rotary fraction and scaling read back from the live rotary
module (GPTModel keeps no record of its ``rope_scaling`` after construction, HybridModel not even
its base), and the YaRN settings of standard attention."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class YarnFacts:
    """YaRN RoPE settings (None where unset): of standard attention (``position_embedding_type:
    yarn``), read from ``yarn_*`` attributes set on the config, or of multi-latent attention."""

    rotary_scaling_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None
    beta_fast: Optional[float] = None
    beta_slow: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    correction_range_round_to_int: Optional[bool] = None


def read_yarn_facts(config, prefix: str = "yarn_") -> YarnFacts:
    return YarnFacts(**{f.name: getattr(config, prefix + f.name, None) for f in fields(YarnFacts)})


def yarn_concentration(factor, mscale=None, mscale_all_dim=None) -> float:
    """Megatron's YaRN cos/sin factor (its "concentration factor")."""
    def get(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale is None or mscale_all_dim is None:
        return get(factor)
    return float(get(factor, mscale) / get(factor, mscale_all_dim))


def read_rotary(chunks: list, head_dim: int, position_embedding: str) -> tuple:
    """(rotary base, rotary percent, RoPE scaling dict or None) of the model."""
    first = chunks[0]
    rotary = next((getattr(c, "rotary_pos_emb", None) for c in chunks
                   if getattr(c, "rotary_pos_emb", None) is not None), None)
    base = float(getattr(first, "rotary_base", 0) or 0) or None
    percent = float(getattr(first, "rotary_percent", 0) or 0) or None
    if rotary is not None and (base is None or percent is None):
        # HybridModel keeps neither: read them back from the rotary module's frequencies.
        base, percent = _rotary_from_inv_freq(rotary, head_dim)
    base = base or 10000.0
    percent = percent or 1.0
    scaling = _infer_rope_scaling(rotary, base, head_dim, percent) if position_embedding == "rope" else None
    return base, percent, scaling


def _rotary_from_inv_freq(rotary, head_dim: int) -> tuple:
    """(base, percent) that reproduce the rotary module's ``inv_freq`` exactly (float32, as
    Megatron computes it); round values are preferred, so 10000 is not read as 9999.98."""
    inv = rotary.inv_freq.detach().to("cpu", torch.float32)
    dim = 2 * inv.numel()
    percent = dim / head_dim
    if inv.numel() < 2:
        return 10000.0, percent
    estimate = float(inv[1].double() ** (-dim / 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    candidates = [estimate] + [float(f"{estimate:.{digits}g}") for digits in range(1, 8)]
    for candidate in sorted(set(candidates), key=lambda c: (len(repr(c)), c)):
        if torch.equal(1.0 / (candidate ** exponents), inv):
            return candidate, percent
    return estimate, percent


def _llama3_inv_freq(base_inv: torch.Tensor, factor: float, low: float = 1.0, high: float = 4.0,
                     original: int = 8192) -> torch.Tensor:
    """Llama 3.x frequency scaling (the published formula; Megatron fixes low/high/original)."""
    wavelen = 2 * math.pi / base_inv
    low_wavelen, high_wavelen = original / low, original / high
    scaled = torch.where(wavelen > low_wavelen, base_inv / factor, base_inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _infer_rope_scaling(rotary, base: float, head_dim: int, percent: float) -> Optional[dict]:
    """RoPE scaling read from the live rotary module, so the export matches what the model does:
    it keeps the resulting ``inv_freq`` and the linear ``seq_len_interpolation_factor``."""
    if rotary is None:
        return None
    linear = getattr(rotary, "seq_len_interpolation_factor", None)
    inv = rotary.inv_freq.detach().to("cpu", torch.float64)
    dim = int(head_dim * percent)
    base_inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if inv.shape != base_inv.shape:
        raise UnsupportedModelError(
            f"rotary embedding: inv_freq has shape {tuple(inv.shape)}, expected {tuple(base_inv.shape)} "
            "from rotary_base/kv_channels/rotary_percent; custom rotary modules are not supported")
    scaling = None
    if not torch.allclose(inv, base_inv, rtol=1e-5, atol=0):
        factor = float(base_inv[-1] / inv[-1])
        candidate = _llama3_inv_freq(base_inv, factor)
        if not torch.allclose(inv, candidate, rtol=1e-4, atol=0):
            raise UnsupportedModelError(
                "rotary embedding: inv_freq matches neither plain RoPE nor Llama-3 scaling; "
                "supported RoPE variants are: none, linear (seq_len_interpolation_factor), llama3")
        scaling = {"rope_type": "llama3", "factor": round(factor, 6), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if linear:
        if scaling is not None:
            raise UnsupportedModelError("rotary embedding: llama3 scaling combined with linear "
                                        "interpolation is not supported; use one of them")
        scaling = {"rope_type": "linear", "factor": float(linear)}
    return scaling
