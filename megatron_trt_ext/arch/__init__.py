"""Architecture families (one data file each) and detection from a model's features."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .gpt import GPT
from .llama import LLAMA
from .mixtral import MIXTRAL
from .spec import ArchSpec

FAMILIES = {spec.name: spec for spec in (LLAMA, GPT, MIXTRAL)}


def family_features(info) -> dict:
    """The feature values that family tables are matched against."""
    return {**info.features, "attention_kind": info.attention_kind, "linear_bias": info.add_bias_linear}


def select_family(info, requested: str = "auto") -> ArchSpec:
    """Pick the family whose requirements the model meets, or raise naming every mismatch."""
    features = family_features(info)
    candidates = FAMILIES.values() if requested == "auto" else [FAMILIES[requested]]
    features = {**features, **{k: False for spec in FAMILIES.values() for k in spec.requires
                               if k.startswith("moe_") and k not in features}}
    problems = {}
    for spec in candidates:
        bad = spec.mismatches(features)
        if not bad:
            for check in spec.checks:
                found = check(info)
                if found:
                    bad = [(found[0], found[1], [found[2]])]
                    break
        if not bad:
            return spec
        problems[spec.name] = bad
    # Report the family that came closest first: its mismatches are the likely culprits.
    lines = []
    for name, bad in sorted(problems.items(), key=lambda kv: len(kv[1])):
        detail = "; ".join(f"{feat}={val!r} (supported: {', '.join(allowed)})" for feat, val, allowed in bad)
        lines.append(f"  {name}: {detail}")
    raise UnsupportedModelError(
        "model: no supported architecture family matches this model. Unsupported features per family:\n"
        + "\n".join(lines)
        + f"\nSupported families: {sorted(FAMILIES)}.")


__all__ = ["ArchSpec", "FAMILIES", "select_family", "family_features"]
