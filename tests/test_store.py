"""Artifact I/O: safetensors round trips against the reference library, streaming writes in
any order, corrupt files named, atomic Zarr writes with provenance, checksums verified on
read, stale temporaries cleaned, provenance records checked against inputs."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.store import (
    ArtifactError,
    SafetensorsReader,
    SafetensorsWriter,
    ZarrWriter,
    array_checksum,
    check_provenance,
    file_fingerprint,
    load_tensors,
    open_tensors,
    provenance,
    write_safetensors,
)

TENSORS = {
    "a.weight": torch.randn(7, 5),
    "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "c": torch.randn(3, dtype=torch.float64),
    "d": torch.randn(4, 4).to(torch.bfloat16),
    "e": torch.randn(2, 3, 2).half(),
    "scalar": torch.tensor(3.5),
}


def test_our_writer_is_read_by_the_reference_library(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, TENSORS, {"k": "v"})
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(TENSORS) and f.metadata() == {"k": "v"}
        for name, t in TENSORS.items():
            assert torch.equal(f.get_tensor(name), t), name


def test_our_reader_reads_the_reference_library(tmp_path):
    path = tmp_path / "y.safetensors"
    save_file(TENSORS, str(path), metadata={"m": "1"})
    reader = open_tensors(path)
    assert set(reader.keys()) == set(TENSORS) and reader.attrs() == {"m": "1"}
    for name, t in TENSORS.items():
        assert reader.shape(name) == tuple(t.shape) and reader.dtype(name) == t.dtype
        assert torch.equal(reader.get(name), t), name


def test_mapped_views_are_the_stored_values_read_only(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(TENSORS, str(path))
    reader = SafetensorsReader(path)
    for name, t in TENSORS.items():
        view = reader.mapped(name)
        if t.dtype == torch.bfloat16:
            assert view is None  # NumPy has no bfloat16: read it instead
            continue
        assert view.ndim == 1 and not view.flags.writeable
        assert torch.equal(torch.from_numpy(view.copy()).view(t.shape), t), name
    del view
    reader.unmap()
    assert torch.equal(reader.get("a.weight"), TENSORS["a.weight"])  # reads go on after unmap
    assert reader.mapped("c") is not None
    reader.close()
    assert open_tensors(path).mapped("a.weight") is not None


def test_streaming_writer_accepts_any_order_and_refuses_incomplete(tmp_path):
    path = tmp_path / "s.safetensors"
    specs = {n: (tuple(t.shape), t.dtype) for n, t in TENSORS.items()}
    with SafetensorsWriter(path, specs) as w:
        for name in reversed(list(TENSORS)):
            w.write(name, TENSORS[name])
    assert all(torch.equal(load_tensors(path)[n], t) for n, t in TENSORS.items())
    w = SafetensorsWriter(tmp_path / "t.safetensors", specs)
    w.write("a.weight", TENSORS["a.weight"])
    with pytest.raises(ArtifactError, match="never written"):
        w.close()
    assert not (tmp_path / "t.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary left


def test_truncated_and_garbage_files_are_named(tmp_path):
    path = tmp_path / "z.safetensors"
    write_safetensors(path, {"w": torch.randn(100)})
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(ArtifactError, match=r"z\.safetensors.*truncated or corrupt"):
        open_tensors(path)
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        open_tensors(path)
    with pytest.raises(ArtifactError, match="file not found"):
        open_tensors(tmp_path / "missing.safetensors")


def test_zarr_writer_is_atomic_and_carries_provenance(tmp_path):
    src = tmp_path / "input.safetensors"
    write_safetensors(src, {"w": torch.ones(2)})
    out = tmp_path / "art.zarr"
    attrs = provenance("basis", {"k": 4}, [src])
    with ZarrWriter(out, attrs) as w:
        w.write("x.y", torch.randn(3, 2))
        w.write("U", torch.randn(4, 2), group="layer.0")
    r = open_tensors(out)
    assert r.keys() == ["x.y"] and r.group("layer.0").keys() == ["U"]
    a = r.attrs()
    assert (
        a["artifact"] == "basis"
        and a["parameters"] == {"k": 4}
        and a["inputs"][str(src)]["size"] > 0
    )
    json.dumps(a)  # plain JSON
    # A failure half-way leaves the previous artifact untouched and no temporary behind.
    with pytest.raises(RuntimeError):
        with ZarrWriter(out, {"artifact": "basis"}) as w:
            w.write("other", torch.zeros(1))
            raise RuntimeError("killed")
    assert open_tensors(out).keys() == ["x.y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art.zarr", "input.safetensors"]


def test_zarr_writer_chunks_are_the_bytes_zarr_writes(tmp_path):
    """ZarrWriter writes single-chunk arrays' bytes itself: the files equal zarr's own, byte for
    byte, and zarr reads them back; an all-zero array gets its chunk file (zarr skips it)."""
    import numpy as np
    import zarr

    arrays = {
        "f32": torch.randn(5, 7), "f64": torch.randn(3, dtype=torch.float64), "scalar": torch.tensor(2.5),
        "i64": torch.arange(6).reshape(2, 3), "flags": torch.tensor([True, False, True]),
        "u8": torch.arange(10, dtype=torch.uint8), "f16": torch.randn(4).half(),
        "cube": torch.arange(24, dtype=torch.int32).reshape(2, 3, 4), "zeros": torch.zeros(4, 4),
        "empty": torch.zeros(0, 3), "bf16": torch.randn(2, 2).bfloat16(),
        # Second arrays of a kind get the first one's zarr.json with their own shape:
        "f32_again": torch.randn(11, 2), "i64_again": torch.arange(4), "f64_again": torch.randn(2, 2, dtype=torch.float64),
        "flags_again": torch.tensor([[True], [False]]), "f16_again": torch.randn(3).half(), "f32_last": torch.randn(1, 1),
    }  # fmt: skip
    ours, ref = tmp_path / "ours.zarr", tmp_path / "ref.zarr"
    with ZarrWriter(ours) as w:
        for name, t in arrays.items():
            w.write(name, t)
        w.write("U", torch.randn(3, 2), group="layer.0")
        w.write("W", torch.randn(4, 2), group="layer.0")
    theirs = zarr.open_group(str(ref), mode="w")
    back = zarr.open_group(str(ours), mode="r")
    for name, t in arrays.items():
        data = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        arr = theirs.create_array(
            name=name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=data.shape or "auto",
            compressors=None,
        )
        arr[...] = data
        assert np.array_equal(back[name][...], data) and back[name].dtype == data.dtype, name
        files = sorted(p.relative_to(ref / name) for p in (ref / name).rglob("*") if p.is_file())
        for f in files:
            assert (ours / name / f).read_bytes() == (ref / name / f).read_bytes(), f"{name}/{f}"
    assert not (ref / "zeros" / "c").exists() and (ours / "zeros" / "c" / "0" / "0").is_file()
    assert np.array_equal(
        back["layer.0"]["U"][...], open_tensors(ours).group("layer.0").get("U").numpy()
    )
    assert np.array_equal(
        back["layer.0"]["W"][...], open_tensors(ours).group("layer.0").get("W").numpy()
    )
    ref_group = theirs.require_group("layer.0")
    ref_group.create_array(name="W", shape=(4, 2), dtype="float32", chunks=(4, 2), compressors=None)
    assert (ours / "layer.0" / "W" / "zarr.json").read_bytes() == (
        ref / "layer.0" / "W" / "zarr.json"
    ).read_bytes()
    # ZarrReader reads such chunks itself (into the caller's buffer with read_into), zarr's
    # store of the same arrays through zarr: the same tensors either way.
    mine, other = open_tensors(ours), open_tensors(ref, require_checksums=False)
    for name, t in arrays.items():
        expected = t.float() if t.dtype == torch.bfloat16 else t
        assert (mine._raw_chunk(name) is not None) == (t.numel() > 0), name
        for got in (mine.get(name), other.get(name) if name != "zeros" else expected):
            assert (
                got.dtype == expected.dtype
                and got.shape == expected.shape
                and torch.equal(got, expected)
            ), name
        buf = torch.empty_like(expected)
        assert torch.equal(mine.read_into(name, buf), expected), name
    packed = theirs.create_array(
        name="packed", shape=(4, 5), dtype="float32", chunks=(2, 5)
    )  # compressed, 2 chunks
    packed[...] = arrays["f32"][:4, :5].numpy()
    reader = open_tensors(ref, require_checksums=False)
    assert reader._raw_chunk("packed") is None and torch.equal(
        reader.get("packed"), arrays["f32"][:4, :5]
    )
    assert torch.equal(reader.read_into("packed", torch.empty(4, 5)), arrays["f32"][:4, :5])


def test_zarr_store_changed_after_opening_is_named(tmp_path):
    """Reads that find the store changed since it was opened (an array's metadata or chunk
    gone) name the store and the array, through `get` and `read_into` alike."""
    out = tmp_path / "art.zarr"
    with ZarrWriter(out) as w:
        w.write("w", torch.randn(3, 4))
        w.write("v", torch.randn(5))
    reader = open_tensors(out)
    (out / "w" / "zarr.json").unlink()
    (out / "v" / "c" / "0").unlink()
    for name, shape in (("w", (3, 4)), ("v", (5,))):
        for read in (lambda: reader.get(name), lambda: reader.read_into(name, torch.empty(shape))):
            with pytest.raises(ArtifactError, match=rf"art.zarr: .*`{name}`.*delete"):
                read()


def test_incomplete_zarr_store_is_named(tmp_path):
    (tmp_path / "broken.zarr").mkdir()
    with pytest.raises(ArtifactError, match="not a Zarr store"):
        open_tensors(tmp_path / "broken.zarr")


# --------------------------------------------------------------------------- integrity


def _store_with_layer(path):
    with ZarrWriter(path, {"artifact": "basis"}) as w:
        w.write("top", torch.arange(12, dtype=torch.float32).reshape(3, 4))
        w.write("U", torch.randn(5, 2, dtype=torch.float64), group="layer.0")
    return path


def _chunk_files(array_dir):
    return [f for f in array_dir.rglob("*") if f.is_file() and f.name != "zarr.json"]


def test_zarr_checksums_are_recorded_and_verified(tmp_path):
    out = _store_with_layer(tmp_path / "a.zarr")
    r = open_tensors(out)
    sums = r.attrs()["checksums"]
    assert set(sums) == {"top", "layer.0/U"} and all(v.startswith("crc32:") for v in sums.values())
    assert sums["top"] == array_checksum(
        torch.arange(12, dtype=torch.float32).reshape(3, 4).numpy()
    )
    assert torch.equal(r.get("top"), torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert r.group("layer.0").get("U").dtype == torch.float64


def test_flipped_byte_in_a_chunk_is_named_with_the_file_to_delete(tmp_path):
    out = _store_with_layer(tmp_path / "a.zarr")
    (chunk,) = _chunk_files(out / "layer.0" / "U")
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    g = open_tensors(out).group("layer.0")
    with pytest.raises(
        ArtifactError,
        match=r"a\.zarr: array `layer\.0/U` does not match its recorded checksum.*delete .*a\.zarr and re-run",
    ):
        g.get("U")


def test_missing_chunk_file_is_an_error_not_zeros(tmp_path):
    out = _store_with_layer(tmp_path / "a.zarr")
    for f in _chunk_files(out / "top"):
        f.unlink()  # Zarr alone would return the fill value (zeros) here
    with pytest.raises(ArtifactError, match="`top` does not match its recorded checksum"):
        open_tensors(out).get("top")


def test_missing_array_or_group_is_named_on_open(tmp_path):
    import shutil

    out = _store_with_layer(tmp_path / "a.zarr")
    shutil.rmtree(out / "layer.0")
    with pytest.raises(ArtifactError, match="group `layer.0` is missing"):
        open_tensors(out).group("layer.0")
    shutil.rmtree(out / "top")
    with pytest.raises(
        ArtifactError, match=r"array `top` is missing \(truncated or corrupt store\)"
    ):
        open_tensors(out)


def test_corrupt_zarr_json_is_named(tmp_path):
    out = _store_with_layer(tmp_path / "a.zarr")
    (out / "zarr.json").write_text("{ truncated")
    with pytest.raises(
        ArtifactError, match=r"a\.zarr: cannot open Zarr group.*delete it and re-run"
    ):
        open_tensors(out)


# --------------------------------------------------------------------------- atomic replacement


def test_rewriting_a_store_replaces_it_whole(tmp_path):
    out = _store_with_layer(tmp_path / "a.zarr")
    with ZarrWriter(out, {"artifact": "basis"}) as w:
        w.write("other", torch.ones(2))
    r = open_tensors(out)
    assert (
        r.keys() == ["other"] and r.group_keys() == [] and list(r.attrs()["checksums"]) == ["other"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]  # nothing moved aside is left


def test_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from pipeline.store import atomic

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)  # that process has exited
    live_pid = os.getppid()
    stale_file = tmp_path / f".x.safetensors.tmp-{atomic.HOST}-{dead_pid}-0123abcd"
    stale_dir = tmp_path / f".x.safetensors.tmp-{atomic.HOST}-{dead_pid}-4567abcd-old"
    live = tmp_path / f".x.safetensors.tmp-{atomic.HOST}-{live_pid}-89abcdef"
    other_host = tmp_path / f".x.safetensors.tmp-elsewhere-{dead_pid}-89abcdef"
    unrelated = tmp_path / f".y.safetensors.tmp-{atomic.HOST}-{dead_pid}-89abcdef"
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "zarr.json").write_text("{}")
    for p in (live, other_host, unrelated):
        p.write_bytes(b"keep")
    write_safetensors(tmp_path / "x.safetensors", {"w": torch.ones(1)})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["x.safetensors", live.name, other_host.name, unrelated.name])


# --------------------------------------------------------------------------- provenance


def test_provenance_is_deterministic_and_ignores_mtime(tmp_path):
    import os
    import shutil

    src = tmp_path / "in.safetensors"
    write_safetensors(src, {"w": torch.arange(4.0)})
    first = provenance("basis", {"k": 4}, [src])
    os.utime(src, (1, 1))
    assert provenance("basis", {"k": 4}, [src]) == first  # same content, other mtime
    copy = tmp_path / "copy.safetensors"
    shutil.copy(src, copy)
    assert file_fingerprint(copy) == file_fingerprint(src)
    assert set(first) == {"artifact", "artifact_version", "package_version", "parameters", "inputs"}
    write_safetensors(src, {"w": torch.arange(4.0) + 1})
    assert provenance("basis", {"k": 4}, [src])["inputs"] != first["inputs"]


def test_the_digest_covers_every_byte_of_a_large_file(tmp_path, monkeypatch):
    """A one-byte edit anywhere in a file far above the old 4 MiB sampling limit changes the
    digest, even one that keeps the size and lands between sampled blocks."""
    monkeypatch.setenv("PIPELINE_DIGEST_CACHE", str(tmp_path / "cache.json"))
    big = tmp_path / "big.bin"
    data = bytearray(torch.randint(0, 256, (6 << 20,), dtype=torch.uint8).numpy().tobytes())
    big.write_bytes(bytes(data))
    before = file_fingerprint(big)
    assert before["digest"].startswith("sha256:") and before["size"] == 6 << 20
    data[(3 << 20) + 70_000] ^= 1  # in the middle, away from any block a sample would read
    with open(big, "r+b") as fh:  # in place: same inode, same size
        fh.write(data)
    assert file_fingerprint(big)["digest"] != before["digest"]


def test_digests_are_cached_by_path_size_mtime_and_inode(tmp_path, monkeypatch):
    """A settled file is hashed once: later fingerprints (this process or another, through the
    cache file) reuse the digest while path, size, mtime and inode are unchanged; any of
    them changing means a fresh hash."""
    import os

    from pipeline.store import digests

    cache = tmp_path / "cache.json"
    monkeypatch.setenv("PIPELINE_DIGEST_CACHE", str(cache))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 << 20))
    os.utime(big, ns=(10**18, 10**18))  # settled: modified long before it is hashed
    calls = []
    real = digests._file_digest
    monkeypatch.setattr(digests, "_file_digest", lambda p, size: calls.append(p) or real(p, size))
    first = file_fingerprint(big)
    assert len(calls) == 1 and cache.is_file()
    digests._digests.clear()  # as a new process: only the cache file remains
    assert file_fingerprint(big) == first and len(calls) == 1
    os.utime(big, ns=(10**18, 10**18 + 1))  # mtime changed, content not
    assert file_fingerprint(big) == first and len(calls) == 2
    monkeypatch.setenv("PIPELINE_DIGEST_CACHE", "off")
    digests._digests.clear()
    file_fingerprint(big)
    assert len(calls) == 3


def test_zarr_store_fingerprint_follows_its_checksums(tmp_path):
    a = _store_with_layer(tmp_path / "a.zarr")
    fp = file_fingerprint(a)
    (a / ".snakemake_timestamp").write_text("")  # Snakemake's marker changes nothing
    assert file_fingerprint(a) == fp
    with ZarrWriter(a, {"artifact": "basis"}) as w:
        w.write("top", torch.zeros(3, 4))
    assert file_fingerprint(a)["digest"] != fp["digest"]


def test_check_provenance_names_the_changed_input_and_parameter(tmp_path):
    p0 = tmp_path / "p.safetensors"
    t1 = tmp_path / "t1.safetensors"
    write_safetensors(p0, {"w": torch.zeros(3)})
    write_safetensors(t1, {"w": torch.ones(3)})
    art = tmp_path / "basis.zarr"
    with ZarrWriter(art, provenance("basis", {"k": 4}, [p0, t1], artifact_version=3)) as w:
        w.write("x", torch.ones(1))
    check_provenance(art, [p0, t1], artifact="basis", parameters={"k": 4}, artifact_version=3)
    with pytest.raises(
        ArtifactError,
        match=r"basis\.zarr: was made with k=4, this run asks for k=8; delete .*basis\.zarr",
    ):
        check_provenance(art, [p0, t1], parameters={"k": 8})
    with pytest.raises(ArtifactError, match="was made from 2 input files, this run gives 1"):
        check_provenance(art, [p0])
    with pytest.raises(ArtifactError, match="holds a `basis` artifact, expected `hessian`"):
        check_provenance(art, [p0, t1], artifact="hessian")
    with pytest.raises(ArtifactError, match="artifact version 3 was written by another release"):
        check_provenance(art, [p0, t1], artifact_version=4)
    write_safetensors(t1, {"w": torch.full((3,), 2.0)})  # same size, other content
    with pytest.raises(
        ArtifactError,
        match=rf"basis\.zarr: input 2 differs from the one it was made from \(recorded {t1}.*given {t1}.*delete",
    ):
        check_provenance(art, [p0, t1])
    with ZarrWriter(tmp_path / "bare.zarr") as w:
        w.write("x", torch.ones(1))
    with pytest.raises(ArtifactError, match="no provenance record"):
        check_provenance(tmp_path / "bare.zarr", [p0])


def test_write_behind_keeps_order_and_surfaces_errors():
    import threading

    from pipeline.store import WriteBehind

    seen, main = [], threading.get_ident()

    def write(name, value):
        assert threading.get_ident() != main  # really on the background thread
        if name == "bad":
            raise ValueError("disk full while writing `bad`")
        seen.append((name, value))

    with WriteBehind(write, depth=2) as w:
        for i in range(10):
            w(f"t{i}", i)
    assert seen == [(f"t{i}", i) for i in range(10)]

    with pytest.raises(ValueError, match="disk full while writing `bad`"):
        with WriteBehind(write, depth=1) as w:
            w("bad", 0)
            for i in range(5):
                w(f"after{i}", i)  # the error surfaces here, at the latest at exit
    assert not any(
        name.startswith("after") for name, _ in seen
    )  # nothing queued after the failure ran


def test_one_safetensors_reader_serves_many_threads_at_once(tmp_path):
    # The merge reads the tensors of one file on a thread pool: reads must not share a file
    # position (a seek then read from two threads returns another tensor's bytes or too few).
    tensors = {f"t{i}": torch.full((64 + i, 257), float(i)) for i in range(48)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    reader = SafetensorsReader(path)
    assert reader.concurrent_reads

    def read(name: str) -> bool:
        out = torch.empty(reader.shape(name))
        ok = torch.equal(reader.read_into(name, out), tensors[name])
        return ok and torch.equal(reader.get(name), tensors[name])

    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(20):
            assert all(pool.map(read, list(tensors)))


@pytest.mark.skipif(
    not hasattr(__import__("os"), "getpriority")
    or not __import__("sys").platform.startswith("linux"),
    reason="per-thread niceness is Linux's",
)
def test_write_behind_runs_at_the_lowest_priority():
    """The background writes yield the cores to the merge (Linux: the thread's niceness)."""
    import os
    import threading

    from pipeline.store import WriteBehind

    seen = []
    with WriteBehind(
        lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    ) as w:
        w()
    assert seen == [19]


@pytest.mark.parametrize("stored", [torch.float64, torch.float16, torch.bfloat16])
def test_read_into_converts_as_torch_does(tmp_path, stored):
    """Reading into a buffer of another dtype (NumPy for the NumPy dtypes, on worker threads)
    rounds exactly as torch's own conversion."""
    g = torch.Generator().manual_seed(5)
    value = (torch.randn(33, 17, generator=g, dtype=torch.float64) * 1e3).to(stored)
    path = tmp_path / "m.safetensors"
    save_file({"w": value}, str(path))
    for want in (torch.float32, torch.float64):
        out = torch.empty(33, 17, dtype=want)
        assert torch.equal(SafetensorsReader(path).read_into("w", out), value.to(want))


def test_the_package_loads_its_torch_side_on_first_use():
    """`import pipeline.store` (as the Snakefile does, through pipeline.stamps) leaves torch
    unimported; every public name still resolves, to the object of its module."""
    code = (
        "import sys, pipeline.store as store, pipeline.stamps\n"
        "assert 'torch' not in sys.modules, 'importing pipeline.store imported torch'\n"
        "for name in store.__all__:\n"
        "    getattr(store, name)\n"
        "from pipeline.store import readers, writers, records\n"
        "assert store.ZarrReader is readers.ZarrReader and store.write_zarr is writers.write_zarr\n"
        "assert store.provenance is records.provenance and store.readers is readers\n"
        "assert set(store.__all__) <= set(dir(store))\n"
        "try:\n"
        "    store.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise AssertionError('an unknown name resolved')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
