"""Load a quantized HF export back as a float transformers model (CPU inspection, demos).

Weights are dequantized with their exported scales and each linear multiplies its input by its
pre-quant scale; activations and the KV cache stay in float (serving engines quantize those).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out/2, in] uint8 (low nibble: even row, high: odd row) -> [out, in] signed int."""
    wide = packed.to(torch.int16)
    low, high = wide & 0x0F, (wide >> 4) & 0x0F
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(-1, packed.shape[1])


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _decode_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] uint8 (low nibble: even input, high: odd) -> [out, in] float."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    magnitude = torch.tensor(E2M1)[codes & 0x7]
    return torch.where(codes & 0x8 > 0, -magnitude, magnitude)


def _per_block(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Expand [rows/r, cols/c] block scales to [rows, cols]."""
    scale = scale.reshape(scale.shape[0], -1) if scale.dim() != 2 else scale
    return scale.repeat_interleave(rows // scale.shape[0], dim=0).repeat_interleave(cols // scale.shape[1], dim=1)


def dequantize_weight(quant_algo: str, tensors: dict, module: str) -> torch.Tensor:
    w, s = tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"]
    if quant_algo == "FP8":
        return w.float() * s.float()
    if quant_algo in ("FP8_PER_CHANNEL_PER_TOKEN", "W8A8_SQ_PER_CHANNEL"):
        return w.float() * s.float()[:, None]
    if quant_algo == "fp8_pb_wo":  # [out/128, 1, in/128, 1]
        return w.float() * _per_block(s.float().reshape(s.shape[0], s.shape[2]), *w.shape)
    if quant_algo == "MXFP8":  # E8M0 exponents (uint8, bias 127) per 32 inputs
        return w.float() * _per_block(torch.exp2(s.float() - 127.0), *w.shape)
    if quant_algo in ("NVFP4", "W4A16_NVFP4"):
        values = _decode_e2m1(w)
        s2 = tensors[f"{module}.weight_scale_2"].float()
        return values * _per_block(s.float() * s2, *values.shape)
    if quant_algo in ("W4A16_AWQ", "W4A8_AWQ"):
        q = _unpack_int4(w).float()
        weight = q * s.float().repeat_interleave(q.shape[1] // s.shape[1], dim=1)
        if quant_algo == "W4A8_AWQ":
            s2 = tensors[f"{module}.weight_scale_2"].float()
            weight = (weight / s2).to(torch.float8_e4m3fn).float() * s2
        return weight
    raise NotImplementedError(f"dequantizing {quant_algo} is not implemented")


def _algo_of(quant: dict, module: str) -> str:
    """The quant_algo of one module (MIXED_PRECISION lists them per module)."""
    layers = quant.get("quantized_layers")
    if layers is not None:
        return layers[module]["quant_algo"]
    return quant["quant_algo"]


SCALES = (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale", ".pre_quant_scale")


def load_dequantized(hf_dir) -> torch.nn.Module:
    """A float32 transformers model from a (possibly quantized) HF export directory.

    The checkpoint is dequantized into a temporary unquantized copy (the export's own tensor
    names) that transformers then loads the usual way, so models whose modules transformers
    lays out differently from the checkpoint (fused MoE experts) load as they would from the hub.
    """
    import tempfile

    import transformers
    from safetensors.torch import load_file, save_file

    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    quant = config.pop("quantization_config", None)
    if quant is None:
        return transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    tensors = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    state = {}
    for name, tensor in tensors.items():
        if name.endswith(SCALES):
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and f"{module}.weight_scale" in tensors:
            state[name] = dequantize_weight(_algo_of(quant, module), tensors, module)
        else:
            state[name] = tensor.float()
    with tempfile.TemporaryDirectory(prefix="mte-dequantized-") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt"})
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    for name, module in model.named_modules():
        pqs = tensors.get(f"{name}.pre_quant_scale")
        if isinstance(module, torch.nn.Linear) and pqs is not None:
            module.register_forward_pre_hook(lambda m, args, pqs=pqs.float(): (args[0] * pqs,))
    return model.eval()
