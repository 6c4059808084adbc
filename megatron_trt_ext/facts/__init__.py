"""Facts of one block kind (MoE routing, multi-latent attention, Mamba-2 mixers, RoPE), each read
from a live model by its own small module and kept as a frozen record on `ModelInfo` (``None``
where the model has no such block), so family files read attributes, not string keys."""

from .mamba import MambaFacts
from .mla import MLAFacts
from .moe import MoEFacts
from .rope import YarnFacts, yarn_concentration

__all__ = ["MambaFacts", "MLAFacts", "MoEFacts", "YarnFacts", "yarn_concentration"]
