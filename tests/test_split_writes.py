"""Several ranks write one tensor, a row range each: the plan's ranges, their assembly on each
writer, the positional writes into one planned file, their checksums and `verify`."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_trt_ext import checksum
from megatron_trt_ext import manifest as mf
from megatron_trt_ext.errors import ExportError
from megatron_trt_ext.formats.safetensors_stream import SafetensorsFileWriter
from megatron_trt_ext.formats.write_pool import WritePool
from megatron_trt_ext.gather import Comm, exchange, iter_meta
from megatron_trt_ext.plan import LocalPiece, SplitPolicy, describe, expert_group, group_ranks, plan_units

TABLE = "embedding.word_embeddings.weight"


def _local(tp: int, tp_rank: int, dp_rank: int, vocab: int = 64, layers: int = 4, experts: int = 0) -> dict:
    """One rank of a TP x DP layout: a vocab-parallel table, row-parallel linears, experts."""
    rows = vocab // tp
    out = {TABLE: [LocalPiece((tp_rank * rows, 0), (vocab, 8), torch.empty(rows, 8, device="meta"), dp_rank == 0)]}
    for layer in range(layers):
        out[f"decoder.layers.{layer}.mlp.linear_fc2.weight"] = [LocalPiece(
            (0, tp_rank * 4), (8, 4 * tp), torch.empty(8, 4, device="meta"), dp_rank == 0)]
        for e in range(experts):
            out[f"decoder.layers.{layer}.mlp.experts.experts.{e}.linear_fc1.weight"] = [LocalPiece(
                (0, 0), (64, 8), torch.empty(64, 8, device="meta"), dp_rank == 0)]
    return out


def _classes(tp: int, dp: int, **kw) -> list:
    return group_ranks([describe(_local(tp, r % tp, r // tp, **kw)) for r in range(tp * dp)])


def _is_table(name: str) -> bool:
    return name == TABLE or ".experts." in name


def _loads(units) -> dict:
    load: dict = {}
    for u in units:
        load[u.writer] = load.get(u.writer, 0) + u.numel * 4
    return load


def test_without_a_policy_every_unit_stays_whole():
    assert all(u.rows is None for u in plan_units(_classes(tp=2, dp=2)))


def test_a_large_table_is_split_into_row_ranges_written_where_they_are_held():
    whole = plan_units(_classes(tp=2, dp=4))
    units = plan_units(_classes(tp=2, dp=4), split=SplitPolicy(_is_table, threshold=512))
    ranges = [u for u in units if u.name == TABLE]
    assert len(ranges) > 1 and all(u.rows is not None for u in ranges)
    assert ranges == [u for u in units[:len(ranges)]]  # the ranges follow each other, in row order
    at = 0
    for u in ranges:  # consecutive, covering every row once, each at most half the threshold
        assert u.rows[0] == at and u.shape == (u.rows[1] - at, 8) and u.numel * 4 <= 256
        at = u.rows[1]
        assert all(u.local_to_writer(p) for p in u.pieces)  # TP row blocks: nothing moves
    assert at == 64
    assert len({u.writer for u in ranges}) == 8  # spread over every rank of the layout
    assert max(_loads(units).values()) < max(_loads(whole).values())
    assert [u.name for u in units if u.rows is None] == [u.name for u in whole if u.name != TABLE]
    meta = dict(iter_meta(units))  # the output plan still sees one whole tensor
    assert tuple(meta[TABLE].shape) == (64, 8)


def test_ranges_cut_slices_when_the_rows_of_a_holder_are_too_many():
    units = plan_units(_classes(tp=1, dp=2), split=SplitPolicy(_is_table, threshold=1024))
    ranges = [u for u in units if u.name == TABLE]
    assert [u.rows for u in ranges] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    for u in ranges:  # rows of rank 0's whole slice, which rank 1 holds too (a DP replica)
        (piece,) = u.pieces
        assert piece.rank == 0 and piece.offset == (0, 0) and piece.shape == (16, 8)
        assert piece.src == ((0, 0), (64, 8)) and u.local_to_writer(piece)
    assert sorted({u.writer for u in ranges}) == [0, 1]


def test_the_default_threshold_is_one_and_a_half_times_the_mean_load():
    classes = _classes(tp=1, dp=4, layers=2)  # a 2048-byte table, two 128-byte linears, 4 ranks
    policy = SplitPolicy(_is_table)
    assert policy.limit(2304, 4) == 864
    ranges = [u.rows for u in plan_units(classes, split=policy) if u.name == TABLE]
    assert ranges == [(0, 12), (12, 25), (25, 38), (38, 51), (51, 64)]  # at most 432 bytes (13 rows) each
    assert [u.rows for u in plan_units(_classes(tp=1, dp=1, layers=2), split=policy)] == [None] * 3  # one rank


def test_units_that_share_a_writer_stay_whole():
    classes = _classes(tp=1, dp=4, layers=2, experts=2)
    units = plan_units(classes, group_key=expert_group, split=SplitPolicy(_is_table, threshold=1024))
    assert all(u.rows is None for u in units if ".experts." in u.name)  # stacked together: one writer
    assert len([u for u in units if u.name == TABLE]) == 4
    assert all(u.rows is None for u in plan_units(classes, split=SplitPolicy(lambda n: False, threshold=1)))


def test_a_writer_assembles_its_rows_from_its_own_slice_and_from_cut_pieces():
    table = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)
    local = {TABLE: [LocalPiece((0, 0), (64, 8), table, True)]}
    units = plan_units(group_ranks([describe(local)]), split=SplitPolicy(_is_table, threshold=1024))
    comm = Comm(timeout_s=10, model_device=torch.device("cpu"))
    parts = [(u.rows, exchange(u, local, comm)) for u in units]
    assert [rows for rows, _ in parts] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    for (first, stop), rows in parts:
        assert torch.equal(rows, table[first:stop]) and rows.data_ptr() == table[first].data_ptr()  # a view


def _planned(path: Path, create: bool, pool=None) -> SafetensorsFileWriter:
    specs = [("a", torch.bfloat16, (3,)), ("t", torch.bfloat16, (10, 4)), ("z", torch.float32, (2, 2))]
    return SafetensorsFileWriter(str(path), specs, {"format": "pt"}, create=create, pool=pool)


def _tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, generator=g).bfloat16(), "t": torch.randn(10, 4, generator=g).bfloat16(),
            "z": torch.randn(2, 2, generator=g)}


@pytest.mark.parametrize("threads", [0, 2])
def test_range_writes_from_two_writers_equal_one_writer_byte_for_byte(tmp_path, threads):
    tensors = _tensors()
    one = _planned(tmp_path / "one.safetensors", create=True)
    for name, t in tensors.items():
        one.write(name, t)
    whole_sums = one.close()
    pools = [WritePool(threads, budget_bytes=1 << 20, check_finite=True) if threads else None for _ in range(2)]
    first = _planned(tmp_path / "two.safetensors", create=True, pool=pools[0])  # creates and sizes the file
    second = _planned(tmp_path / "two.safetensors", create=False, pool=pools[1])  # only writes into it
    second.write("t", tensors["t"][6:], rows=(6, 10))
    first.write("a", tensors["a"])
    first.write("t", tensors["t"][:6], rows=(0, 6))
    second.write("z", tensors["z"])
    sums = {**first.close(), **second.close()}
    for pool in pools:
        if pool is not None:
            pool.close()
    assert (tmp_path / "two.safetensors").read_bytes() == (tmp_path / "one.safetensors").read_bytes()
    assert sorted(sums) == ["a", "t@rows 0:6", "t@rows 6:10", "z"]
    assert sums["a"] == whole_sums["a"] and sums["z"] == whole_sums["z"]
    t = tensors["t"]
    assert sums["t@rows 6:10"] == checksum.hexdigest([t[6:].contiguous().view(torch.uint8).numpy()])
    assert first.missing(set(sums)) == [] and first.missing({"a", "z", "t@rows 0:6"}) == ["t"]
    assert first.missing({"a", "z", "t@rows 0:6", "t@rows 5:10"}) == ["t"]  # an overlap is no cover


def test_a_range_write_is_checked_against_the_plan(tmp_path):
    w = _planned(tmp_path / "f.safetensors", create=True)
    t = _tensors()["t"]
    with pytest.raises(ValueError, match="outside its shape"):
        w.write("t", t[:4], rows=(8, 12))
    with pytest.raises(ValueError, match=r"t@rows 0:4.*planned"):
        w.write("t", t[:3], rows=(0, 4))
    w.write("t", t[:4], rows=(0, 4))
    with pytest.raises(ValueError, match="written twice"):
        w.write("t", t[2:6], rows=(2, 6))
    with pytest.raises(ValueError, match="written twice"):
        w.write("t", t)
    nan = t[4:].clone()
    nan[1, 1] = float("nan")
    pool = WritePool(1, budget_bytes=1 << 20, check_finite=True)
    w.pool = pool
    w.write("t", nan, rows=(4, 10))
    with pytest.raises(ExportError, match=r"t@rows 4:10: contains NaN"):  # checked per range, named by it
        w.close()
    pool.close()
    w.abort()


def _export_with_rows(root: Path, sums: dict) -> Path:
    """A minimal complete export whose one file lists ``sums`` (keys may be row ranges)."""
    export = root / "iter_0000001"
    (export / "hf").mkdir(parents=True)
    save_file(_tensors(), str(export / "hf" / "model.safetensors"))
    manifest = {"schema_version": mf.SCHEMA_VERSION, "status": "complete",
                "files": {"hf/model.safetensors": checksum.entry(sums)}}
    (export / mf.MANIFEST).write_text(json.dumps(manifest))
    return export


def _range_sums(ranges=((0, 6), (6, 10))) -> dict:
    t = _tensors()
    sums = {n: checksum.hexdigest([t[n].contiguous().view(torch.uint8).reshape(-1).numpy()]) for n in ("a", "z")}
    for first, stop in ranges:
        data = t["t"][first:stop].contiguous().view(torch.uint8).reshape(-1).numpy()
        sums[checksum.range_key("t", first, stop)] = checksum.hexdigest([data])
    return sums


def test_verify_reads_checksums_by_rows(tmp_path):
    assert checksum.parse_key("t@rows 6:10") == ("t", (6, 10)) and checksum.parse_key("t") == ("t", None)
    assert mf.verify_export(_export_with_rows(tmp_path / "ok", _range_sums())) == []
    sums = _range_sums()
    sums["t@rows 6:10"] = sums["t@rows 0:6"]
    assert mf.verify_export(_export_with_rows(tmp_path / "bad", sums)) == [
        "hf/model.safetensors: t@rows 6:10 checksum mismatch (xxh3_128)"]
    gap = mf.verify_export(_export_with_rows(tmp_path / "gap", _range_sums(((0, 6), (7, 10)))))
    assert gap == ["hf/model.safetensors: t checksums by rows: rows 6:7 missing"]


FC2 = "decoder.layers.0.mlp.linear_fc2.weight"


def _write_from_rank(rank: int, world_size: int, out: str) -> dict:
    """One rank of TP=2: a vocab table split by rows over TP and a row-parallel linear split by
    columns, both planned as row ranges; each rank assembles its ranges and writes them into the
    one file rank 0 created (after a barrier, as the export agrees on the files first); rank 0
    compares with a single writer's file and runs `verify`."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(1)
    full = {TABLE: torch.randn(64, 8, generator=g), FC2: torch.randn(64, 8, generator=g)}
    local = {TABLE: [LocalPiece((rank * 32, 0), (64, 8), full[TABLE][rank * 32:(rank + 1) * 32].clone(), True)],
             FC2: [LocalPiece((0, rank * 4), (64, 8), full[FC2][:, rank * 4:(rank + 1) * 4].clone(), True)]}
    comm = Comm(timeout_s=60, model_device=torch.device("cpu"))
    units = plan_units(group_ranks(comm.all_gather_object(describe(local))),
                       split=SplitPolicy(lambda n: True, threshold=1024))
    path = Path(out) / "split.safetensors"
    specs = [(name, torch.bfloat16, (64, 8)) for name in (TABLE, FC2)]
    writer = SafetensorsFileWriter(str(path), specs, {"format": "pt"}, create=True) if rank == 0 else None
    dist.barrier()
    writer = writer or SafetensorsFileWriter(str(path), specs, {"format": "pt"}, create=False)
    for unit in units:
        rows = exchange(unit, local, comm, cast_to=torch.bfloat16)
        if rows is not None:
            writer.write(unit.name, rows.bfloat16(), rows=unit.rows)
    sums = comm.all_gather_object(writer.close())
    if rank != 0:
        return {}
    merged = {k: v for s in sums for k, v in s.items()}
    export = Path(out) / "iter_0000001"
    (export / "hf").mkdir(parents=True)
    path.rename(export / "hf" / "model.safetensors")
    (export / mf.MANIFEST).write_text(json.dumps({"schema_version": mf.SCHEMA_VERSION, "status": "complete",
                                                  "files": {"hf/model.safetensors": checksum.entry(merged)}}))
    single = SafetensorsFileWriter(str(Path(out) / "single.safetensors"), specs, {"format": "pt"})
    for name, t in full.items():  # one writer, whole tensors: the file before this change
        single.write(name, t.bfloat16())
    single.close()
    return {"units": [(u.name, u.rows, u.writer, sum(not u.local_to_writer(p) for p in u.pieces)) for u in units],
            "keys": sorted(merged), "verify": mf.verify_export(export),
            "same": (export / "hf" / "model.safetensors").read_bytes()
            == (Path(out) / "single.safetensors").read_bytes()}


@pytest.mark.heavy
def test_two_ranks_write_one_tensor_into_one_file(tmp_path):
    from tests.support.distributed import run_ranks

    outcome = run_ranks(2, "tests.test_split_writes:_write_from_rank", timeout_s=120, cpu_shim=False,
                        out=str(tmp_path))
    assert all(status == "ok" for status, _ in outcome.values()), outcome
    got = outcome[0][1]
    ranges = [(0, 16), (16, 32), (32, 48), (48, 64)]
    table = [(rows, writer, moved) for name, rows, writer, moved in got["units"] if name == TABLE]
    fc2 = [(rows, writer, moved) for name, rows, writer, moved in got["units"] if name == FC2]
    assert table == [((0, 16), 0, 0), ((16, 32), 0, 0), ((32, 48), 1, 0), ((48, 64), 1, 0)]  # held rows: nothing moves
    assert [r for r, _, _ in fc2] == ranges and {w for _, w, _ in fc2} == {0, 1}
    assert all(moved == 1 for _, _, moved in fc2)  # the other rank's columns of these rows, cut from its slice
    assert got["keys"] == sorted(checksum.range_key(n, *r) for n in (TABLE, FC2) for r in ranges)
    assert got["verify"] == [] and got["same"]


def test_fingerprints_of_row_ranges_join_into_the_whole_tensors():
    from megatron_trt_ext.verification import fingerprint as fp

    t = torch.randn(300, 7, dtype=torch.float64).bfloat16()
    whole = fp.fingerprint("w", t)
    entries = {"other": "why not", "w@rows 0:100": None, "w@rows 100:300": None}
    for first, stop in ((0, 100), (100, 300)):
        acc = fp.Accumulator("w", t.shape, rows=(first, stop))
        acc.update(t[first:stop].reshape(stop - first, -1))
        entries[checksum.range_key("w", first, stop)] = acc.result()
    merged = fp.merge_ranges(entries)
    assert merged["other"] == "why not"
    assert torch.equal(merged["w"][0], whole[0])  # each row's entry is that row's alone
    assert torch.allclose(merged["w"][1], whole[1], rtol=1e-13, atol=0)  # sums: another order of additions
    assert fp.compare("w", merged["w"], t) is None
    swapped = t.clone()
    swapped[[5, 250]] = swapped[[250, 5]]
    assert "row" in fp.compare("w", merged["w"], swapped)
    with pytest.raises(ValueError, match="rows 100:150 missing"):
        fp.merge_ranges({"w@rows 0:100": whole, "w@rows 150:300": whole})


def test_block_hashes_of_row_ranges_join_into_runs_of_the_whole_tensor():
    from megatron_trt_ext.verification import fingerprint as fp

    gen = torch.Generator().manual_seed(9)
    t = torch.randn(3000, 700, generator=gen).bfloat16()  # 4 MiB: several blocks per range
    cuts = ((0, 1000), (1000, 2900), (2900, 3000))
    entries = {checksum.range_key("w", a, b): fp.block_hashes(t[a:b]) for a, b in reversed(cuts)}
    merged = fp.merge_ranges(entries)["w"]
    assert merged.shape == (3000, 700) and merged.starts == (0, 1000, 2900)
    assert torch.equal(merged.digests, fp.block_hashes(t, starts=(0, 1000, 2900)).digests)
    assert fp.compare("w", merged, t) is None
    flipped = t.clone()
    flipped.view(torch.int16)[2950, 1] ^= 1
    assert "first rows 2900:3000" in fp.compare("w", merged, flipped)
    assert fp.compare("w", fp.block_hashes(t), t) is None and fp.compare("w", merged, t[:, :699]) is not None
    vectors = fp.Accumulator("w", t.shape, rows=(1000, 3000))
    vectors.update(t[1000:].reshape(2000, -1))
    with pytest.raises(ValueError, match="different kinds"):
        fp.merge_ranges({"w@rows 0:1000": fp.block_hashes(t[:1000]), "w@rows 1000:3000": vectors.result()})


@pytest.mark.heavy
@pytest.mark.parametrize("layout,model_kw,vocab,mode", [({"tp": 2}, {"vocab_size": 256}, 200, "sync"),
                                                        ({"pp": 2}, {"tied": True}, 120, "async")])
def test_export_with_rows_split_over_ranks_equals_single_writer(megatron_world, tmp_path, layout, model_kw, vocab,
                                                                mode):
    """A tiny Llama on 2 ranks with a low `split_rows_over`: the vocabulary tables are written by
    both ranks, a row range each (TP2: vocabulary padding across shards; PP2: tied, the output
    copy on the last stage; async: the worker processes snapshot each slice once, however many
    ranges read it), into HF and TensorRT-LLM files (TP1, and TP2 with lm_head padded over two
    rank files). Every tensor file equals the single-writer export byte for byte, the
    manifest lists the tables' checksums by rows, and `verify` passes (checksums by range, the
    fingerprints joined from their ranges, the probe)."""
    from megatron_trt_ext.verification.check import verify
    from tests.test_distributed import PROBE, WORKER, exported_files, reference
    from tests.support.distributed import run_ranks

    targets = [dict(inference_tp=1), dict(inference_tp=2, formats=["trtllm_checkpoint"])]
    ckpt = reference(tmp_path, "llama", model_kw, vocab, targets)
    exports = [dict(output_dir=str(tmp_path / f"dist{i}"), vocab_size=vocab, split_rows_over=4096, mode=mode, **t)
               for i, t in enumerate(targets)]
    outcome = run_ranks(2, WORKER, timeout_s=240, family="llama", layout=layout, checkpoint_dir=str(ckpt),
                        exports=exports, model_kw=model_kw)
    for rank, (status, value) in outcome.items():
        assert status == "ok" and [v[0] for v in value] == ["complete"] * 2, f"rank {rank}: {status} {value}"
    for i in range(len(targets)):
        ref, got = tmp_path / f"ref{i}" / "iter_0000001", tmp_path / f"dist{i}" / "iter_0000001"
        ref_files, got_files = exported_files(ref), exported_files(got)
        assert sorted(ref_files) == sorted(got_files)
        for name in ref_files:
            if not name.endswith("fingerprints.safetensors"):  # the tables' hashes: a run per range
                assert ref_files[name] == got_files[name], f"target {i}: {name} differs"
        manifest = json.loads((got / "manifest.json").read_text())
        ranged = [key for rel, entry in manifest["files"].items() if rel != PROBE
                  for key in checksum.read_entry(entry)[1] if checksum.parse_key(key)[1] is not None]
        assert ranged, f"target {i}: nothing was written by row ranges"
        assert mf.verify_export(got) == []
        if i == 0:
            report = verify(got, record=False)
            assert report.passed, report.lines()
            from megatron_trt_ext.verification import fingerprint as fp

            table = fp.load(got / fp.FILE_NAME)["embedding.word_embeddings.weight"]
            assert isinstance(table, fp.Hashes) and len(table.starts) > 1  # exact hashes, a run per range


def test_outputs_are_learned_as_runs_of_rows_and_ranges_write_one_run_each():
    from megatron_trt_ext.row_split import Output, _runs, range_writes, rows_data

    probe = torch.arange(1, 6 * 4 + 1, dtype=torch.float64).reshape(6, 4)
    padded = torch.cat([probe[4:], torch.zeros(2, 4, dtype=torch.float64)])  # lm_head's last TP slice
    assert _runs(probe[:4], probe) == ((0, 4, 0),)
    assert _runs(padded, probe) == ((0, 2, 4), (2, 4, None))
    assert _runs(probe[[1, 0, 2]], probe) == ((0, 1, 1), (1, 2, 0), (2, 3, 2))  # kept in order of output rows
    assert _runs(probe.t()[:, :4].contiguous(), probe) is None  # a transpose is not made of rows
    assert _runs(probe[:, 2:], probe) == ((0, 6, 0),)  # a split along columns: the rows of one column block
    assert _runs(probe[:, [0, 2]], probe) is None  # columns interleaved
    assert _runs(probe * 2, probe) is None
    outputs = (Output("trtllm", 0, "lm_head.weight", ((0, 4, 0),)),
               Output("trtllm", 1, "lm_head.weight", _runs(padded, probe)))
    first, second = range_writes(outputs, (0, 3)), range_writes(outputs, (3, 6))
    assert [(o.rank, rows, blocks) for o, rows, blocks in first] == [(0, (0, 3), [(0, 3)])]
    assert [(o.rank, rows, blocks) for o, rows, blocks in second] == [(0, (3, 4), [(3, 4)]),
                                                                       (1, (0, 4), [(4, 6), ("zeros", 2)])]
    rows = torch.randn(3, 4)
    data = rows_data([(4, 6), ("zeros", 2)], rows, 3)  # source rows 3:6 held: rows 4:6, then zeros
    assert tuple(data.shape) == (4, 4) and torch.equal(data.parts[0], rows[1:])
    half = rows_data([(3, 6)], rows, 3, cols=(2, 4, 4))  # the second half of the columns (a TP2 split)
    assert torch.equal(half, rows[:, 2:])
    swapped = (Output("hf", None, "w", ((0, 1, 1), (1, 2, 0), (2, 6, 2))),)
    assert range_writes(swapped, (0, 2))[0][1:] == ((0, 2), [(1, 2), (0, 1)])  # one run, rows in output order
    apart = (Output("hf", None, "w", ((0, 1, 0), (1, 2, 2), (2, 3, 1))),)
    with pytest.raises(ValueError, match="not one run"):
        range_writes(apart, (0, 2))  # source rows 0 and 1 land at output rows 0 and 2
