"""The CPU shim, for the demo, tests and benchmarks: a re-export of `megatron_trt_ext.cpu_mode`
(the package's CPU trial mode, installed with it and switched on by ``megatron-trt-ext run --cpu``).

Each function does nothing when CUDA is available, so it can never change a GPU run.
"""

from megatron_trt_ext.cpu_mode import (  # noqa: F401 (re-exported)
    function_mode_paused,
    install,
    install_megatron_training,
    stub_triton_only_modules,
)
