"""`megatron-trt-ext verify`: is an export exactly the model it came from, and does it still give
the logits the live model gave?

Five checks, each reported with the thing that failed:

1. integrity: every tensor's checksum against the manifest (`manifest.verify_export`), the probe
   and fingerprint files included;
2. config (exact): hf/config.json against the config the family derives from the Megatron facts
   the export recorded, key by key (`verification.exact`);
3. weights (exact; within the rounding for quantized exports): every Megatron tensor rebuilt from
   hf/ through the inverse tables against its fingerprint recorded at export, per tensor
   (`verification.fingerprint`); "trtllm weights" the same for trtllm_checkpoint/'s rank files
   (`verification.trtllm_read`);
4. loading: ``hf/`` loads with transformers in float32 (quantized exports dequantized with their
   own scales, `quant.dequant.load_dequantized`), with the vocabulary the export recorded;
5. logits (statistical): the probe's tokens through the loaded model, compared with the
   reference top-k logits recorded at export time (`verification.probe`) against the thresholds
   of the export's dtype or quantization recipe (`verification.thresholds`): float32 noise when
   the reference was computed from the weights as exported, the recipe's own error otherwise.
   ``engine="vllm"`` (``--engine vllm``) runs checks 4-5 in vLLM instead (`engine_vllm`).

A checksum catches a flipped byte; the exact checks catch a converter that wrote consistent but
wrong tensors or configs (a swapped row, a wrong RoPE theta) whatever the weights; the logits
catch what neither describes (the HF modelling code itself). Exports made before fingerprints
were recorded skip checks 2-3 ("not checked").
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from .. import manifest as mf
from ..errors import ConfigError
from .exact import check_config, check_weights
from .probe import FILE_NAME
from .thresholds import thresholds_for


def logit_metrics(hf_logits: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> dict:
    """Compare full HF logits [n, s, V] with the reference top-k (values, ids) [n, s, k].

    * ``max_rel_logit_diff``: max over every stored (position, id) of |HF logit - stored value|,
      divided by the logit scale (the largest |stored value| of the probe);
    * ``top1_agreement``: fraction of positions whose HF argmax (over the whole vocabulary) is the
      stored top-1 id;
    * ``kl_mean`` / ``kl_max``: KL(reference || HF) of the softmax restricted to the stored top-k
      ids, per position (exact for the distribution over those ids; the tail outside them is not
      stored).
    """
    hf_logits = hf_logits.float()
    values, ids = values.float(), ids.long()
    at_ids = torch.gather(hf_logits, -1, ids)
    scale = values.abs().max().clamp_min(1e-12)
    ref_log = torch.log_softmax(values, dim=-1)
    hf_log = torch.log_softmax(at_ids, dim=-1)
    kl = (ref_log.exp() * (ref_log - hf_log)).sum(-1)
    return {
        "max_rel_logit_diff": float((at_ids - values).abs().max() / scale),
        "top1_agreement": float((hf_logits.argmax(-1) == ids[..., 0]).float().mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "logit_scale": float(scale),
        "positions": int(values.shape[0] * values.shape[1]),
    }


def load_hf_model(hf_dir: Path, device: str, quiet: bool = True):
    """The export's HF model in float32 on ``device``, in eval mode. ``quiet``: without
    transformers' own loading bars (stderr stays for our progress bar, or clean)."""
    from ..quant.dequant import load_dequantized

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return load_dequantized(hf_dir).to(device).eval()


class Report:
    """The outcome of one export's verification (a dict for --json, lines for people)."""

    def __init__(self, export: Path, manifest: dict):
        self.data = {"export": str(export), "iteration": manifest.get("iteration"), "status": "pass",
                     "dtype": manifest.get("dtype"),
                     "quantization": (manifest.get("config", {}).get("quantization") or {}).get("algorithm", "none"),
                     "checks": [], "metrics": None, "thresholds": None}

    def check(self, name: str, ok: Optional[bool], detail: str) -> None:
        """ok None: not checked (said why); counts as neither pass nor fail."""
        self.data["checks"].append({"name": name, "ok": ok, "detail": detail})
        if ok is False:
            self.data["status"] = "fail"

    @property
    def passed(self) -> bool:
        return self.data["status"] == "pass"

    def lines(self) -> list:
        d = self.data
        out = [f"{d['export']}: {d['status'].upper()} (iteration {d['iteration']}, dtype {d['dtype']}, "
               f"quantization {d['quantization']})"]
        for c in d["checks"]:
            mark = {True: "ok  ", False: "FAIL", None: "skip"}[c["ok"]]
            out.append(f"  [{mark}] {c['name']}: {c['detail']}")
        return out


def read_export(export_dir) -> tuple:
    """(path, manifest) of an export directory; ConfigError (bad input) when it is not one."""
    export = Path(export_dir)
    if not export.is_dir():
        raise ConfigError(f"{str(export)!r}: not a directory; pass an export directory (<output_dir>/iter_XXXXXXX)")
    if not (export / mf.MANIFEST).is_file():
        raise ConfigError(f"{str(export)!r}: no manifest.json, so not an export directory; pass "
                          "<output_dir>/iter_XXXXXXX (or use --all ROOT for an export root)")
    try:
        manifest = mf.read_manifest(export)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{export / mf.MANIFEST}: unreadable ({exc}); the export is damaged") from exc
    if not isinstance(manifest, dict):
        raise ConfigError(f"{export / mf.MANIFEST}: not a manifest (a JSON object is expected)")
    return export, manifest


def check_device(device: str) -> None:
    """A device this machine has (bad input otherwise, before anything loads)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {device!r}: not a torch device ({exc}); use cpu, cuda or cuda:N") from exc
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                          "use --device cpu, or run where that GPU exists")


def verify(export_dir, device: str = "cpu", record: bool = True, progress=None, engine: str = "transformers") -> Report:
    """Verify one export (see the module docstring). ``record``: write the outcome into the
    manifest (``verify``), which `megatron-trt-ext ls` shows. ``engine``: what runs the logits
    check, transformers or vLLM (`engine_vllm`). Raises ConfigError for bad input."""
    from ..progress import _Silent
    from .engine_vllm import check_engine

    progress = progress or _Silent()
    check_device(device)
    check_engine(engine)
    export, manifest = read_export(export_dir)
    report = Report(export, manifest)
    report.data["engine"] = engine
    t0 = time.perf_counter()
    problems = mf.verify_export(export)
    report.check("checksums", not problems, "; ".join(problems) if problems else
                 f"{mf.checksum_count(manifest)} tensors match the manifest")
    progress.update()
    check_config(report, export, manifest)
    check_weights(report, export, manifest)
    if engine == "vllm":
        from .engine_vllm import check_logits

        check_logits(report, export, manifest, progress)
    else:
        _check_logits(report, export, manifest, device, progress)
    report.data["seconds"] = time.perf_counter() - t0
    if record:
        _record(report, export)
    return report


def read_reference(report: Report, export: Path, manifest: dict) -> Optional[tuple]:
    """(probe record, tokens, top-k values, top-k ids) for a logits check on any engine, or None
    once the report says why there is nothing to check (no hf/, no probe, an unreadable file)."""
    probe = manifest.get("verification") or {}
    if not (export / "hf").is_dir():
        report.check("logits", None, "the export has no hf/ (formats: "
                     f"{manifest.get('formats')}); nothing to load")
        return None
    if probe.get("status") != "recorded" or not (export / FILE_NAME).is_file():
        why = probe.get("error") or ("the probe was off (verification.enabled: false)" if probe.get("status") == "off"
                                     else "no reference logits in this export (made before they were recorded?)")
        report.check("logits", None, f"not checked: {why}")
        return None
    from safetensors.torch import load_file

    try:
        reference = load_file(str(export / FILE_NAME))
        return probe, reference["tokens"], reference["topk_values"], reference["topk_ids"]
    except Exception as exc:  # noqa: BLE001 - a damaged probe file is a failed check, not a crash
        report.check("logits", False, f"{FILE_NAME} unreadable: {type(exc).__name__}: {str(exc)[:300]}")
        return None


def _check_logits(report: Report, export: Path, manifest: dict, device: str, progress) -> None:
    read = read_reference(report, export, manifest)
    if read is None:
        return
    probe, tokens, values, ids = read
    try:
        model = load_hf_model(export / "hf", device)
    except Exception as exc:  # noqa: BLE001 - a broken export is a failed check, not a crash
        report.check("load hf/", False, f"transformers cannot load it: {type(exc).__name__}: {str(exc)[:400]}")
        return
    progress.update()
    hf_vocab = int(model.config.vocab_size)
    recorded = int(probe.get("vocab_size", manifest.get("vocab_size", hf_vocab)))
    report.check("vocabulary", hf_vocab == recorded,
                 f"hf/config.json vocab_size {hf_vocab}" + ("" if hf_vocab == recorded else
                                                            f", but the export recorded {recorded} ids"))
    outside = int(max(tokens.max(), ids.max())) + 1
    if outside > hf_vocab:
        report.check("logits", False, f"the probe uses vocabulary id {outside - 1}, which the HF model (vocab_size "
                     f"{hf_vocab}) does not have")
        return
    try:
        with torch.no_grad():
            logits = model(input_ids=tokens.to(device)).logits.float().cpu()
    except Exception as exc:  # noqa: BLE001 - e.g. a config that does not fit the tensors
        report.check("logits", False, f"the HF model's forward pass failed: {type(exc).__name__}: {str(exc)[:300]}")
        return
    progress.update()
    metrics = logit_metrics(logits[..., :hf_vocab], values, ids)
    key, limits = thresholds_for(manifest)
    reference = probe.get("reference", "live")  # older manifests: the live model's own logits
    report.data["metrics"], report.data["thresholds"] = metrics, {"for": key, "reference": reference,
                                                                  **limits.to_dict()}
    failures = limits.failures(metrics)
    detail = (f"max |diff|/scale {metrics['max_rel_logit_diff']:.2e} (<= {limits.max_rel_logit_diff:g}), "
              f"top-1 agreement {metrics['top1_agreement']:.3f} (>= {limits.min_top1_agreement:g}), "
              f"KL mean {metrics['kl_mean']:.2e} (<= {limits.max_kl_mean:g}), thresholds for {key} "
              f"(reference: {reference.replace('_', ' ')}), "
              f"{metrics['positions']} positions")
    report.check("logits", not failures, detail if not failures else "; ".join(failures) + f" [{detail}]")


def _record(report: Report, export: Path) -> None:
    """Best effort: an export on a read-only file system is still verified."""
    d = report.data
    try:
        mf.update_manifest(export, verify={"status": d["status"], "checked_unix": time.time(),
                                           "metrics": d["metrics"], "thresholds": d["thresholds"],
                                           "engine": d.get("engine", "transformers"),
                                           "failed": [c["name"] for c in d["checks"] if c["ok"] is False]})
    except OSError as exc:
        report.data["record_error"] = f"could not record the result in the manifest: {exc}"


def verify_root(root, device: str = "cpu", record: bool = True, progress_enabled: bool = False,
                engine: str = "transformers") -> list:
    """Verify every complete export under ``root``, oldest first. ConfigError when there is none."""
    from ..progress import bar
    from .engine_vllm import check_engine

    check_device(device)
    check_engine(engine)
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--all {str(root)!r}: not a directory; pass the export root (output_dir)")
    exports = mf.complete_exports(root)
    if not exports:
        raise ConfigError(f"--all {str(root)!r}: no complete export (iter_XXXXXXX with a manifest) under it")
    reports = []
    with bar(len(exports), "verify", progress_enabled, unit="export") as progress:
        for export in exports:
            reports.append(verify(export, device, record, engine=engine))
            progress.update()
    return reports
