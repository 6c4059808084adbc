"""Calibration statistics as plan units.

Each quantized Megatron linear carries small statistics (input amax, pre-quant scale, KV amax)
that must reach the rank that writes the linear. They are described like weights (global shape,
offset, main replica), named ``<linear>.#<stat>`` so they sort just before the linear's weight, and
share its writer, so the existing plan and transfers move them with no special case.
"""

from __future__ import annotations

import torch

from ..plan import LocalPiece
from .calibrate import is_quantizable_linear

SEP = ".#"


def stat_name(weight_name: str, stat: str) -> str:
    return weight_name[: -len(".weight")] + SEP + stat


def is_stat(name: str) -> bool:
    return SEP in name


def weight_of(name: str) -> str:
    return name.split(SEP)[0] + ".weight" if is_stat(name) else name


def stats_for(spec, weight_name: str) -> list:
    """Statistic names a linear carries under ``spec``."""
    out = []
    algo = spec.algo
    if algo is not None and algo.activation is not None:
        out.append("input_amax")
    if algo is not None and algo.pre_quant_scale:
        out.append("pre_quant_scale")
    if spec.kv_cache != "none" and weight_name.endswith("self_attention.linear_qkv.weight"):
        out += ["k_amax", "v_amax"]
    return out


def _owner_map(chunks) -> dict:
    owners = {}
    for chunk in chunks:
        for module in chunk.modules():
            weight = module.__dict__.get("_parameters", {}).get("weight")
            if weight is not None:
                owners[weight.untyped_storage().data_ptr()] = module
    return owners


def stat_pieces(local: dict, spec, chunks=None, kv_amax=None) -> dict:
    """Statistic pieces for this rank's linear weight pieces.

    With ``chunks`` (a calibrated replica) the values are read from its ModelOpt quantizers and
    ``kv_amax``; without, zeros of the right shape stand in (for the plan at attach time).
    """
    owners = _owner_map(chunks) if chunks is not None else {}
    out: dict = {}
    for name, pieces in local.items():
        if not is_quantizable_linear(name):
            continue
        wanted = stats_for(spec, name)
        if not wanted:
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        for piece in pieces:
            o0, o1 = piece.offset
            s1 = piece.tensor.shape[1]
            first = all(o == 0 for o in piece.offset)
            module = owners.get(piece.tensor.untyped_storage().data_ptr()) if chunks is not None else None
            for stat in wanted:
                if stat == "pre_quant_scale":
                    value = _pre_quant_scale(module, s1)
                    entry = LocalPiece((o1,), (piece.global_shape[1],), value, piece.main and o0 == 0)
                else:
                    value = _scalar_stat(module, stat, layer, kv_amax)
                    entry = LocalPiece((0,), (1,), value, piece.main and first)
                out.setdefault(stat_name(name, stat), []).append(entry)
    return out


def _pre_quant_scale(module, size: int) -> torch.Tensor:
    if module is None:
        return torch.zeros(size, dtype=torch.float32)
    scale = getattr(module.input_quantizer, "_pre_quant_scale", None)
    if scale is None:
        return torch.ones(size, dtype=torch.float32)
    return scale.detach().float().reshape(size).cpu()


def _scalar_stat(module, stat: str, layer: int, kv_amax) -> torch.Tensor:
    if stat in ("k_amax", "v_amax"):
        if kv_amax is None:
            return torch.zeros(1, dtype=torch.float32)
        return kv_amax[layer][0 if stat == "k_amax" else 1].reshape(1).float()
    if module is None:
        return torch.zeros(1, dtype=torch.float32)
    amax = module.input_quantizer.amax
    return amax.detach().float().reshape(-1).max().reshape(1).cpu()
