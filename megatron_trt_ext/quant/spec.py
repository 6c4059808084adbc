"""Quantization options (recipe section ``quantization:``): pure validation, no ModelOpt import."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Optional

from ..errors import ConfigError, reject_unknown_keys, short_repr


@dataclass(frozen=True)
class Algorithm:
    """One export algorithm: its ModelOpt calibration config and the checkpoint conventions."""

    name: str                 # recipe value
    quant_algo: str           # TensorRT-LLM / ModelOpt unified-checkpoint name
    modelopt_cfg: str         # modelopt.torch.quantization config the calibration uses
    weight: str               # fp8_tensor | int8_channel | int4_block | nvfp4_block
    activation: Optional[str]  # fp8_tensor | int8_tensor | None (weight-only)
    group_size: int = 0
    pre_quant_scale: bool = False
    weight_scale_2: bool = False
    needs_cuda: bool = False


ALGORITHMS = {
    "fp8": Algorithm("fp8", "FP8", "FP8_DEFAULT_CFG", "fp8_tensor", "fp8_tensor"),
    "int8_sq": Algorithm("int8_sq", "W8A8_SQ_PER_CHANNEL", "INT8_SMOOTHQUANT_CFG", "int8_channel", "int8_tensor",
                         pre_quant_scale=True),
    "int4_awq": Algorithm("int4_awq", "W4A16_AWQ", "INT4_AWQ_CFG", "int4_block", None, group_size=128,
                          pre_quant_scale=True),
    "w4a8_awq": Algorithm("w4a8_awq", "W4A8_AWQ", "W4A8_AWQ_BETA_CFG", "int4_block", "fp8_tensor", group_size=128,
                          pre_quant_scale=True, weight_scale_2=True),
    "nvfp4": Algorithm("nvfp4", "NVFP4", "NVFP4_DEFAULT_CFG", "nvfp4_block", "nvfp4", group_size=16,
                       weight_scale_2=True, needs_cuda=True),
}
KV_CACHE = {"none": None, "fp8": "FP8"}
SOURCES = ("synthetic", "iterator", "jsonl")


@dataclass
class CalibrationOptions:
    """Where calibration tokens come from and how many.

    ``source``: ``synthetic`` (random tokens: smoke tests only), ``iterator`` (the user's iterator
    or callable, passed as ``calibration_data=`` to `attach`/`Exporter`; e.g. a slice of the
    training data iterator), or ``jsonl`` (a JSON-lines file with a ``text`` field, tokenized with
    the transformers tokenizer at ``tokenizer``).
    """

    source: str = "synthetic"
    num_samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    jsonl: Optional[str] = None
    tokenizer: Optional[str] = None
    seed: int = 1234

    # Largest sensible values: calibration runs inside the training stall, so a typo such as
    # num_samples: 1000000000000 must fail at attach, not allocate at the first export.
    LIMITS: ClassVar[dict] = {"num_samples": 100_000, "seq_len": 1 << 20, "batch_size": 100_000, "seed": 2**63 - 1}
    MAX_TOKENS: ClassVar[int] = 1 << 28

    def validate(self, source: str) -> None:
        if not isinstance(self.source, str) or self.source not in SOURCES:
            raise ConfigError(f"{source}.source: unknown {short_repr(self.source)}; choose one of {list(SOURCES)}")
        for name, upper in self.LIMITS.items():
            value = getattr(self, name)
            lower = 0 if name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or not lower <= value <= upper:
                raise ConfigError(f"{source}.{name}: expected an integer between {lower} and {upper}, got "
                                  f"{short_repr(value)}")
        if self.num_samples * self.seq_len > self.MAX_TOKENS:
            raise ConfigError(f"{source}: num_samples x seq_len = {self.num_samples * self.seq_len} tokens is more "
                              f"than {self.MAX_TOKENS}; calibration needs a few hundred samples")
        for name in ("jsonl", "tokenizer"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"{source}.{name}: expected a path, got {short_repr(value)}")
        if self.source == "jsonl":
            if not self.jsonl or not self.tokenizer:
                raise ConfigError(f"{source}: source jsonl needs both 'jsonl' (the file) and "
                                  "'tokenizer' (a transformers tokenizer directory)")
            if not Path(self.jsonl).is_file():
                raise ConfigError(f"{source}.jsonl: {str(self.jsonl)!r} is not a file; give the JSON-lines "
                                  "calibration file (one {\"text\": ...} per line)")
            if not Path(self.tokenizer).is_dir():
                raise ConfigError(f"{source}.tokenizer: {str(self.tokenizer)!r} is not a directory; give a local "
                                  "transformers tokenizer directory (exports never download during training)")
        elif self.jsonl is not None or self.tokenizer is not None:
            raise ConfigError(f"{source}: 'jsonl'/'tokenizer' are only used with source: jsonl, not "
                              f"{self.source!r}; remove them or set source: jsonl")


@dataclass
class QuantSpec:
    """What to quantize and how to calibrate.

    Args:
        algorithm: one of ``fp8``, ``int8_sq``, ``int4_awq``, ``w4a8_awq``, ``nvfp4`` (or ``none``).
        kv_cache: ``fp8`` or ``none``.
        exclude: HF module-name patterns (fnmatch) left unquantized; ``lm_head`` and MoE routers
            are never quantized.
        smoothquant_alpha: migration strength for ``int8_sq``.
        calibration: see `CalibrationOptions`.
    """

    algorithm: str = "none"
    kv_cache: str = "none"
    exclude: list = field(default_factory=lambda: ["lm_head"])
    smoothquant_alpha: float = 0.5
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)

    @property
    def algo(self) -> Optional[Algorithm]:
        return ALGORITHMS.get(self.algorithm)

    @property
    def enabled(self) -> bool:
        return self.algo is not None or self.kv_cache != "none"

    @classmethod
    def from_dict(cls, data, source: str = "quantization") -> "QuantSpec":
        if data is None:
            return cls()
        if isinstance(data, QuantSpec):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping such as {{algorithm: fp8, kv_cache: fp8}}")
        reject_unknown_keys(data, {f.name for f in fields(cls)}, source)
        data = dict(data)
        calib = data.pop("calibration", None) or {}
        if not isinstance(calib, dict):
            raise ConfigError(f"{source}.calibration: expected a mapping")
        reject_unknown_keys(calib, {f.name for f in fields(CalibrationOptions)}, f"{source}.calibration")
        spec = cls(**data, calibration=CalibrationOptions(**calib))
        spec.validate(source)
        return spec

    def validate(self, source: str = "quantization") -> None:
        if not isinstance(self.algorithm, str) or (self.algorithm != "none" and self.algorithm not in ALGORITHMS):
            raise ConfigError(f"{source}.algorithm: unknown {short_repr(self.algorithm)}; choose one of "
                              f"{['none', *ALGORITHMS]}")
        if not isinstance(self.kv_cache, str) or self.kv_cache not in KV_CACHE:
            raise ConfigError(f"{source}.kv_cache: unknown {short_repr(self.kv_cache)}; choose one of {list(KV_CACHE)}")
        if not isinstance(self.exclude, list) or not all(isinstance(p, str) for p in self.exclude):
            raise ConfigError(f"{source}.exclude: expected a list of module-name patterns such as [lm_head]")
        if "lm_head" not in self.exclude or set(self.exclude) - {"lm_head"}:
            raise ConfigError(f"{source}.exclude: this version leaves exactly lm_head (and MoE routers) "
                              f"unquantized and quantizes every other linear; got {short_repr(self.exclude)}. Use "
                              "exclude: [lm_head]")
        if not isinstance(self.smoothquant_alpha, (int, float)) or not 0 <= self.smoothquant_alpha <= 1:
            raise ConfigError(f"{source}.smoothquant_alpha: expected a number in [0, 1], got "
                              f"{short_repr(self.smoothquant_alpha)}")
        if self.smoothquant_alpha != 0.5 and self.algorithm != "int8_sq":
            raise ConfigError(f"{source}.smoothquant_alpha: only used by algorithm int8_sq, not "
                              f"{self.algorithm!r}; remove it")
        self.calibration.validate(f"{source}.calibration")

    def to_dict(self) -> dict:
        return asdict(self)
