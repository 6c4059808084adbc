"""megatron-trt-ext: export live Megatron-Core models to TensorRT-LLM and Hugging Face checkpoints.

Public API::

    from megatron_trt_ext import ExportConfig, Exporter, attach
    from megatron_trt_ext import import_hf   # an HF checkpoint into a live model, any layout
"""

from . import recipes
from .config import ExportConfig
from .errors import ConfigError, ExportError, MegatronTrtExtError, UnsupportedModelError
from .exporter import Exporter
from .manifest import __version__
from .result import ExportResult
from .hook import ExportHandle, attach
from .importer import import_hf

__all__ = [
    "ExportConfig", "Exporter", "ExportResult", "ExportHandle", "attach", "import_hf",
    "ConfigError", "ExportError", "MegatronTrtExtError", "UnsupportedModelError", "__version__",
]
