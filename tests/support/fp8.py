"""Stand-ins for Transformer Engine's FP8 parameters (TE does not install here): a Megatron
linear's weight is made FP8-representable and given the attributes TE's tensor subclasses carry
(the format contract `quant.fp8_source` reads). The parameter keeps the dequantized values, so
the model's forward pass computes exactly what an FP8-trained model's would."""

from __future__ import annotations

import torch

FP8_MAX = 448.0


@torch.no_grad()
def as_fp8_per_tensor(weight: torch.nn.Parameter) -> None:
    """Float8Tensor (per-tensor scaling): ``_data`` uint8, ``_scale_inv`` [1]."""
    scale = weight.detach().float().abs().amax() / FP8_MAX
    q = (weight.detach().float() / scale).to(torch.float8_e4m3fn)
    weight.copy_(q.float() * scale)
    weight._data = q.view(torch.uint8)
    weight._scale_inv = scale.reshape(1)
    weight._fp8_dtype = "DType.kFloat8E4M3"


@torch.no_grad()
def as_fp8_blockwise(weight: torch.nn.Parameter, block: int = 128) -> None:
    """Float8BlockwiseQTensor with 2-D scaling: ``_rowwise_data`` uint8 [M, K],
    ``_rowwise_scale_inv`` float32 padded to [ceil(M/128), roundup(ceil(K/128), 4)] (the padding
    holds values that must never be read: -1)."""
    rows, cols = weight.shape
    w = weight.detach().float()
    blocks = w.reshape(rows // block, block, cols // block, block).abs().amax(dim=(1, 3)) / FP8_MAX
    full = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
    q = (w / full).to(torch.float8_e4m3fn)
    weight.copy_(q.float() * full)
    padded_cols = -(-(cols // block) // 4) * 4
    scale_inv = torch.full((rows // block, padded_cols), -1.0)
    scale_inv[:, : cols // block] = blocks
    weight._rowwise_data = q.view(torch.uint8)
    weight._rowwise_scale_inv = scale_inv
    weight._is_2D_scaled = True


LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def fp8_model(model, blockwise: bool = False):
    """Every decoder linear of ``model`` as an FP8 parameter."""
    for layer in model.decoder.layers:
        for name in LINEARS:
            weight = layer.get_submodule(name).weight
            (as_fp8_blockwise if blockwise else as_fp8_per_tensor)(weight)
    return model
