"""Wrong exports, as a converter bug would leave them: the HF tensors or config.json edited, the
manifest's checksums rewritten, so only a check of what the export means can catch them.

Each corruption edits an export directory in place (copy it first); tensors of a quantized
export move with their scales (the rows of a packed weight and of its per-row scales together,
a module's whole set of tensors when two modules are swapped).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from megatron_trt_ext import checksum
from megatron_trt_ext import manifest as mf
from megatron_trt_ext.formats.safetensors_stream import tensor_bytes


def rewrite_tensors(export_dir: Path, edit) -> None:
    """Apply ``edit`` to hf/model.safetensors' tensors, then rewrite the manifest's checksums
    (with the algorithm it names)."""
    path = Path(export_dir) / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    manifest = mf.read_manifest(export_dir)
    algorithm, _ = checksum.read_entry(manifest["files"]["hf/model.safetensors"])
    manifest["files"]["hf/model.safetensors"] = checksum.entry(
        {name: checksum.hexdigest([tensor_bytes(t)], algorithm) for name, t in tensors.items()}, algorithm)
    (Path(export_dir) / "manifest.json").write_text(json.dumps(manifest))


def edit_config(export_dir: Path, **fields) -> None:
    """Set top-level keys of hf/config.json (and rope_parameters' copy of rope_theta)."""
    path = Path(export_dir) / "hf" / "config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        if key not in config:
            raise KeyError(f"hf/config.json has no {key!r}: {sorted(config)}")
        config[key] = value
        if key == "rope_theta" and isinstance(config.get("rope_parameters"), dict):
            config["rope_parameters"]["rope_theta"] = value
    path.write_text(json.dumps(config))


def _module(tensors: dict, pattern: str) -> str:
    found = sorted({n.rsplit(".", 1)[0] for n in tensors if re.search(pattern, n)})
    if not found:
        raise KeyError(f"no HF module matches {pattern!r}")
    return found[0]


def swap_rows(tensors: dict, pattern: str, i: int = 3, j: int = 40) -> None:
    """Rows i and j of one projection's weight (and of its bias and per-row scales)."""
    module = _module(tensors, pattern)
    rows = tensors[module + ".weight"].shape[0]
    for name in [n for n in tensors if n.startswith(module + ".")]:
        t = tensors[name]
        if t.dim() >= 1 and t.shape[0] == rows:
            t = t.clone()
            t[[i, j]] = t[[j, i]]
            tensors[name] = t


def swap_modules(tensors: dict, a: str, b: str) -> None:
    """Every tensor of module ``a`` for module ``b``'s (q/k projections: weights, biases, scales)."""
    ma, mb = _module(tensors, a), _module(tensors, b)
    names_a = {n[len(ma):]: n for n in tensors if n.startswith(ma + ".")}
    for suffix, name in names_a.items():
        other = mb + suffix
        tensors[name], tensors[other] = tensors[other].clone(), tensors[name].clone()


def drop(tensors: dict, pattern: str) -> None:
    """One tensor left out of the file (a dropped bias): transformers initialises it."""
    name = next(n for n in sorted(tensors) if re.search(pattern, n))
    del tensors[name]


def apply(export_dir: Path, kind: str) -> None:
    """The corruptions the verification tests use, by name."""
    config = json.loads((Path(export_dir) / "hf" / "config.json").read_text())
    if kind == "rows":  # one pair of rows of one layer's attention output projection
        rewrite_tensors(export_dir, lambda t: swap_rows(t, r"layers\.1\.self_attn\.o_proj\.weight$"))
    elif kind == "qk":
        rewrite_tensors(export_dir, lambda t: swap_modules(t, r"layers\.0\.self_attn\.q_proj\.",
                                                           r"layers\.0\.self_attn\.k_proj\."))
    elif kind == "rope_theta":
        edit_config(export_dir, rope_theta=2.0 * config["rope_theta"])
    elif kind == "norm_eps":
        key = next(k for k in ("rms_norm_eps", "norm_epsilon", "layer_norm_epsilon") if k in config)
        edit_config(export_dir, **{key: config[key] / 10})
    elif kind == "window":
        edit_config(export_dir, sliding_window=2 * config["sliding_window"])
    elif kind == "bias":
        rewrite_tensors(export_dir, lambda t: drop(t, r"layers\.0\.self_attn\.q_proj\.bias$"))
    elif kind == "router":  # layer 0's router rows of experts 0 and 1: tokens go to the wrong experts
        rewrite_tensors(export_dir, lambda t: swap_rows(t, r"layers\.0\.(block_sparse_moe|mlp)\.gate\.weight$", 0, 1))
    else:
        raise ValueError(kind)


def logits_only(monkeypatch) -> None:
    """Verify without the exact checks (config, weights): what the probe alone catches."""
    from megatron_trt_ext.verification import check

    monkeypatch.setattr(check, "check_config", lambda *a, **k: None)
    monkeypatch.setattr(check, "check_weights", lambda *a, **k: None)


def drop_fingerprints(export_dir: Path) -> None:
    """Make ``export_dir`` look like an export from before fingerprints were recorded."""
    from megatron_trt_ext.verification import fingerprint as fp

    manifest = mf.read_manifest(export_dir)
    for key in ("fingerprints", "model_info"):
        manifest.pop(key)
    manifest["files"].pop(fp.FILE_NAME)
    (export_dir / fp.FILE_NAME).unlink()
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
