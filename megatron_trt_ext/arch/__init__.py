"""Architecture families (one data file each) and detection from a model's features."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .deepseek_v3 import DEEPSEEK_V3
from .features import family_features
from .gemma import GEMMA
from .gpt import GPT
from .gpt_oss import GPT_OSS
from .llama import LLAMA
from .mixtral import MIXTRAL
from .nemotron import NEMOTRON
from .nemotron_h import NEMOTRON_H
from .qwen3 import QWEN3
from .qwen3_moe import QWEN3_MOE
from .spec import ArchSpec
from .starcoder2 import STARCODER2

FAMILIES = {spec.name: spec for spec in (LLAMA, QWEN3, GEMMA, NEMOTRON, STARCODER2, GPT, MIXTRAL, QWEN3_MOE,
                                         DEEPSEEK_V3, GPT_OSS, NEMOTRON_H)}


# Models Megatron-Core can train that no exporter here writes, and why (README's model table).
FEATURE_NOTES = {
    "heterogeneous_layers": "Llama-Nemotron (NAS, heterogeneous layers): its HF class DeciLMForCausalLM is "
                            "remote code outside transformers, so no export here could be checked against it",
}


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
    notes = {FEATURE_NOTES[feat] for bad in problems.values() for feat, val, _ in bad
             if feat in FEATURE_NOTES and val}
    lines += [f"  note: {note}" for note in sorted(notes)]
    raise UnsupportedModelError(
        "model: no supported architecture family matches this model. Unsupported features per family:\n"
        + "\n".join(lines)
        + f"\nSupported families: {sorted(FAMILIES)}.")


__all__ = ["ArchSpec", "FAMILIES", "select_family", "family_features"]
