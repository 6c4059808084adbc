"""Assembling a unit on its writer (one process): views when the slices already form the tensor,
one cast-and-place pass otherwise."""

import torch

from megatron_trt_ext.gather import Comm, exchange
from megatron_trt_ext.plan import LocalPiece, Piece, Unit


def _unit(pieces, shape=(8, 3)):
    return Unit(name="w", shape=shape, dtype="float32", pieces=tuple(pieces), writer=0,
                writer_slices=frozenset((p.offset, p.shape) for p in pieces))


def _comm():
    return Comm(timeout_s=10, model_device=torch.device("cpu"))


def test_halves_of_one_parameter_come_back_as_a_view():
    param = torch.randn(8, 3)
    pieces = [Piece(0, (4, 0), (4, 3)), Piece(0, (0, 0), (4, 3))]
    local = {"w": [LocalPiece((0, 0), (8, 3), param[:4], True), LocalPiece((4, 0), (8, 3), param[4:], True)]}
    full = exchange(_unit(pieces), local, _comm())
    assert torch.equal(full, param) and full.data_ptr() == param.data_ptr()


def test_separate_slices_are_assembled_and_cast_in_one_pass():
    a, b = torch.randn(4, 3), torch.randn(4, 3)  # separate allocations (snapshot buffers)
    pieces = [Piece(0, (0, 0), (4, 3)), Piece(0, (4, 0), (4, 3))]
    local = {"w": [LocalPiece((0, 0), (8, 3), a, True), LocalPiece((4, 0), (8, 3), b, True)]}
    full = exchange(_unit(pieces), local, _comm())
    assert torch.equal(full, torch.cat([a, b])) and full.dtype == torch.float32
    cast = exchange(_unit(pieces), local, _comm(), cast_to=torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, torch.cat([a, b]).bfloat16())


def test_column_slices_are_never_viewed_as_rows():
    param = torch.randn(8, 6)
    left, right = param[:, :3], param[:, 3:]  # not contiguous: must be copied into place
    pieces = [Piece(0, (0, 0), (8, 3)), Piece(0, (0, 3), (8, 3))]
    local = {"w": [LocalPiece((0, 0), (8, 6), left, True), LocalPiece((0, 3), (8, 6), right, True)]}
    full = exchange(_unit(pieces, shape=(8, 6)), local, _comm())
    assert torch.equal(full, param) and full.data_ptr() != param.data_ptr()
