"""ModelOpt's own calibration of a single-rank Megatron model: the reference that quantized
exports are tested against (tests only; the exporter never uses it)."""

from __future__ import annotations

import copy

import torch


def modelopt_config(algorithm: str, kv_cache: str = "none", smoothquant_alpha: float = 0.5) -> dict:
    """The ModelOpt config of a recipe algorithm (plus its KV-cache config)."""
    import modelopt.torch.quantization as mtq

    from megatron_trt_ext.quant.spec import ALGORITHMS

    cfg = copy.deepcopy(getattr(mtq, ALGORITHMS[algorithm].modelopt_cfg))
    if algorithm == "int8_sq":
        cfg["algorithm"] = {"method": "smoothquant", "alpha": smoothquant_alpha}
    if kv_cache != "none":
        extra = getattr(mtq, {"fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG"}[kv_cache])["quant_cfg"]
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(extra)
    return cfg


def calibration_tokens(exporter) -> list:
    """The batches the exporter's calibration draws (synthetic source: seeded, ids of the exported
    vocabulary)."""
    from megatron_trt_ext.quant.calibrate import calibration_batches

    return calibration_batches(exporter.quant.calibration, None, exporter.vocab_size,
                               torch.device("cpu"))


def modelopt_fake_quant(model, exporter, weight_only: bool = False):
    """A copy of ``model`` calibrated by ``mtq.quantize`` with the exporter's recipe on the same
    batches; ``weight_only`` disables its input quantizers afterwards (pre-quant scales still apply,
    as in the deployed kernels)."""
    import modelopt.torch.quantization as mtq

    from megatron_trt_ext.quant.calibrate import replicate

    spec = exporter.quant
    device = next(model.parameters()).device
    batches = [t.to(device) for t in calibration_tokens(exporter)]

    def loop(m):
        with torch.no_grad():
            for t in batches:
                m(t, torch.arange(t.shape[1], device=t.device).unsqueeze(0).expand_as(t), attention_mask=None)
    replica = mtq.quantize(replicate([model])[0].eval(), modelopt_config(spec.algorithm, "none",
                                                                         spec.smoothquant_alpha), loop)
    if weight_only:
        for name, module in replica.named_modules():
            if name.endswith("input_quantizer"):
                module.disable()
    return replica
