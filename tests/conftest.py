import warnings

import pytest
import torch

from examples.cpu_shim import stub_triton_only_modules

# Before anything imports megatron.core (newer versions import a Triton-only module at import time).
stub_triton_only_modules()

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")


@pytest.fixture(scope="session")
def megatron_world():
    """One-rank gloo world with Megatron's parallel state, CPU shim active when CUDA is absent."""
    from tests.support.models import init_single_process

    init_single_process(seed=1234)
    yield


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 120, (2, 17), generator=gen)


def pytest_collection_modifyitems(config, items):
    """Heavy multi-process cases (launchers, many processes) run once per CI run: in scripts/test
    (the pinned megatron-core), not again in scripts/test-mcore-latest, which sets MTE_SKIP_HEAVY."""
    import os

    if not os.environ.get("MTE_SKIP_HEAVY"):
        return
    skip = pytest.mark.skip(reason="heavy multi-process case: runs in scripts/test (pinned megatron-core) only")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
