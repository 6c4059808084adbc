"""What `Exporter` refuses at construction (attach), on the model's facts and the config alone.

Everything here raises `ConfigError` naming the option and the fix, so a layout or recipe that
cannot work fails when training starts, on every rank alike, never at the first checkpoint.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

from .errors import ConfigError
from .quant.calibrate import check_calibration_data


def check_trtllm_support(spec, info, formats) -> None:
    wanted = [f for f in formats if f.startswith("trtllm")]
    reason = spec.trtllm_unsupported(info) if (wanted and spec.trtllm_unsupported) else None
    if reason:
        raise ConfigError(
            f"formats {wanted}: {reason}. Export formats: [hf] and deploy hf/ with TensorRT-LLM's PyTorch "
            "backend (trtllm-serve), vLLM or SGLang")


def check_inference_layout(info, config) -> tuple:
    """Checks that the inference TP/PP can hold the model; returns (moe_tp, moe_ep)."""
    tp, pp = config.inference_tp, config.inference_pp
    heads, groups = info.num_attention_heads, info.num_query_groups
    if heads % tp:
        raise ConfigError(f"inference_tp={tp}: does not divide num_attention_heads={heads}; "
                          f"choose a divisor of {heads}")
    if groups >= tp and groups % tp:
        raise ConfigError(f"inference_tp={tp}: does not divide the {groups} KV heads; choose a divisor "
                          f"of {groups} or a multiple of it that divides {heads}")
    if groups < tp and tp % groups:
        raise ConfigError(f"inference_tp={tp}: larger than the {groups} KV heads but not a multiple of "
                          "them, so KV heads cannot be duplicated evenly; choose a multiple of "
                          f"{groups} that divides {heads}")
    if info.ffn_hidden_size % tp:
        raise ConfigError(f"inference_tp={tp}: does not divide ffn_hidden_size={info.ffn_hidden_size}")
    if info.num_layers % pp:
        raise ConfigError(f"inference_pp={pp}: does not divide num_layers={info.num_layers}; "
                          f"choose a divisor of {info.num_layers}")
    return _moe_layout(info, config, tp)


def _moe_layout(info, config, tp: int) -> tuple:
    moe_tp, moe_ep = config.inference_moe_tp, config.inference_moe_ep
    if not info.num_experts:
        if moe_tp not in (None, tp) or moe_ep not in (None, 1):
            raise ConfigError("inference_moe_tp/inference_moe_ep: the model has no MoE layers; "
                              "leave them unset")
        return tp, 1
    if moe_tp is None and moe_ep is None:
        moe_tp, moe_ep = tp, 1
    elif moe_tp is None:
        moe_tp = tp // moe_ep if tp % moe_ep == 0 else 0
    elif moe_ep is None:
        moe_ep = tp // moe_tp if tp % moe_tp == 0 else 0
    if not moe_tp or not moe_ep or moe_tp * moe_ep != tp:
        raise ConfigError(f"inference_moe_tp x inference_moe_ep must equal inference_tp={tp}; got "
                          f"{config.inference_moe_tp} x {config.inference_moe_ep}")
    if info.num_experts % moe_ep:
        raise ConfigError(f"inference_moe_ep={moe_ep}: does not divide the {info.num_experts} experts")
    if info.moe_ffn_hidden_size % moe_tp:
        raise ConfigError(f"inference_moe_tp={moe_tp}: does not divide the expert FFN size "
                          f"{info.moe_ffn_hidden_size}")
    return moe_tp, moe_ep


def check_quantization(config, quant, spec, info, chunks, calibration_data, forward_loop) -> None:
    """Everything about a quantized export (``quant``: the parsed recipe) that can fail."""
    where = f"quantization.algorithm {quant.algorithm}"
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{where}: needs NVIDIA ModelOpt ({exc}); install it with "
                          "pip install 'megatron-trt-ext[quant]'") from exc
    refusal = quant.refusal(config.formats)
    if refusal:
        raise ConfigError(f"quantization: {refusal}")
    if spec.quantization_unsupported:
        raise ConfigError(f"quantization: {spec.quantization_unsupported}; export this model unquantized "
                          "(recipes/bf16.yaml)")
    refused = spec.calibration_unsupported.get(quant.calibration_kind)
    if refused:
        raise ConfigError(f"{where}: {refused}")
    if quant.calibration_kind is not None:
        missing = missing_mamba_kernel(chunks)
        if missing:
            raise ConfigError(
                f"{where}" + (f", kv_cache {quant.kv_cache}" if quant.kv_cache != "none" else "") +
                f": calibration runs the model's forward pass, and its Mamba mixers need {missing} "
                "(mamba_ssm, on a CUDA machine); install mamba-ssm, or use a weight-only recipe (fp8_pc_pt, "
                "fp8_pb_wo, mxfp8, w4a16_nvfp4) with kv_cache: none, which needs no forward pass")
    for fmt in config.formats:
        reason = spec.quantized_formats_unsupported.get(fmt)
        if reason:
            raise ConfigError(f"quantization with formats: [{fmt}] ({spec.name} family): {reason}")
    if info.num_experts:
        if quant.calibration_kind in ("smoothquant", "awq"):
            raise ConfigError(f"{where}: SmoothQuant/AWQ exports of mixture-of-experts models are not supported "
                              "yet; use fp8, nvfp4 or a weight-only FP8/FP4 recipe")
    if quant.kv_cache != "none" and info.mla:
        raise ConfigError(f"quantization.kv_cache {quant.kv_cache}: multi-latent attention caches the compressed "
                          "latent, whose scales this version does not export; use kv_cache: none")
    if quant.calibration.source == "iterator" and calibration_data is None and forward_loop is None:
        raise ConfigError("quantization.calibration.source is 'iterator': pass calibration_data=<a callable "
                          "returning an iterator, or a list of batches> (e.g. lambda: iter(batches)) to "
                          "attach()/Exporter()")
    if quant.calibration.source == "iterator" and forward_loop is None:
        check_calibration_data(calibration_data)
    # Shapes (group and block sizes, per inference-TP rank) are checked per linear by the plan.


def missing_mamba_kernel(chunks) -> Optional[str]:
    """The kernel a Mamba mixer of the model would call in a forward pass that its Megatron module
    could not import (mamba_ssm's), or None. The mixer calls ``mamba_split_conv1d_scan_combined``
    on its memory-efficient path, else ``mamba_chunk_scan_combined``."""
    for chunk in chunks:
        for module in chunk.modules():
            if type(module).__name__ != "MambaMixer":
                continue
            kernel = ("mamba_split_conv1d_scan_combined" if getattr(module, "use_mem_eff_path", False)
                      else "mamba_chunk_scan_combined")
            if getattr(sys.modules.get(type(module).__module__), kernel, None) is None:
                return kernel
    return None


def export_vocab_size(info, config, rank: int) -> int:
    """The rows the export keeps: the tokenizer's vocabulary (``vocab_size``), else Megatron's
    padded one (with a warning on rank 0: the padding rows are then exported too)."""
    padded = info.padded_vocab_size
    wanted = config.vocab_size
    if wanted is None:
        if rank == 0:
            warnings.warn(
                f"vocab_size not set: exporting Megatron's padded vocabulary ({padded} rows). Set "
                "ExportConfig(vocab_size=<tokenizer size>) to trim the padding rows.", stacklevel=3)
        return padded
    if wanted > padded:
        raise ConfigError(f"vocab_size={wanted}: larger than the model's padded vocabulary ({padded}); "
                          "give the tokenizer's vocabulary size")
    return wanted
