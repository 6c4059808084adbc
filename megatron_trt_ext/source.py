"""Source model classes and the target's layer numbering.

Two things vary independently: the **source model class** (`GPTModel`: layer i holds attention and
MLP; `HybridModel`: one layer per pattern symbol) and the **family** (names and layouts of one
block kind). This module maps a source's checkpoint names to the canonical names the family tables
are written in, once per model, so one table serves both classes:

* GPTModel: names are canonical already;
* HybridModel with an attention + MLP/MoE paired pattern (``*-*-``, ``*E*E``): hybrid layers 2i
  and 2i+1 are target layer i (a GPT block), ``decoder.final_norm`` is ``decoder.final_layernorm``;
* any other HybridModel (Mamba hybrids such as Nemotron-H): one target layer per pattern symbol.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(transformer_layer\.)?(.*)$")


def canonical_namer(info) -> Optional[Callable[[str], str]]:
    """The rename for ``info``'s source layout (None when names are canonical already).

    Multi-token-prediction layers (``mtp.layers.k``) follow the decoder's layers: their
    transformer layer is ``decoder.layers.{num_layers + k}``, their own modules (enorm, hnorm,
    eh_proj, final_layernorm) ``decoder.layers.{num_layers + k}.mtp.*``.
    """
    if info.source_layout == "gpt" and not info.mtp_num_layers:
        return None
    paired = info.source_layout == "hybrid_paired"
    first_mtp = info.num_layers

    def rename(name: str) -> str:
        m = _MTP.match(name)
        if m:
            layer = first_mtp + int(m.group(1))
            return f"decoder.layers.{layer}.{m.group(3)}" if m.group(2) else f"decoder.layers.{layer}.mtp.{m.group(3)}"
        if name.startswith("decoder.final_norm."):
            return "decoder.final_layernorm." + name[len("decoder.final_norm."):]
        m = _LAYER.match(name)
        if m and paired:
            return f"decoder.layers.{int(m.group(1)) // 2}.{m.group(2)}"
        return name

    return rename
