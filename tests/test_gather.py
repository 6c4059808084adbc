"""Assembling a unit on its writer (one process): views when the slices already form the tensor,
one cast-and-place pass otherwise."""

import pytest
import torch

from megatron_trt_ext.gather import Comm, exchange
from megatron_trt_ext.plan import LocalPiece, Piece, Unit


def _unit(pieces, shape=(8, 3)):
    return Unit(name="w", shape=shape, dtype="float32", pieces=tuple(pieces), writer=0,
                writer_slices=frozenset((p.offset, p.shape) for p in pieces if p.rank == 0))


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


class _DeviceComm:
    """A writer's data path through an accelerator (NCCL): receive buffers live on
    ``data_device``. The meta device stands in for the GPU (every machine has it); the
    "transfer" hands back the sender's values and records how many buffers were in flight."""

    rank = 0

    def __init__(self, slices: dict):
        self.data_device = torch.device("meta")
        self.slices = slices  # tag -> the values that rank sends
        self.in_flight = self.most_in_flight = 0
        self.received_into = []

    def recv(self, shape, dtype, src, tag):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return self.slices[tag].to(dtype).clone(), _Work(self)

    def recv_into(self, buf, src, tag):
        self.received_into.append(buf.device)
        return _Work(self, buf, self.slices[tag])


class _Work:
    def __init__(self, comm, buf=None, values=None):
        self.comm, self.buf, self.values = comm, buf, values
        if buf is not None:
            comm.in_flight += 1
            comm.most_in_flight = max(comm.most_in_flight, comm.in_flight)

    def wait(self):
        self.comm.in_flight -= 1
        if self.buf is not None and self.buf.device.type == "cpu":
            self.buf.copy_(self.values)


def test_units_received_through_the_accelerator_are_assembled_in_host_memory():
    # Sync mode on NCCL: training memory is full, so the writer assembles the whole unit in host
    # memory and moves the remote slices through the accelerator one at a time.
    rows = [torch.randn(2, 3) for _ in range(4)]
    pieces = [Piece(0, (0, 0), (2, 3))] + [Piece(r, (2 * r, 0), (2, 3)) for r in (1, 2, 3)]
    local = {"w": [LocalPiece((0, 0), (8, 3), rows[0].clone(), True)]}
    comm = _DeviceComm({tag: rows[tag] for tag in (1, 2, 3)})
    full = exchange(_unit(pieces), local, comm)
    assert full.device.type == "cpu", f"unit assembled on {full.device}, not in host memory"
    assert comm.received_into == [], "received in place into a unit that should be in host memory"
    assert comm.most_in_flight == 1, "several slices held in accelerator memory at once"
    assert torch.equal(full, torch.cat(rows))
    cast = exchange(_unit(pieces), local, _DeviceComm({tag: rows[tag] for tag in (1, 2, 3)}),
                    cast_to=torch.bfloat16)
    assert cast.device.type == "cpu" and torch.equal(cast, torch.cat(rows).bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (sync mode reads the live parameters there)")
def test_units_of_live_gpu_parameters_are_assembled_in_host_memory():
    param = torch.randn(8, 3, device="cuda")
    halves = [Piece(0, (0, 0), (4, 3)), Piece(0, (4, 0), (4, 3))]
    local = {"w": [LocalPiece((0, 0), (8, 3), param[:4], True), LocalPiece((4, 0), (8, 3), param[4:], True)]}
    for unit in (_unit(halves), _unit([Piece(0, (0, 0), (8, 3))])):
        pieces = local["w"] if len(unit.pieces) == 2 else [LocalPiece((0, 0), (8, 3), param, True)]
        full = exchange(unit, {"w": pieces}, _comm())
        assert full.device.type == "cpu" and torch.equal(full, param.cpu())
