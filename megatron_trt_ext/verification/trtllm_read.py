"""`verify`'s exact weight check of the TensorRT-LLM checkpoint (``trtllm_checkpoint/``).

The rank files are read back into HF-named tensors (`TrtllmAsHF`: the per-rank TP split, the
TensorRT-LLM names, fused q|k|v and [up; gate] experts, the vocabulary padding, transposes and
``+1`` norms undone with the inverses declared beside each layout in `formats.trtllm_layouts`;
quantized linears dequantized per rank with their own scales, as `exact._Dequantized` does for
hf/), then into Megatron tensors through the same family inverse table as hf/
(`arch.inverse.hf_to_megatron`), and compared with the fingerprints recorded at export
(`verification.fingerprint`). So a swapped row in one rank's qkv, a wrong split between ranks, a
replicated tensor that differs on one rank or a scale on the wrong linear fails, naming the
Megatron tensor, its row and the TensorRT-LLM tensors it was read from.

Exact bit for bit, except ``+1`` norms (within the checkpoint dtype's rounding of ``w + 1``) and
quantized linears (within the format's rounding, `fingerprint.quant_bound`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import ExportError
from ..formats.trtllm_layouts import (LAYOUTS, OP_ROUNDED, expert_place, invert_op, unplace,
                                      unplace_expert)
from . import fingerprint as fp

TRT_DIR = "trtllm_checkpoint"
CHECK = "trtllm weights"
# weight-side scales: TensorRT-LLM suffix -> the HF one `quant.dequant.dequantize_weight` reads
# (inverse of ``TrtllmConverter._TRT_SCALE``; FP8 per-channel scales are ``per_channel_scale``)
_HF_SCALE = {"weights_scaling_factor": "weight_scale", "per_channel_scale": "weight_scale",
             "weights_scaling_factor_2": "weight_scale_2"}


class RankFiles:
    """The ``rank{N}.safetensors`` of a checkpoint, each tensor read when asked for."""

    def __init__(self, path: Path, world: int):
        from safetensors import safe_open

        missing = [f"rank{r}.safetensors" for r in range(world) if not (path / f"rank{r}.safetensors").is_file()]
        if missing:
            raise ExportError(f"{path}: missing {missing} (config.json's mapping has {world} ranks)")
        self.handles = [safe_open(str(path / f"rank{r}.safetensors"), framework="pt") for r in range(world)]
        self.names = [set(h.keys()) for h in self.handles]

    def has(self, rank: int, name: str) -> bool:
        return name in self.names[rank]

    def get(self, rank: int, name: str) -> torch.Tensor:
        if name not in self.names[rank]:
            raise KeyError(f"rank{rank}.safetensors has no tensor {name!r}")
        return self.handles[rank].get_tensor(name)


class TrtllmAsHF:
    """The HF tensors (HF names and layout) a TensorRT-LLM checkpoint was made from, looked up by
    name as `arch.inverse.hf_to_megatron` reads them. Per lookup it notes what the value's
    exactness depends on: ``algos`` (quant_algos dequantized), ``rounded`` (an op inverted within
    the dtype's rounding), ``sources`` (TensorRT-LLM names and ranks read); reset them per unit.

    ``tied_head``: the embedding is read from the lm_head copy TensorRT-LLM writes for tied
    embeddings (so that copy is checked too)."""

    def __init__(self, path: Path, family: dict, info, vocab_size: int, hf_dtype, keep_fp32=(),
                 tied_head: bool = False):
        config = json.loads((path / "config.json").read_text())
        mapping = config["mapping"]
        self.tp, self.pp = int(mapping["tp_size"]), int(mapping["pp_size"])
        self.moe_ep = int(mapping.get("moe_ep_size", 1))
        self.moe_tp = int(mapping.get("moe_tp_size", self.tp // self.moe_ep))
        self.quant_algo = (config.get("quantization") or {}).get("quant_algo")
        self.table = LAYOUTS[family["layout"]]
        self.layer_re = re.compile("^" + re.escape(self.table["layer_prefix"]) + r"(\d+)\.(.+)$")
        self.info, self.vocab_size, self.hf_dtype, self.keep_fp32 = info, vocab_size, hf_dtype, keep_fp32
        self.layers_per_stage = info.num_layers // self.pp
        self.tied_head = tied_head
        self.files = RankFiles(path, self.tp * self.pp)
        self.reset()

    def reset(self) -> None:
        self.algos, self.rounded, self.sources = [], False, {}

    # ------------------------------------------------------------------ names
    def _locate(self, hf_name: str) -> tuple:
        """(stage, TensorRT-LLM name, kind, op, (expert, role) or None) of one HF tensor: the
        forward's naming (``TrtllmConverter.feed``) read backwards. KeyError when it has none."""
        m = self.layer_re.match(hf_name)
        if m is None:
            entry = self.table["global"].get(hf_name)
            if entry is None:
                raise KeyError(f"TensorRT-LLM layout has no tensor for HF {hf_name!r}")
            name, kind, op = entry
            last = self.pp - 1
            if kind == "embedding" and self.tied_head:
                return last, "lm_head.weight", "lm_head", op, None
            return (0 if kind in ("embedding", "first") else last), name, kind, op, None
        layer, suffix = int(m.group(1)), m.group(2)
        stage, local = divmod(layer, self.layers_per_stage)
        prefix = f"transformer.layers.{local}."
        experts = self.table.get("experts")
        em = experts.match(suffix) if experts is not None else None
        if em is not None:
            role = self.table.get("expert_roles", {}).get(em.group(2), em.group(2))
            name = prefix + ("mlp.proj.weight" if role == "w2" else "mlp.fc.weight")
            return stage, name, "expert", None, (int(em.group(1)), role)
        entry = self.table["layer"].get(suffix)
        if entry is None:
            raise KeyError(f"TensorRT-LLM layout has no tensor for HF {hf_name!r}")
        name, kind, op = entry
        return stage, prefix + name, kind, op, None

    def __contains__(self, hf_name) -> bool:
        try:
            stage, name, *_ = self._locate(hf_name)
        except KeyError:
            return False
        return self.files.has(stage * self.tp, name)

    # ------------------------------------------------------------------ tensors
    def __getitem__(self, hf_name: str) -> torch.Tensor:
        stage, name, kind, op, expert = self._locate(hf_name)
        first = stage * self.tp
        try:
            if expert is not None:
                ranks, local = expert_place(self.info, expert[0], self.moe_tp, self.moe_ep)
                ranks = [first + r for r in ranks]
                tensor = unplace_expert(expert[1], [self._read(r, name, local) for r in ranks])
            else:
                ranks = range(first, first + self.tp)
                which = kind if kind in ("q", "k", "v") else ""
                tensor = unplace("qkv" if which else kind, [self._read(r, name) for r in ranks], self.info,
                                 self.vocab_size, which)
        except (ValueError, RuntimeError, IndexError) as exc:  # the rank files do not fit the model
            raise ValueError(f"{name} (ranks {first}-{first + self.tp - 1}): {exc}") from None
        self.sources.setdefault(name, set()).update(ranks)
        if op in OP_ROUNDED:
            self.rounded = True
        tensor = invert_op(tensor, op)
        if kind == "router" and not any(re.search(p, hf_name) for p in self.keep_fp32):
            tensor = tensor.to(self.hf_dtype)  # float32 in TensorRT-LLM only; hf/ holds the export dtype
        return tensor

    def _read(self, rank: int, name: str, expert=None) -> torch.Tensor:
        """One rank's tensor (``expert``: one expert of a stack), dequantized with its own scales
        when it is quantized. Not times its pre-quant scale: SmoothQuant/AWQ export the weights
        of the calibration replica ModelOpt rescaled (`Exporter`), and the fingerprints are of
        those; the pre-quant scale undoes the rescaling on the input side at run time."""
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        scale_keys = [k for k in _HF_SCALE if module is not None and self.files.has(rank, f"{module}.{k}")]
        pick = (lambda t: t[expert]) if expert is not None else (lambda t: t)
        weight = pick(self.files.get(rank, name))
        if not scale_keys:
            return weight
        from ..quant.dequant import dequantize_weight

        algo = self.quant_algo
        if not algo or algo == "MIXED_PRECISION":
            raise ValueError(f"{name} on rank {rank} has scales but config.json's quant_algo is {algo!r}")
        if weight.dtype == torch.int8 and algo in ("W4A16_AWQ", "W4A8_AWQ"):
            weight = weight.view(torch.uint8)  # packed int4, stored int8 for TensorRT-LLM's repacking
        parts = {"m.weight": weight, **{f"m.{_HF_SCALE[k]}": pick(self.files.get(rank, f"{module}.{k}"))
                                        for k in scale_keys}}
        self.algos.append(algo)
        return dequantize_weight(algo, parts, "m")

    def describe(self) -> str:
        """The TensorRT-LLM tensors of the last lookups, with their ranks."""
        return ", ".join(f"{n} (rank{'s' if len(r) > 1 else ''} {','.join(map(str, sorted(r)))})"
                         for n, r in sorted(self.sources.items()))


def _within_rounding(name: str, recorded: tuple, tensor: torch.Tensor, dtype: torch.dtype):
    """None when ``tensor`` (``w`` from a stored ``w + 1``) has the recorded fingerprint up to
    the rounding of ``w + 1`` to ``dtype``: each element off by at most u * |w + 1| <= u * (|w| + 1)
    (u the unit roundoff; 2u allowed for the float32 arithmetic), each entry by that times its
    vector's weights. Else what differs."""
    rows, cols = recorded
    u = torch.finfo(dtype).eps / 2
    got_rows, got_cols = fp.fingerprint(name, tensor)
    mag_rows, mag_cols = fp._magnitudes(name, tensor.double().abs() + 1.0, weights_sq=False)
    for label, want, got, mag in (("row", rows, got_rows, mag_rows), ("column", cols, got_cols, mag_cols)):
        problem = fp.entries_differ(label, want, got, (2 * u + fp.EXACT_REL) * mag, f" beyond the {dtype} rounding of w + 1")
        if problem:
            return problem
    return None


def _compare(name: str, recorded: tuple, tensor: torch.Tensor, reader: TrtllmAsHF, trt_dtype: torch.dtype):
    rel, gain = fp.quant_bound(reader.algos)
    problem = fp.compare(name, recorded, tensor, rel, gain)
    if problem is None or not reader.rounded or reader.algos or "shape" in problem or isinstance(recorded, fp.Hashes):
        return problem
    return _within_rounding(name, recorded, tensor, trt_dtype)


def check_trtllm_weights(report, export: Path, manifest: dict, recorded: dict, spec, ctx) -> None:
    """The "trtllm weights" check (module docstring): every fingerprinted Megatron tensor rebuilt
    from trtllm_checkpoint/, and for tied embeddings also from TensorRT-LLM's lm_head copy."""
    from ..arch.convert import find_transform
    from ..arch.inverse import hf_to_megatron
    from ..arch.spec import Vocab
    from ..plan import torch_dtype

    path = export / TRT_DIR
    dtype = torch_dtype(manifest.get("dtype", "bfloat16"))
    try:
        trt_dtype = torch_dtype(json.loads((path / "config.json").read_text())["dtype"])
        readers = [TrtllmAsHF(path, spec.trtllm(ctx.info), ctx.info, ctx.vocab_size, dtype, spec.keep_fp32)]
        if ctx.info.tied_embeddings:
            readers.append(TrtllmAsHF(path, spec.trtllm(ctx.info), ctx.info, ctx.vocab_size, dtype, spec.keep_fp32,
                                      tied_head=True))
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is a failed check, not a crash
        report.check(CHECK, False, f"{TRT_DIR}/ cannot be read back: {type(exc).__name__}: {str(exc)[:300]}")
        return
    failures, compared, rounded, copies = [], 0, set(), 0
    for name, value in sorted(recorded.items()):
        is_vocab = isinstance(find_transform(spec, name)[0], Vocab)
        for reader in readers if is_vocab else readers[:1]:
            reader.reset()
            copy = " (from the tied lm_head copy)" if reader.tied_head else ""
            try:
                tensor = hf_to_megatron(spec, ctx, reader, strict=False, only={name})[name]
            except (ExportError, KeyError) as exc:
                failures.append(f"{name}{copy}: cannot be rebuilt from {TRT_DIR}/ ({exc})")
                continue
            problem = _compare(name, value, fp.vocab_rows(spec, ctx, name, tensor), reader, trt_dtype)
            compared += not reader.tied_head
            copies += reader.tied_head
            if reader.rounded and not reader.algos:
                rounded.add(name)
            if problem:
                failures.append(f"{name}{copy}: {problem} [read from {reader.describe()}]")
    quantized = readers[0].quant_algo
    skipped = (manifest.get("fingerprints") or {}).get("skipped") or {}
    note = f"; {len(skipped)} not fingerprinted: {sorted(skipped)[:3]}" if skipped else ""
    report.check(CHECK, not failures, "; ".join(failures[:6]) + (f" ... ({len(failures)} tensors)" if
                                                                   len(failures) > 6 else "") if failures else
                 f"{compared} Megatron tensors rebuilt from {TRT_DIR}/ ({readers[0].tp * readers[0].pp} rank files"
                 f"{', the tied lm_head copy too' if copies else ''}) match their export fingerprints"
                 f"{' within the quantization rounding' if quantized else ' exactly'}"
                 f"{f' ({len(rounded)} norms stored as w + 1: within its {trt_dtype} rounding)' if rounded else ''}"
                 f"{note}")
