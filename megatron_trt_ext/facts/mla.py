"""Multi-latent attention (DeepSeek-V2/V3, Kimi-K2): its LoRA ranks, head dims and RoPE (YaRN) settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .rope import YarnFacts, read_yarn_facts


@dataclass(frozen=True)
class MLAFacts:
    """An ``MLATransformerConfig``'s own fields, as Megatron holds them (None where unset)."""

    q_lora_rank: Optional[int] = None   # None or 0: no q LoRA (one linear_q_proj)
    kv_lora_rank: Optional[int] = None
    qk_head_dim: Optional[int] = None   # the non-rotary part of a q/k head
    qk_pos_emb_head_dim: Optional[int] = None  # the decoupled rotary part
    v_head_dim: Optional[int] = None
    rope_type: Optional[str] = None     # "rope" or "yarn"
    rotary_base: Optional[float] = None
    # the YaRN parameters (MLA's config names them without the ``yarn_`` prefix)
    yarn: YarnFacts = field(default_factory=YarnFacts)

    @property
    def q_lora(self) -> bool:
        return bool(self.q_lora_rank)


def read_mla_facts(config) -> MLAFacts:
    names = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
             "rotary_base")
    return MLAFacts(**{name: getattr(config, name, None) for name in names}, yarn=read_yarn_facts(config, prefix=""))
