"""The plan on synthetic layouts: DP replicas gathered once, writers balanced, groups kept."""

import pytest
import torch

from megatron_trt_ext.errors import ExportError
from megatron_trt_ext.plan import LocalPiece, describe, expert_group, group_ranks, plan_units
from tests.support.plans import build_units, rank_descriptions


def _local(tp: int, tp_rank: int, dp_rank: int, layers: int = 8, experts: int = 0) -> dict:
    """One rank of a TP x DP layout: column-split linears, a replicated norm, whole experts."""
    out = {}
    for layer in range(layers):
        rows = 64 // tp
        out[f"decoder.layers.{layer}.mlp.linear_fc2.weight"] = [LocalPiece(
            (tp_rank * rows, 0), (64, 32), torch.empty(rows, 32, device="meta"), dp_rank == 0)]
        out[f"decoder.layers.{layer}.input_layernorm.weight"] = [LocalPiece(
            (0,), (32,), torch.empty(32, device="meta"), dp_rank == 0 and tp_rank == 0)]
        for e in range(experts):
            out[f"decoder.layers.{layer}.mlp.experts.experts.{e}.linear_fc1.weight"] = [LocalPiece(
                (0, 0), (16, 32), torch.empty(16, 32, device="meta"), dp_rank == 0)]
    return out


def _descriptions(tp: int, dp: int, **kw) -> list:
    return [describe(_local(tp, rank % tp, rank // tp, **kw)) for rank in range(tp * dp)]


def test_dp_replicas_are_one_class_and_gathered_once():
    descriptions = _descriptions(tp=2, dp=4)
    classes = group_ranks(descriptions)
    assert len(classes) == 2  # one per TP position, whatever the DP size
    assert [rank for rank, _ in classes[0].members] == [0, 2, 4, 6]
    assert [mask != 0 for _, mask in classes[0].members] == [True, False, False, False]  # DP rank 0 is main


def test_writes_spread_evenly_over_the_replicas_of_a_layout():
    units = plan_units(group_ranks(_descriptions(tp=2, dp=4, layers=8)))
    load = {}
    for unit in units:
        load[unit.writer] = load.get(unit.writer, 0) + unit.nbytes
    linears = [u for u in units if u.name.endswith("fc2.weight")]
    assert sorted(u.writer for u in linears) == list(range(8))  # 8 equal linears, 8 ranks: one each
    assert max(load.values()) <= 1.5 * (sum(load.values()) / 8)
    for unit in units:  # a writer never waits on a slice it holds itself
        moved = [p for p in unit.pieces if not unit.local_to_writer(p)]
        assert len(moved) == (1 if unit.name.endswith("fc2.weight") else 0)


def test_norms_are_written_by_a_full_holder_without_transfers():
    units = plan_units(group_ranks(_descriptions(tp=2, dp=2, layers=2)))
    for unit in (u for u in units if u.name.endswith("layernorm.weight")):
        assert all(unit.local_to_writer(p) for p in unit.pieces)
        assert [p.rank for p in unit.pieces] == [0]  # the main copy: TP rank 0, DP rank 0


def test_experts_of_one_layer_share_a_writer():
    units = plan_units(group_ranks(_descriptions(tp=1, dp=2, layers=3, experts=4)), group_key=expert_group)
    for layer in range(3):
        writers = {u.writer for u in units if f"layers.{layer}.mlp.experts" in u.name}
        assert len(writers) == 1, layer


def test_planning_does_not_grow_with_dp_replicas():
    small = plan_units(group_ranks(_descriptions(tp=2, dp=1)))
    large_classes = group_ranks(_descriptions(tp=2, dp=64))
    large = plan_units(large_classes)
    assert len(large_classes) == 2
    assert [(u.name, u.shape, u.pieces) for u in small] == [(u.name, u.shape, u.pieces) for u in large]
    assert all(len(u.writer_slices) <= 2 for u in large)  # per unit: the TP slices, never the replicas


def test_legacy_per_rank_descriptions_plan_the_same():
    descriptions = _descriptions(tp=2, dp=2, layers=2)
    legacy = []
    for rank, (pieces, main) in enumerate(descriptions):
        d = {}
        for (name, off, shp, gshape, dtype), flag in zip(pieces, main):
            d.setdefault(name, []).append((rank, off, shp, gshape, dtype, flag))
        legacy.append(d)
    assert rank_descriptions(legacy) == descriptions
    assert build_units(legacy) == plan_units(group_ranks(descriptions))


def test_gather_classes_on_one_rank():
    from megatron_trt_ext.gather import Comm, gather_classes

    comm = Comm(timeout_s=10, model_device=torch.device("cpu"))
    description = describe(_local(1, 0, 0, layers=1))
    failures, classes = gather_classes(comm, description, None)
    assert failures == [] and len(classes) == 1 and classes[0].pieces == description[0]
    failures, classes = gather_classes(comm, None, ("ExportError", "boom"))
    assert failures == [(0, ("ExportError", "boom"))] and classes is None


def test_with_inference_expert_parallelism_each_ranks_experts_form_a_group():
    names = [f"decoder.layers.3.mlp.experts.experts.{e}.linear_fc1.weight" for e in range(8)]
    assert len({expert_group(n) for n in names}) == 1  # moe_ep = 1: every rank stacks every expert
    groups = [expert_group(n, experts_per_group=2) for n in names]  # moe_ep = 4
    assert groups[0] == groups[1] != groups[2] == groups[3] != groups[4]
    assert len(set(groups)) == 4
    assert expert_group("decoder.layers.3.mlp.router.weight", 2) == "decoder.layers.3.mlp.router.weight"


# ---------------------------------------------------------------------- coverage is exact
def _split(slices: list, global_shape=(8, 4)) -> list:
    """One rank per (offset, shape) slice of one tensor, every slice a main replica."""
    return [{"w": [(rank, off, shp, global_shape, "float32", True)]} for rank, (off, shp) in enumerate(slices)]


@pytest.mark.parametrize("slices,problem", [
    ([((0, 0), (4, 4)), ((0, 0), (4, 4))], "overlap"),  # the same slice twice, rows 4..7 missing
    ([((2, 0), (4, 4)), ((4, 0), (4, 4))], "overlap"),  # rows 4..5 twice, rows 0..1 missing: 32 of 32
    ([((0, 0), (2, 4)), ((2, 0), (4, 4)), ((2, 0), (2, 4))], "overlap"),  # rows 2..3 twice, 6..7 missing
    ([((0, 0), (8, 2)), ((1, 2), (8, 2))], "outside"),  # right count, one slice sticks out of the tensor
    ([((0, 0), (4, 4)), ((4, 0), (4, 2))], "cover 24 of 32"),  # a hole, nothing else
])
def test_main_replicas_must_cover_each_tensor_exactly_once(slices, problem):
    with pytest.raises(ExportError, match=f"tensor 'w'.*{problem}"):
        build_units(_split(slices))


def test_a_tiling_of_uneven_slices_is_accepted():
    slices = [((0, 0), (3, 4)), ((3, 0), (5, 1)), ((3, 1), (5, 3))]
    units = build_units(_split(slices))
    assert [u.name for u in units] == ["w"] and len(units[0].pieces) == 3
