"""Pass/fail thresholds of `megatron-trt-ext verify`, per export dtype and quantization recipe.

The reference is the live model's logits; the export is the same weights rounded to the export
dtype (or quantized), run in float32 by transformers. So the expected difference is set by the
coarser of the export dtype and the model's own parameter dtype (a bf16-trained model computed its
reference in bf16), or by the quantization recipe. Each limit sits well above what correct exports
gave in measurements (README, *Verify*) and well below what a wrong conversion gives.
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


# Measured on this project's tiny random models (README, *Verify*: correct exports of every family,
# 3 seeds; quantized recipes, 2 seeds), the largest value seen, and the limit:
#   float32   max rel 5.6e-7, top-1 1.0,   KL 2e-8     -> 1e-4, 0.98, 1e-6
#   float16   max rel 8.0e-4, top-1 0.992, KL 5e-8     -> 5e-3, 0.95, 1e-5
#   bfloat16  max rel 8.6e-3 (dense) / 5.4e-2 (MoE: a routing flip at one position), top-1 0.977,
#             KL 3.7e-6 (dense) / 1.9e-5 (MoE)          -> 0.1, 0.90, 1e-4
#   fp8       max rel 0.073, top-1 0.84, KL 2.0e-3      -> 0.2, 0.70, 1e-2
#   int8_sq   max rel 0.023, top-1 0.945, KL 1.8e-4     -> 0.1, 0.85, 2e-3
#   int4_awq, w4a8_awq  max rel 0.42, top-1 0.52, KL 0.035 -> 0.8, 0.35, 0.1 (nvfp4: the same, unmeasured)
# against wrong exports (bf16, attention as peaked as a trained model's): RoPE theta 20000 for
# 10000 gives max rel >= 0.076 and KL >= 3.7e-4; swapped q/k projections max rel >= 0.64, KL >= 0.037.
THRESHOLDS = {
    "float32": Limits(max_rel_logit_diff=1e-4, min_top1_agreement=0.98, max_kl_mean=1e-6),
    "float16": Limits(max_rel_logit_diff=5e-3, min_top1_agreement=0.95, max_kl_mean=1e-5),
    "bfloat16": Limits(max_rel_logit_diff=0.1, min_top1_agreement=0.90, max_kl_mean=1e-4),
    "fp8": Limits(max_rel_logit_diff=0.2, min_top1_agreement=0.70, max_kl_mean=1e-2),
    "int8_sq": Limits(max_rel_logit_diff=0.1, min_top1_agreement=0.85, max_kl_mean=2e-3),
    "int4_awq": Limits(max_rel_logit_diff=0.8, min_top1_agreement=0.35, max_kl_mean=0.1),
    "w4a8_awq": Limits(max_rel_logit_diff=0.8, min_top1_agreement=0.35, max_kl_mean=0.1),
    "nvfp4": Limits(max_rel_logit_diff=0.8, min_top1_agreement=0.35, max_kl_mean=0.1),
}
# Formats with no separate measurement take the limits of the nearest one: FP8 weights with finer
# scales than per-tensor FP8 (per channel, per 128x128 block, per 32 as powers of two), and NVFP4
# weights alone.
for _name, _like in (("fp8_pc_pt", "fp8"), ("fp8_pb_wo", "fp8"), ("mxfp8", "fp8"), ("w4a16_nvfp4", "nvfp4")):
    THRESHOLDS[_name] = THRESHOLDS[_like]


def thresholds_for(manifest: dict) -> tuple:
    """(key, Limits) for an export: its quantization algorithm, else the coarser of the export
    dtype and the model dtype the reference was computed in."""
    quant = (manifest.get("config") or {}).get("quantization") or {}
    # mixed precision: the loosest of the formats it combines
    used = [quant.get("algorithm", "none")] + [o.get("algorithm") for o in quant.get("overrides") or []]
    used = [a for a in used if a in THRESHOLDS]
    if used:
        algorithm = max(used, key=lambda a: THRESHOLDS[a].max_rel_logit_diff)
        return algorithm, THRESHOLDS[algorithm]
    dtypes = [manifest.get("dtype"), (manifest.get("verification") or {}).get("model_dtype")]
    known = [d for d in dtypes if d in _DTYPE_ORDER] or ["bfloat16"]
    key = max(known, key=_DTYPE_ORDER.index)
    return key, THRESHOLDS[key]
