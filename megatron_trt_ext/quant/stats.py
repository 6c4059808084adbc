"""Calibration statistics as plan units.

Each quantized Megatron linear carries small statistics (input amax, pre-quant scale, KV amax)
that must reach the rank that writes the linear. They are described like weights (global shape,
offset, main replica), named ``<linear>.#<stat>`` so they sort just before the linear's weight, and
share its writer, so the existing plan and transfers move them with no special case.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..plan import LocalPiece
from .calibrate import group_key, is_quantizable_linear, linear_of

SEP = ".#"
GROUP = "group_amax"


def stat_name(weight_name: str, stat: str) -> str:
    return weight_name[: -len(".weight")] + SEP + stat


def fold_name(norm_unit: str) -> str:
    """The pre-quant scale folding into ``norm_unit`` (it moves with that unit, sorted just
    before it: `weight_of` names the unit)."""
    base, last = norm_unit.rsplit(".", 1)
    return base + SEP + FOLD + last


FOLD = "fold:"


def is_stat(name: str) -> bool:
    return SEP in name


def weight_of(name: str) -> str:
    """The unit a statistic travels with (its linear's weight, or the norm a fold targets)."""
    if not is_stat(name):
        return name
    base, stat = name.split(SEP, 1)
    return f"{base}.{stat[len(FOLD):]}" if stat.startswith(FOLD) else base + ".weight"


def norm_units(linear_weight: str, names, aliases: dict) -> list:
    """The units of the norm that feeds ``linear_weight`` (weight, and bias for LayerNorm) when
    the model has one right before it (Transformer Engine's fused norm or a local-spec alias)."""
    prefix = linear_weight[: -len(".weight")]
    layer = prefix[: prefix.index(".layers.") + len(".layers.")]
    layer += prefix[len(layer):].split(".", 1)[0] + "."
    out = []
    for suffix in ("layer_norm_weight", "layer_norm_bias"):
        canonical = f"{prefix}.{suffix}"
        local_suffix = canonical[len(layer):]
        candidates = [canonical] + [layer + alias for alias in aliases.get(local_suffix, ())]
        out += [c for c in candidates if c in names][:1]
    return out


def stats_for(spec, weight_name: str) -> list:
    """Statistic names a linear carries under ``spec``."""
    out = []
    algos = spec.algorithms
    if any(a.activation is not None for a in algos):
        out.append("input_amax")
    if any(a.pre_quant_scale for a in algos):
        out.append("pre_quant_scale")
    if spec.kv_cache != "none" and weight_name.endswith("self_attention.linear_qkv.weight"):  # (MLA: refused)
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


def stat_pieces(local: dict, spec, calibration=None, fold_aliases: Optional[dict] = None, groups: tuple = ()) -> dict:
    """Statistic pieces for this rank's linear weight pieces.

    With ``calibration`` (a `calibrate.Calibration`) the values are the measured ones (from its
    ModelOpt replica's quantizers, or the max path's hooks); without, zeros of the right shape
    stand in (for the plan at attach time). ``fold_aliases`` (the family's aliases; given when
    AWQ pre-quant scales fold into the preceding norm of the Hugging Face export, as ModelOpt
    does) adds each fold's copy of the scale, which travels with the norm's unit.
    """
    replica = calibration.replica if calibration is not None else None
    owners = _owner_map(replica) if replica is not None else {}
    out: dict = {}
    for unit, pieces in local.items():
        if not is_quantizable_linear(unit):
            continue
        name = linear_of(unit)
        if name != unit:  # a component: the whole linear's scalar statistics, from its first component
            if any(s.startswith(name[: -len(".weight")] + SEP) for s in out):
                continue
            if spec.calibration_kind in ("smoothquant", "awq"):
                raise AssertionError(f"{name}: per-channel statistics of a concatenated linear (refused at attach)")
        key = group_key(name, groups) if groups else None
        if key is not None:  # the group's shared weight amax rides with each member (`group_key`)
            value = calibration.group_amax[key].reshape(1) if calibration is not None else torch.zeros(1)
            out[stat_name(name, GROUP)] = [LocalPiece((0,), (1,), value, p.main and all(o == 0 for o in p.offset))
                                           for p in pieces]
        wanted = stats_for(spec, name)
        if not wanted:
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        pqs = None
        for piece in pieces:
            o0, o1 = piece.offset
            s1 = piece.tensor.shape[1]
            first = all(o == 0 for o in piece.offset)
            module = owners.get(piece.tensor.untyped_storage().data_ptr()) if replica is not None else None
            for stat in wanted:
                if stat == "pre_quant_scale":
                    value = _pre_quant_scale(module, s1, calibration is None)
                    entry = LocalPiece((o1,), (piece.global_shape[1],), value, piece.main and o0 == 0)
                    if s1 == piece.global_shape[1]:
                        pqs = value  # the whole input dim: what a fold needs
                else:
                    value = _scalar_stat(module, name, stat, layer, calibration)
                    entry = LocalPiece((0,), (1,), value, piece.main and first)
                out.setdefault(stat_name(name, stat), []).append(entry)
        if fold_aliases is not None and pqs is not None:
            for norm in norm_units(name, local, fold_aliases):
                for piece in local[norm]:
                    out.setdefault(fold_name(norm), []).append(
                        LocalPiece((0,), tuple(piece.global_shape), pqs, piece.main))
    return out


def _pre_quant_scale(module, size: int, planning: bool) -> torch.Tensor:
    if planning:
        return torch.zeros(size, dtype=torch.float32)
    scale = getattr(module.input_quantizer, "_pre_quant_scale", None)
    if scale is None:
        return torch.ones(size, dtype=torch.float32)
    return scale.detach().float().reshape(size).cpu()


def _scalar_stat(module, name: str, stat: str, layer: int, calibration) -> torch.Tensor:
    if calibration is None:
        return torch.zeros(1, dtype=torch.float32)
    if stat in ("k_amax", "v_amax"):
        return calibration.kv_amax[layer][0 if stat == "k_amax" else 1].reshape(1).float()
    if module is None:  # the max path: measured by hooks, reduced by name
        from .calibrate import sharing_key

        return calibration.input_amax[sharing_key(name)].reshape(1).float()
    amax = module.input_quantizer.amax
    return amax.detach().float().reshape(-1).max().reshape(1).cpu()
