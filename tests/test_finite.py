"""The fused finite check (a sum, or one aminmax reduction) against the boolean definition."""

import pytest
import torch

from megatron_trt_ext.errors import ExportError
from megatron_trt_ext.finite import check_finite, is_finite
from megatron_trt_ext.layouts import RowBlocks, ZeroRows

SPECIALS = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 64, 1000, 4099])
def test_a_single_nan_or_inf_anywhere_is_caught(dtype, n):
    gen = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=gen).to(dtype)
    assert is_finite(base)
    for special in SPECIALS:
        for pos in {0, n // 3, n - 1}:
            bad = base.clone()
            bad[pos] = special
            assert not is_finite(bad), (special, pos)


def test_agrees_with_isfinite_on_random_tensors_and_views():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        t = torch.randn(17, 33, generator=gen)
        k = int(torch.randint(0, 3, (1,), generator=gen))
        for _ in range(k):
            i, j = (int(v) for v in torch.randint(0, 17, (2,), generator=gen))
            t[i, j % 33] = SPECIALS[int(torch.randint(0, 3, (1,), generator=gen))]
        for view in (t, t.t(), t[:, ::2], t.bfloat16(), t.half()):
            assert is_finite(view) == bool(torch.isfinite(view).all()), trial


def test_values_that_overflow_at_the_cast_are_caught_after_it():
    t = torch.tensor([1.0, 70000.0])
    assert is_finite(t) and is_finite(t.bfloat16())
    assert not is_finite(t.half())  # 70000 > float16's largest finite value: Inf as written
    with pytest.raises(ExportError, match="w: contains NaN or Inf"):
        check_finite("w", t.half())


def test_non_float_empty_and_meta_tensors_pass():
    assert is_finite(torch.arange(5))
    assert is_finite(torch.empty(0))
    assert is_finite(torch.empty(3, 3, device="meta"))


def test_fp8_nan_is_caught():
    t = torch.tensor([0.5, 1.0]).to(torch.float8_e4m3fn)
    assert is_finite(t)
    assert not is_finite(torch.tensor([0.5, float("nan")]).to(torch.float8_e4m3fn))


def test_row_blocks_are_checked_block_by_block():
    good = torch.ones(2, 3)
    assert is_finite(RowBlocks([good, ZeroRows(1, (3,), torch.float32)]))
    bad = good.clone()
    bad[1, 2] = float("inf")
    assert not is_finite(RowBlocks([good, bad]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_values_whose_sum_overflows_pass_and_a_nan_beside_them_fails(dtype):
    huge = torch.full((64,), torch.finfo(dtype).max / 4, dtype=dtype)
    assert not torch.isfinite(huge.sum())  # the sum is Inf: the exact check decides
    assert is_finite(huge) and is_finite(torch.cat([huge, -huge]))
    for special in SPECIALS:
        bad = huge.clone()
        bad[5] = special
        assert not is_finite(bad), special
    inf_pair = torch.tensor([float("inf"), float("-inf"), 1.0], dtype=dtype)  # the sum is NaN, not finite
    assert not is_finite(inf_pair)
