import warnings

import pytest
import torch

from megatron_trt_ext.testing.cpu_shim import stub_triton_only_modules

# Before anything imports megatron.core (newer versions import a Triton-only module at import time).
stub_triton_only_modules()

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")


@pytest.fixture(scope="session")
def megatron_world():
    """One-rank gloo world with Megatron's parallel state, CPU shim active when CUDA is absent."""
    from megatron_trt_ext.testing.models import init_single_process

    init_single_process(seed=1234)
    yield


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 120, (2, 17), generator=gen)
