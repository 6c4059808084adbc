"""Verification probe options (recipe section ``verification:``): pure validation, no torch.

The probe runs inside the training stall, so its size is bounded here: a typo such as
``seq_len: 3200000`` fails at attach, naming the key, instead of stalling every save; and what the
recipe leaves unset is sized by `probe_size` (fewer tokens for large models).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Optional

from ..errors import ConfigError, check_int_fields, parse_section, short_repr


@dataclass
class VerificationOptions:
    """Reference logits recorded at each export, for ``megatron-trt-ext verify``.

    Args:
        enabled: run the probe at each export (with the ``hf`` format; it is what ``verify`` loads).
        num_sequences: probe sequences (one forward pass over all of them); unset (None): sized
            by `probe_size` from the model's parameter count.
        seq_len: tokens per sequence (at most the model's ``max_position_embeddings``); unset
            (None): 32, or the model's ``max_position_embeddings`` when that is shorter.
        top_k: logits kept per position (values and ids), over the exported vocabulary.
        seed: seed of the probe's own generator for synthetic token ids (never the global RNG), so
            every export of a run is probed with the same tokens.
    """

    enabled: bool = True
    num_sequences: Optional[int] = None  # None: `probe_size` decides
    seq_len: Optional[int] = None
    top_k: int = 8
    seed: int = 1234

    LIMITS: ClassVar[dict] = {"num_sequences": 1024, "seq_len": 1 << 16, "top_k": 1024, "seed": 2**63 - 1}
    MAX_TOKENS: ClassVar[int] = 1 << 16  # a probe, not an evaluation: it runs while training waits
    SIZED: ClassVar[tuple] = ("num_sequences", "seq_len")  # None: `probe_size`'s rule decides

    @classmethod
    def from_dict(cls, data, source: str = "verification") -> "VerificationOptions":
        return parse_section(cls, data, source,
                             "a mapping such as {enabled: true, num_sequences: 4, seq_len: 32, top_k: 8}")

    def validate(self, source: str = "verification") -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"{source}.enabled: expected true or false, got {short_repr(self.enabled)}")
        unset = {name for name in self.SIZED if getattr(self, name) is None}  # sized by `probe_size`
        check_int_fields(self, {k: v for k, v in self.LIMITS.items() if k not in unset}, source)
        if self.num_sequences is not None and self.seq_len is not None \
                and self.num_sequences * self.seq_len > self.MAX_TOKENS:
            raise ConfigError(f"{source}: num_sequences x seq_len = {self.num_sequences * self.seq_len} tokens is "
                              f"more than {self.MAX_TOKENS}; the probe runs while training waits: a few short "
                              "sequences are enough (e.g. num_sequences: 4, seq_len: 32)")

    def check_model(self, max_positions: int, vocab_size: int, source: str = "verification") -> None:
        """What depends on the model, checked at attach."""
        if self.enabled and max_positions and self.seq_len is not None and self.seq_len > max_positions:
            raise ConfigError(f"{source}.seq_len={self.seq_len}: longer than the model's max_position_embeddings "
                              f"({max_positions}); choose at most {max_positions}")
        if self.enabled and self.top_k > vocab_size:
            raise ConfigError(f"{source}.top_k={self.top_k}: more than the {vocab_size} exported vocabulary ids; "
                              f"choose at most {vocab_size}")

    def to_dict(self) -> dict:
        return asdict(self)


# The size rule for what the recipe leaves unset (`probe_size`). The probe's forward pass costs about
# 2 x parameters FLOPs per token, so a fixed FLOP budget gives large models fewer tokens; a floor
# keeps enough positions for the statistics `verify` computes.
FLOP_BUDGET = 1 << 36  # ~6.9e10 forward FLOPs: 4 x 32 tokens up to 268M parameters
MAX_AUTO_TOKENS = 128  # 4 x 32, the probe's size before the rule
MIN_AUTO_TOKENS = 64   # 2 x 32: one top-1 flip (a float32 near-tie) still passes the 0.98 limit (63/64)
DEFAULT_SEQ_LEN = 32
RULE = (f"unset sizes: seq_len {DEFAULT_SEQ_LEN} (at most max_position_embeddings); tokens = min({MAX_AUTO_TOKENS}, "
        f"max({MIN_AUTO_TOKENS}, floor(2^36 / (2 x parameters)))), num_sequences = max(1, tokens // seq_len); "
        "parameters: the exported tensors' elements")


@dataclass(frozen=True)
class ProbeSize:
    """The probe's shape for one export, and where each number came from (for the manifest)."""

    num_sequences: int
    seq_len: int
    parameters: int
    from_recipe: tuple  # the fields the recipe set, never overridden

    @property
    def tokens(self) -> int:
        return self.num_sequences * self.seq_len

    def record(self) -> dict:
        return {"rule": RULE, "parameters": self.parameters, "flop_budget": FLOP_BUDGET,
                "forward_flops": 2 * self.parameters * self.tokens,
                **{name: "recipe" if name in self.from_recipe else "rule" for name in VerificationOptions.SIZED}}


def auto_tokens(parameters: int) -> int:
    """Tokens the rule gives a model of ``parameters`` elements (integer arithmetic: the same on
    every rank and machine)."""
    per_budget = FLOP_BUDGET // (2 * parameters) if parameters > 0 else MAX_AUTO_TOKENS
    return min(MAX_AUTO_TOKENS, max(MIN_AUTO_TOKENS, per_budget))


def probe_size(options: VerificationOptions, parameters: Optional[int], max_positions: int = 0) -> ProbeSize:
    """The probe's shape: what the recipe set, as set (never overridden); the rest by `RULE`.
    ``parameters`` None (unknown) counts as a small model; ``max_positions`` 0: unknown."""
    parameters = int(parameters or 0)
    set_fields = tuple(name for name in options.SIZED if getattr(options, name) is not None)
    seq_len = options.seq_len
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, max_positions) if max_positions else DEFAULT_SEQ_LEN
    num_sequences = options.num_sequences
    if num_sequences is None:
        num_sequences = max(1, auto_tokens(parameters) // seq_len)
    return ProbeSize(num_sequences, seq_len, parameters, set_fields)
