"""Moving slices to their writer rank, one unit at a time, and agreeing on outcomes.

Every rank walks the same list of units in the same order; for each unit the writer receives the
slices it does not hold and the holders send them, nothing else. So no rank can wait on a
transfer that its peer skipped, each byte crosses the network at most once, and a rank holds at
most one assembled unit at a time.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Iterator, Optional

import torch

from . import host_memory
from .plan import Unit, torch_dtype

# Where the writer assembles units: host memory, whatever device the slices travel through.
HOST = torch.device("cpu")


class Comm:
    """The export's process groups, created once (collectively) when the exporter is built.

    ``control``: a gloo group with a bounded timeout, for plans and decisions (objects).
    ``data``: for tensor slices; NCCL when the default group is NCCL and the model is on CUDA,
    else the gloo group (slices then travel through host memory).
    With ``own_world`` (the export workers, whose whole world is the export's) both are the
    default group.

    After a communication failure (a peer lost, a timeout), `abort` tears the groups down, so
    peers blocked on this rank fail at once instead of at their timeout, and `lost_ranks` names
    the ranks that did not check in through the store within a short grace period.
    """

    def __init__(self, timeout_s: float, model_device: torch.device, own_world: bool = False, store=None):
        dist = torch.distributed
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.timeout_s = timeout_s
        self.grace_s = max(1.0, min(10.0, timeout_s / 4))
        self.data_device = torch.device("cpu")
        self.control = self.data = None
        self.own_world = own_world
        self.store = store
        self.broken: Optional[str] = None
        self._round = 0
        self.token = "local"
        if self.distributed:
            timeout = timedelta(seconds=timeout_s)
            if not own_world:
                self.control = dist.new_group(backend="gloo", timeout=timeout)
                if model_device.type == "cuda" and dist.get_backend() == "nccl":
                    self.data = dist.new_group(backend="nccl", timeout=timeout)
                    self.data_device = model_device
                else:
                    self.data = self.control
            if self.store is None:
                try:
                    self.store = dist.distributed_c10d._get_default_store()
                except Exception:  # noqa: BLE001 - no store: failures are reported without naming ranks
                    self.store = None
            import uuid

            self.token = self.all_gather_object(uuid.uuid4().hex)[0]

    def _check(self) -> None:
        if self.broken:
            raise RuntimeError(f"the export's process groups were torn down after an earlier failure ({self.broken})")

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        self._check()
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast_object(self, obj, src: int):
        """``obj`` of rank ``src``, on every rank."""
        if not self.distributed:
            return obj
        self._check()
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src, group=self.control)
        return box[0]

    def gather_object(self, obj) -> Optional[list]:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        self._check()
        out = [None] * self.world_size if self.rank == 0 else None
        torch.distributed.gather_object(obj, out, dst=0, group=self.control)
        return out

    def agree(self, error: Optional[str]) -> list:
        """Every rank's error (None when fine), identical on every rank: one shared decision."""
        return [(rank, err) for rank, err in enumerate(self.all_gather_object(error)) if err]

    def send(self, tensor: torch.Tensor, dst: int, tag: int):
        self._check()
        t = tensor.detach().to(self.data_device).contiguous()
        # the groups span the whole world, so group ranks are global ranks
        return t, torch.distributed.isend(t, dst, group=self.data, tag=tag)

    def recv(self, shape: tuple, dtype: torch.dtype, src: int, tag: int):
        self._check()
        buf = torch.empty(shape, dtype=dtype, device=self.data_device)
        return buf, torch.distributed.irecv(buf, src, group=self.data, tag=tag)

    def recv_into(self, buf: torch.Tensor, src: int, tag: int):
        """Receive straight into ``buf`` (a contiguous view of the tensor being assembled)."""
        self._check()
        return torch.distributed.irecv(buf, src, group=self.data, tag=tag)

    # ------------------------------------------------------------------ failures
    def next_round(self, iteration: int) -> str:
        """A name for one export attempt, the same on every rank (they all count alike)."""
        self._round += 1
        return f"{iteration}.{self._round}"

    def abort(self, why: str) -> None:
        """Tear the export's groups down: peers waiting on this rank get an error at once."""
        if not self.distributed or self.broken:
            return
        self.broken = why
        dist = torch.distributed
        groups = {id(g): g for g in (self.control, self.data) if g is not None}
        self.control = self.data = None  # the last references: the connections close with them
        try:
            if self.own_world:
                dist.destroy_process_group()
            else:
                for group in groups.values():
                    dist.destroy_process_group(group)
        except Exception:  # noqa: BLE001 - already broken
            pass
        groups.clear()
        import gc

        gc.collect()

    def lost_ranks(self, round_name: str) -> Optional[list]:
        """After a communication failure: the ranks that did not check in within the grace period
        (None when there is no store to ask). Every surviving rank checks in, then waits."""
        if not self.distributed:
            return []
        if self.store is None:
            return None
        import time

        prefix = f"megatron_trt_ext/{self.token}/{round_name}/alive/"
        try:
            self.store.set(prefix + str(self.rank), "1")
            deadline = time.monotonic() + self.grace_s
            while True:
                missing = [r for r in range(self.world_size) if not self.store.check([prefix + str(r)])]
                if not missing or time.monotonic() >= deadline:
                    return missing
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store itself is gone: its host (rank 0) is lost
            return [0]


def gather_classes(comm: Comm, description: Optional[tuple], error) -> tuple:
    """Every rank's slice description, each distinct one moved once: ``(failures, classes)``.

    First every rank shares a fixed-size line (its error, a digest of its pieces, its main flags);
    then, for each distinct digest, its lowest rank broadcasts the pieces. DP replicas describe
    the same pieces, so what each rank receives grows with the model-parallel positions (one
    description per TP x PP x EP position), never with ranks x their descriptions.
    ``failures``: [(rank, error)] when some rank could not describe itself (then no classes).
    """
    import hashlib
    import pickle

    from .plan import RankClass, main_mask

    pieces, main = description if description is not None else ((), ())
    digest = hashlib.sha256(pickle.dumps(pieces, protocol=4)).digest()[:16]
    table = comm.all_gather_object((error, digest, main_mask(main)))
    failures = [(rank, err) for rank, (err, _, _) in enumerate(table) if err]
    if failures:
        return failures, None
    members: dict = {}
    for rank, (_, key, mask) in enumerate(table):
        members.setdefault(key, []).append((rank, mask))
    classes = []
    for key, ranks in members.items():  # in the order of their first rank: the same on every rank
        first = ranks[0][0]
        classes.append(RankClass(comm.broadcast_object(pieces if comm.rank == first else None, first),
                                 tuple(ranks)))
    return [], classes


def _local_piece(local: dict, unit: Unit, piece) -> torch.Tensor:
    """This rank's memory of ``piece``: its slice, or the rows of it that a split unit's range
    takes (a view either way)."""
    offset, shape = piece.key
    for held in local.get(unit.name, ()):
        if held.offset == offset and tuple(held.tensor.shape) == shape:
            tensor = held.tensor.detach()
            if piece.src is not None:  # rows of the slice: the range's first row is unit.rows[0]
                tensor = tensor.narrow(0, unit.rows[0] + piece.offset[0] - offset[0], piece.shape[0])
            return tensor
    raise KeyError(f"tensor {unit.name!r}: this rank holds no slice at offset {offset}")


def exchange(unit: Unit, local: dict, comm: Comm, cast_to: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """Run this rank's part of one unit's transfer. Returns the full tensor (a split unit: its
    rows ``unit.rows``) on the writer, in host memory.

    ``cast_to``: the dtype the writer casts the whole unit to next (see `Conversion.unit`):
    slices are then cast as they are placed, so the unit is assembled and cast in one pass, at
    the export dtype's size. Local slices that already form one tensor in memory (the gate and
    up halves of a gated fc1 are views of one parameter) come back as a view, uncopied.

    The unit is assembled in host memory even when the slices travel through the accelerator
    (NCCL): a sync export runs while training's memory is still allocated, and a whole unit
    there (an embedding, a fused expert weight) may not fit. Device receive buffers then hold
    one slice at a time.
    """
    rank = comm.rank
    if rank == unit.writer:
        if len(unit.pieces) == 1 and unit.local_to_writer(unit.pieces[0]):
            return _local_piece(local, unit, unit.pieces[0]).to(HOST)
        dtype = torch_dtype(unit.dtype)
        local_parts = [(p, _local_piece(local, unit, p))
                       for p in unit.pieces if unit.local_to_writer(p)]
        remote = [(tag, p) for tag, p in enumerate(unit.pieces) if not unit.local_to_writer(p)]
        if not remote:
            whole = _one_view(unit, local_parts)
            if whole is not None:
                return whole.to(HOST)
        full = host_memory.empty(unit.shape, cast_to or dtype)
        pending = []
        if comm.data_device.type == HOST.type:  # every slice in flight at once, landing in place
            for tag, piece in remote:
                target = full[_index(piece)]
                if target.is_contiguous() and full.dtype == dtype:  # a row block: received in place
                    pending.append((piece, None, comm.recv_into(target, piece.rank, tag)))
                else:
                    pending.append((piece, *comm.recv(piece.shape, dtype, piece.rank, tag)))
        for piece, tensor in local_parts:
            full[_index(piece)] = tensor.to(HOST)
        for piece, buf, work in pending:
            work.wait()
            if buf is not None:
                full[_index(piece)] = buf
        if comm.data_device.type != HOST.type:  # through the accelerator: one device buffer at a time
            for tag, piece in remote:
                buf, work = comm.recv(piece.shape, dtype, piece.rank, tag)
                work.wait()
                full[_index(piece)] = buf.to(HOST)
                buf = None  # freed before the next slice's buffer is allocated, not after
        return full
    sends = []
    for tag, piece in enumerate(unit.pieces):
        if piece.rank == rank and not unit.local_to_writer(piece):
            sends.append(comm.send(_local_piece(local, unit, piece), unit.writer, tag))
    for _, work in sends:
        work.wait()
    return None


def _one_view(unit: Unit, parts: list) -> Optional[torch.Tensor]:
    """The unit as a view of its local slices' memory, when they are contiguous row blocks lying
    one after the other in one storage (else None)."""
    parts = sorted(parts, key=lambda pt: pt[0].offset)
    first = parts[0][1]
    row = first.stride(0) if first.dim() else 0
    position = first.storage_offset()
    for piece, tensor in parts:
        if (not tensor.is_contiguous() or tensor.dtype != first.dtype or tensor.device != first.device
                or tuple(tensor.shape[1:]) != tuple(unit.shape[1:]) or any(piece.offset[1:])
                or tensor.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or tensor.storage_offset() != position):
            return None
        position += tensor.numel()
    if first.dim() == 0 or position - first.storage_offset() != unit.numel:
        return None
    return first.as_strided(unit.shape, (row, *first.stride()[1:]), first.storage_offset())


def _index(piece) -> tuple:
    return tuple(slice(o, o + s) for o, s in zip(piece.offset, piece.shape))


def iter_meta(units: list) -> Iterator[tuple]:
    """Shape-only stand-ins with the same names, for planning the output files: one per tensor,
    whole (the row ranges of a split unit follow each other in the plan, the last one ends at
    its last row)."""
    for i, unit in enumerate(units):
        if unit.rows is None:
            yield unit.name, torch.empty(unit.shape, dtype=torch_dtype(unit.dtype), device="meta")
        elif i + 1 == len(units) or units[i + 1].name != unit.name:
            yield unit.name, torch.empty((unit.rows[1], *unit.shape[1:]), dtype=torch_dtype(unit.dtype), device="meta")
