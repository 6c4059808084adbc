"""Engine-build options (recipe section ``build:``): pure validation, no tensorrt_llm import."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from ..errors import ConfigError, parse_section, short_repr

# TensorRT-LLM PluginConfig fields we pass through (values: "auto", a dtype name, True/False, None).
PLUGINS = ("gemm_plugin", "gpt_attention_plugin", "paged_kv_cache", "remove_input_padding",
           "context_fmha", "use_paged_context_fmha", "nccl_plugin", "moe_plugin", "reduce_fusion",
           "use_fp8_context_fmha", "multiple_profiles", "paged_state")
_PLUGIN_VALUES = ("auto", "float16", "bfloat16", "float32", "fp8", "enable", "disable")


@dataclass
class BuildOptions:
    """What `trtllm-build` would be told; see TensorRT-LLM's BuildConfig.

    Args:
        max_batch_size, max_input_len, max_seq_len, max_num_tokens: engine limits.
        max_beam_width: beam search width the engine supports.
        plugins: PluginConfig fields, e.g. ``{gemm_plugin: auto, paged_kv_cache: true}``.
        devices: CUDA devices to build on, one rank per device at a time: indices among the visible
            devices, as torch numbers them (under ``CUDA_VISIBLE_DEVICES=4,5,6,7``, 0 is GPU 4);
            None: every device torch sees.
        timeout: seconds before a build is killed and recorded as failed.
        deploy_check: for TensorRT-LLM >= 1.3 (no engine builder): load the HF export with
            ``tensorrt_llm.LLM`` and generate a few tokens.
    """

    max_batch_size: int = 8
    max_input_len: int = 1024
    max_seq_len: int = 2048
    max_num_tokens: int = 8192
    max_beam_width: int = 1
    plugins: dict = field(default_factory=lambda: {"gemm_plugin": "auto", "gpt_attention_plugin": "auto"})
    devices: Optional[list] = None
    timeout: int = 3600
    deploy_check: bool = False

    @classmethod
    def from_dict(cls, data, source: str = "build") -> "BuildOptions":
        return parse_section(cls, data, source, "a mapping of build options", "build option")

    def validate(self, source: str = "build") -> None:
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width",
                     "timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{source}.{name}: expected a positive integer, got {short_repr(value)}")
        if self.max_input_len > self.max_seq_len:
            raise ConfigError(f"{source}: max_input_len={self.max_input_len} exceeds max_seq_len="
                              f"{self.max_seq_len}; raise max_seq_len or lower max_input_len")
        if not isinstance(self.plugins, dict):
            raise ConfigError(f"{source}.plugins: expected a mapping such as {{gemm_plugin: auto}}")
        for key, value in self.plugins.items():
            if key not in PLUGINS:
                raise ConfigError(f"{source}.plugins: unknown plugin {key!r}; known: {list(PLUGINS)}")
            if not (value is None or isinstance(value, bool) or value in _PLUGIN_VALUES):
                raise ConfigError(f"{source}.plugins.{key}: {short_repr(value)} is not one of {list(_PLUGIN_VALUES)}, "
                                  "true, false or null")
        if self.devices is not None:
            if not isinstance(self.devices, list) or not self.devices or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in self.devices):
                raise ConfigError(f"{source}.devices: expected a list of CUDA device indices such as [0, 1], "
                                  f"got {short_repr(self.devices)}")
        if not isinstance(self.deploy_check, bool):
            raise ConfigError(f"{source}.deploy_check: expected true or false")

    def check_devices(self, available: int, source: str = "build") -> None:
        """Devices must exist where the build runs (attach time for in-training builds)."""
        if self.devices is None:
            return
        missing = [d for d in self.devices if d >= available]
        if missing:
            raise ConfigError(f"{source}.devices: {missing} do not exist (this machine has {available} CUDA "
                              f"device(s)); list existing devices, or build later with "
                              "`megatron-trt-ext build EXPORT_DIR` on a GPU node")

    def to_dict(self) -> dict:
        return asdict(self)
