"""Test-only entry point: the CPU shim for Megatron-LM's training loop, then the project's CLI
(`megatron-trt-ext ...`), e.g. ``export`` of a saved checkpoint, under torchrun too."""

import sys

import os  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository: examples/, tests/support/
from examples.cpu_shim import install_megatron_training

install_megatron_training()

from megatron_trt_ext.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
