"""Background writes: same bytes and checksums as direct writes, bounded memory, failures kept."""

import threading
import time

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from megatron_trt_ext.formats.safetensors_stream import SafetensorsFileWriter, tensor_bytes
from megatron_trt_ext.formats.write_pool import WritePool
from megatron_trt_ext.layouts import RowBlocks, ZeroRows


def _tensors():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, generator=gen)
    return {
        "a": torch.randn(5, 3, generator=gen).bfloat16(),
        "b": base.t(),  # non-contiguous
        "c": RowBlocks([base[:2], base[5:], ZeroRows(1, (6,), torch.float32)]),
        "d": torch.arange(10, dtype=torch.int64),
    }


def _write(path, pool):
    tensors = _tensors()
    writer = SafetensorsFileWriter(str(path), [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], pool=pool)
    for name in ("c", "a", "d", "b"):  # any order: each tensor has its planned offset
        writer.write(name, tensors[name])
    return writer.close()


def test_pool_writes_the_same_file_and_checksums_as_direct_writes(tmp_path):
    direct = _write(tmp_path / "direct.safetensors", None)
    pool = WritePool(threads=2, budget_bytes=64)
    pooled = _write(tmp_path / "pooled.safetensors", pool)
    pool.close()
    assert direct == pooled and None not in pooled.values()
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "pooled.safetensors").read_bytes()
    stored = load_file(str(tmp_path / "pooled.safetensors"))
    for name, tensor in _tensors().items():
        expected = tensor.materialize() if isinstance(tensor, RowBlocks) else tensor
        assert torch.equal(stored[name], expected)
        assert pooled[name] == xxhash.xxh3_128(tensor_bytes(expected)).hexdigest()


def test_a_failed_background_write_is_raised_at_the_next_submit_and_at_wait():
    pool = WritePool(threads=1)

    def fail():
        raise OSError(28, "No space left on device (injected)")

    pool.submit(fail)
    with pytest.raises(OSError, match="No space left"):
        pool.wait()
    with pytest.raises(OSError, match="No space left"):
        pool.submit(lambda: None)
    pool.close()  # never raises: the failure was reported


def test_a_unit_waits_while_earlier_units_hold_the_budget():
    pool = WritePool(threads=1, budget_bytes=100)
    release = threading.Event()
    pool.begin(80)
    pool.submit(release.wait)
    started = threading.Event()
    done = threading.Event()

    def next_unit():
        started.set()
        pool.begin(50)  # 80 + 50 > 100: must wait for the first unit's write
        done.set()

    thread = threading.Thread(target=next_unit)
    thread.start()
    started.wait()
    time.sleep(0.1)
    assert not done.is_set()
    release.set()
    thread.join(5)
    assert done.is_set()
    pool.begin(10)  # 50 + 10 <= 100: room without waiting for the 50-byte unit
    pool.close()


def test_a_unit_larger_than_the_budget_still_runs_alone():
    pool = WritePool(threads=1, budget_bytes=10)
    pool.begin(1000)
    pool.submit(lambda: None)
    pool.begin(1000)  # returns once the first unit's writes are done
    pool.close()


def test_bytes_written_to_two_files_are_hashed_once_and_checksummed_in_both(tmp_path, monkeypatch):
    import megatron_trt_ext.formats.safetensors_stream as stream

    hashed = []
    real_new = stream.checksum.new

    class Counting:
        def __init__(self):
            self.inner = real_new()

        def update(self, data):
            hashed.append(len(data))
            self.inner.update(data)

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(stream.checksum, "new", Counting)
    shared = torch.randn(64, 32)
    other = torch.randn(64, 32)  # same shape, other bytes: must not take the shared checksum
    pool = WritePool(threads=2, budget_bytes=1 << 20)
    specs = [("w", torch.float32, (64, 32)), ("x", torch.float32, (64, 32))]
    a = SafetensorsFileWriter(str(tmp_path / "a.safetensors"), specs, pool=pool)
    b = SafetensorsFileWriter(str(tmp_path / "b.safetensors"), specs, pool=pool)
    pool.begin(shared.numel() * 4)
    a.write("w", shared)
    b.write("w", shared[:])  # another view object of the same bytes
    a.write("x", other)
    b.write("x", other)
    sums_a, sums_b = a.close(), b.close()
    pool.close()
    monkeypatch.setattr(stream.checksum, "new", real_new)
    assert sums_a == sums_b
    assert sums_a["w"] == xxhash.xxh3_128(tensor_bytes(shared)).hexdigest() != sums_a["x"]
    assert sums_a["x"] == xxhash.xxh3_128(tensor_bytes(other)).hexdigest()
    assert sum(hashed) == 2 * shared.numel() * 4  # each tensor's bytes hashed once, not twice
    assert load_file(str(tmp_path / "b.safetensors"))["w"].equal(shared)


class _FingerprintJob:
    """What `verification.fingerprint.Recorder` hands the pool, without a model around it."""

    def __init__(self, name, tensor, cast=None):
        from megatron_trt_ext.verification.fingerprint import Accumulator

        self.name, self.tensor, self.cast, self.result, self.ran_alone = name, tensor, cast, None, False
        self._acc = Accumulator

    def claim(self, tensor):  # a write of the very memory computes it (as `fingerprint._Job`)
        same = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype) == \
            (self.tensor.data_ptr(), self.tensor.shape, self.tensor.stride(), self.tensor.dtype)
        if same and self.result is None:
            self.taken = True
            return self
        return None

    def accumulator(self):
        return self._acc(self.name, self.tensor.shape, self.cast)

    def finish(self, acc):
        self.result = acc.result()

    def run(self):
        if getattr(self, "taken", False):
            return
        self.ran_alone = True
        acc = self.accumulator()
        acc.update(self.tensor.reshape(self.tensor.shape[0], -1))
        self.finish(acc)


def test_the_write_pass_computes_the_units_fingerprint_exactly_and_alone_when_no_write_holds_it(tmp_path):
    from megatron_trt_ext.formats import safetensors_stream as stream
    from megatron_trt_ext.verification.fingerprint import fingerprint

    gen = torch.Generator().manual_seed(5)
    # 3 MiB of bf16 in rows of 1536: several write chunks, each several fingerprint blocks
    big = torch.randn(1024, 1536, generator=gen).bfloat16()
    source = torch.randn(40, 24, generator=gen)  # fingerprinted as bf16; its bf16 copy is written
    assert big.numel() * 2 > 2 * stream.CHUNK_BYTES
    pool = WritePool(threads=2, budget_bytes=1 << 30)
    writer = SafetensorsFileWriter(str(tmp_path / "f.safetensors"),
                                   [("big", big.dtype, tuple(big.shape)), ("src", torch.bfloat16, tuple(source.shape))],
                                   pool=pool)
    pool.begin(big.numel() * 2 + source.numel() * 6)
    fused, alone = _FingerprintJob("big", big), _FingerprintJob("src", source, cast=torch.bfloat16)
    pool.want_fingerprint(big, fused)
    pool.want_fingerprint(source, alone)
    writer.write("big", big)
    writer.write("src", source.bfloat16())  # other memory: no write holds the unit's bytes
    pool.end()
    sums = writer.close()
    pool.close()
    assert not fused.ran_alone and alone.ran_alone
    for got, want in zip(fused.result, fingerprint("big", big)):
        assert torch.equal(got, want)  # the same blocks in the same order: the same numbers
    for got, want in zip(alone.result, fingerprint("src", source.bfloat16())):
        assert torch.equal(got, want)
    stored = load_file(str(tmp_path / "f.safetensors"))
    assert torch.equal(stored["big"], big) and sums["big"] == xxhash.xxh3_128(tensor_bytes(big)).hexdigest()


class _Recorder:  # what `fingerprint._Job` reads of its recorder
    quant = None

    def __init__(self):
        self.entries = {}


@pytest.mark.parametrize("threads", [1, 2])
def test_writes_of_runs_of_a_units_rows_hash_them_and_the_rest_is_hashed_at_its_end(tmp_path, threads):
    """A gated fc1 is written as two HF tensors, each a run of the unit's rows: each write's
    checksum state gives the hashes of its run; rows no write held (here: a copy was written)
    are hashed at the unit's end; a later write of rows already taken takes nothing."""
    from megatron_trt_ext.verification import fingerprint as fp

    gen = torch.Generator().manual_seed(8)
    unit = torch.randn(3000, 600, generator=gen).bfloat16()  # 3.4 MiB: runs of several blocks
    gate, up, tail = unit[:1200], unit[1200:2500], unit[2500:].clone()  # the tail: other memory
    specs = [("gate", unit.dtype, tuple(gate.shape)), ("up", unit.dtype, tuple(up.shape)),
             ("tail", unit.dtype, tuple(tail.shape)), ("whole", unit.dtype, tuple(unit.shape))]
    pool = WritePool(threads=threads, budget_bytes=1 << 30)
    writer = SafetensorsFileWriter(str(tmp_path / "f.safetensors"), specs, pool=pool)
    recorder = _Recorder()
    pool.begin(unit.numel() * 2)
    pool.want_fingerprint(unit, fp._Job(recorder, "w", unit, None, None))
    for name, t in (("gate", gate), ("up", up), ("tail", tail), ("whole", unit)):
        writer.write(name, t)
    pool.end()
    sums = writer.close()
    pool.close()
    got = recorder.entries["w"]
    assert isinstance(got, fp.Hashes) and got.starts == (0, 1200, 2500)
    want = fp.block_hashes(unit, starts=(0, 1200, 2500))
    assert torch.equal(got.digests, want.digests) and fp.compare("w", got, unit) is None
    # each run's last hash is its write's checksum (low 64 bits): the write's own state gave them
    step = fp.block_rows(600, torch.bfloat16)
    last = [len(range(0, 1200, step)) - 1, len(range(0, 1200, step)) + len(range(0, 1300, step)) - 1]
    for name, i in zip(("gate", "up"), last):
        assert int(sums[name], 16) & (2 ** 64 - 1) == int(got.digests[i]) & (2 ** 64 - 1)
    flipped = unit.clone()
    flipped.view(torch.int16)[1300, 5] ^= 1
    assert "first rows 1200:" in fp.compare("w", got, flipped)
    stored = load_file(str(tmp_path / "f.safetensors"))
    assert torch.equal(stored["whole"], unit) and torch.equal(stored["up"], up)


def test_the_write_pass_refuses_nan_or_inf_anywhere_and_names_the_tensor(tmp_path):
    from megatron_trt_ext.errors import ExportError
    from megatron_trt_ext.formats import safetensors_stream as stream

    rows = 3 * stream.CHUNK_BYTES // (256 * 4)
    for bad in (float("nan"), float("inf")):
        t = torch.zeros(256, rows).t()  # strided: made contiguous a chunk at a time
        t[-1, 7] = bad  # in the last chunk
        for check in (True, False):
            pool = WritePool(threads=1, check_finite=check)
            path = tmp_path / f"{bad}-{check}.safetensors"
            writer = SafetensorsFileWriter(str(path), [("layer.w", t.dtype, tuple(t.shape))], pool=pool)
            writer.write("layer.w", t)
            if check:
                with pytest.raises(ExportError, match="layer.w: contains NaN or Inf"):
                    writer.close()
                writer.abort()
            else:
                writer.close()
                assert bytes(tensor_bytes(load_file(str(path))["layer.w"])) == bytes(tensor_bytes(t))
            pool.close()
