"""Typed words of the family tables: which models a row applies to (`Condition`, tested on
`ModelInfo`) and which layers (`Layers`, by layer kind).

A row whose source tensor exists only in some models names the condition it needs
(``when=Not(TIED_EMBEDDINGS)``); a row for one block kind names the layers that have it
(``on=MOE_LAYERS``). Both are objects, not strings: a typo is a NameError at import, and a new
condition is a line here, not an attribute looked up by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Condition:
    """A named yes/no fact of a model (``test`` takes its `ModelInfo`); equal by name."""

    name: str
    test: Callable = field(compare=False)

    def __call__(self, info) -> bool:
        return bool(self.test(info))


def Not(condition: Condition) -> Condition:  # noqa: N802 (reads as a word in the tables)
    return Condition(f"not {condition.name}", lambda info: not condition(info))


ALWAYS = Condition("always", lambda info: True)
NEVER = Condition("never", lambda info: False)
TIED_EMBEDDINGS = Condition("tied embeddings", lambda info: info.tied_embeddings)
LINEAR_BIAS = Condition("linear biases", lambda info: info.add_bias_linear)
QKV_BIAS = Condition("q/k/v biases", lambda info: info.add_qkv_bias)
Q_LORA = Condition("MLA q LoRA", lambda info: info.mla is not None and info.mla.q_lora)
ROUTER_BIAS = Condition("router bias", lambda info: info.moe is not None and info.moe.router_bias)
SHARED_EXPERTS = Condition("shared experts", lambda info: info.moe is not None and bool(info.moe.shared_size))


@dataclass(frozen=True)
class Layers:
    """The target layers a row applies to, by kind (`ModelInfo.layer_symbols`: ``D`` dense MLP /
    ``E`` MoE for GPT blocks, lower case for their MTP layers; a HybridModel's own pattern
    symbols for one-layer-per-symbol targets). ``kinds`` empty: every layer."""

    name: str
    kinds: str = ""

    def select(self, info) -> list:
        """The indices of the target layers of these kinds."""
        kinds = info.layer_symbols or "D" * info.num_layers
        return [i for i, kind in enumerate(kinds) if not self.kinds or kind in self.kinds]


EVERY_LAYER = Layers("every layer")
DENSE_MLP_LAYERS = Layers("dense MLP layers (MTP ones too)", "Dd")
MOE_LAYERS = Layers("MoE layers (MTP ones too)", "Ee")
MTP_LAYERS = Layers("multi-token-prediction layers", "de")
# one target layer per HybridModel pattern symbol (Nemotron-H)
MAMBA_LAYERS = Layers("Mamba layers", "M")
ATTENTION_LAYERS = Layers("attention layers", "*")
MLP_LAYERS = Layers("MLP layers", "-")
