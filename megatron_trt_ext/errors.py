"""Exception types. Every message names the offending thing and the fix."""


class MegatronTrtExtError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MegatronTrtExtError, ValueError):
    """An export option or recipe value is invalid."""


class UnsupportedModelError(MegatronTrtExtError):
    """The model uses a feature that no exporter here supports."""


class ExportError(MegatronTrtExtError, RuntimeError):
    """An export failed while running (conversion, gathering, writing)."""
