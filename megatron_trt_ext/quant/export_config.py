"""The quantization blocks of the written configs (ModelOpt unified HF, TensorRT-LLM)."""

from __future__ import annotations

from .spec import KV_CACHE


def _block(spec) -> dict:
    algo = spec.algo
    block = {"quant_algo": algo.quant_algo if algo else None, "kv_cache_quant_algo": KV_CACHE[spec.kv_cache]}
    if algo is not None and algo.group_size:
        block["group_size"] = algo.group_size
    if algo is not None and algo.name in ("int4_awq", "w4a8_awq"):
        block["has_zero_point"] = False
        block["pre_quant_scale"] = True
    block["exclude_modules"] = list(spec.exclude)
    return block


def _producer() -> dict:
    try:
        import modelopt

        version = modelopt.__version__
    except Exception:  # noqa: BLE001
        version = "unknown"
    return {"name": "modelopt", "version": version}


def hf_quant_config_file(spec) -> dict:
    """hf_quant_config.json, as ModelOpt's unified export writes it."""
    return {"producer": _producer(), "quantization": _block(spec)}


def hf_quantization_config(spec) -> dict:
    """config.json's quantization_config (what vLLM/SGLang/TensorRT-LLM's PyTorch backend read)."""
    return {"quant_method": "modelopt", **_block(spec), "producer": _producer()}


def trtllm_quantization(spec) -> dict:
    return _block(spec)
