"""Pure layout functions: semantics against hand-built layouts, and inverse(forward(x)) == x."""

import pytest
import torch

from megatron_trt_ext import layouts


def _labelled_qkv(nh, groups, d, hidden=3):
    """Interleaved Megatron QKV built by hand: every head's rows carry a unique label."""
    q = torch.arange(nh * d * hidden, dtype=torch.float32).reshape(nh * d, hidden)
    k = 1000 + torch.arange(groups * d * hidden, dtype=torch.float32).reshape(groups * d, hidden)
    v = 2000 + torch.arange(groups * d * hidden, dtype=torch.float32).reshape(groups * d, hidden)
    rows = []
    per = nh // groups
    for g in range(groups):
        for h in range(g * per, (g + 1) * per):
            rows.append(q[h * d:(h + 1) * d])
        rows.append(k[g * d:(g + 1) * d])
        rows.append(v[g * d:(g + 1) * d])
    return torch.cat(rows), q, k, v


@pytest.mark.parametrize("nh,groups", [(8, 8), (8, 2), (8, 1), (4, 4)])
def test_qkv_split_matches_hand_built_layout(nh, groups):
    fused, q, k, v = _labelled_qkv(nh, groups, d=4)
    q2, k2, v2 = layouts.qkv_interleaved_to_split(fused, nh, groups, 4)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("nh,groups", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("shape_tail", [(16,), ()])
def test_qkv_round_trip_weight_and_bias(nh, groups, shape_tail):
    d = 4
    x = torch.randn((nh + 2 * groups) * d, *shape_tail)
    q, k, v = layouts.qkv_interleaved_to_split(x, nh, groups, d)
    assert torch.equal(layouts.qkv_split_to_interleaved(q, k, v, nh, groups, d), x)


def test_gated_round_trip_and_halves():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fused = layouts.gate_up_to_gated(gate, up)
    g2, u2 = layouts.gated_to_gate_up(fused)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_pad_then_trim_is_identity_and_pads_with_zeros():
    t = torch.randn(10, 3)
    padded = layouts.pad_rows(t, 4)
    assert padded.shape == (12, 3) and torch.equal(padded[10:], torch.zeros(2, 3))
    assert torch.equal(layouts.trim_rows(padded, 10), t)
    with pytest.raises(ValueError):
        layouts.trim_rows(t, 11)


def test_repeat_kv_heads_gives_each_rank_its_head():
    d, nkv, tp = 2, 2, 4
    k = torch.arange(nkv * d, dtype=torch.float32).reshape(nkv * d, 1)
    rep = layouts.repeat_kv_heads(k, nkv, d, tp)
    for rank in range(tp):
        part = layouts.split_for_rank(rep, 0, tp, rank)
        head = rank // (tp // nkv)
        assert torch.equal(part, k[head * d:(head + 1) * d])
    assert layouts.repeat_kv_heads(k, nkv, d, 2) is k
    with pytest.raises(ValueError):
        layouts.repeat_kv_heads(torch.zeros(3 * d, 1), 3, d, 4)


def test_split_for_rank_refuses_uneven():
    with pytest.raises(ValueError, match="does not divide"):
        layouts.split_for_rank(torch.zeros(5, 2), 0, 2, 0)


def test_concat_transform_buffers_parts_and_concatenates_in_order():
    """Concat (a Mamba in_proj saved as z, x, B, C, dt) yields once, when its last part arrives,
    whatever order the parts come in; splitting the result gives the parts back."""
    from megatron_trt_ext.arch.spec import Concat

    t = Concat("decoder.layers.{L}.mixer.in_proj.weight.{P}", dst="backbone.layers.{L}.mixer.in_proj.weight",
               parts=("z", "x", "B", "C", "dt"))
    sizes = {"z": 4, "x": 4, "B": 2, "C": 2, "dt": 1}
    parts = {p: torch.randn(n, 3) for p, n in sizes.items()}
    pending, out = {}, []
    for p in ("C", "z", "dt", "x", "B"):
        groups = t.matches(f"decoder.layers.7.mixer.in_proj.weight.{p}")
        out += list(t.apply(parts[p], groups, None, pending))
    assert [name for name, _ in out] == ["backbone.layers.7.mixer.in_proj.weight"] and pending == {}
    back = torch.split(out[0][1], [sizes[p] for p in t.parts])
    assert all(torch.equal(a, parts[p]) for a, p in zip(back, t.parts))


@pytest.mark.parametrize("rows,tp", [(10, 4), (12, 4), (3, 4), (1, 8), (128, 8), (127, 2)])
def test_padded_rows_for_rank_equals_the_padded_split_without_copying(rows, tp):
    from megatron_trt_ext.formats.safetensors_stream import byte_blocks, tensor_bytes

    t = torch.randn(rows, 5).bfloat16()
    padded = layouts.pad_rows(t, tp)
    for rank in range(tp):
        expected = layouts.split_for_rank(padded, 0, tp, rank)
        got = layouts.padded_rows_for_rank(t, tp, rank)
        assert tuple(got.shape) == tuple(expected.shape) and got.dtype == expected.dtype
        real = got if isinstance(got, torch.Tensor) else got.parts[0]
        if isinstance(real, torch.Tensor) and real.numel():  # the real rows are a view, never a copy
            assert real.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        materialized = got if isinstance(got, torch.Tensor) else got.materialize()
        assert torch.equal(materialized, expected)
        assert b"".join(bytes(b) for b in byte_blocks(got)) == bytes(tensor_bytes(expected))


@pytest.mark.parametrize("nkv,tp", [(2, 4), (2, 8), (4, 4), (4, 2), (1, 4)])
def test_kv_rows_for_rank_equals_the_repeated_split(nkv, tp):
    d = 3
    k = torch.randn(nkv * d, 6)
    repeated = layouts.repeat_kv_heads(k, nkv, d, tp)
    for rank in range(tp):
        got = layouts.kv_rows_for_rank(k, nkv, d, tp, rank)
        assert torch.equal(got, layouts.split_for_rank(repeated, 0, tp, rank))
        assert got.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # a view


def test_row_blocks_stream_the_bytes_of_their_concatenation():
    from megatron_trt_ext.formats.safetensors_stream import byte_blocks, tensor_bytes

    base = torch.randn(6, 4)
    q, k = base[:4], torch.randn(4, 3).t()  # a view and a non-contiguous tensor
    assert not k.is_contiguous()
    blocks = layouts.RowBlocks([q, k, layouts.ZeroRows(2, (4,), torch.float32)])
    expected = torch.cat([q, k, torch.zeros(2, 4)])
    assert blocks.shape == expected.shape and torch.equal(blocks.materialize(), expected)
    assert b"".join(bytes(b) for b in byte_blocks(blocks)) == bytes(tensor_bytes(expected))
    assert blocks.to(torch.bfloat16).materialize().equal(expected.bfloat16())
    with pytest.raises(ValueError, match="disagree"):
        layouts.RowBlocks([q, torch.zeros(2, 5)])
    assert layouts.row_blocks([q, base[:0]]) is q  # one real block: no wrapper
