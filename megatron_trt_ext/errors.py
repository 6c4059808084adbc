"""Exception types. Every message names the offending thing and the fix."""

import dataclasses
from typing import Any


class MegatronTrtExtError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MegatronTrtExtError, ValueError):
    """An export option or recipe value is invalid."""


class UnsupportedModelError(MegatronTrtExtError):
    """The model uses a feature that no exporter here supports."""


class ExportError(MegatronTrtExtError, RuntimeError):
    """An export failed while running (conversion, gathering, writing)."""


def reject_unknown_keys(keys, known, source: str, what: str = "option") -> None:
    """Raise ConfigError naming every key of a recipe section that is not one of ``known``."""
    unknown = sorted(str(k) for k in set(keys) - set(known))
    if not unknown:
        return
    close = [k for k in sorted(known) if k.split("_")[0] == unknown[0].split("_")[0]]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{source}: unknown {what}(s) {unknown}{hint}; valid {what}s are {sorted(known)}")


def parse_section(cls, data, source: str, expected: str, what: str = "option", build=None):
    """One recipe section as its typed, validated options ``cls`` (a dataclass with a
    ``validate(source)``): None gives the defaults, an instance of ``cls`` is taken as it is, and a
    mapping must name only ``cls``'s fields (``build(mapping)`` makes the instance where the
    section has nested parts). ``expected`` describes a good value for the error message."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected {expected}, got {type(data).__name__}")
    reject_unknown_keys(data, {f.name for f in dataclasses.fields(cls)}, source, what)
    options = build(data) if build else cls(**data)
    options.validate(source)
    return options


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() cut to ``limit`` characters: error messages stay readable whatever the input."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlist = r.maxdict = r.maxtuple = 6
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int_fields(obj, limits: dict, source: str) -> None:
    """Every ``limits`` field of ``obj`` an int in [1, upper] (``seed``: [0, upper]), else a
    ConfigError naming ``source.field`` and the range."""
    for name, upper in limits.items():
        value = getattr(obj, name)
        lower = 0 if name == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or not lower <= value <= upper:
            raise ConfigError(f"{source}.{name}: expected an integer between {lower} and {upper}, got "
                              f"{short_repr(value)}")
