"""Resource bombs against the checkpoint importers: small crafted `.pt` files that would make an
unbounded reader allocate gigabytes or compute for minutes, and malformed module pickles. Each bomb is refused with an error naming the file, within a time bound, in a
child process whose address space is capped a little above what importing torch needs."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.models import importers
from pipeline.models.importers import (
    check_torch_checkpoint,
    detect_format,
    foreign_checkpoint,
    import_encoder,
    import_head,
    load_restricted,
    module_tensors,
)
from pipeline.store import ArtifactError

REPO = Path(__file__).resolve().parents[1]
HEADROOM = 1 << 30  # address space the child may add after importing torch and the pipeline
TIME_BOUND_S = 10.0  # per bomb; a refusal takes milliseconds, the old behaviour minutes
RSS_BOUND = 256 << 20  # peak resident growth over all bombs together


# --------------------------------------------------------------------------- crafting torch files


class StorageRef:
    """A storage record as torch writes its persistent id: ('storage', type, key, 'cpu', numel)."""

    def __init__(self, key: str, numel: int, storage_type: type = torch.FloatStorage) -> None:
        self.key, self.numel, self.storage_type = key, numel, storage_type


class TensorView:
    """Pickles as torch pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(
        self, storage: StorageRef, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0
    ) -> None:
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class BadPid:
    """An object whose persistent id is whatever the test asks for."""

    def __init__(self, pid: object) -> None:
        self.pid = pid


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj: object):
        if isinstance(obj, StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        if isinstance(obj, BadPid):
            return obj.pid
        return None


def torch_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def torch_zip(path: Path, pkl: bytes, records: dict[str, bytes], compress: bool = False) -> Path:
    """A torch zip archive (`archive/data.pkl`, `archive/data/<key>`), as torch.save lays it out."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


def head_zip(path: Path, weight: TensorView, bias: TensorView, records: dict[str, bytes]) -> Path:
    return torch_zip(path, torch_pickle({"weight": weight, "bias": bias}), records)


# Raw pickle opcodes, for structures the pickler itself cannot produce cheaply (writing a dict
# whose key is a 60-level shared tuple would hash that key while building the test).
def _put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)  # LONG_BINPUT


def _get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)  # LONG_BINGET


def shared_tuple_ops(levels: int) -> bytes:
    """Ops leaving t_levels on the stack, t_0 = ('x', 'y'), t_i = (t_{i-1}, t_{i-1}): 2^levels
    leaves, each level stored once in the memo."""
    ops = [b"X\x01\x00\x00\x00xX\x01\x00\x00\x00y\x86" + _put(0)]  # BINUNICODE x2, TUPLE2
    ops += [
        b"0" + _get(i - 1) + _get(i - 1) + b"\x86" + _put(i) for i in range(1, levels + 1)
    ]  # POP, GET, GET, TUPLE2, PUT
    return b"".join(ops)


def hash_bomb(kind: str, levels: int = 60) -> bytes:
    """A pickle whose loading hashes a `levels`-deep shared tuple (2^levels hash steps unbounded)."""
    t = shared_tuple_ops(levels)
    one = b"K\x01"  # BININT1 1
    body = {
        "setitem": b"}" + t + one + b"s",  # EMPTY_DICT, key, value, SETITEM
        "setitems": b"}(" + t + one + b"u",  # EMPTY_DICT, MARK, key, value, SETITEMS
        "dict": b"(" + t + one + b"d",  # MARK, key, value, DICT
        "additems": b"\x8f(" + t + b"\x90",  # EMPTY_SET, MARK, item, ADDITEMS
        "frozenset": b"(" + t + b"\x91",  # MARK, item, FROZENSET
        "reduce-set": b"c__builtin__\nset\n]"
        + t
        + b"a\x85R",  # set, [t] (EMPTY_LIST, APPEND), TUPLE1, REDUCE
    }[kind]
    return b"\x80\x04" + body + b"."


def copies_bomb(kind: str, k: int = 50_000, n: int = 50_000) -> bytes:
    """A pickle that hands one shared K-item container to a call `n` times: K × n (2.5·10⁹) items
    hashed or copied, from under a megabyte of opcodes."""
    ints = b"".join(b"J" + struct.pack("<i", i) for i in range(k))  # BININT
    if kind == "set":  # set(L) n times
        head = b"c__builtin__\nset\n" + _put(0) + b"0(" + ints + b"l" + _put(1) + b"0]"
        rep = _get(0) + _get(1) + b"\x85R0"  # GET set, GET L, TUPLE1, REDUCE, POP
    elif kind == "build":  # n stand-ins, each given the same K-entry state dict, kept in a list
        pairs = b"".join(b"J" + struct.pack("<i", i) + b"N" for i in range(k))  # int key: None
        head = b"csrc.modeling\nX\n" + _put(0) + b"0}(" + pairs + b"u" + _put(1) + b"0]"
        rep = _get(0) + b")\x81" + _get(1) + b"ba"  # NEWOBJ, GET state, BUILD, APPEND
    elif kind == "size":  # torch.Size(L) n times
        head = b"ctorch\nSize\n" + _put(0) + b"0(" + ints + b"l" + _put(1) + b"0]"
        rep = _get(0) + _get(1) + b"\x85R0"
    else:  # a stand-in called with the same K arguments n times
        head = b"csrc.modeling\nX\n" + _put(0) + b"0(" + ints + b"t" + _put(1) + b"0]"
        rep = _get(0) + _get(1) + b"Ra"
    return b"\x80\x02" + head + rep * n + b"."


def list_dag(levels: int) -> list:
    """l_0 = ['x'], l_i = [l_{i-1}, l_{i-1}]: its str() has 2^levels parts; pickled in a few bytes."""
    node: list = ["x"]
    for _ in range(levels):
        node = [node, node]
    return node


def deep_list_pickle(levels: int) -> bytes:
    """[[[...]]] nested `levels` deep, built with flat opcodes (no recursion to write it)."""
    return b"\x80\x02" + b"]" * (levels + 1) + b"a" * levels + b"."


def module_chain_pickle(levels: int, cls: str = "src.modeling\nImageEncoder\n") -> bytes:
    """A chain of `levels` pickled modules, each the only child (`a`) of the one above it."""
    mod, name = cls.strip().split("\n")
    glob = b"c" + mod.encode() + b"\n" + name.encode() + b"\n"

    def module(child: bytes | None) -> bytes:
        state = (
            b"}(X\x0b\x00\x00\x00_parameters}X\x08\x00\x00\x00_buffers}X\x08\x00\x00\x00_modules}"
            + (b"X\x01\x00\x00\x00a" + child + b"s" if child is not None else b"")
            + b"u"
        )
        return glob + b")\x81" + state + b"b"  # cls, (), NEWOBJ, state, BUILD

    ops = [module(None) + _put(0) + b"0"]
    ops += [module(_get(i - 1)) + _put(i) + b"0" for i in range(1, levels)]
    return b"\x80\x02" + b"".join(ops) + _get(levels - 1) + b"."


# --------------------------------------------------------------------------- the bombs


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """name → (how to import it, file). Every file is at most a few hundred KiB."""
    d = tmp_path_factory.mktemp("bombs")
    one = struct.pack("<f", 1.0)
    out: dict[str, tuple[str, Path]] = {}

    # D7: a 1 KB head whose weight is a stride-0 view of 10⁵ × 10⁵ (40 GB once copied out).
    s = StorageRef("0", 1)
    out["stride0-head"] = (
        "head",
        head_zip(
            d / "stride0.pt",
            TensorView(s, (10**5, 10**5), (0, 0)),
            TensorView(s, (10**5,), (0,)),
            {"0": one},
        ),
    )
    # Overlap without stride 0: rows of 4 floats advancing by 1 over a 7-float storage.
    s7 = StorageRef("0", 7)
    out["overlap-head"] = (
        "head",
        head_zip(
            d / "overlap.pt",
            TensorView(s7, (4, 4), (1, 1)),
            TensorView(s7, (4,), (1,)),
            {"0": bytes(28)},
        ),
    )
    # D7: a storage record that declares 256 MiB, stored deflated in a file of ~260 KB.
    big = StorageRef("0", 1 << 26)
    path = d / "zipbomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(
            "archive/data.pkl",
            torch_pickle(
                {
                    "weight": TensorView(big, (8192, 8192), (8192, 1)),
                    "bias": TensorView(big, (8192,), (1,)),
                }
            ),
        )
        z.writestr("archive/byteorder", "little")
        with z.open("archive/data/0", "w", force_zip64=True) as fh:
            chunk = bytes(1 << 24)
            for _ in range(16):
                fh.write(chunk)
        z.writestr("archive/version", "3\n")
    assert path.stat().st_size < 1 << 20
    out["zip-bomb-record"] = ("head", path)
    # A storage whose persistent id declares 1 GiB, with a 4-byte record.
    gib = StorageRef("0", 1 << 28)
    out["declared-gib"] = (
        "head",
        head_zip(
            d / "gib.pt", TensorView(gib, (1,), (1,)), TensorView(gib, (1,), (1,)), {"0": one}
        ),
    )
    # D7: a persistent id holding a shared-reference list DAG (its str() is exponential).
    pkl = torch_pickle({"weight": BadPid(("storage", list_dag(60), "0", "cpu", 1))})
    out["pid-list-dag"] = ("head", torch_zip(d / "piddag.pt", pkl, {"0": one}))
    assert len(pkl) < 1000
    # A storage key that is a list DAG (it was formatted into the record name).
    pkl = torch_pickle({"weight": BadPid(("storage", torch.FloatStorage, list_dag(60), "cpu", 1))})
    out["key-list-dag"] = ("encoder", torch_zip(d / "keydag.pt", pkl, {"0": one}))
    # D7: a 60-level shared tuple hashed as a dict key or set member, each way a pickle can hash.
    for kind in ("setitem", "setitems", "dict", "additems", "frozenset", "reduce-set"):
        path = d / f"hash-{kind}.pt"
        path.write_bytes(hash_bomb(kind))
        assert path.stat().st_size < 2000
        out[f"hash-{kind}"] = ("encoder", path)
    # One shared container handed to set(), BUILD, torch.Size or a call 50,000 times.
    for kind in ("set", "build", "size", "args"):
        path = d / f"copies-{kind}.pt"
        path.write_bytes(copies_bomb(kind))
        assert path.stat().st_size < 1 << 20
        out[f"copies-{kind}"] = ("encoder", path)
    # A pickle length field of 2⁴⁰ bytes in a 20-byte file (BINBYTES8).
    path = d / "length.pt"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc.")
    out["huge-length"] = ("encoder", path)
    # A data.pkl record that inflates past the file.
    path = d / "pklbomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as fh:
            fh.write(b"\x80\x02]" + b"N" * (8 << 20))
    out["pickle-record-bomb"] = ("encoder", path)
    # D8: 3,000-deep module tree and a 200,000-deep list.
    path = d / "deep-modules.pt"
    path.write_bytes(module_chain_pickle(3000))
    out["deep-modules"] = ("encoder", path)
    path = d / "deep-list.pt"
    path.write_bytes(deep_list_pickle(200_000))
    out["deep-list"] = ("encoder", path)
    return out


CHILD = textwrap.dedent(
    """
    import contextlib, io, json, resource, sys, time
    from pipeline.cli import main
    from pipeline.models import importers

    importers.expected_shapes("demo")
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    limit = vm + int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for line in sys.stdin:
        name, how, path, out = json.loads(line)
        start = time.perf_counter()
        try:
            if how == "head":
                importers.import_head(path)
            else:
                importers.import_encoder(path, "demo")
            error = None
        except Exception as err:
            error = f"{type(err).__name__}: {err}"[:600]
        seconds = time.perf_counter() - start
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            argv = ["import", "-q", "--out", out] + (["--kind", "head"] if how == "head" else ["--backbone", "demo"])
            code = main(argv + [path])
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        print(json.dumps({"name": name, "error": error, "seconds": seconds, "exit": code,
                          "stderr": stderr.getvalue(), "rss": rss}), flush=True)
    """
)


@pytest.fixture(scope="module")
def refusals(bombs, tmp_path_factory) -> dict[str, dict]:
    """Each bomb imported (API and CLI) in one child process under an address-space limit."""
    if not Path("/proc/self/status").exists():
        pytest.skip("the memory bound is set from /proc/self/status (Linux)")
    out_dir = tmp_path_factory.mktemp("outs")
    lines = "".join(
        json.dumps([name, how, str(path), str(out_dir / f"{name}.safetensors")]) + "\n"
        for name, (how, path) in bombs.items()
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(HEADROOM)],
            input=lines,
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
            cwd=REPO,
        )
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as err:  # the results so far still say which bomb hung
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr = "timed out"
    results = {r["name"]: r for r in map(json.loads, stdout.splitlines())}
    results["_stderr"] = stderr  # type: ignore[assignment]
    return results


EXPECTED = {
    "stride0-head": r"stride0\.pt: .*10000000000 elements, more than the 1 of its storage.*stride-0",
    "overlap-head": r"overlap\.pt: .*16 elements, more than the 7 of its storage",
    "zip-bomb-record": r"zipbomb\.pt: .*declares 268435456 bytes, more than the whole file",
    "declared-gib": r"gib\.pt: .*storage `0` declares 1073741824 bytes, more than the whole file",
    "pid-list-dag": r"piddag\.pt: malformed storage record \('storage', \[<list of 2 items>, <list of 2 items>\]",
    "key-list-dag": r"keydag\.pt: malformed storage record",
    "huge-length": r"length\.pt: cannot unpickle",
    "pickle-record-bomb": r"pklbomb\.pt: record `archive/data\.pkl` declares \d+ bytes, more than the whole file",
    "deep-modules": r"deep-modules\.pt: module tree nested deeper than 64 levels",
    "deep-list": r"deep-list\.pt: the pickled object \(\[\[<list of 1 items>\]\]\) is neither a module nor a state dict",
    "copies-set": r"copies-set\.pt: building its dicts and sets would hash or copy more than 1000000 objects",
    "copies-build": r"copies-build\.pt: building its dicts and sets would hash or copy more than 1000000 objects",
    "copies-size": r"copies-size\.pt: torch\.Size of \[0, 1, 2, .*expected at most 32 ints",
    "copies-args": r"copies-args\.pt: REDUCE with arguments \(0, 1, 2, .*expected a tuple of at most 16",
    **{
        f"hash-{k}": rf"hash-{k}\.pt: a dict key or set member is a nested tuple of more than 1000 objects"
        for k in ("setitem", "setitems", "dict", "additems", "frozenset", "reduce-set")
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bomb_is_refused_quickly_under_a_memory_limit(refusals, name):
    result = refusals.get(name)
    assert result is not None, (
        f"no result for {name}: the child died or hung ({refusals['_stderr'][-2000:]})"
    )
    assert result["error"] is not None, f"{name} was imported"
    assert result["error"].startswith("ArtifactError: "), result["error"]
    assert re.search(EXPECTED[name], result["error"]), result["error"]
    assert result["seconds"] < TIME_BOUND_S, result
    # The command line prints the same refusal as one line and exits 2.
    assert result["exit"] == 2, result
    lines = result["stderr"].strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result["stderr"]
    ), lines


def test_all_bombs_together_stay_small(refusals):
    assert all(name in refusals for name in EXPECTED), refusals["_stderr"][-2000:]
    assert max(r["rss"] for n, r in refusals.items() if n != "_stderr") < RSS_BOUND


# --------------------------------------------------------------------------- in-process checks


def test_crafted_layout_matches_torch(tmp_path):
    """The bomb builder writes real torch archives: a sane file made with it loads the same way
    with torch.load and with the importer."""
    w, b = torch.randn(3, 4), torch.randn(3)
    path = head_zip(
        tmp_path / "head.pt",
        TensorView(StorageRef("0", 12), (3, 4), (4, 1)),
        TensorView(StorageRef("1", 3), (3,), (1,)),
        {"0": w.numpy().tobytes(), "1": b.numpy().tobytes()},
    )
    loaded = torch.load(path, weights_only=True)
    got_w, got_b = import_head(path)
    assert torch.equal(loaded["weight"], w) and torch.equal(got_w, w) and torch.equal(got_b, b)
    # A transposed view and a view at an offset, copied out as torch would show them.
    s = StorageRef("0", 12)
    path = head_zip(
        tmp_path / "views.pt",
        TensorView(s, (4, 3), (1, 4)),
        TensorView(s, (4,), (1,), offset=8),
        {"0": w.numpy().tobytes()},
    )
    loaded = torch.load(path, weights_only=True)
    got_w, got_b = import_head(path)
    assert torch.equal(got_w, loaded["weight"]) and torch.equal(got_w, w.T)
    assert torch.equal(got_b, loaded["bias"]) and torch.equal(got_b, w.flatten()[8:12])


def test_expanded_size_one_dimension_is_accepted(tmp_path):
    """Stride 0 on a dimension of size 1 (HF's position_ids is arange(n).expand(1, -1)) is fine."""
    ids = torch.arange(5, dtype=torch.int64)
    path = torch_zip(
        tmp_path / "ids.pt",
        torch_pickle({"ids": TensorView(StorageRef("0", 5, torch.LongStorage), (1, 5), (0, 1))}),
        {"0": ids.numpy().tobytes()},
    )
    with load_restricted(path, modules=False) as ckpt:
        got = ckpt.tensor(module_tensors(ckpt.root, path)["ids"])
    assert torch.equal(got, ids[None])


def test_copies_beyond_twice_the_file_are_refused(tmp_path):
    """Tensors may share one storage, but what is copied out stays within twice the file."""
    n = 1 << 18  # a 1 MiB storage, viewed whole by eight entries
    s = StorageRef("0", n)
    path = torch_zip(
        tmp_path / "shared.pt",
        torch_pickle({f"t{i}": TensorView(s, (n,), (1,)) for i in range(8)}),
        {"0": bytes(4 * n)},
    )
    with load_restricted(path, modules=False) as ckpt:
        refs = module_tensors(ckpt.root, path)
        for name in ("t0", "t1"):
            assert ckpt.tensor(refs[name]).shape == (n,)
        with pytest.raises(
            ArtifactError, match=r"shared\.pt: its tensors would take more than twice the file"
        ):
            for name in list(refs)[2:]:
                ckpt.tensor(refs[name])


def test_pickles_longer_than_the_limit_are_refused(tmp_path, monkeypatch):
    """Parsing time is bounded by the pickle limit, not by the file's size (lowered here to
    1 MiB so that the test writes a 2 MiB file, not a 64 MiB one)."""
    monkeypatch.setattr(importers, "_MAX_PICKLE_BYTES", 1 << 20)
    ops = b"\x80\x02" + b"N0" * (1 << 20) + b"N."  # None, POP, ... : 2 MiB of harmless opcodes
    stream = tmp_path / "long.pt"
    stream.write_bytes(ops)
    with pytest.raises(ArtifactError, match=r"long\.pt: its pickle runs past 1 MiB"):
        load_restricted(stream)
    archive = torch_zip(tmp_path / "long-zip.pt", ops, {})
    with pytest.raises(
        ArtifactError, match=r"long-zip\.pt: record `archive/data\.pkl` holds a 2097156-byte pickle"
    ):
        load_restricted(archive)
    monkeypatch.setattr(importers, "_MAX_PICKLE_BYTES", 4 << 20)
    with load_restricted(stream) as ckpt:  # within the limit the same file parses
        assert ckpt.root is None


def test_storage_declared_twice_differently(tmp_path):
    pkl = torch_pickle(
        {
            "weight": TensorView(StorageRef("0", 4), (2, 2), (2, 1)),
            "bias": TensorView(StorageRef("0", 2), (2,), (1,)),
        }
    )
    path = torch_zip(tmp_path / "twice.pt", pkl, {"0": bytes(16)})
    with pytest.raises(ArtifactError, match=r"twice\.pt: storage `0` is declared twice"):
        import_head(path)


def test_brief_is_bounded():
    dag = list_dag(200)  # str() of it would never finish
    text = importers._brief(("storage", dag, "0" * 10_000, 10**400))
    assert len(text) < 300 and "<int of" in text and "…" in text


def _module_pickle(state_items: bytes) -> bytes:
    """One pickled src.modeling module whose state dict holds `state_items` (key, value ops)."""
    return b"\x80\x02csrc.modeling\nImageEncoder\n)\x81}(" + state_items + b"ub."


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (
            b"X\x08\x00\x00\x00_modules]X\x0b\x00\x00\x00_parameters}",
            r"`_modules` of the root module .* is \[\], not a mapping",
        ),
        (
            b"X\x08\x00\x00\x00_modules}X\x0b\x00\x00\x00_parametersX\x03\x00\x00\x00abc",
            r"`_parameters` of the root module .* is 'abc', not a mapping",
        ),
        (
            b"X\x08\x00\x00\x00_modules}X\x08\x00\x00\x00_buffers}K\x01Ns",
            r"`_buffers` of the root module has a key 1, not a name",
        ),
        (
            b"X\x08\x00\x00\x00_modules}X\x01\x00\x00\x00a]sX\x0b\x00\x00\x00_parameters}",
            r"child `a` is \[\], not a module",
        ),
        (
            b"X\x08\x00\x00\x00_modules}X\x0b\x00\x00\x00_parameters}X\x01\x00\x00\x00wK\x05s",
            r"`w` is 5, not a tensor",
        ),
        (
            b"X\x08\x00\x00\x00_modules}X\x1b\x00\x00\x00_non_persistent_buffers_set]",
            r"`_non_persistent_buffers_set` of the root module is \[\], not a set",
        ),
    ],
    ids=[
        "modules-list",
        "parameters-str",
        "buffers-int-key",
        "child-list",
        "parameter-int",
        "nonpersistent-list",
    ],
)
def test_malformed_module_pickles(tmp_path, capsys, items, message):
    path = tmp_path / "finetuned.pt"
    path.write_bytes(_module_pickle(items))
    with pytest.raises(ArtifactError, match=rf"finetuned\.pt: {message}"):
        import_encoder(path, "demo")
    assert (
        main(
            [
                "import",
                "--backbone",
                "demo",
                "-q",
                "--out",
                str(tmp_path / "o.safetensors"),
                str(path),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "finetuned.pt" in err[0]


def test_malformed_head_module(tmp_path):
    path = tmp_path / "head_Cars.pt"
    path.write_bytes(
        b"\x80\x02csrc.modeling\nClassificationHead\n)\x81}(X\t\x00\x00\x00normalize\x88"
        b"X\x0b\x00\x00\x00_parametersX\x01\x00\x00\x00xub."
    )
    with pytest.raises(
        ArtifactError, match=r"head_Cars\.pt: `_parameters` of the head .* is 'x', not a mapping"
    ):
        import_head(path)


def test_module_tree_at_the_depth_limit_is_read(tmp_path):
    """Nesting is refused only past the limit: a chain 64 modules deep still flattens."""
    path = tmp_path / "chain.pt"
    path.write_bytes(module_chain_pickle(importers._MAX_MODULE_DEPTH + 1))
    with load_restricted(path) as ckpt:
        assert module_tensors(ckpt.root, path) == {}
    path.write_bytes(module_chain_pickle(importers._MAX_MODULE_DEPTH + 2))
    with load_restricted(path) as ckpt, pytest.raises(ArtifactError, match="deeper than 64 levels"):
        module_tensors(ckpt.root, path)


def test_small_tuple_keys_are_still_accepted(tmp_path):
    """The hash bound refuses only big keys: a dict keyed by a 3-level shared tuple (31 objects) loads."""
    path = tmp_path / "keys.pt"
    path.write_bytes(b"\x80\x04}" + shared_tuple_ops(3) + b"K\x01s.")
    with load_restricted(path) as ckpt:
        (key,) = ckpt.root
    assert key[0][0] == (("x", "y"), ("x", "y"))


def test_build_only_sets_state_of_stand_ins(tmp_path):
    """BUILD on an allowed function or class (to set its attributes) is refused."""
    path = tmp_path / "build.pt"
    path.write_bytes(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x01\x00\x00\x00aK\x01sb.")
    with pytest.raises(ArtifactError, match=r"build\.pt: BUILD sets the state of <function>"):
        load_restricted(path)
    assert not hasattr(importers._rebuild_tensor, "a")


def test_build_cannot_shadow_mapping_methods(tmp_path):
    """A state dict's OrderedDict may carry `_metadata`, not an attribute hiding `items`."""
    path = tmp_path / "shadow.pt"
    path.write_bytes(
        b"\x80\x02ccollections\nOrderedDict\n)R}X\x05\x00\x00\x00itemsctorch\ndevice\nsb."
    )
    with pytest.raises(
        ArtifactError,
        match=r"shadow\.pt: BUILD gives an OrderedDict the state \{'items': <class torch\.device>\}",
    ):
        import_encoder(path, "demo")
    path.write_bytes(b"\x80\x02ccollections\nOrderedDict\n)R}X\t\x00\x00\x00_metadata}sb.")
    with load_restricted(path) as ckpt:
        assert ckpt.root == {} and ckpt.root._metadata == {}


def test_state_dict_format_refuses_module_classes(tmp_path):
    path = tmp_path / "finetuned.pt"
    path.write_bytes(module_chain_pickle(2))
    assert detect_format(path) == "taskvectors"
    with pytest.raises(
        ArtifactError,
        match=r"finetuned\.pt: holds pickled classes \(`src\.modeling\.ImageEncoder`\)",
    ):
        import_encoder(path, "demo", format="state_dict")


# --------------------------------------------------------------------------- θ0 through open_clip


class _Shell:
    def __reduce__(self):
        return (os.system, ("true",))


def test_theta0_refuses_malicious_and_bomb_files(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"visual.proj": _Shell()}, evil)
    s = StorageRef("0", 1)
    bomb = head_zip(
        tmp_path / "bomb.pt",
        TensorView(s, (10**5, 10**5), (0, 0)),
        TensorView(s, (1,), (1,)),
        {"0": struct.pack("<f", 1.0)},
    )
    for path, message in (
        (evil, r"refusing to unpickle global `posix\.system`|`nt\.system`"),
        (bomb, r"more than the 1 of its storage"),
    ):
        with pytest.raises(ArtifactError, match=rf"{path.name}: .*({message})"):
            check_torch_checkpoint(path)
        out = tmp_path / "theta0.safetensors"
        assert (
            main(
                [
                    "theta0",
                    "--backbone",
                    "ViT-B-32",
                    "--pretrained",
                    str(path),
                    "--out",
                    str(out),
                    "-q",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and path.name in lines[0] and "Traceback" not in err, err
        assert "weights_only" not in err and "\x1b[" not in err and not out.exists()


def test_theta0_check_accepts_real_state_dicts(tmp_path):
    """A torch.save'd state dict (zip and legacy) passes the check, reading no tensor bytes."""
    state = {"visual.conv1.weight": torch.randn(4, 3, 2, 2), "logit_scale": torch.tensor(4.6)}
    for legacy in (False, True):
        path = tmp_path / f"open_clip_{legacy}.pt"
        torch.save(
            {"state_dict": state, "epoch": 3}, path, _use_new_zipfile_serialization=not legacy
        )
        check_torch_checkpoint(path)


def test_foreign_loader_errors_become_one_plain_line(tmp_path):
    """torch's weights-only refusal carries colour codes and advice to re-run with
    weights_only=False; the guarded load reports the refused global in one plain line."""
    import argparse

    path = tmp_path / "refused.pt"
    system = f"{os.system.__module__}.system"
    for payload, gist, colour in (
        (argparse.Namespace(a=1), "GLOBAL argparse.Namespace was not an allowed global", True),
        (_Shell(), f"GLOBAL {system} whose module {os.system.__module__} is blocked", False),
    ):
        torch.save({"x": payload}, path)
        with pytest.raises(pickle.UnpicklingError) as raw:
            torch.load(path, weights_only=True)
        assert (
            "weights_only" in str(raw.value) and ("\x1b[" in str(raw.value)) == colour
        )  # what torch says
        message = importers._plain_message(raw.value)
        assert "\n" not in message and "\x1b[" not in message and "weights_only" not in message
        assert gist in message, message

    # A file the restricted unpickler accepts but torch's weights-only unpickler does not
    # (an INST opcode): the loader's failure comes back as one ArtifactError naming the file.
    odd = torch_zip(tmp_path / "odd.pt", b"\x80\x02(icollections\nOrderedDict\n.", {})
    with pytest.raises(ArtifactError) as err, foreign_checkpoint(odd):
        torch.load(odd, weights_only=True)
    text = str(err.value)
    assert text.startswith(f"{odd}: cannot load these weights: ") and "Unsupported operand" in text
    assert "\n" not in text and "weights_only" not in text


def test_guarded_open_clip_load_is_unchanged(tmp_path):
    """A genuine open_clip checkpoint loads through the guard exactly as without it."""
    open_clip = pytest.importorskip("open_clip")
    name = "epimer-limits-tiny-vit"
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 16,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    path = tmp_path / "open_clip_model.pt"
    torch.save(model.state_dict(), path)
    plain = open_clip.create_model(name, pretrained=str(path))
    with foreign_checkpoint(path):
        guarded = open_clip.create_model(name, pretrained=str(path))
    want, got = plain.state_dict(), guarded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
