"""The exact checks of `verify`, which need no forward pass and no luck in the weights:

* weights: every Megatron source tensor, rebuilt from ``hf/`` through the family's inverse table
  (`arch.inverse.hf_to_megatron`; quantized linears dequantized with their own scales), against
  the fingerprint recorded at export (`verification.fingerprint`), per tensor;
* trtllm weights: the same for ``trtllm_checkpoint/``, read back through the inverse of each
  TensorRT-LLM layout first (`verification.trtllm_read`);
* config: ``hf/config.json`` against the config the family derives from the Megatron facts the
  export recorded (``model_info`` in the manifest: rope base and scaling, norm kind and eps,
  window, activation, tied embeddings, MoE routing ...), key by key.

Exports made before these records existed are reported as not checked, never as failures.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from ..tokenizer import manifest_ids
from . import fingerprint as fp
from .trtllm_read import CHECK as TRT_CHECK
from .trtllm_read import TRT_DIR, check_trtllm_weights

MODEL_INFO = "model_info"
_NO_VALUE = object()


# ---------------------------------------------------------------------- the recorded facts
def info_record(info) -> dict:
    """`ModelInfo` as JSON-able data (what the inverse tables and `hf_config` read)."""
    return dataclasses.asdict(info)


def info_from_record(record: dict):
    """The `ModelInfo` an export recorded with `info_record`."""
    from ..facts import MambaFacts, MLAFacts, MoEFacts, YarnFacts
    from ..model_info import ModelInfo

    names = {f.name for f in dataclasses.fields(ModelInfo)}
    kw = {k: v for k, v in record.items() if k in names}
    for key, cls in (("moe", MoEFacts), ("mamba", MambaFacts), ("yarn", YarnFacts)):
        if kw.get(key) is not None:
            kw[key] = cls(**kw[key])
    if kw.get("mla") is not None:
        mla = dict(kw["mla"])
        mla["yarn"] = YarnFacts(**mla["yarn"]) if mla.get("yarn") is not None else YarnFacts()
        kw["mla"] = MLAFacts(**mla)
    return ModelInfo(**kw)


def _family(manifest: dict):
    """(spec, ctx) of the export, from its manifest; None when it recorded no facts."""
    from ..arch import FAMILIES
    from ..arch.spec import Context

    record = manifest.get(MODEL_INFO)
    if not record or manifest.get("family") not in FAMILIES:
        return None
    info = info_from_record(record)
    return FAMILIES[manifest["family"]], Context(info=info, vocab_size=int(manifest["vocab_size"]))


# ---------------------------------------------------------------------- config
def config_mismatches(expected, actual, prefix: str = "") -> list:
    """Dotted keys where ``actual`` (config.json) differs from ``expected``, with both values."""
    out = []
    for key in sorted(set(expected) | set(actual), key=str):
        want, got = expected.get(key, _NO_VALUE), actual.get(key, _NO_VALUE)
        where = f"{prefix}{key}"
        if isinstance(want, dict) and isinstance(got, dict):
            out += config_mismatches(want, got, where + ".")
        elif want is _NO_VALUE:
            out.append(f"{where}: in config.json ({got!r}), not derived from the model")
        elif got is _NO_VALUE:
            out.append(f"{where}: missing (the model gives {want!r})")
        elif want != got:
            out.append(f"{where}: config.json has {got!r}, the model's recorded facts give {want!r}")
    return out


def check_config(report, export: Path, manifest: dict) -> None:
    found = _family(manifest)
    path = export / "hf" / "config.json"
    if found is None or not path.is_file():
        report.check("config", None, "not checked: " + ("no hf/config.json" if found else
                                                        "no Megatron facts recorded (an export made before they were)"))
        return
    spec, ctx = found
    actual = json.loads(path.read_text())
    actual.pop("quantization_config", None)
    expected = json.loads(json.dumps(spec.hf_config(ctx.info, ctx, manifest.get("dtype", "bfloat16"))))
    expected.update(manifest_ids(manifest))  # the tokenizer's special-token ids, where it has one
    problems = config_mismatches(expected, actual)
    report.check("config", not problems, "; ".join(problems) if problems else
                 f"{len(expected)} keys of hf/config.json match the facts of the {spec.name} model")


# ---------------------------------------------------------------------- weights
class _Dequantized(Mapping):
    """The HF tensors with quantized linears dequantized and the scale tensors hidden; ``algos``
    collects the quant_algo of every linear read. Not times their pre-quant scale: SmoothQuant/AWQ
    export the weights of the calibration replica ModelOpt rescaled, which the fingerprints
    describe (the pre-quant scale undoes the rescaling on the input side at run time)."""

    def __init__(self, hf: Mapping, quant: dict):
        from ..quant.dequant import SCALES

        self.hf, self.quant, self.algos = hf, quant, []
        self.names = [n for n in hf if not n.endswith(SCALES)]
        self._names = set(self.names)

    def __getitem__(self, name):
        from ..quant.dequant import _algo_of, dequantize_weight

        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is None or f"{module}.weight_scale" not in self.hf:
            return self.hf[name]
        algo = _algo_of(self.quant, module)
        parts = {k: self.hf[k] for k in (name, f"{module}.weight_scale", f"{module}.weight_scale_2") if k in self.hf}
        weight = dequantize_weight(algo, parts, module)
        self.algos.append(algo)
        return weight

    def __contains__(self, name):
        return name in self._names

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def check_weights(report, export: Path, manifest: dict) -> None:
    """The "weights" check of hf/ and the "trtllm weights" check of trtllm_checkpoint/ (each
    where the export has it)."""
    entry = manifest.get("fingerprints") or {}
    found = _family(manifest)
    trt = (export / TRT_DIR).is_dir()
    if not entry or found is None:
        for name in ("weights", TRT_CHECK) if trt else ("weights",):
            report.check(name, None, "not checked: no fingerprints recorded (an export made before they were)")
        return
    spec, ctx = found
    recorded = fp.load(export / entry.get("file", fp.FILE_NAME))
    if (export / "hf").is_dir():
        _check_hf_weights(report, export, entry, recorded, spec, ctx)
    else:
        report.check("weights", None, f"not checked: the export has no hf/ (formats: {manifest.get('formats')})")
    if trt:  # the TensorRT-LLM checkpoint, read back through its own inverse layouts (`trtllm_read`)
        check_trtllm_weights(report, export, manifest, recorded, spec, ctx)


def _check_hf_weights(report, export: Path, entry: dict, recorded: dict, spec, ctx) -> None:
    from ..arch.inverse import hf_to_megatron
    from ..errors import ExportError
    from ..importer import SafetensorsDir

    hf = SafetensorsDir(export / "hf")
    config = json.loads((export / "hf" / "config.json").read_text())
    quant = config.get("quantization_config")
    tensors = _Dequantized(hf, quant) if quant else hf
    failures, compared = [], 0
    for name, value in sorted(recorded.items()):
        if quant:
            tensors.algos = []
        try:
            tensor = hf_to_megatron(spec, ctx, tensors, strict=False, only={name})[name]
        except (ExportError, KeyError) as exc:
            failures.append(f"{name}: cannot be rebuilt from hf/ ({exc})")
            continue
        rel, gain = fp.quant_bound(tensors.algos if quant else ())
        problem = fp.compare(name, value, fp.vocab_rows(spec, ctx, name, tensor), rel, gain)
        compared += 1
        if problem:
            failures.append(f"{name}: {problem}")
    skipped = entry.get("skipped") or {}
    note = f" ({len(skipped)} not fingerprinted: {sorted(skipped)[:3]})" if skipped else ""
    report.check("weights", not failures, "; ".join(failures[:6]) + (f" ... ({len(failures)} tensors)" if
                                                                       len(failures) > 6 else "") if failures else
                 f"{compared} Megatron tensors rebuilt from hf/ match their export fingerprints"
                 f"{' within the quantization rounding' if quant else ' exactly'}{note}")
