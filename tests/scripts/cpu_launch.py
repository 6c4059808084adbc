"""Test-only entry point: the CPU shim for Megatron-LM's training loop, then the project's launcher
(`python -m megatron_trt_ext.launch`), exactly as a user runs it on GPUs.

    python tests/scripts/cpu_launch.py SCRIPT [args]
    torchrun --nproc-per-node 2 tests/scripts/cpu_launch.py SCRIPT [args]
"""

import sys

from megatron_trt_ext.testing.cpu_shim import install_megatron_training

install_megatron_training()

from megatron_trt_ext.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
