"""Quantization options (recipe section ``quantization:``): pure validation, no ModelOpt import."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Optional

from ..errors import ConfigError, check_int_fields, parse_section, reject_unknown_keys, short_repr


# Where each checkpoint format loads (README's recipe table is generated from the same facts).
HF_FP8_LOADERS = "vLLM, SGLang, TensorRT-LLM PyTorch backend"
TRT_ENGINE = "trtllm-build (TensorRT-LLM <= 1.2 engines)"


@dataclass(frozen=True)
class Algorithm:
    """One export algorithm: its ModelOpt calibration config and the checkpoint conventions.

    ``formats`` maps each checkpoint format to the engines that load it, or to ``None`` when no
    engine loads that combination (the recipe is then refused at attach, with ``refusals`` saying
    why and where the format does load).
    """

    name: str                 # recipe value (ModelOpt's spelling)
    quant_algo: str           # ModelOpt unified / TensorRT-LLM name
    modelopt_cfg: str         # modelopt.torch.quantization config with the same numerics
    # fp8_tensor | fp8_channel | fp8_block (128x128) | mxfp8 (E8M0 per 32) | int8_channel |
    # int4_block | nvfp4_block
    weight: str
    # static input scale: fp8_tensor | int8_tensor | nvfp4 ; None: 16-bit activations or the
    # engine quantizes activations dynamically (fp8_pc_pt, fp8_pb_wo, mxfp8)
    activation: Optional[str]
    # how the statistics are gathered: "max" (max |input| of each linear: hooks on the live
    # model), "smoothquant" / "awq" (ModelOpt's algorithms on a replica), None (weights only)
    calibration: Optional[str] = "max"
    group_size: int = 0
    pre_quant_scale: bool = False
    weight_scale_2: bool = False
    block: int = 0            # fp8_block: square block edge
    hf: Optional[str] = HF_FP8_LOADERS
    trtllm_checkpoint: Optional[str] = TRT_ENGINE
    refusals: dict = field(default_factory=dict, compare=False, hash=False)

    def loaders(self, fmt: str) -> Optional[str]:
        return getattr(self, fmt) if fmt in ("hf", "trtllm_checkpoint") else None


NO_TRT_BLOCK = ("TensorRT-LLM checkpoints (engine backend) have no {algo} weights and ModelOpt does not "
                "export them either; write formats: [hf] ({loaders})")
ALGORITHMS = {
    "fp8": Algorithm("fp8", "FP8", "FP8_DEFAULT_CFG", "fp8_tensor", "fp8_tensor"),
    "fp8_pc_pt": Algorithm("fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PER_CHANNEL_PER_TOKEN_CFG", "fp8_channel",
                           None, calibration=None, hf="vLLM"),
    "fp8_pb_wo": Algorithm("fp8_pb_wo", "fp8_pb_wo", "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "fp8_block", None,
                           calibration=None, block=128, hf="vLLM, TensorRT-LLM PyTorch backend (FP8_BLOCK_SCALES)",
                           trtllm_checkpoint=None),
    "mxfp8": Algorithm("mxfp8", "MXFP8", "MXFP8_DEFAULT_CFG", "mxfp8", None, calibration=None, group_size=32,
                       hf="vLLM", trtllm_checkpoint=None),
    "int8_sq": Algorithm("int8_sq", "W8A8_SQ_PER_CHANNEL", "INT8_SMOOTHQUANT_CFG", "int8_channel", "int8_tensor",
                         calibration="smoothquant", pre_quant_scale=True, hf=None),
    "int4_awq": Algorithm("int4_awq", "W4A16_AWQ", "INT4_AWQ_CFG", "int4_block", None, calibration="awq",
                          group_size=128, pre_quant_scale=True, hf="TensorRT-LLM PyTorch backend"),
    "w4a8_awq": Algorithm("w4a8_awq", "W4A8_AWQ", "W4A8_AWQ_BETA_CFG", "int4_block", "fp8_tensor", calibration="awq",
                          group_size=128, pre_quant_scale=True, weight_scale_2=True,
                          hf="TensorRT-LLM PyTorch backend"),
    "nvfp4": Algorithm("nvfp4", "NVFP4", "NVFP4_DEFAULT_CFG", "nvfp4_block", "nvfp4", group_size=16,
                       weight_scale_2=True),
    "w4a16_nvfp4": Algorithm("w4a16_nvfp4", "W4A16_NVFP4", "W4A16_NVFP4_CFG", "nvfp4_block", None, calibration=None,
                             group_size=16, weight_scale_2=True, hf="vLLM", trtllm_checkpoint=None),
}
REFUSALS = {
    ("int8_sq", "hf"): "no engine loads INT8 SmoothQuant from a Hugging Face checkpoint (vLLM's and SGLang's "
                       "ModelOpt loaders and TensorRT-LLM's PyTorch backend have no W8A8_SQ); write "
                       "formats: [trtllm_checkpoint] (trtllm-build, TensorRT-LLM <= 1.2)",
    ("fp8_pb_wo", "trtllm_checkpoint"): NO_TRT_BLOCK.format(algo="128x128 block-scaled FP8",
                                                            loaders=ALGORITHMS["fp8_pb_wo"].hf),
    ("mxfp8", "trtllm_checkpoint"): "TensorRT-LLM <= 1.2 engines have no MXFP8 (QuantAlgo lacks it); write "
                                    "formats: [hf] (vLLM)",
    ("w4a16_nvfp4", "trtllm_checkpoint"): "TensorRT-LLM <= 1.2 engines have no W4A16_NVFP4; write formats: [hf] "
                                          "(vLLM), or use nvfp4",
}
# KV cache: recipe value -> (kv_cache_quant_algo, divisor of the amax for k_scale/v_scale)
KV_CACHE = {"none": None, "fp8": "FP8", "nvfp4": "NVFP4"}
KV_REFUSALS = {
    ("nvfp4", "trtllm_checkpoint"): "NVFP4 KV cache is written to Hugging Face checkpoints only (hf_quant_config's "
                                    "kv_cache_quant_algo NVFP4, read by vLLM and TensorRT-LLM's PyTorch backend); "
                                    "TensorRT-LLM checkpoints get kv_cache: fp8",
}
SOURCES = ("synthetic", "iterator", "jsonl")


@dataclass(frozen=True)
class CalibrationOptions:
    """Where calibration tokens come from and how many.

    ``source``: ``synthetic`` (random tokens: smoke tests only), ``iterator`` (the user's data,
    passed as ``calibration_data=`` to `attach`/`Exporter`: a callable returning a fresh iterator
    of token batches, or a list of batches; a one-shot iterator is refused), or ``jsonl`` (a JSON-lines file with a ``text`` field, tokenized with
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
        check_int_fields(self, self.LIMITS, source)
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


ALWAYS_UNQUANTIZED = ("lm_head",)  # plus what a family never quantizes (MoE routers)
# What one MIXED_PRECISION checkpoint may combine: the formats vLLM's and TensorRT-LLM's PyTorch
# backend accept per layer (a layer in another format would load as unquantized).
MIXABLE = ("fp8", "nvfp4", "w4a16_nvfp4")


@dataclass(frozen=True)
class Override:
    """One mixed-precision rule: the linears it matches get ``algorithm`` (``none``: unquantized).

    ``modules``: HF module-name patterns (fnmatch), e.g. ``"*.mlp.*"``, ``"*.self_attn.*"``;
    ``layers``: decoder layer indices (negative counts from the end: -1 is the last layer).
    Both default to everything; the first rule that matches a linear decides.
    """

    algorithm: str
    modules: tuple = ("*",)
    layers: Optional[tuple] = None

    def matches(self, module: str, layer: Optional[int], num_layers: int) -> bool:
        import fnmatch

        if self.layers is not None:
            if layer is None or not any(layer == (i if i >= 0 else num_layers + i) for i in self.layers):
                return False
        return any(fnmatch.fnmatchcase(module, pattern) for pattern in self.modules)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how to calibrate.

    Args:
        algorithm: the default for every linear: one of `ALGORITHMS` (ModelOpt's names) or ``none``.
        kv_cache: ``fp8``, ``nvfp4`` or ``none``.
        exclude: HF module-name patterns (fnmatch) left unquantized; ``lm_head`` and MoE routers
            are never quantized.
        overrides: mixed precision: a list of ``{algorithm, modules, layers}`` rules (see
            `Override`); an export whose linears end up with more than one format is written as
            ModelOpt's MIXED_PRECISION.
        smoothquant_alpha: migration strength for ``int8_sq``.
        calibration: see `CalibrationOptions`.
    """

    algorithm: str = "none"
    kv_cache: str = "none"
    exclude: list = field(default_factory=lambda: ["lm_head"])
    overrides: list = field(default_factory=list)
    smoothquant_alpha: float = 0.5
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)

    @property
    def algo(self) -> Optional[Algorithm]:
        """The default algorithm (None: linears unquantized unless an override says otherwise)."""
        return ALGORITHMS.get(self.algorithm)

    @property
    def rules(self) -> list:
        return [Override(o["algorithm"], tuple(_as_list(o.get("modules", "*"))),
                         None if o.get("layers") is None else tuple(_as_list(o["layers"])))
                for o in self.overrides]

    @property
    def algorithms(self) -> list:
        """Every algorithm some linear may get, default first."""
        names = [self.algorithm] + [r.algorithm for r in self.rules]
        return [ALGORITHMS[n] for n in dict.fromkeys(names) if n in ALGORITHMS]

    @property
    def enabled(self) -> bool:
        return bool(self.algorithms) or self.kv_cache != "none"

    @property
    def calibration_kind(self) -> Optional[str]:
        """smoothquant / awq (ModelOpt on a replica), max (hooks on the live model: needs forward
        passes), or None (no forward pass: weight-only formats without a KV-cache scale)."""
        kinds = {a.calibration for a in self.algorithms} - {None}
        if kinds & {"smoothquant", "awq"}:
            return (kinds & {"smoothquant", "awq"}).pop()
        if kinds or self.kv_cache != "none":
            return "max"
        return None

    def algorithm_for(self, module: str, layer: Optional[int], num_layers: int,
                      never: tuple = ()) -> Optional[Algorithm]:
        """The algorithm of one HF linear (``module``: its HF name without ``.weight``)."""
        import fnmatch

        if any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module, p + ".*")
               for p in (*ALWAYS_UNQUANTIZED, *self.exclude)):
            return None
        if any(fnmatch.fnmatchcase(module, p) for p in never):
            return None
        for rule in self.rules:
            if rule.matches(module, layer, num_layers):
                return ALGORITHMS.get(rule.algorithm)
        return self.algo

    def refusal(self, formats) -> Optional[str]:
        """Why these formats cannot be written with this recipe (None: they can)."""
        for fmt in formats:
            for algo in self.algorithms:
                reason = REFUSALS.get((algo.name, fmt))
                if reason:
                    return f"algorithm {algo.name} with format {fmt}: {reason}"
            reason = KV_REFUSALS.get((self.kv_cache, fmt))
            if reason:
                return f"kv_cache {self.kv_cache} with format {fmt}: {reason}"
            if fmt == "trtllm_checkpoint" and self.overrides:
                return ("mixed precision (overrides) with format trtllm_checkpoint: written as ModelOpt's "
                        "MIXED_PRECISION Hugging Face checkpoint only (vLLM, TensorRT-LLM PyTorch backend); "
                        "use formats: [hf]")
        return None

    @classmethod
    def from_dict(cls, data, source: str = "quantization") -> "QuantSpec":
        def build(section: dict) -> "QuantSpec":
            section = dict(section)
            calib = section.pop("calibration", None) or {}
            if not isinstance(calib, dict):
                raise ConfigError(f"{source}.calibration: expected a mapping")
            reject_unknown_keys(calib, {f.name for f in fields(CalibrationOptions)}, f"{source}.calibration")
            return cls(**section, calibration=CalibrationOptions(**calib))

        return parse_section(cls, data, source, "a mapping such as {algorithm: fp8, kv_cache: fp8}", build=build)

    def validate(self, source: str = "quantization") -> None:
        names = ["none", *ALGORITHMS]
        if not isinstance(self.algorithm, str) or self.algorithm not in names:
            raise ConfigError(f"{source}.algorithm: unknown {short_repr(self.algorithm)}; choose one of {names}")
        if not isinstance(self.kv_cache, str) or self.kv_cache not in KV_CACHE:
            raise ConfigError(f"{source}.kv_cache: unknown {short_repr(self.kv_cache)}; choose one of {list(KV_CACHE)}")
        if not isinstance(self.exclude, list) or not all(isinstance(p, str) and p for p in self.exclude):
            raise ConfigError(f"{source}.exclude: expected a list of HF module-name patterns such as "
                              "[lm_head, 'model.layers.0.*']")
        self._validate_overrides(source)
        if not isinstance(self.smoothquant_alpha, (int, float)) or not 0 <= self.smoothquant_alpha <= 1:
            raise ConfigError(f"{source}.smoothquant_alpha: expected a number in [0, 1], got "
                              f"{short_repr(self.smoothquant_alpha)}")
        if self.smoothquant_alpha != 0.5 and self.algorithm != "int8_sq":
            raise ConfigError(f"{source}.smoothquant_alpha: only used by algorithm int8_sq, not "
                              f"{self.algorithm!r}; remove it")
        self.calibration.validate(f"{source}.calibration")

    def _validate_overrides(self, source: str) -> None:
        if not isinstance(self.overrides, list):
            raise ConfigError(f"{source}.overrides: expected a list of rules such as "
                              "[{modules: '*.mlp.*', algorithm: nvfp4}]")
        for i, rule in enumerate(self.overrides):
            where = f"{source}.overrides[{i}]"
            if not isinstance(rule, dict):
                raise ConfigError(f"{where}: expected a mapping {{algorithm, modules, layers}}")
            reject_unknown_keys(rule, {"algorithm", "modules", "layers"}, where)
            name = rule.get("algorithm")
            if name != "none" and name not in MIXABLE:
                raise ConfigError(f"{where}.algorithm: {short_repr(name)} cannot be mixed; choose one of "
                                  f"{['none', *MIXABLE]} (the formats serving engines accept per layer in a "
                                  "MIXED_PRECISION checkpoint)")
            modules = _as_list(rule.get("modules", "*"))
            if not modules or not all(isinstance(m, str) and m for m in modules):
                raise ConfigError(f"{where}.modules: expected HF module-name patterns such as '*.mlp.*'")
            layers = rule.get("layers")
            if layers is not None and (not _as_list(layers) or not all(
                    isinstance(x, int) and not isinstance(x, bool) and abs(x) < 1 << 20 for x in _as_list(layers))):
                raise ConfigError(f"{where}.layers: expected decoder layer indices such as [0, -1] (negative: from "
                                  f"the end), got {short_repr(layers)}")
        if self.overrides and self.algorithm not in ("none", *MIXABLE):
            raise ConfigError(f"{source}.overrides: algorithm {self.algorithm} cannot be mixed with other formats; "
                              f"use one of {list(MIXABLE)} as the default")

    def to_dict(self) -> dict:
        return asdict(self)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
