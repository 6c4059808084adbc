"""Export options: the `ExportConfig` dataclass, recipe files and validation.

Everything that can be checked without the model is checked here, at construction, so a bad value
fails when the job starts and not at the first checkpoint hours later.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from . import recipes
from .engines.options import BuildOptions
from .errors import ConfigError, reject_unknown_keys, short_repr
from .quant.spec import QuantSpec
from .serve.options import ServeOptions
from .tokenizer import TOKENIZER_FILES
from .verification.spec import VerificationOptions

FORMATS = ("hf", "trtllm_checkpoint", "trtllm_engine")
MODES = ("sync", "async")
BUSY_POLICIES = ("skip", "wait")
DTYPES = ("bfloat16", "float16", "float32")
# The names `arch.FAMILIES` defines, plus "auto" (tests/test_config.py checks that they agree: the
# family tables import torch, which validating a recipe must not need).
FAMILIES = ("auto", "llama", "qwen3", "gemma", "nemotron", "starcoder2", "gpt", "mixtral", "qwen3_moe",
            "deepseek_v3", "gpt_oss", "nemotron_h")

# Integer options and their largest sensible value: a typo such as 10**21 fails here, naming the
# key, instead of overflowing a timer or an allocation at the first export.
INT_RANGES = {
    "inference_tp": 4096, "inference_pp": 4096, "inference_moe_tp": 4096, "inference_moe_ep": 4096,
    "every_n_saves": 10**9, "timeout_s": 7 * 24 * 3600, "keep_last": 10**6, "vocab_size": 2**31 - 1,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(value: Any, what: str) -> int:
    """Parse a byte size given as an int or a string such as "2GB", "500MiB"."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size such as 2GB, got {short_repr(value)}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and _SIZE_RE.match(value):
        number, unit, binary = _SIZE_RE.match(value).groups()
        base = 1024 if binary else 1000
        size = int(float(number) * base ** " KMGT".index(unit.upper() or " "))
    else:
        raise ConfigError(f"{what}: expected a size such as 2GB or a number of bytes, got {short_repr(value)}")
    if size <= 0:
        raise ConfigError(f"{what}: must be positive, got {short_repr(value)}")
    return size


# Recipe sections parsed into their typed options. Their own parser checks the type (naming the key and
# the fix), so the generic type check skips them, as it skips max_shard_size (`parse_size`).
SECTIONS = {"build": BuildOptions, "quantization": QuantSpec, "verification": VerificationOptions,
            "serve": ServeOptions}
_OWN_TYPE_CHECK = {"max_shard_size", "split_rows_over", *SECTIONS}


@dataclass(frozen=True)
class ExportConfig:
    """What to export, where and how often. Parsed and checked once, at construction, then frozen:
    every reader sees the typed values (``quantization`` is a `QuantSpec` whether a dict or a
    QuantSpec was given); derive a changed config with ``dataclasses.replace``.

    Args:
        output_dir: root directory; each export goes to ``<output_dir>/iter_XXXXXXX``.
        formats: any of ``"hf"`` (Hugging Face / ModelOpt unified layout) and
            ``"trtllm_checkpoint"`` (TensorRT-LLM checkpoint: config.json + rank{N}.safetensors).
        dtype: dtype of the written weights (conversion happens at write time; the live model is
            never modified).
        inference_tp, inference_pp: tensor and pipeline parallel sizes of the TensorRT-LLM
            checkpoint, independent of the training layout.
        inference_moe_tp, inference_moe_ep: how the inference TP ranks split MoE experts
            (tensor-parallel within experts x expert-parallel; their product is inference_tp).
            Unset: experts are tensor-parallel over all inference_tp ranks.
        vocab_size: the tokenizer's real vocabulary size; Megatron pads the embedding table and
            the padding rows are trimmed on export. ``None`` exports the padded size (warned once).
        every_n_saves: export at every Nth checkpoint save seen by the hook.
        family: ``"auto"`` detects the architecture family from the model's config.
        max_shard_size: largest Hugging Face safetensors shard (e.g. ``"5GB"``).
        split_rows_over: units larger than this (a size such as ``"2GB"``, or ``"auto"``, the
            default: 1.5x the mean bytes each rank writes) are written by several ranks, a range
            of rows each, into the same files, where their conversion keeps rows whole (vocabulary
            tables, linears; not stacked experts; `megatron_trt_ext.row_split`). The files are the
            same bytes as one writer's; their checksums are then listed per range. ``None``
            (``null``): every unit is written whole by one rank. Not with quantization or a live
            refit. On one rank nothing is ever above 1.5x the mean.
        tokenizer_dir: the training tokenizer's directory (as saved by transformers'
            ``save_pretrained``): its files (and chat template) are copied into the HF export and
            its bos/eos/pad ids written to config.json and generation_config.json, so the export
            serves text (`megatron_trt_ext.tokenizer`). Filled from Megatron-LM's
            ``--tokenizer-model`` / Bridge's tokenizer config when that is a local HF tokenizer.
        eod_token_id: Megatron's end-of-document id (filled by the Megatron-LM and Bridge
            integrations); written as an eos id beside the tokenizer's own where it differs.
            Needs ``tokenizer_dir``.
        strict: when an export triggered by the hook fails, raise into training instead of
            logging the failure and going on.
        check_finite: refuse to export tensors holding NaN or Inf.
        mode: ``"async"`` (training waits only for a host snapshot of its shards; conversion and
            writing run in a worker process) or ``"sync"``. Unset: async under `attach`, sync for a
            plain `Exporter`.
        busy_policy: what a save does while the previous export still runs (async mode).
            ``"skip"``: training waits only for the snapshot; the save is copied into a second
            slot and exported after the running export. A newer save that comes before that
            export starts replaces it in the slot (newest wins; the replaced one is recorded as
            skipped). ``"wait"``: the save waits until the running export is done, so every due
            save is exported, at the cost of the wait.
        keep_last: keep only the newest N complete exports (never the newest, never one being
            built); unset keeps all.
        build: engine-build options (a mapping or `engines.options.BuildOptions`), used with the
            ``trtllm_engine`` format.
        quantization: quantized export (a mapping or `quant.spec.QuantSpec`): algorithm, KV cache,
            excluded modules and calibration.
        verification: reference logits recorded at each export for ``megatron-trt-ext verify`` (a
            mapping or `verification.spec.VerificationOptions`); ``{enabled: false}`` turns it off.
        timeout_s: longest time a rank waits on its peers during an export (a failed or lost
            rank turns into an error on every rank within this bound, never a hang).
        drop_mtp: leave the model's multi-token-prediction layers out of the export (by default
            they are exported where the target has them: DeepSeek-V3's extra layers).
        serve: refit a running vLLM server with the converted tensors at saves (a mapping
            ``{url: "http://HOST:PORT", every_n_saves: 1, timeout_s: 300}`` or
            `serve.options.ServeOptions`); with it, ``formats`` may be empty (only the manifest
            recording the refit is written).
    """

    output_dir: str = "exports"
    formats: list = field(default_factory=lambda: ["hf", "trtllm_checkpoint"])
    dtype: str = "bfloat16"
    inference_tp: int = 1
    inference_pp: int = 1
    inference_moe_tp: Optional[int] = None
    inference_moe_ep: Optional[int] = None
    vocab_size: Optional[int] = None
    every_n_saves: int = 1
    family: str = "auto"
    max_shard_size: Union[int, str] = "5GB"
    split_rows_over: Union[int, str, None] = "auto"
    tokenizer_dir: Optional[str] = None
    eod_token_id: Optional[int] = None
    strict: bool = False
    check_finite: bool = True
    timeout_s: int = 600
    mode: Optional[str] = None
    busy_policy: str = "skip"
    keep_last: Optional[int] = None
    build: Union[BuildOptions, dict, None] = None
    quantization: Union[QuantSpec, dict, None] = None
    drop_mtp: bool = False
    verification: Union[VerificationOptions, dict, None] = None
    serve: Union[ServeOptions, dict, str, None] = None
    recipe: Optional[str] = None
    max_shard_size_bytes: int = field(init=False, repr=False, compare=False)  # max_shard_size, parsed
    split_rows_over_bytes: Optional[int] = field(init=False, repr=False, compare=False)  # None: off or "auto"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field and normalize it to its typed value (idempotent); raise ConfigError
        naming the field and the fix."""
        source = f" (from {self.recipe})" if self.recipe else ""
        hints = typing.get_type_hints(ExportConfig)
        for f in dataclasses.fields(self):
            if f.init and f.name not in _OWN_TYPE_CHECK:
                _check_type(f.name, getattr(self, f.name), hints[f.name], source)
        if isinstance(self.formats, str):
            self._set("formats", [self.formats])
        elif not isinstance(self.formats, list):
            self._set("formats", list(self.formats))
        serving = ServeOptions.from_dict(self.serve, f"serve{source}").enabled  # checked in full below
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not (self.formats or serving):
            raise ConfigError(
                f"formats{source}: unknown format(s) {unknown or self.formats}; "
                f"choose one or more of {list(FORMATS)}"
                + ("" if unknown else " (or set serve: to only refit a server)"))
        if len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"formats{source}: {self.formats} names a format twice")
        if "trtllm_engine" in self.formats and "trtllm_checkpoint" not in self.formats:
            raise ConfigError(f"formats{source}: trtllm_engine is built from the TensorRT-LLM checkpoint; "
                              "add trtllm_checkpoint to formats")
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"mode{source}: unknown mode {short_repr(self.mode)}; choose one of {list(MODES)}")
        if self.busy_policy not in BUSY_POLICIES:
            raise ConfigError(f"busy_policy{source}: unknown policy {short_repr(self.busy_policy)}; choose one of "
                              f"{list(BUSY_POLICIES)}")
        for name, options in SECTIONS.items():
            raw, where = getattr(self, name), f"{name}{source}"
            parsed = options.from_dict(raw, where)
            if parsed is raw:  # given already typed: checked here, as a mapping would be
                parsed.validate(where)
            self._set(name, parsed)
        refusal = self.quantization.refusal(self.formats)
        if refusal:  # a checkpoint no engine loads is never written
            raise ConfigError(f"quantization{source}: {refusal}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype{source}: unknown dtype {short_repr(self.dtype)}; choose one of {list(DTYPES)}")
        if self.family not in FAMILIES:
            raise ConfigError(f"family{source}: unknown family {short_repr(self.family)}; choose one of {list(FAMILIES)}")
        for name, upper in INT_RANGES.items():
            value = getattr(self, name)
            if value is not None and not 1 <= value <= upper:
                raise ConfigError(f"{name}{source}: must be between 1 and {upper}, got {short_repr(value)}")
        if self.serve.enabled and self.serve.every_n_saves % self.every_n_saves:
            raise ConfigError(f"serve.every_n_saves{source}: {self.serve.every_n_saves} is not a multiple of "
                              f"every_n_saves ({self.every_n_saves}); refits run at export saves: choose a multiple")
        if self.serve.enabled and self.serve.timeout_s >= self.timeout_s:
            # a rank waiting on the server holds up its peers' collectives: it must give up first
            raise ConfigError(f"serve.timeout_s{source}: {self.serve.timeout_s} s must be shorter than timeout_s "
                              f"({self.timeout_s} s), the export ranks' patience with each other; lower it or "
                              "raise timeout_s")
        self._set("max_shard_size_bytes", parse_size(self.max_shard_size, f"max_shard_size{source}"))
        self._set("split_rows_over_bytes", None if self.split_rows_over in (None, "auto")
                  else parse_size(self.split_rows_over, f"split_rows_over{source} (a size, \"auto\" or unset)"))
        self._set("output_dir", os.fspath(self.output_dir))
        if not self.output_dir:
            raise ConfigError(f"output_dir{source}: must not be empty")
        self._check_tokenizer(source)

    def _check_tokenizer(self, source: str) -> None:
        """The cheap checks; the tokenizer itself is loaded and checked at attach (`tokenizer.read`)."""
        if self.tokenizer_dir is not None:
            self._set("tokenizer_dir", os.fspath(self.tokenizer_dir))
            if not Path(self.tokenizer_dir).is_dir():
                raise ConfigError(f"tokenizer_dir{source}: {self.tokenizer_dir!r} is not a directory; give the "
                                  "directory the training tokenizer was saved to (save_pretrained)")
            if not any((Path(self.tokenizer_dir) / name).is_file() for name in TOKENIZER_FILES):
                raise ConfigError(f"tokenizer_dir{source}: {self.tokenizer_dir!r} holds no tokenizer file (none of "
                                  f"{', '.join(TOKENIZER_FILES[:5])}, ...); give the directory the training "
                                  "tokenizer was saved to (save_pretrained)")
        elif self.eod_token_id is not None:
            raise ConfigError(f"eod_token_id{source}: is written beside the tokenizer's ids; set tokenizer_dir too "
                              "(or leave eod_token_id unset)")
        if self.eod_token_id is not None and self.eod_token_id < 0:
            raise ConfigError(f"eod_token_id{source}: must be a token id (>= 0), got {self.eod_token_id}")

    def _set(self, name: str, value: Any) -> None:
        """Store a parsed value while validating (the config is frozen to every other writer)."""
        object.__setattr__(self, name, value)

    def check_output_dir_writable(self) -> Path:
        """Create ``output_dir`` if needed and prove that files can be written there."""
        import uuid

        from .safe_fs import unlink_name, write_bytes

        root = Path(self.output_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not root.is_dir():
                raise NotADirectoryError(20, "not a directory", str(root))
            probe = root / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            write_bytes(probe, b"ok", fsync=False)  # never through a link planted under the root
            unlink_name(probe)
        except OSError as exc:
            raise ConfigError(
                f"output_dir: cannot write to {str(root)!r} ({exc.strerror or exc}); "
                "choose a writable directory or fix its permissions") from exc
        return root

    # ------------------------------------------------------------------ recipes
    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "ExportConfig":
        """Load a recipe (YAML, parsed with ``safe_load``): a file, or the name of a shipped recipe
        (`megatron_trt_ext.recipes`); keyword arguments override it."""
        path = recipes.resolve(path)
        try:
            data = load_recipe_yaml(path.read_text(), str(path))
        except OSError as exc:
            fix = f"; {recipes.describe_missing(path)}" if not path.exists() else (
                "; give the path of a YAML recipe file you can read")
            raise ConfigError(f"recipe {str(path)!r}: cannot read it ({exc.strerror or exc}){fix}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {str(path)!r}: the top level must be a mapping of option: value")
        return cls.from_dict(data, source=str(path), **overrides)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>", **overrides: Any) -> "ExportConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init} - {"recipe"}
        reject_unknown_keys(list(data) + list(overrides), known, source)
        merged = {**data, **overrides}
        return cls(**merged, recipe=source)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        for name in SECTIONS:
            out[name] = getattr(self, name).to_dict()
        return out


def _check_type(name: str, value: Any, hint: Any, source: str) -> None:
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin is typing.Union else (hint,)
    if value is None and type(None) in allowed:
        return
    for t in allowed:
        if t is Any:
            return
        base = typing.get_origin(t) or t
        if base is list and isinstance(value, (list, tuple, str)):
            return
        if base is bool and isinstance(value, bool):
            return
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if base is str and isinstance(value, (str, os.PathLike)):
            return
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{name}{source}: expected {names}, got {type(value).__name__} {short_repr(value)}")


def load_recipe_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` that also refuses duplicate keys (the later one would silently win)
    and anchors/aliases (a few nested aliases expand into gigabytes: a recipe writes values out)."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ConfigError(f"recipe {source!r} line {mark.line + 1}: YAML aliases (*name) are not "
                                  "allowed in recipes; write the value out")
            event = self.peek_event()
            if getattr(event, "anchor", None):
                raise ConfigError(f"recipe {source!r} line {event.start_mark.line + 1}: YAML anchors (&name) "
                                  "are not allowed in recipes; write the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise ConfigError(f"recipe {source!r} line {key_node.start_mark.line + 1}: key "
                                      f"{short_repr(key)} appears twice; keep one")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {source!r}: not valid YAML: {exc}") from exc
