"""Host tensors in numpy memory (huge pages) cast exactly as ``Tensor.to`` does."""

import pytest
import torch

from megatron_trt_ext import host_memory


def _values(n: int) -> torch.Tensor:
    """Random float32 values with the cases a cast must round or map alike: specials, the
    extremes of float32 and of the targets, subnormals, and ties at bfloat16's rounding point."""
    gen = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=gen) * torch.logspace(-40, 38, n, dtype=torch.float64).float()
    edge = [float("nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38, 3.3961e38, 65504.0, 65520.0, 70000.0,
            1e-45, -1e-45, 1e-39, 0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20]
    t[:len(edge)] = torch.tensor(edge)
    return t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1000, (host_memory.LARGE_BYTES // 2) + 4096])  # below and above the threshold
def test_cast_is_bit_identical_to_to(dtype, numel):
    src = _values(numel).reshape(-1, 8) if numel % 8 == 0 else _values(numel)
    got, want = host_memory.cast(src, dtype), src.to(dtype)
    assert got.dtype == dtype and got.shape == src.shape and got.is_contiguous()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_cast_of_a_strided_view_keeps_its_values_and_is_contiguous():
    src = _values(4096 * 1024).reshape(4096, 1024)
    view = src.t()[:, 1:]  # not contiguous
    got = host_memory.cast(view, torch.bfloat16)
    assert got.is_contiguous() and torch.equal(got.view(torch.int16), view.to(torch.bfloat16).view(torch.int16))


def test_large_tensors_come_from_numpy_and_own_their_memory():
    shape = (1024, host_memory.LARGE_BYTES // 1024 // 4)
    a, b = host_memory.empty(shape, torch.float32), host_memory.empty(shape, torch.float32)
    assert a.shape == shape and a.dtype == torch.float32 and a.is_contiguous()
    assert a.data_ptr() != b.data_ptr()
    a.fill_(1.0)
    b.fill_(2.0)
    view = a[3:5]
    del a  # the view alone keeps the memory
    assert bool((view == 1.0).all()) and bool((b == 2.0).all())
    small = host_memory.empty((4, 4), torch.bfloat16)
    assert small.shape == (4, 4) and small.dtype == torch.bfloat16


def test_device_tensors_and_same_dtype_pass_through_to():
    t = torch.randn(8)
    assert host_memory.cast(t, torch.float32) is t  # Tensor.to returns the tensor itself
