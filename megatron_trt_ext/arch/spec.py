"""Transform kinds and the `ArchSpec` record that a family file fills in.

A family is a table: Megatron global names (``{L}`` stands for the global layer number) mapped
to Hugging Face names by small named transforms. The conversion engine in `arch.convert` never
asks which family it runs.

Every transform declares both directions next to each other: ``apply`` (one Megatron tensor ->
its HF tensors) and ``inverse`` (the HF tensors -> that Megatron tensor, full and unsharded), so
each table reads an HF checkpoint back (`arch.inverse`) and is round-trip tested as a whole.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .. import layouts
from .conditions import ALWAYS, EVERY_LAYER, NEVER, Condition, Layers

# Megatron's global names of one layer ({L}: the global layer number), its attention and MLP, and one
# of its experts after the plan's expansion (the layout shared by SequentialMLP and grouped experts).
MEGATRON_LAYER = "decoder.layers.{L}"
MEGATRON_ATTENTION = f"{MEGATRON_LAYER}.self_attention"
MEGATRON_MLP = f"{MEGATRON_LAYER}.mlp"
MEGATRON_EXPERT = f"{MEGATRON_MLP}.experts.experts.{{E}}"


@dataclass(frozen=True)
class Context:
    """Facts a transform may need: the model's shape and the export vocabulary size."""

    info: "object"  # ModelInfo (kept untyped to avoid an import cycle)
    vocab_size: int


@functools.lru_cache(maxsize=None)  # a few hundred templates; asked for thousands of times per export
def _pattern(template: str, parts: tuple = ()) -> re.Pattern:
    """``{L}`` matches a layer number, ``{E}`` an expert number, ``{P}`` one of ``parts``."""
    body = re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    if parts:
        body = body.replace(r"\{P\}", "(?P<P>" + "|".join(re.escape(p) for p in parts) + ")")
    return re.compile("^" + body + "$")


@dataclass(frozen=True)
class Transform:
    """Base of every table row: ``src`` is a Megatron name template; ``on`` the layers it
    applies to (`conditions.Layers`); ``when`` the models that have its source tensor
    (`conditions.Condition`, tested on `ModelInfo`)."""

    src: str
    on: Layers = EVERY_LAYER
    when: Condition = ALWAYS

    def layers(self, info) -> list:
        """The target layers whose sources this transform expects."""
        return self.on.select(info)

    def matches(self, name: str) -> Optional[dict]:
        m = _pattern(self.src).match(name)
        return m.groupdict() if m else None

    def apply(self, tensor: torch.Tensor, groups: dict, ctx: Context) -> Iterator[tuple]:
        raise NotImplementedError

    def inverse(self, hf, groups: dict, ctx: Context) -> torch.Tensor:
        """The Megatron tensor ``src`` (filled with ``groups``) from the HF tensors ``hf`` (a
        mapping name -> tensor): the inverse of ``apply``, in the HF tensors' dtype."""
        raise NotImplementedError


def _hf(hf, template: str, groups: dict) -> torch.Tensor:
    name = _fill(template, groups)
    try:
        return hf[name]
    except KeyError:
        raise KeyError(f"the HF checkpoint has no tensor {name!r}") from None


def _fill(template: str, groups: dict) -> str:
    return (template.replace("{L}", groups.get("L") or "").replace("{E}", groups.get("E") or "")
            .replace("{P}", groups.get("P") or ""))


@dataclass(frozen=True)
class Rename(Transform):
    """One tensor to one tensor. ``transpose`` for Conv1D-style targets ([in, out])."""

    dst: str = ""
    transpose: bool = False

    def apply(self, tensor, groups, ctx):
        yield _fill(self.dst, groups), (tensor.t() if self.transpose else tensor)

    def inverse(self, hf, groups, ctx):
        tensor = _hf(hf, self.dst, groups)
        return tensor.t() if self.transpose else tensor


@dataclass(frozen=True)
class Vocab(Transform):
    """Vocab-parallel table ([V_pad, H]): trim Megatron's padding rows to the real vocabulary.
    ``mtp_copies``: names (``{L}`` = each MTP layer) under which the table is also written, for
    targets whose MTP layers carry their own copy of the shared embedding or output head."""

    dst: str = ""
    mtp_copies: tuple = ()

    def apply(self, tensor, groups, ctx):
        trimmed = layouts.trim_rows(tensor, ctx.vocab_size)
        yield _fill(self.dst, groups), trimmed
        for template in self.mtp_copies:
            for layer, kind in enumerate(ctx.info.layer_symbols):
                if kind.islower():
                    yield template.replace("{L}", str(layer)), trimmed

    def inverse(self, hf, groups, ctx):
        """Re-padded to Megatron's padded vocabulary with zero rows: the padding rows are not in
        the HF checkpoint, so a round trip is exact on the real rows only. Copies (``mtp_copies``)
        present in ``hf`` must equal the table: Megatron holds one."""
        table = _hf(hf, self.dst, groups)
        for template in self.mtp_copies:
            for layer, kind in enumerate(ctx.info.layer_symbols):
                name = template.replace("{L}", str(layer))
                if kind.islower() and name in hf and not torch.equal(hf[name], table):
                    raise ValueError(f"HF tensor {name!r} differs from {_fill(self.dst, groups)!r}: Megatron's "
                                     "multi-token-prediction layers share that one table")
        return layouts.pad_rows_to(table, ctx.info.padded_vocab_size)


@dataclass(frozen=True)
class QKV(Transform):
    """Megatron per-group interleaved QKV -> separate q, k, v projections."""

    q: str = ""
    k: str = ""
    v: str = ""

    def apply(self, tensor, groups, ctx):
        info = ctx.info
        q, k, v = layouts.qkv_interleaved_to_split(
            tensor, info.num_attention_heads, info.num_query_groups, info.head_dim)
        yield _fill(self.q, groups), q
        yield _fill(self.k, groups), k
        yield _fill(self.v, groups), v

    def inverse(self, hf, groups, ctx):
        info = ctx.info
        return layouts.qkv_split_to_interleaved(_hf(hf, self.q, groups), _hf(hf, self.k, groups),
                                                _hf(hf, self.v, groups), info.num_attention_heads,
                                                info.num_query_groups, info.head_dim)


@dataclass(frozen=True)
class FusedQKV(Transform):
    """Megatron interleaved QKV -> one fused [Q|K|V] tensor (GPT-2's c_attn), optionally transposed."""

    dst: str = ""
    transpose: bool = False

    def apply(self, tensor, groups, ctx):
        info = ctx.info
        fused = torch.cat(layouts.qkv_interleaved_to_split(
            tensor, info.num_attention_heads, info.num_query_groups, info.head_dim), dim=0)
        yield _fill(self.dst, groups), (fused.t() if self.transpose else fused)

    def inverse(self, hf, groups, ctx):
        info = ctx.info
        fused = _hf(hf, self.dst, groups)
        q, k, v = layouts.fused_qkv_to_split(fused.t() if self.transpose else fused, info.num_attention_heads,
                                             info.num_query_groups, info.head_dim)
        return layouts.qkv_split_to_interleaved(q, k, v, info.num_attention_heads, info.num_query_groups,
                                                info.head_dim)


@dataclass(frozen=True)
class GatedMLP(Transform):
    """Gated fc1 [gate; up] -> gate_proj (the activated half) and up_proj."""

    gate: str = ""
    up: str = ""

    def apply(self, tensor, groups, ctx):
        gate, up = layouts.gated_to_gate_up(tensor)
        yield _fill(self.gate, groups), gate
        yield _fill(self.up, groups), up

    def inverse(self, hf, groups, ctx):
        return layouts.gate_up_to_gated(_hf(hf, self.gate, groups), _hf(hf, self.up, groups))


@dataclass(frozen=True)
class Concat(Transform):
    """Several source tensors (``src`` with ``{P}`` = each of ``parts``) -> one, concatenated in
    ``parts`` order along ``dim``. Megatron saves some fused tensors as separate components (a
    Mamba mixer's in_proj as z, x, B, C, dt; its conv1d as x, B, C) because each TP rank holds a
    slice of every component; the target stores the fused tensor. The parts are buffered in
    ``pending`` until the last arrives; the plan gives them one writer (`unit_group`).
    ``sizes``: (ModelInfo) -> each part's size along ``dim``, which the inverse splits by."""

    dst: str = ""
    parts: tuple = ()
    dim: int = 0
    sizes: Optional[Callable] = None

    def matches(self, name: str) -> Optional[dict]:
        m = _pattern(self.src, self.parts).match(name)
        return m.groupdict() if m else None

    def matches_whole(self, name: str) -> Optional[dict]:
        """The whole tensor's name (``src`` without its ``.{P}``): what statistics of the
        concatenated linear are named after (`quant.calibrate.linear_of`)."""
        if not self.src.endswith(".{P}"):
            return None
        m = _pattern(self.src[: -len(".{P}")]).match(name)
        return m.groupdict() if m else None

    def group(self, groups: dict) -> str:
        return _fill(self.dst, groups)

    def apply(self, tensor, groups, ctx, pending=None):
        if pending is None:
            raise ValueError(f"{self.dst}: a concatenation needs the conversion's pending buffer")
        key = self.group(groups)
        got = pending.setdefault(key, {})
        got[groups["P"]] = tensor
        if len(got) == len(self.parts):
            del pending[key]
            yield key, torch.cat([got[p] for p in self.parts], dim=self.dim)

    def inverse(self, hf, groups, ctx):
        if self.sizes is None:
            raise ValueError(f"{self.dst}: a concatenation needs its part sizes to be split")
        sizes = tuple(self.sizes(ctx.info))
        whole = _hf(hf, self.dst, groups)
        if sum(sizes) != whole.shape[self.dim]:
            raise ValueError(f"HF tensor {_fill(self.dst, groups)!r}: dim {self.dim} is {whole.shape[self.dim]}, "
                             f"the parts {dict(zip(self.parts, sizes))} add up to {sum(sizes)}")
        index = self.parts.index(groups["P"])
        return whole.narrow(self.dim, sum(sizes[:index]), sizes[index])


@dataclass(frozen=True)
class StackExperts(Transform):
    """Every expert of one layer (``src`` with ``{E}``) -> one stacked tensor [E, ...], for targets
    that store a layer's experts fused (GPT-OSS). ``interleave``: the gated halves [gate; up] of
    each expert become interleaved rows (gate0, up0, gate1, up1, ...); ``transpose``: each expert
    is stored [in, out]. The experts of a layer share one writer (`plan.expert_group`)."""

    dst: str = ""
    interleave: bool = False
    transpose: bool = False

    def group(self, groups: dict) -> str:
        return _fill(self.dst, groups)

    def apply(self, tensor, groups, ctx, pending=None):
        if pending is None:
            raise ValueError(f"{self.dst}: stacking experts needs the conversion's pending buffer")
        key = self.group(groups)
        got = pending.setdefault(key, {})
        got[int(groups["E"])] = tensor
        if len(got) < ctx.info.num_experts:
            return
        del pending[key]
        experts = []
        for e in range(ctx.info.num_experts):
            t = layouts.interleave_gate_up(got[e]) if self.interleave else got[e]
            experts.append(t.t() if self.transpose and t.dim() == 2 else t)
        yield key, torch.stack(experts)

    def inverse(self, hf, groups, ctx):
        t = _hf(hf, self.dst, groups)[int(groups["E"])]
        if self.transpose and t.dim() == 2:
            t = t.t()
        return layouts.deinterleave_gate_up(t) if self.interleave else t


@dataclass(frozen=True)
class Drop(Transform):
    """Intentionally not exported."""

    when: Condition = NEVER

    def apply(self, tensor, groups, ctx):
        return iter(())

    def inverse(self, hf, groups, ctx):
        raise ValueError(f"{self.src}: not exported, so it cannot be read back")


@dataclass(frozen=True)
class ArchSpec:
    """One architecture family, as data.

    Args:
        name: family name (``ExportConfig.family``).
        requires: feature -> allowed values; a model matches when every feature is allowed.
        mappings: the transforms, Megatron name -> HF names.
        aliases: other Megatron spellings (local-spec norms ...) -> the canonical (TE) spelling.
        hf_config: builds the HF ``config.json`` dict from (ModelInfo, Context, torch dtype name).
        trtllm: builds the TensorRT-LLM family description (see `formats.trtllm`).
        trtllm_unsupported: for models TensorRT-LLM's checkpoint format cannot hold, the reason
            (the TensorRT-LLM formats are then refused at attach).
    """

    name: str
    requires: dict
    mappings: tuple
    hf_config: Callable
    trtllm: Callable
    aliases: dict = field(default_factory=dict)
    checks: tuple = ()
    # (info) -> None when TensorRT-LLM (<= 1.2) has this model, else the reason it has not.
    trtllm_unsupported: Optional[Callable] = None
    # None when quantized exports are supported, else why not
    quantization_unsupported: Optional[str] = None
    # calibration kind (`QuantSpec.calibration_kind`: max, smoothquant, awq) -> why this family's
    # recipes of that kind are refused
    calibration_unsupported: dict = field(default_factory=dict)
    # format -> why quantized exports of this family are refused in that format (others are written)
    quantized_formats_unsupported: dict = field(default_factory=dict)
    # the HF class stores every linear transposed ([in, out]: GPT-2's Conv1D); quantized linears
    # are quantized, scaled and placed in Linear layout ([out, in]), as ModelOpt does
    conv1d_linears: bool = False
    # HF names (regular expressions) kept in float32 whatever the export dtype (MoE routers)
    keep_fp32: tuple = ()
    # Megatron linears of one layer (name suffixes) that read the same input and that serving
    # engines fuse, so they share a per-tensor weight scale (ModelOpt unifies NVFP4's scale_2
    # over them): DeepSeek's q_a_proj and kv_a_proj_with_mqa
    shared_input_linears: tuple = ()

    def mismatches(self, features: dict) -> list:
        out = []
        for feature, allowed in self.requires.items():
            value = features.get(feature)
            if value not in allowed:
                out.append((feature, value, sorted(map(str, allowed))))
        if any(feature == "moe" for feature, _, _ in out):  # MoE details only matter for MoE
            out = [m for m in out if not m[0].startswith("moe_")]
        return out


def no_trtllm(info) -> dict:
    """`ArchSpec.trtllm` of a family TensorRT-LLM has no engine for (see ``trtllm_unsupported``)."""
    return {}


def unit_group(spec: ArchSpec, name: str) -> Optional[str]:
    """Source tensors that must be converted on one rank: the parts of a `Concat`, the experts
    of a layer that `StackExperts` stacks into one HF tensor."""
    for transform in spec.mappings:
        if isinstance(transform, (Concat, StackExperts)):
            groups = transform.matches(name)
            if groups is None and isinstance(transform, Concat):
                groups = transform.matches_whole(name)
            if groups is not None:
                return transform.group(groups)
    return None
