"""The recipes shipped with the package (YAML files beside this module), addressable by name.

``--export-recipe fp8``, ``ExportConfig.from_yaml("fp8")`` and ``megatron-trt-ext export --recipe
fp8`` take a shipped recipe by its name; a path to a file of one's own still works, and a file
that exists always wins over a name. ``megatron-trt-ext recipes`` lists them.
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def names() -> list:
    """The shipped recipes' names (file names without ``.yaml``), sorted."""
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def resolve(recipe: "str | os.PathLike") -> Path:
    """A recipe's file: ``recipe`` itself when it names an existing file, else the shipped recipe of
    that name (with or without ``.yaml``). Unknown names come back as given, so that the reader
    reports the missing file (with the shipped names: see `describe_missing`)."""
    path = Path(recipe)
    if path.is_file():
        return path
    text = os.fspath(recipe)
    if os.sep not in text and "/" not in text:
        shipped = HERE / (text if text.endswith(".yaml") else f"{text}.yaml")
        if shipped.is_file():
            return shipped
    return path


def describe_missing(recipe: "str | os.PathLike") -> str:
    """The fix for a recipe that is neither a file nor a shipped name."""
    return f"give the path of a YAML recipe or the name of a shipped one: {', '.join(names())}"


def summary(name: str) -> dict:
    """What a shipped recipe writes: its formats, algorithm and KV cache, and its header comment
    (which says what each format is loaded by)."""
    import yaml

    path = HERE / f"{name}.yaml"
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    quant = data.get("quantization") or {}
    about = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        about.append(line.lstrip("#").strip())
    return {"name": name, "formats": list(data.get("formats") or []), "dtype": data.get("dtype", "bfloat16"),
            "algorithm": quant.get("algorithm", "none"), "kv_cache": quant.get("kv_cache", "none"),
            "serve": bool(data.get("serve")), "about": " ".join(about), "path": str(path)}
