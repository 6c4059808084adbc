"""Test-only entry point: the CPU shim for Megatron-LM's training loop, then the project's launcher
(`python -m megatron_trt_ext.launch`), exactly as a user runs it on GPUs.

    python tests/scripts/cpu_launch.py SCRIPT [args]
    torchrun --nproc-per-node 2 tests/scripts/cpu_launch.py SCRIPT [args]

With MTE_FAKE_TENSORBOARD=1, a recording stand-in replaces torch.utils.tensorboard where the
tensorboard package is missing (see fake_tensorboard.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository: examples/, tests/support/
from examples.cpu_shim import install_megatron_training

install_megatron_training()
if os.environ.get("MTE_FAKE_TENSORBOARD"):  # tests: a recording SummaryWriter where tensorboard is missing
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fake_tensorboard

    fake_tensorboard.install()

from megatron_trt_ext.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
