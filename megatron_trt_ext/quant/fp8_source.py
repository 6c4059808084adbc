"""FP8 weights as trained (Transformer Engine FP8 parameters, ``--fp8-param-gather``), read by
their format contract and exported natively: the E4M3 bytes move and are written as they are,
with their scales, instead of being dequantized and quantized again.

Transformer Engine does not install here, so nothing imports it: a weight is FP8 when it carries
the raw data and the dequantization multiplier TE's tensor subclasses keep:

* ``Float8Tensor`` (delayed or current per-tensor scaling): ``_data`` (uint8, the logical
  shape), ``_scale_inv`` (one float32), ``_fp8_dtype`` (E4M3 for weights);
* ``Float8BlockwiseQTensor`` with 2-D scaling (``_is_2D_scaled``, DeepSeek-V3-style 128x128
  blocks): ``_rowwise_data`` (uint8 [M, K]), ``_rowwise_scale_inv`` (float32, GEMM-padded to
  [ceil(M/128), roundup(ceil(K/128), 4)]).

``_scale_inv`` is the dequantization multiplier: TE's ``scale_inv`` = DeepSeek's
``weight_scale_inv`` = ModelOpt's ``weight_scale`` (no reciprocal anywhere).

Each shard's scales travel as one statistic per linear, ``<linear>.#fp8_scale``: float32
[M, ceil(K/128)], the multiplier of each row's 128-column block, so per-tensor shards of any
tensor-parallel split and 128x128 blocks share one representation and one plan. A per-tensor
shard fills its rows and columns with its one value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError

BLOCK = 128
STAT = "fp8_scale"


@dataclass
class Fp8Shard:
    data: torch.Tensor    # uint8 [rows, cols]: E4M3 bits
    scale: torch.Tensor   # float32 [rows, ceil(cols/128)]: dequantization multiplier per 128-column block


def _is_e4m3(tensor) -> bool:
    dtype = getattr(tensor, "_fp8_dtype", None)
    return dtype is None or "E4M3" in str(dtype).upper()


def fp8_shard(tensor) -> Optional[Fp8Shard]:
    """The FP8 data and scales of a weight shard, or None when it is not an FP8 tensor."""
    data, scale_inv = getattr(tensor, "_data", None), getattr(tensor, "_scale_inv", None)
    if isinstance(data, torch.Tensor) and isinstance(scale_inv, torch.Tensor) and data.dim() == 2:
        if not _is_e4m3(tensor):
            return None  # E5M2 weights: no export format keeps them; they are dequantized
        rows, cols = data.shape
        scale = scale_inv.detach().float().reshape(-1)[:1].reshape(1, 1).expand(rows, -(-cols // BLOCK))
        return Fp8Shard(data.detach().view(torch.uint8), scale.contiguous())
    data, scale_inv = getattr(tensor, "_rowwise_data", None), getattr(tensor, "_rowwise_scale_inv", None)
    if (isinstance(data, torch.Tensor) and isinstance(scale_inv, torch.Tensor) and data.dim() == 2
            and scale_inv.dtype == torch.float32 and getattr(tensor, "_is_2D_scaled", False)):
        rows, cols = data.shape
        blocks = scale_inv.detach()[: -(-rows // BLOCK), : -(-cols // BLOCK)].float()  # GEMM padding trimmed
        return Fp8Shard(data.detach().view(torch.uint8), blocks.repeat_interleave(BLOCK, dim=0)[:rows].contiguous())
    return None


def check_alignment(name: str, offset: tuple, shape: tuple, global_shape: tuple) -> None:
    """A shard's scales land on the global 128-column grid only if its columns start and end on
    it (row-parallel splits of per-tensor shards; any split of 128x128 blocks)."""
    o1, c, k = offset[1], shape[1], global_shape[1]
    if o1 % BLOCK or (o1 + c != k and c % BLOCK):
        raise ConfigError(f"FP8 weight {name}: a shard holds inputs [{o1}, {o1 + c}) of {k}, not on the "
                          f"{BLOCK}-column grid its scales need; export it unquantized (bf16 recipe) or use "
                          "a tensor-parallel size that splits the inputs into multiples of 128")


def element_scale(scale: torch.Tensor, cols: int) -> torch.Tensor:
    """[rows, ceil(cols/128)] block multipliers -> [rows, cols]."""
    return scale.repeat_interleave(BLOCK, dim=1)[:, :cols]


def dequantize(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.view(torch.float8_e4m3fn).float() * element_scale(scale, data.shape[1])


def requantize(data: torch.Tensor, scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes for the ``target`` multiplier (per element, broadcastable): the same bytes
    wherever the target equals the trained scale (x * 1.0 is exact), rounded where a coarser
    target (one scale over shards trained with different ones) needs it."""
    ratio = element_scale(scale, data.shape[1]) / target
    values = data.view(torch.float8_e4m3fn).float() * ratio
    return values.to(torch.float8_e4m3fn).view(torch.uint8)


def _owner_shards(chunks) -> dict:
    """storage pointer -> (parameter, its Fp8Shard) for every FP8 parameter of the chunks."""
    owners = {}
    for chunk in chunks:
        for param in chunk.parameters():
            shard = fp8_shard(param)
            if shard is not None:
                try:
                    owners[param.untyped_storage().data_ptr()] = (param, shard)
                except (RuntimeError, NotImplementedError):  # a wrapper subclass without storage
                    pass
    return owners


def _shard_of(tensor, owners: dict) -> Optional[Fp8Shard]:
    """The FP8 shard a piece holds: the piece itself (TE keeps views FP8), or the rows of an FP8
    parameter it is a view of (the gate/up halves of a tensor-parallel fc1)."""
    shard = fp8_shard(tensor)
    if shard is not None:
        return shard
    try:
        owner = owners.get(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None
    if owner is None:
        return None
    param, shard = owner
    if tensor.dim() != 2 or tensor.shape[1] != param.shape[1] or tensor.stride() != param.stride():
        return None
    first = (tensor.storage_offset() - param.storage_offset()) // param.stride(0)
    rows = slice(first, first + tensor.shape[0])
    return Fp8Shard(shard.data[rows], shard.scale[rows])


def native_pieces(local: dict, chunks, is_linear) -> dict:
    """``local`` with each FP8 linear weight's pieces replaced by their E4M3 bytes (uint8) and
    their scales added as the ``<linear>.#fp8_scale`` statistic (see the module docstring)."""
    from ..plan import LocalPiece
    from .stats import stat_name

    owners = _owner_shards(chunks)
    out = dict(local)
    for name, pieces in local.items():
        if not is_linear(name):
            continue
        shards = [_shard_of(p.tensor, owners) for p in pieces]
        if not any(s is not None for s in shards):
            continue
        if not all(s is not None for s in shards):
            raise ConfigError(f"FP8 weight {name}: some of its shards on this rank are FP8 and some are not")
        new, stats = [], []
        for piece, shard in zip(pieces, shards):
            check_alignment(name, piece.offset, tuple(shard.data.shape), piece.global_shape)
            rows, cols = piece.global_shape
            new.append(LocalPiece(piece.offset, piece.global_shape, shard.data, piece.main))
            stats.append(LocalPiece((piece.offset[0], piece.offset[1] // BLOCK), (rows, -(-cols // BLOCK)),
                                    shard.scale, piece.main))
        out[name] = new
        out[stat_name(name, STAT)] = stats
    return out
