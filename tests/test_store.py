"""Artifact I/O: safetensors round trips against the reference library, streaming writes in
any order, corrupt files named, atomic Zarr writes with provenance."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.store import (
    ArtifactError,
    SafetensorsWriter,
    ZarrWriter,
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
    assert a["artifact"] == "basis" and a["parameters"] == {"k": 4} and a["inputs"][str(src)]["size"] > 0
    json.dumps(a)  # plain JSON
    # A failure half-way leaves the previous artifact untouched and no temporary behind.
    with pytest.raises(RuntimeError):
        with ZarrWriter(out, {"artifact": "basis"}) as w:
            w.write("other", torch.zeros(1))
            raise RuntimeError("killed")
    assert open_tensors(out).keys() == ["x.y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art.zarr", "input.safetensors"]


def test_incomplete_zarr_store_is_named(tmp_path):
    (tmp_path / "broken.zarr").mkdir()
    with pytest.raises(ArtifactError, match="not a Zarr store"):
        open_tensors(tmp_path / "broken.zarr")
