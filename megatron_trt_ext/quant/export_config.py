"""The quantization blocks of the written configs (ModelOpt unified HF, TensorRT-LLM).

``summary`` is what the plan decided per linear (`conversion.plan_outputs`): ``layers`` (HF module
-> recipe algorithm name), ``hf_exclude`` (unquantized HF linears and embeddings, listed as ModelOpt
lists them), ``trt_exclude`` (the same in TensorRT-LLM names).
"""

from __future__ import annotations

from ..errors import ConfigError
from .spec import ALGORITHMS, KV_CACHE


def _algo_fields(algo) -> dict:
    out = {"quant_algo": algo.quant_algo}
    if algo.group_size:
        out["group_size"] = algo.group_size
    if algo.calibration == "awq":
        out.update(has_zero_point=False, pre_quant_scale=True)
    return out


def _block(spec, summary: dict, exclude: list) -> dict:
    used = sorted(set(summary["layers"].values()))
    kv = KV_CACHE[spec.kv_cache]
    if len(used) > 1:  # ModelOpt's MIXED_PRECISION: what is not listed stays unquantized
        return {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": kv,
                "quantized_layers": {m: _algo_fields(ALGORITHMS[a]) for m, a in sorted(summary["layers"].items())}}
    block = {"quant_algo": None, "kv_cache_quant_algo": kv}
    if used:
        block.update(_algo_fields(ALGORITHMS[used[0]]))
    block["exclude_modules"] = exclude
    return block


def check_quantizes_something(spec, summary: dict) -> None:
    """Refuse, at attach (the plan runs there), a recipe whose exclusions and overrides leave every
    linear unquantized and no KV cache: its config would say ``quant_algo: null`` with every linear
    ignored, which vLLM refuses to load. Refused rather than written as a plain export, so a rule
    that matches nothing is seen where it was written, not deployed as if it had worked."""
    if summary["layers"] or KV_CACHE[spec.kv_cache]:
        return
    rules = f"exclude {list(spec.exclude)}" + (f", overrides {list(spec.overrides)}" if spec.overrides else "")
    raise ConfigError(f"quantization: algorithm {spec.algorithm} with {rules} quantizes no linear of this model "
                      "(and no KV cache): the checkpoint would be a plain one labelled quantized, which vLLM "
                      "refuses; fix the overrides' modules/layers or the exclude patterns, or drop the "
                      "quantization section for a plain export")


def _producer() -> dict:
    try:
        import modelopt

        version = modelopt.__version__
    except Exception:  # noqa: BLE001
        version = "unknown"
    return {"name": "modelopt", "version": version}


def hf_quant_config_file(spec, summary: dict) -> dict:
    """hf_quant_config.json, as ModelOpt's unified export writes it."""
    return {"producer": _producer(), "quantization": _block(spec, summary, summary["hf_exclude"])}


def hf_quantization_config(spec, summary: dict) -> dict:
    """config.json's quantization_config: ModelOpt's own conversion of hf_quant_config.json (the
    flat form vLLM and SGLang read first: ``ignore``, ``kv_cache_scheme``, ``config_groups``)."""
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    return convert_hf_quant_config_format(hf_quant_config_file(spec, summary))


def trtllm_quantization(spec, summary: dict) -> dict:
    return _block(spec, summary, summary["trt_exclude"])
