"""Verification probe options (recipe section ``verification:``): pure validation, no torch.

The probe runs inside the training stall, so its size is bounded here: a typo such as
``seq_len: 3200000`` fails at attach, naming the key, instead of stalling every save.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from ..errors import ConfigError, check_int_fields, parse_section, short_repr


@dataclass
class VerificationOptions:
    """Reference logits recorded at each export, for ``megatron-trt-ext verify``.

    Args:
        enabled: run the probe at each export (with the ``hf`` format; it is what ``verify`` loads).
        num_sequences: probe sequences (one forward pass over all of them).
        seq_len: tokens per sequence (at most the model's ``max_position_embeddings``).
        top_k: logits kept per position (values and ids), over the exported vocabulary.
        seed: seed of the probe's own generator for synthetic token ids (never the global RNG), so
            every export of a run is probed with the same tokens.
    """

    enabled: bool = True
    num_sequences: int = 4
    seq_len: int = 32
    top_k: int = 8
    seed: int = 1234

    LIMITS: ClassVar[dict] = {"num_sequences": 1024, "seq_len": 1 << 16, "top_k": 1024, "seed": 2**63 - 1}
    MAX_TOKENS: ClassVar[int] = 1 << 16  # a probe, not an evaluation: it runs while training waits

    @classmethod
    def from_dict(cls, data, source: str = "verification") -> "VerificationOptions":
        return parse_section(cls, data, source,
                             "a mapping such as {enabled: true, num_sequences: 4, seq_len: 32, top_k: 8}")

    def validate(self, source: str = "verification") -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"{source}.enabled: expected true or false, got {short_repr(self.enabled)}")
        check_int_fields(self, self.LIMITS, source)
        if self.num_sequences * self.seq_len > self.MAX_TOKENS:
            raise ConfigError(f"{source}: num_sequences x seq_len = {self.num_sequences * self.seq_len} tokens is "
                              f"more than {self.MAX_TOKENS}; the probe runs while training waits: a few short "
                              "sequences are enough (e.g. num_sequences: 4, seq_len: 32)")

    def check_model(self, max_positions: int, vocab_size: int, source: str = "verification") -> None:
        """What depends on the model, checked at attach."""
        if self.enabled and max_positions and self.seq_len > max_positions:
            raise ConfigError(f"{source}.seq_len={self.seq_len}: longer than the model's max_position_embeddings "
                              f"({max_positions}); choose at most {max_positions}")
        if self.enabled and self.top_k > vocab_size:
            raise ConfigError(f"{source}.top_k={self.top_k}: more than the {vocab_size} exported vocabulary ids; "
                              f"choose at most {vocab_size}")

    def to_dict(self) -> dict:
        return asdict(self)
