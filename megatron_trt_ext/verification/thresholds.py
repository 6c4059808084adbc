"""Pass/fail thresholds of `megatron-trt-ext verify`, per export dtype and quantization recipe.

The export runs in float32 under transformers. What the reference is decides the limits; the
manifest says which (``verification.reference``, `probe.reference_kind`):

* ``as_exported`` (unquantized exports of a model holding float32 parameters): the probe rounded
  the live weights to the export dtype and computed in float32, so a correct bf16/fp16/fp32 export
  matches it to float32 noise, and every dtype takes the tight float32 limits (AS_EXPORTED);
* ``live`` (a model holding bf16/fp16 parameters, quantized exports) or none (exports made before
  it was recorded): the live model in its own dtype, so the difference is set by the coarser of the
  export dtype and the model dtype, or by the quantization recipe (THRESHOLDS, statistical).

Each limit sits well above what correct exports gave in measurements and below what the wrong
exports of the tests gave (docs/verification.md, *Thresholds*).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# coarsest last: the looser of the export dtype and the model dtype decides
_DTYPE_ORDER = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Limits:
    max_rel_logit_diff: float
    min_top1_agreement: float
    max_kl_mean: float

    def failures(self, metrics: dict) -> list:
        out = []
        if not metrics["max_rel_logit_diff"] <= self.max_rel_logit_diff:
            out.append(f"max |logit diff| / logit scale {metrics['max_rel_logit_diff']:.3e} > "
                       f"{self.max_rel_logit_diff:g}")
        if not metrics["top1_agreement"] >= self.min_top1_agreement:
            out.append(f"top-1 agreement {metrics['top1_agreement']:.3f} < {self.min_top1_agreement:g}")
        if not metrics["kl_mean"] <= self.max_kl_mean:
            out.append(f"mean KL over the top-k {metrics['kl_mean']:.3e} > {self.max_kl_mean:g}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


# A live reference (and manifests from before the kind was recorded). Measured on this project's
# tiny random models (correct exports of every family, 3 seeds; quantized recipes, 2 seeds), the
# largest value seen, and the limit:
#   float32   max rel 5.6e-7, top-1 1.0,   KL 2e-8     -> 1e-4, 0.98, 1e-6
#   float16   max rel 8.0e-4, top-1 0.992, KL 5e-8     -> 5e-3, 0.95, 1e-5
#   bfloat16  max rel 8.6e-3 (dense) / 5.4e-2 (MoE: a routing flip at one position), top-1 0.977,
#             KL 3.7e-6 (dense) / 1.9e-5 (MoE)          -> 0.1, 0.90, 1e-4
#   fp8       max rel 0.073, top-1 0.84, KL 2.0e-3; on the trained models below 0.062, 0.953, 7.5e-4
#             -> 0.2, 0.70, 3e-3 (KL was 1e-2: two rows swapped in one projection gave 3.7e-3 to
#             8.4e-3, RoPE theta x 2 up to 1.0e-2; docs/verification.md lists what fp8 still hides)
#   int8_sq   max rel 0.023, top-1 0.945, KL 1.8e-4     -> 0.1, 0.85, 2e-3
#   int4_awq, w4a8_awq  max rel 0.42, top-1 0.52, KL 0.035 -> 0.8, 0.35, 0.1; nvfp4 the same (on the
#             trained models 0.21, 0.906, 1.1e-2: the wrong exports but swapped q/k and a wrong window
#             stay within it, and the exact checks catch them)
# against wrong exports (bf16, attention as peaked as a trained model's): RoPE theta 20000 for
# 10000 gives max rel >= 0.076 and KL >= 3.7e-4; swapped q/k projections max rel >= 0.64, KL >= 0.037.
THRESHOLDS = {
    "float32": Limits(max_rel_logit_diff=1e-4, min_top1_agreement=0.98, max_kl_mean=1e-6),
    "float16": Limits(max_rel_logit_diff=5e-3, min_top1_agreement=0.95, max_kl_mean=1e-5),
    "bfloat16": Limits(max_rel_logit_diff=0.1, min_top1_agreement=0.90, max_kl_mean=1e-4),
    "fp8": Limits(max_rel_logit_diff=0.2, min_top1_agreement=0.70, max_kl_mean=3e-3),
    "int8_sq": Limits(max_rel_logit_diff=0.1, min_top1_agreement=0.85, max_kl_mean=2e-3),
    "int4_awq": Limits(max_rel_logit_diff=0.8, min_top1_agreement=0.35, max_kl_mean=0.1),
    "w4a8_awq": Limits(max_rel_logit_diff=0.8, min_top1_agreement=0.35, max_kl_mean=0.1),
    "nvfp4": Limits(max_rel_logit_diff=0.8, min_top1_agreement=0.35, max_kl_mean=0.1),
}
# The reference computed from the weights as exported, in float32 (`probe.rounded_to_export`).
# Measured on trained tiny models (`tests/support/trained.py`: Qwen2-style dense MHA with q/k/v
# biases, Mixtral-style MoE, Starcoder2 with a 6-token window; hidden 96; 60 Adam steps on a task
# that needs attention), 4 x 32 probe positions, exports in bf16, fp16 and fp32: the largest values
# seen on correct exports were max rel 1.0e-6, top-1 1.0, |KL| 1.9e-8 (float32 noise: the HF and
# Megatron kernels sum in other orders); the random sharpened Mixtral of tests/test_verify.py gave
# max rel 1.1e-4 in bf16 (a router near-tie that float32 noise flips moves one position), KL 9e-9.
# The mildest wrong export (docs/verification.md): norm eps / 10 on the windowed model, max rel
# 1.6e-3, KL 2.4e-6; every other one max rel >= 6.7e-3, KL >= 1.5e-5.
#   -> 1e-3, 0.98, 1e-6 for every dtype (9x and 50x above the noise)
AS_EXPORTED = Limits(max_rel_logit_diff=1e-3, min_top1_agreement=0.98, max_kl_mean=1e-6)

# Formats with no separate measurement take the limits of the nearest one: FP8 weights with finer
# scales than per-tensor FP8 (per channel, per 128x128 block, per 32 as powers of two), and NVFP4
# weights alone.
for _name, _like in (("fp8_pc_pt", "fp8"), ("fp8_pb_wo", "fp8"), ("mxfp8", "fp8"), ("w4a16_nvfp4", "nvfp4")):
    THRESHOLDS[_name] = THRESHOLDS[_like]


def thresholds_for(manifest: dict) -> tuple:
    """(key, Limits) for an export: its quantization algorithm; else the export dtype with the
    tight AS_EXPORTED limits when the reference was computed from the weights as exported; else
    (a live reference, or a manifest from before references were told apart) the coarser of the
    export dtype and the model dtype the reference was computed in."""
    quant = (manifest.get("config") or {}).get("quantization") or {}
    # mixed precision: the loosest of the formats it combines
    used = [quant.get("algorithm", "none")] + [o.get("algorithm") for o in quant.get("overrides") or []]
    used = [a for a in used if a in THRESHOLDS]
    if used:
        algorithm = max(used, key=lambda a: THRESHOLDS[a].max_rel_logit_diff)
        return algorithm, THRESHOLDS[algorithm]
    probe = manifest.get("verification") or {}
    if probe.get("reference") == "as_exported" and manifest.get("dtype") in _DTYPE_ORDER:
        return manifest["dtype"], AS_EXPORTED
    dtypes = [manifest.get("dtype"), probe.get("model_dtype")]
    known = [d for d in dtypes if d in _DTYPE_ORDER] or ["bfloat16"]
    key = max(known, key=_DTYPE_ORDER.index)
    return key, THRESHOLDS[key]
