"""Every artifact on disk goes through this module: safetensors and Zarr.

Reads are lazy (one tensor at a time, so a merge never holds T full models), writes are
atomic (into a temporary sibling, renamed into place on success, removed on failure), and
every Zarr artifact carries provenance attributes (what it is, the parameters and inputs it
was made from, the package version) and a CRC-32 checksum of every array.

Guarantees (tested in tests/test_store.py and tests/test_atomic.py):
- A process killed at any moment (even SIGKILL) leaves either the previous artifact or none at
  the final path, never a half-written one; its temporary sibling (`.NAME.tmp-HOST-PID-…`) is
  removed by the next writer of the same path once that process is gone.
- Reading a Zarr artifact verifies each array against its recorded checksum, so a truncated or
  corrupt store is reported by name with the advice to delete it, never read as zeros.
- `check_provenance` refuses an artifact whose recorded inputs (size and full content digest)
  or parameters differ from the ones a stage is about to combine it with.
- A writer never replaces what it should not (`check_output_path`): an existing folder that is
  not an artifact of the same kind, or a file where a store goes. Tensor names that are not
  plain relative names (`check_tensor_name`) never become paths, and writers opened with
  `finite=True` refuse NaN or Inf before anything is renamed into place.
"""

from __future__ import annotations

import copy
import errno
import fnmatch
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import __version__


# Snakemake leaves a `.snakemake_timestamp` marker inside directory outputs (our Zarr stores);
# Zarr warns about the foreign file on every open. It is expected, so it is not shown.
warnings.filterwarnings("ignore", message=r".*\.snakemake_timestamp.*")


class ArtifactError(ValueError):
    """A file could not be read or does not hold what it should. The message names the file."""


_BAD_NAME_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")


def check_tensor_name(name: str, source: str | os.PathLike) -> None:
    """Refuse a tensor name that is not a plain relative name.

    Zarr stores a tensor `a/b` as the folder `a/b/` of the store, so a name is a path: empty
    segments, `.` or `..`, a leading `/`, backslashes and control characters (NUL included)
    could leave the store or collide with its metadata, and are refused for every output
    format alike. `source` is the file the name comes from (named in the error).
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty"
    else:
        bad = _BAD_NAME_CHAR.search(name)
        if bad is not None:
            problem = "contains a backslash" if bad.group() == "\\" else f"contains the control character {bad.group()!r}"
        elif name.startswith("/"):
            problem = "is an absolute path"
        elif any(part in ("", ".", "..") for part in name.split("/")):
            problem = "has an empty, `.` or `..` path segment"
        elif "zarr.json" in name.split("/"):
            problem = "has a segment `zarr.json` (the name of Zarr's metadata files)"
    if problem is not None:
        text = str(name)
        shown = repr(text) if len(text) <= 120 else f"{text[:120]!r}…"  # repr: NUL and control characters visible
        raise ArtifactError(
            f"{source}: tensor name {shown} {problem}; tensor names must be relative names of "
            "'/'-separated segments without `.`, `..`, backslashes or control characters: rename it in that file"
        )


# --------------------------------------------------------------------------- dtypes

_ST_TO_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}
#: Stored (little-endian) NumPy dtypes of the safetensors dtypes NumPy has.
_NP_LITTLE_ENDIAN = {
    t: np.dtype(c)
    for t, c in [(torch.float64, "<f8"), (torch.float32, "<f4"), (torch.float16, "<f2"), (torch.int64, "<i8"),
                 (torch.int32, "<i4"), (torch.int16, "<i2"), (torch.int8, "i1"), (torch.uint8, "u1"), (torch.bool, "?")]
}  # fmt: skip


# --------------------------------------------------------------------------- readers


#: dtypes whose conversions `TensorReader.read_into` does in NumPy (the same rounding as torch's).
_NUMPY_COPY = (torch.float16, torch.float32, torch.float64)


class TensorReader:
    """Lazy read access to named tensors in one file (safetensors) or store (Zarr group).

    Subclasses implement `keys`, `shape`, `dtype` and `_load`. `get` wraps `_load` so a
    read failure names the file and the tensor.
    """

    path: Path
    #: Whether several threads may read tensors of this one reader at the same time.
    concurrent_reads: bool = False

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def _load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.keys())

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor)."""
        if name not in self:
            raise ArtifactError(f"{self.path}: no tensor named `{name}`")
        try:
            return self._load(name)
        except ArtifactError:
            raise
        except Exception as err:  # corrupt payloads surface here, with a library-specific type
            raise ArtifactError(f"{self.path}: cannot read tensor `{name}`: {err}") from err

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read one tensor into the preallocated `out` (same shape; converted to out's dtype)."""
        if name not in self:
            raise ArtifactError(f"{self.path}: no tensor named `{name}`")
        src = self.get(name)
        if out.device.type == "cpu" and out.dtype in _NUMPY_COPY and src.dtype in _NUMPY_COPY and out.shape == src.shape:
            # NumPy, not torch: readers run on worker threads, where a torch op would start an
            # OpenMP team of its own (see `pipeline.parallel`).
            np.copyto(out.numpy(), src.numpy(), casting="unsafe")
        else:
            out.copy_(src)
        return out

    def attrs(self) -> dict[str, Any]:
        """Metadata stored with the tensors (safetensors `__metadata__`, Zarr attributes)."""
        return {}

    def mapped(self, name: str) -> np.ndarray | None:
        """A read-only, zero-copy 1-D view of the tensor's stored values, or None where the
        format cannot give one (then `get` or `read_into`)."""
        return None

    def unmap(self) -> None:
        """Drop the mapping behind `mapped` views (they must not be used after)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsReader(TensorReader):
    """Lazy reader of a safetensors file: the header is parsed once, each `get` reads one
    tensor's bytes with a plain seek + read.

    Reads copy (no memory map by default: mapped pages of every input would count towards the
    process's resident memory, and a merge reads T + 1 or 2T + 1 whole files); `mapped` gives
    zero-copy views for a caller that streams one file at a time and `unmap`s it after (TIES).
    The header is checked against the file size, so a truncated or corrupt file is reported by
    name before any merge. Reads are positional (`pread`), so threads may share a reader.
    """

    concurrent_reads = True

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        fix = "re-create or re-download it"
        try:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                if n > _MAX_HEADER_BYTES:
                    raise ValueError(f"header length {n} exceeds the format's limit of {_MAX_HEADER_BYTES} bytes")
                header = json.loads(fh.read(n))
        except (ValueError, struct.error, UnicodeDecodeError) as err:
            raise ArtifactError(f"{self.path}: not a readable safetensors file ({err}); {fix}") from err
        except RecursionError:
            raise ArtifactError(f"{self.path}: not a readable safetensors file (its header nests too deeply); {fix}") from None
        if not isinstance(header, dict):
            raise ArtifactError(
                f"{self.path}: not a readable safetensors file (the header is a JSON {type(header).__name__}, "
                f"expected an object of tensor entries); {fix}"
            )
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ArtifactError(f"{self.path}: `__metadata__` is not a mapping of strings to strings; {fix}")
        self._meta = meta
        self._data_start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                if not isinstance(entry, dict):
                    raise TypeError(f"expected an object, got a JSON {type(entry).__name__}")
                dtype = _ST_TO_TORCH[entry["dtype"]]
                shape = tuple(_json_int(d) for d in entry["shape"])
                offsets = entry["data_offsets"]
                if not isinstance(offsets, list) or len(offsets) != 2:
                    raise ValueError(f"data_offsets {offsets!r} is not a pair [begin, end]")
                begin, end = (_json_int(x) for x in offsets)
                if any(d < 0 for d in shape):
                    raise ValueError(f"negative dimension in shape {list(shape)}")
            except (KeyError, TypeError, ValueError) as err:
                raise ArtifactError(f"{self.path}: tensor `{name}` has a malformed header entry ({err})") from err
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0 or self._data_start + end > size:
                raise ArtifactError(
                    f"{self.path}: tensor `{name}` lies outside the file or has the wrong byte count "
                    f"(truncated or corrupt file); {fix}"
                )
            self._entries[name] = (dtype, shape, begin, end)
        # As the safetensors library checks: sorted by offset, the tensors tile the data
        # section exactly (no overlap, so no tensor reads another's bytes; no gap).
        position = 0
        for name, (_, _, begin, end) in sorted(self._entries.items(), key=lambda item: (item[1][2], item[1][3])):
            if begin != position:
                what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
                raise ArtifactError(
                    f"{self.path}: tensor `{name}` has invalid data_offsets [{begin}, {end}]: it {what} "
                    f"(expected to start at byte {position}); corrupt or hand-edited file: {fix}"
                )
            position = end
        if self._data_start + position != size:
            raise ArtifactError(
                f"{self.path}: the tensors end at byte {self._data_start + position} but the file has {size} bytes "
                f"(corrupt file or trailing data); {fix}"
            )
        self._keys = list(self._entries)
        self._file = open(self.path, "rb")
        self._map: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def _load(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        buf = bytearray(end - begin)
        self._pread_into(name, memoryview(buf), self._data_start + begin)
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def _pread_into(self, name: str, view: memoryview, offset: int) -> None:
        try:
            complete = _pread_full(self._file.fileno(), view, offset)
        except OSError as err:  # an I/O error of the disk or the network file system
            raise ArtifactError(f"{self.path}: cannot read tensor `{name}` ({err.strerror or err})") from err
        if not complete:
            raise ArtifactError(f"{self.path}: tensor `{name}` is truncated")

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        dtype, shape, begin, end = self._entries.get(name, (None, (), 0, 0))
        if dtype != out.dtype or not out.is_contiguous() or out.device.type != "cpu" or dtype == torch.bfloat16:
            return super().read_into(name, out)
        if tuple(out.shape) != shape:
            raise ArtifactError(f"{self.path}: tensor `{name}` has shape {list(shape)}, expected {list(out.shape)}")
        # Straight from the file into the caller's buffer: no intermediate copy.
        self._pread_into(name, memoryview(out.numpy()).cast("B"), self._data_start + begin)
        return out

    def attrs(self) -> dict[str, Any]:
        return dict(self._meta)

    def mapped(self, name: str) -> np.ndarray | None:
        """The tensor's bytes in a shared read-only map of the file (prefaulted on first use),
        for one pass over a whole model without copying it (TIES). bfloat16 has no NumPy type."""
        dtype, shape, begin, end = self._entries[name]
        np_dtype = _NP_LITTLE_ENDIAN.get(dtype)
        if np_dtype is None:
            return None
        if self._map is None:
            size = self.path.stat().st_size
            if size == 0:
                return None
            self._map = mmap.mmap(self._file.fileno(), size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        return np.frombuffer(self._map, dtype=np_dtype, count=math.prod(shape), offset=self._data_start + begin)

    def unmap(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # views still alive: the map goes when they do
                pass
            self._map = None

    def close(self) -> None:
        self.unmap()
        self._file.close()


#: The safetensors library's limit on the header's size (100 MB).
_MAX_HEADER_BYTES = 100_000_000


def _json_int(value: Any) -> int:
    """An integer of a JSON header (not a float, string or bool that int() would accept)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _pread_full(fd: int, view: memoryview, offset: int) -> bool:
    """Fill `view` from file `fd` at `offset` by positional reads (no shared file position, so
    threads may read different parts of one file at once); False if the file ends first."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            return False
        done += n
    return True


class ZarrReader(TensorReader):
    """Lazy reader over the arrays at the root of a Zarr v3 group (subgroups are not tensors).

    Stores written by `ZarrWriter` list a CRC-32 of every array (root attribute `checksums`,
    keyed `name` or `group/name`): opening checks that every listed array exists, and each
    read is verified against its checksum. (Zarr itself returns the fill value for a chunk
    file that has gone missing; the checksum turns that into an error naming the store.)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        require_checksums: bool = True,
        _checksums: Mapping[str, str] | None = None,
        _store: Path | None = None,
    ) -> None:
        """require_checksums: refuse a store without a valid `checksums` attribute, and any array
        it does not list (the default: every artifact is written by `ZarrWriter`). False only
        for stores made by other tools, which are then read unverified."""
        import zarr

        self.path = Path(path)
        # The store a subgroup reader belongs to: errors name it, as it is what to delete.
        self._store = _store or self.path
        self._prefix = f"{self.path.relative_to(self._store).as_posix()}/" if _store is not None else ""
        self._strict = require_checksums
        if not (self.path / "zarr.json").is_file():
            raise ArtifactError(
                f"{self.path}: not a Zarr store (no zarr.json); it is missing, truncated or was "
                "written by an interrupted job: delete it and re-run"
            )
        try:
            self._group = zarr.open_group(str(self.path), mode="r")
            self._keys = sorted(self._group.array_keys())
            self._attrs = dict(self._group.attrs)
        except Exception as err:
            raise ArtifactError(f"{self.path}: cannot open Zarr group ({err}); delete it and re-run") from err
        self._key_set = set(self._keys)
        self._group_keys: list[str] | None = None  # listed on first use
        self._arrays: dict[str, Any] = {}  # zarr array handles, opened on first use
        if _checksums is None:
            recorded = self._attrs.get("checksums")
            valid = isinstance(recorded, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) and v.startswith("crc32:") for k, v in recorded.items()
            )
            if not valid:
                if require_checksums:
                    found = "missing" if recorded is None else f"a {type(recorded).__name__}, not a mapping of crc32 strings"
                    raise ArtifactError(
                        f"{self.path}: artifact has no checksums (its `checksums` attribute is {found}), so its "
                        f"arrays cannot be verified; delete {self.path} and re-run"
                    )
                recorded = {}
            _checksums = recorded
        self._all_checksums = dict(_checksums)
        # Checksums of this group's own arrays; deeper ones belong to subgroups.
        self._checksums = {k: v for k, v in self._all_checksums.items() if "/" not in k}
        for name in sorted(set(self._checksums) - self._key_set):
            raise ArtifactError(
                f"{self._store}: array `{self._prefix}{name}` is missing (truncated or corrupt store); "
                f"delete {self._store} and re-run"
            )

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._key_set

    def _array(self, name: str) -> Any:
        arr = self._arrays.get(name)
        if arr is None:  # zarr parses the array's metadata on every lookup: once is enough
            arr = self._arrays[name] = self._group[name]
        return arr

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._array(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return torch.from_numpy(np.empty((), dtype=self._array(name).dtype)).dtype

    def _raw_chunk(self, name: str) -> Path | None:
        """The file holding all of array `name`'s bytes in C order, if it has one (the arrays
        ZarrWriter writes: one chunk, plain little-endian `bytes` codec), else None. Only a
        chunk file of exactly the array's size counts; anything else is left to zarr."""
        arr = self._array(name)
        dtype, shape = np.dtype(arr.dtype), tuple(arr.shape)
        path = _single_chunk_path(self.path, arr, dtype, shape)
        try:
            if path is None or os.stat(path).st_size != math.prod(shape) * dtype.itemsize:
                return None
        except OSError:
            return None
        return path

    def _read_chunk(self, name: str, path: Path, out: np.ndarray) -> None:
        """Fill `out` (C-contiguous, the array's dtype and shape) from the chunk file `path`."""
        with open(path, "rb", buffering=0) as fh:
            if not _pread_full(fh.fileno(), memoryview(out.reshape(-1).view(np.uint8)), 0):
                raise ArtifactError(
                    f"{self._store}: array `{self._prefix}{name}` is truncated (corrupt store); delete {self._store} and re-run"
                )

    def _verify(self, name: str, data: np.ndarray) -> None:
        expected = self._checksums.get(name)
        if expected is None:
            if self._strict:
                raise ArtifactError(
                    f"{self._store}: array `{self._prefix}{name}` has no recorded checksum (corrupt or foreign "
                    f"store); delete {self._store} and re-run"
                )
        elif expected != array_checksum(data):
            raise ArtifactError(
                f"{self._store}: array `{self._prefix}{name}` does not match its recorded checksum (corrupt store); "
                f"delete {self._store} and re-run"
            )

    def _unreadable(self, name: str, err: Exception) -> ArtifactError:
        return ArtifactError(
            f"{self._store}: cannot read array `{self._prefix}{name}` ({err}); the store is corrupt: "
            f"delete {self._store} and re-run"
        )

    def _load(self, name: str) -> torch.Tensor:
        try:
            chunk = self._raw_chunk(name)
            if chunk is not None:  # the chunk's bytes straight into the result, as zarr would decode them
                arr = self._array(name)
                data = np.empty(tuple(arr.shape), dtype=arr.dtype)
                self._read_chunk(name, chunk, data)
            else:
                data = np.asarray(self._array(name)[...], order="C")  # a 0-d array stays 0-d
        except ArtifactError:
            raise
        except Exception as err:
            raise self._unreadable(name, err) from err
        self._verify(name, data)
        return torch.from_numpy(data)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if name not in self or out.device.type != "cpu" or not out.is_contiguous() or out.dtype == torch.bfloat16:
            return super().read_into(name, out)
        try:
            chunk = self._raw_chunk(name)
            direct = chunk is not None and tuple(out.shape) == self.shape(name)
            direct = direct and self.dtype(name) == out.dtype
            if direct:
                data = out.numpy()
                self._read_chunk(name, chunk, data)  # into the caller's buffer: no intermediate copy
        except ArtifactError:
            raise
        except Exception as err:  # the store changed under us, or the file system failed
            raise self._unreadable(name, err) from err
        if not direct:
            return super().read_into(name, out)
        self._verify(name, data)
        return out

    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    def group(self, name: str) -> ZarrReader:
        """A reader over a subgroup (e.g. `basis.zarr/<layer>`), verified like the root."""
        prefix = f"{name}/"
        inner = {k[len(prefix) :]: v for k, v in self._all_checksums.items() if k.startswith(prefix)}
        if inner and not (self.path / name / "zarr.json").is_file():
            raise ArtifactError(
                f"{self._store}: group `{self._prefix}{name}` is missing (truncated or corrupt store); "
                f"delete {self._store} and re-run"
            )
        try:
            return ZarrReader(self.path / name, require_checksums=self._strict, _checksums=inner, _store=self._store)
        except ArtifactError as err:  # name the store to delete, not the subgroup
            if str(err).startswith(f"{self._store}:"):
                raise
            raise ArtifactError(
                f"{self._store}: group `{self._prefix}{name}` is unreadable (truncated or corrupt store); "
                f"delete {self._store} and re-run"
            ) from err

    def group_keys(self) -> list[str]:
        # Listed once: a reader never sees its store change, and zarr lists a group by walking
        # its members' metadata (about 10 ms per call on a ViT-B basis, called per layer).
        if self._group_keys is None:
            self._group_keys = sorted(self._group.group_keys())
        return list(self._group_keys)


def array_checksum(data: np.ndarray) -> str:
    """`crc32:xxxxxxxx` of an array's C-order bytes (what ZarrWriter records for each array)."""
    buf = np.ascontiguousarray(data).reshape(-1)
    return f"crc32:{zlib.crc32(buf.view(np.uint8)):08x}"


def open_tensors(path: str | os.PathLike, *, require_checksums: bool = True) -> TensorReader:
    """Open a safetensors file or a Zarr group for lazy, by-name tensor reads
    (`require_checksums`: see `ZarrReader`)."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".zarr":
        return ZarrReader(p, require_checksums=require_checksums)
    return SafetensorsReader(p)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a small file at once (heads, test fixtures); prefer `open_tensors`."""
    with open_tensors(path) as reader:
        return {name: reader.get(name) for name in reader.keys()}


# --------------------------------------------------------------------------- atomic writes


#: Test hook (see `_fault_point`): kill the process after this many tensor writes.
FAULT_AFTER_ENV = "PIPELINE_FAULT_AFTER"
#: Test hook: only artifacts whose path matches this glob (fnmatch) are faulted.
FAULT_PATH_ENV = "PIPELINE_FAULT_PATH"
#: Test hook: a folder; when set, each artifact is faulted at most once (a marker file there
#: records it), so a job's retry runs through.
FAULT_ONCE_ENV = "PIPELINE_FAULT_ONCE"
_fault_writes = 0


def _fault_point(path: Path, *, commit: bool = False) -> None:
    """Test hook that simulates a job killed part-way (OOM killer, scheduler, power cut of a node).

    Inactive unless the environment sets PIPELINE_FAULT_AFTER=n. Then, for artifacts whose
    path matches PIPELINE_FAULT_PATH (fnmatch globs separated by `os.pathsep`; every artifact
    when unset), the process sends
    itself SIGKILL just before its (n+1)-th tensor write, or at the latest just before the
    final rename (`commit`); no Python cleanup runs, exactly as for a real kill. With
    PIPELINE_FAULT_ONCE=folder, an artifact is killed only if no earlier process killed
    itself on it: the first kill leaves a marker file (its content: the artifact's path) in
    that folder, and later attempts run through. Used only by tests/test_atomic.py and
    tests/workflow/test_determinism.py.
    """
    global _fault_writes
    limit = os.environ.get(FAULT_AFTER_ENV)
    if limit is None:
        return
    pattern = os.environ.get(FAULT_PATH_ENV)
    if pattern and not any(fnmatch.fnmatch(str(path), glob) for glob in pattern.split(os.pathsep)):
        return
    if commit or _fault_writes >= int(limit):
        once = os.environ.get(FAULT_ONCE_ENV)
        if once:
            marker = Path(once) / hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()
            try:  # O_EXCL: of two processes on one artifact, exactly one creates the marker
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return
            os.write(fd, str(path).encode())
            os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    _fault_writes += 1


_HOST = socket.gethostname().replace("-", "_") or "host"


def _temporary_sibling(path: Path) -> Path:
    # Same directory, so the final rename stays on one file system and is atomic. Host and
    # pid in the name let a later writer tell an abandoned temporary from a live one.
    _remove_stale_temporaries(path)
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of `path` left by killed writers on this host (their pid is gone).

    Temporaries of live processes, or written on other hosts of a shared file system, are
    left alone: they may belong to a job that is still running.
    """
    if not path.parent.is_dir():
        return
    prefix = f".{path.name}.tmp-{_HOST}-"
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            _remove(entry)


def check_output_path(path: str | os.PathLike, *, store: bool = False, artifact: str | None = None) -> None:
    """Refuse an output path whose replacement would destroy something else.

    A file output (`store=False`) must not be an existing folder. A Zarr output (`store=True`)
    may replace only an empty folder or a Zarr store that holds an artifact of the same kind
    (its `artifact` attribute equals `artifact`): never a file, a folder of other things, or
    another kind of artifact. An existing ancestor that is a file is named too. Raises
    ArtifactError; nothing is touched.
    """
    p = Path(path)
    for parent in p.parents:
        if parent.is_dir():
            break
        if parent.exists():
            raise ArtifactError(f"{p}: cannot create it: {parent} is a file, not a folder; choose another output path")
    if not (p.exists() or p.is_symlink()):
        return
    keep = "move or delete it, or choose another output path"
    if not store:
        if p.is_dir():
            raise ArtifactError(f"{p}: is an existing folder; refusing to replace a folder with a file ({keep})")
        return
    if not p.is_dir():
        raise ArtifactError(f"{p}: exists and is a file, not a Zarr store; refusing to replace it ({keep})")
    if not any(not entry.name.startswith(".") for entry in p.iterdir()):
        return  # empty (Snakemake's hidden marker aside): nothing to lose
    try:
        meta = json.loads((p / "zarr.json").read_bytes())
        found = meta["attributes"].get("artifact") if meta.get("node_type") == "group" else None
        is_store = meta.get("node_type") == "group"
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        is_store, found = False, None
    if not is_store:
        raise ArtifactError(f"{p}: is an existing folder that is not a Zarr artifact; refusing to replace it ({keep})")
    if found != artifact:
        raise ArtifactError(
            f"{p}: holds {f'a `{found}` artifact' if found else 'a Zarr store of no known artifact kind'}; "
            f"refusing to replace it with {f'a `{artifact}` artifact' if artifact else 'another store'} ({keep})"
        )


def _make_parents(path: Path) -> list[Path]:
    """Create `path`'s missing parent folders; return them, deepest first (see `_remove_created`)."""
    created = []
    for parent in path.parents:
        if parent.is_dir():
            break
        created.append(parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArtifactError(f"{path}: cannot create its folder {path.parent} ({err.strerror or err})") from err
    return created


def _remove_created(folders: Sequence[Path]) -> None:
    """Remove the folders `_make_parents` created, deepest first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another job wrote there) or already gone
            break


#: How often a store's rename is retried when a concurrent writer's store lands in between.
_RENAME_TRIES = 8


def _replace(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path` atomically. On failure `tmp` is removed and the error names `path`."""
    try:
        _fault_point(path, commit=True)
        if not tmp.is_dir():
            os.replace(tmp, path)  # a folder at `path` fails here (IsADirectoryError): never removed
            return
        for _ in range(_RENAME_TRIES):
            old = None
            if path.is_dir() and not path.is_symlink():
                # A directory cannot be renamed over a non-empty one. Move the old one aside first
                # (one atomic rename), so no moment exists where a half-deleted store sits at `path`.
                old = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}-old")
                try:
                    os.replace(path, old)
                except FileNotFoundError:  # a concurrent writer moved it aside first
                    old = None
            try:
                os.replace(tmp, path)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue  # a concurrent writer's complete store landed in between: move it aside too
            finally:
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            return
        raise ArtifactError(
            f"{path}: other processes kept replacing it while this one renamed its output into place; "
            "run one writer per output"
        )
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, OSError) and not isinstance(err, ArtifactError):
            raise ArtifactError(f"{path}: cannot move the finished output into place ({err.strerror or err})") from err
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _all_finite(data: np.ndarray) -> bool:
    """No NaN or Inf in a NumPy array (integers: always). One read pass in the usual case: a
    sum is finite only if every term is; a finite array whose sum overflows takes the exact check."""
    if data.dtype.kind not in "fc" or data.size == 0:
        return True
    flat = data.reshape(-1)
    if data.dtype.itemsize >= 4:
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(flat)):
                return True
    return bool(np.isfinite(flat).all())


def _not_finite(path: Path, name: str) -> ArtifactError:
    return ArtifactError(
        f"{path}: computed tensor `{name}` holds NaN or Inf, so nothing is written; the inputs hold "
        "values near the floating-point limits or a numeric option (--alpha, --eps) is too large for them"
    )


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write to; rename it into place on success.

    On any exception the temporary is removed and `path` is left as it was, so a failed or
    killed job never leaves something that looks like a finished artifact. An existing folder
    at `path` is refused (`check_output_path`); parent folders created here are removed again
    when the write fails.
    """
    final = Path(path)
    check_output_path(final)
    created = _make_parents(final)
    tmp = _temporary_sibling(final)
    try:
        yield tmp
        _replace(tmp, final)
    except BaseException:
        _remove(tmp)
        _remove_created(created)
        raise


class SafetensorsWriter:
    """Stream tensors into a safetensors file whose layout is fixed up front.

    The header (names, dtypes, shapes, offsets) is written first from `specs`, then each
    tensor's bytes go to their offset as they are produced, in any order; so a merge can
    write its output layer by layer without holding the whole model. `close()` checks that
    every tensor was written and renames the file into place.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
        *,
        finite: bool = False,
    ) -> None:
        """finite: refuse a floating tensor holding NaN or Inf (every stage's output is
        written with it; off for test fixtures that need such values)."""
        self.path = Path(path)
        self._finite = finite
        for name in specs:
            check_tensor_name(name, self.path)
        check_output_path(self.path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, (shape, dtype) in specs.items():
            if dtype not in _TORCH_TO_ST:
                raise ArtifactError(f"{self.path}: tensor `{name}` has unsupported dtype {dtype}")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._layout[name] = (offset, tuple(shape), dtype)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        self._created = _make_parents(self.path)
        self._tmp = _temporary_sibling(self.path)
        try:
            self._file = open(self._tmp, "wb")
            self._file.write(struct.pack("<Q", len(raw)))
            self._file.write(raw)
            self._file.truncate(self._data_start + offset)
        except OSError as err:
            self._tmp.unlink(missing_ok=True)
            _remove_created(self._created)
            raise ArtifactError(f"{self.path}: cannot write its header ({err.strerror or err})") from err

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._layout:
            raise ArtifactError(f"{self.path}: tensor `{name}` is not in the declared layout")
        offset, shape, dtype = self._layout[name]
        if tuple(tensor.shape) != shape:
            raise ArtifactError(
                f"{self.path}: tensor `{name}` has shape {tuple(tensor.shape)}, declared {shape}"
            )
        _fault_point(self.path)
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        if self._finite and dtype.is_floating_point:
            finite = bool(torch.isfinite(data).all()) if dtype == torch.bfloat16 else _all_finite(data.numpy())
            if not finite:
                raise _not_finite(self.path, name)
        # Raw little-endian bytes, as the format stores them (via uint8 view: bf16 has no numpy),
        # written from the tensor's memory: no intermediate bytes copy.
        payload = data.reshape(-1).view(torch.uint8).numpy()
        try:
            self._file.seek(self._data_start + offset)
            self._file.write(memoryview(payload))
        except OSError as err:  # disk full, quota, I/O error
            raise ArtifactError(f"{self.path}: cannot write tensor `{name}` ({err.strerror or err})") from err
        self._written.add(name)

    def close(self) -> None:
        missing = set(self._layout) - self._written
        try:
            try:
                self._file.close()
            except OSError as err:  # the last buffered bytes did not fit
                raise ArtifactError(f"{self.path}: cannot write it ({err.strerror or err})") from err
            if missing:
                raise ArtifactError(f"{self.path}: tensors never written: {sorted(missing)[:5]}")
            _replace(self._tmp, self.path)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            _remove_created(self._created)
            raise

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:  # a failed write's buffered bytes: the file goes anyway
            pass
        self._tmp.unlink(missing_ok=True)
        _remove_created(self._created)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _lower_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux: niceness is per thread).

    Background writes then take the cores only when the merge leaves them idle. Competing
    with it, they cost far more than their own time: a third runnable thread on a 2-core
    machine makes torch's two-thread LAPACK calls wait at every barrier (a 256 × 256 eigh
    3 ms → 40 ms next to a busy thread)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:  # not permitted here: run at the normal priority
            pass


class WriteBehind:
    """Run a writer's `write(name, tensor, ...)` calls on one background thread.

    The merge hands each finished tensor over and goes on with the next layer while this
    one is checksummed, encoded and written (file writes and CRC-32 release the GIL). At
    most `depth` writes are pending, so memory stays bounded by `depth` tensors. Errors
    surface at the next call or at `flush()`. The caller must not modify a tensor after
    handing it over. Use as a context manager around the writer's own context:

        with ZarrWriter(out, attrs) as writer, WriteBehind(writer.write) as write:
            ...
            write.flush()  # before touching the writer again (attributes)
    """

    def __init__(self, write: Any, depth: int = 2) -> None:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self._write, self._depth = write, max(1, depth)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-behind", initializer=_lower_priority)
        self._pending: Any = deque()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write, *args, **kwargs))

    def flush(self) -> None:
        """Wait for every pending write; re-raise the first error."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:  # on any error the writer aborts next: let a running write end, drop the rest
            for future in self._pending:
                future.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)


class ZarrWriter:
    """Write a Zarr v3 group into a temporary sibling and rename it into place on `close()`.

    Tensors are written uncompressed, one chunk each (float weights barely compress, and
    compression would dominate the cost of cheap stages). `attrs` become the group's
    attributes; `provenance(...)` builds the standard ones. The CRC-32 of every array is
    recorded in the root attribute `checksums` (`name` or `group/name` → `crc32:…`), which
    `ZarrReader` verifies on every read.
    """

    def __init__(self, path: str | os.PathLike, attrs: Mapping[str, Any] | None = None, *, finite: bool = False) -> None:
        """finite: refuse a floating tensor holding NaN or Inf (every stage's output is
        written with it; off for test fixtures and artifacts where NaN is a value)."""
        import zarr

        self.path = Path(path)
        self._finite = finite
        check_output_path(self.path, store=True, artifact=(attrs or {}).get("artifact"))
        self._created = _make_parents(self.path)
        self._tmp = _temporary_sibling(self.path)
        try:
            self._root = zarr.open_group(str(self._tmp), mode="w")
        except BaseException:
            _remove(self._tmp)
            _remove_created(self._created)
            raise
        self._prefix = f"{self._tmp}{os.sep}"
        self._attrs = dict(attrs or {})
        self._checksums: dict[str, str] = {}
        self._groups: dict[str, Any] = {}
        # (dtype, ndim) → (zarr.json of the first such array as zarr wrote it, its chunk key):
        # later arrays of that kind get the same document with their shape (see `write`).
        self._templates: dict[tuple[str, int], tuple[dict[str, Any], str]] = {}

    def write(self, name: str, tensor: torch.Tensor | np.ndarray, group: str | None = None) -> None:
        """Store one tensor as an array `name` (in subgroup `group`, created on first use)."""
        key = name if group is None else f"{group}/{name}"
        check_tensor_name(key, self.path)
        # The names are checked at input checking already; this keeps every path the writer
        # creates inside its temporary folder whatever a caller passes.
        if not os.path.normpath(os.path.join(self._tmp, key)).startswith(self._prefix):
            raise ArtifactError(f"{self.path}: tensor `{key}` would be written outside the store")
        if isinstance(tensor, torch.Tensor):
            t = tensor.detach().cpu()
            if t.dtype == torch.bfloat16:
                t = t.float()
            data = t.contiguous().numpy()
        else:
            data = np.ascontiguousarray(tensor)
        if self._finite and not _all_finite(data):
            raise _not_finite(self.path, key)
        _fault_point(self.path)
        try:
            self._write(name, data, group)
        except OSError as err:  # disk full, quota, I/O error
            raise ArtifactError(f"{self.path}: cannot write tensor `{key}` ({err.strerror or err})") from err
        self._checksums[key] = array_checksum(data)

    def _write(self, name: str, data: np.ndarray, group: str | None) -> None:
        if group is None:
            target = self._root
        elif group in self._groups:
            target = self._groups[group]
        else:
            target = self._groups[group] = self._root.require_group(group)
        shape = tuple(data.shape)
        kind = (data.dtype.str, data.ndim)
        template = self._templates.get(kind) if math.prod(shape) > 0 and data.ndim > 0 else None
        if template is not None:
            # The metadata zarr wrote for the first array of this dtype and rank, with this
            # one's shape: the same bytes as zarr's own (`tests/test_store.py`), without a
            # round trip through zarr's event loop per array (≈ 2 ms each, a third of a
            # 350 MB store's write).
            meta, key = copy.deepcopy(template[0]), template[1]
            meta["shape"] = list(shape)
            meta["chunk_grid"]["configuration"]["chunk_shape"] = list(shape)
            folder = self._tmp / target.path / name if target.path else self._tmp / name
            folder.mkdir(parents=True, exist_ok=False)
            (folder / "zarr.json").write_bytes(_zarr_json(meta))
            chunk = folder / key
        else:
            chunks = data.shape if data.ndim > 0 else ()
            arr = target.create_array(
                name=name, shape=data.shape, dtype=data.dtype, chunks=chunks or "auto", compressors=None
            )
            chunk = _single_chunk_path(self._tmp, arr, data.dtype, shape)
            if chunk is not None:
                self._remember_template(kind, self._tmp / arr.path, chunk, shape)
        # Straight from the tensor's memory where the chunk file is its bytes: about 0.6 s less
        # per 350 MB than zarr's write path (copies into its buffers, then an event loop). Zarr
        # reads such chunks like any other; only an all-zero array gets a chunk file where
        # zarr would leave it out.
        if chunk is None:
            arr[...] = data
        else:
            chunk.parent.mkdir(parents=True, exist_ok=True)
            with open(chunk, "wb") as fh:
                fh.write(data.reshape(-1).view(np.uint8))

    def _remember_template(self, kind: tuple[str, int], folder: Path, chunk: Path, shape: tuple[int, ...]) -> None:
        """Keep the zarr.json zarr wrote for this array as the template of its kind, if it
        re-serialises to the same bytes and has nothing but the shape to change."""
        raw = (folder / "zarr.json").read_bytes()
        meta = json.loads(raw)
        grid = meta.get("chunk_grid", {}).get("configuration", {})
        if meta.get("shape") == list(shape) and grid.get("chunk_shape") == list(shape) and _zarr_json(meta) == raw:
            self._templates[kind] = (meta, chunk.relative_to(folder).as_posix())

    def set_attrs(self, attrs: Mapping[str, Any], group: str | None = None) -> None:
        if group is None:
            self._attrs.update(attrs)
        else:
            check_tensor_name(group, self.path)
            self._root.require_group(group).attrs.update(_jsonable(dict(attrs)))

    def close(self) -> None:
        try:
            attrs = {**self._attrs, "checksums": dict(sorted(self._checksums.items()))}
            try:
                self._root.attrs.update(_jsonable(attrs))
            except OSError as err:
                raise ArtifactError(f"{self.path}: cannot write its attributes ({err.strerror or err})") from err
            _replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        _remove(self._tmp)
        _remove_created(self._created)

    def __enter__(self) -> ZarrWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _zarr_json(meta: Mapping[str, Any]) -> bytes:
    """A zarr.json document as zarr 3 serialises it (indent 2, NaN allowed)."""
    return json.dumps(meta, allow_nan=True, indent=2).encode()


def _single_chunk_path(root: Path, arr: Any, dtype: np.dtype, shape: tuple[int, ...]) -> Path | None:
    """The chunk file of a Zarr v3 array (in the store at `root`) whose bytes are the array's
    own C-order bytes, or None when zarr must encode or decode them.

    That is the case for one chunk covering a non-empty array, the plain `bytes` codec
    (little-endian, no compressor: what ZarrWriter creates) and a numeric or boolean dtype in
    little-endian order on a little-endian host."""
    from zarr.codecs import BytesCodec

    meta = arr.metadata
    codecs = getattr(meta, "codecs", ())
    if (
        math.prod(shape) == 0
        or dtype.kind not in "fiub"
        or dtype.byteorder == ">"
        or not np.little_endian
        or len(codecs) != 1
        or not isinstance(codecs[0], BytesCodec)
        or getattr(codecs[0].endian, "value", "little") != "little"
        or tuple(arr.chunks) != shape
    ):
        return None
    return root / arr.path / meta.encode_chunk_key((0,) * len(shape))


def _jsonable(value: Any) -> Any:
    """Turn tensors, numpy scalars and paths into plain JSON values for Zarr attributes."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    finite: bool = False,
) -> None:
    """Write small tensor dicts (heads, checkpoints) atomically as safetensors (`finite`: see
    `SafetensorsWriter`)."""
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    with SafetensorsWriter(path, specs, metadata, finite=finite) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


def write_zarr(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    attrs: Mapping[str, Any] | None = None,
    *,
    finite: bool = False,
) -> None:
    """Write a dict of tensors as the root arrays of a Zarr group, atomically (`finite`: see
    `ZarrWriter`)."""
    with ZarrWriter(path, attrs, finite=finite) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


# --------------------------------------------------------------------------- provenance

#: Read size of the content digest (large reads: hashing runs at the disk's or the hash's speed).
_DIGEST_BUFFER_BYTES = 8 << 20
#: Environment variable: the digest cache file, or `off` for none (see `_digest_cache_path`).
DIGEST_CACHE_ENV = "PIPELINE_DIGEST_CACHE"
#: Files below this size are hashed on every run: reading them costs less than the cache.
_CACHED_DIGEST_BYTES = 1 << 20
#: A file modified less than this long before it is hashed may still change within the same
#: modification-time tick: its digest is not cached (the "racy" case of git's index).
_SETTLED_SECONDS = 2.0
#: Entries kept in the digest cache file (the most recently used).
_DIGEST_CACHE_ENTRIES = 4096


def _file_digest(path: Path, size: int) -> str:
    """`sha256:` digest of every byte of one file, so that any change to any byte, in any
    layer of a checkpoint, changes it (SHA-256 runs at about 0.6 GB/s where the CPU has SHA
    instructions, twice BLAKE2b's speed there). `size` is the file's size (it sizes the
    read buffer)."""
    h = hashlib.sha256()
    buf = bytearray(min(_DIGEST_BUFFER_BYTES, max(size, 1)))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            h.update(view[:n])
    return f"sha256:{h.hexdigest()}"


def _digest_cache_path() -> Path | None:
    """The file that keeps content digests across processes: $PIPELINE_DIGEST_CACHE (`off`:
    none), else `pipeline/digests.json` under $XDG_CACHE_HOME or ~/.cache. It lives with
    the user, not with the inputs, so read-only inputs are cached as well."""
    env = os.environ.get(DIGEST_CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pipeline" / "digests.json"


def _read_digest_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


def _store_digest(key: str, digest: str) -> None:
    """Add one entry to the digest cache file (atomically; any failure leaves the cache
    as it was: a digest that is not cached is computed again next time)."""
    path = _digest_cache_path()
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        entries = _read_digest_cache(path)
        entries.pop(key, None)
        entries[key] = digest
        kept = dict(list(entries.items())[-_DIGEST_CACHE_ENTRIES:])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(kept))
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


#: file_fingerprint's digests of regular files, by (path, device, inode, size, mtime).
_digests: dict[str, str] = {}


def _cached_file_digest(p: Path) -> tuple[int, str]:
    """(size, digest) of a regular file, hashed once per (path, device, inode, size, mtime_ns):
    kept in this process and, for files of 1 MiB and more, in the digest cache file, so a
    350 MB checkpoint is read once, not by every run that records or checks it. Any write to
    the file changes its mtime (and a replaced file has another inode), so a cached digest is
    never used for changed content; files modified in the last 2 s are hashed every time."""
    st = p.stat()
    key = f"{p.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
    digest = _digests.get(key)
    if digest is None and st.st_size >= _CACHED_DIGEST_BYTES:
        cache = _digest_cache_path()
        if cache is not None:
            digest = _read_digest_cache(cache).get(key)
    if digest is None:
        settled = time.time() - st.st_mtime_ns / 1e9 > _SETTLED_SECONDS
        digest = _file_digest(p, st.st_size)
        if settled:
            _digests[key] = digest
            if st.st_size >= _CACHED_DIGEST_BYTES:
                _store_digest(key, digest)
    return st.st_size, digest


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size (bytes) and content digest of a file, or of a directory (a Zarr store).

    A Zarr store written by `ZarrWriter` is digested through its root `zarr.json`, which
    lists a CRC-32 of every array (verified on every read), so this costs one small read.
    Other directories: a digest over the sorted relative paths and digests of their files.
    Hidden files (Snakemake's `.snakemake_timestamp`) are ignored. Modification times are
    not part of the fingerprint: a copy, or an identical re-creation, of an input matches.
    """
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p}: file not found")
    if not p.is_dir():
        size, digest = _cached_file_digest(p)
        return {"size": size, "digest": digest}
    files = [f for f in sorted(p.rglob("*")) if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
    size = sum(f.stat().st_size for f in files)
    meta = p / "zarr.json"
    if meta.is_file() and b'"checksums"' in meta.read_bytes():
        return {"size": size, "files": len(files), "digest": _file_digest(meta, meta.stat().st_size)}
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p).as_posix()}\0{_cached_file_digest(f)[1]}\0".encode())
    return {"size": size, "files": len(files), "digest": f"sha256-tree:{h.hexdigest()}"}


def provenance(
    artifact: str,
    parameters: Mapping[str, Any],
    inputs: Iterable[str | os.PathLike] = (),
    artifact_version: int = 1,
) -> dict[str, Any]:
    """Standard provenance attributes for a Zarr artifact.

    artifact: its kind (`basis`, `hessian`, `fisher`, `merged`); parameters: everything
    that shaped it; inputs: the files it was made from, in order (each recorded with
    `file_fingerprint`). No timestamps: re-creating an artifact from the same inputs gives
    the same bytes.
    """
    return {
        "artifact": artifact,
        "artifact_version": artifact_version,
        "package_version": __version__,
        "parameters": _jsonable(dict(parameters)),
        "inputs": {str(p): file_fingerprint(p) for p in inputs},
    }


def check_provenance(
    path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    artifact: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    artifact_version: int | None = None,
) -> None:
    """Refuse a Zarr artifact that was not made from `inputs` (in order) with `parameters`.

    Compares the recorded fingerprints (size, content digest) of the artifact's inputs with
    those of the files given now, position by position (paths may differ: a moved or copied
    run still matches), and each given parameter with the recorded one. Raises ArtifactError
    naming the artifact, the first input or parameter that differs, and what to delete.
    """
    p = Path(path)
    attrs = ZarrReader(p).attrs()
    fix = f"delete {p} and re-run (Snakemake re-creates it)"
    if "inputs" not in attrs or "parameters" not in attrs:
        raise ArtifactError(f"{p}: no provenance record (inputs, parameters); {fix}")
    if artifact is not None and attrs.get("artifact") != artifact:
        raise ArtifactError(f"{p}: holds a `{attrs.get('artifact')}` artifact, expected `{artifact}`")
    if artifact_version is not None and attrs.get("artifact_version") != artifact_version:
        raise ArtifactError(
            f"{p}: artifact version {attrs.get('artifact_version')} was written by another release "
            f"(this one reads version {artifact_version}); {fix}"
        )
    recorded = list(dict(attrs["inputs"]).items())
    if len(recorded) != len(inputs):
        raise ArtifactError(f"{p}: was made from {len(recorded)} input files, this run gives {len(inputs)}; {fix}")
    for i, ((old_path, old), new_path) in enumerate(zip(recorded, inputs), start=1):
        new = file_fingerprint(new_path)
        if old.get("size") != new["size"] or old.get("digest") != new["digest"]:
            raise ArtifactError(
                f"{p}: input {i} differs from the one it was made from (recorded {old_path}: "
                f"{old.get('size')} bytes, {str(old.get('digest'))[:24]}…; given {new_path}: {new['size']} bytes, "
                f"{new['digest'][:24]}…); {fix}"
            )
    recorded_params = attrs["parameters"]
    for key, value in (parameters or {}).items():
        if recorded_params.get(key) != _jsonable(value):
            raise ArtifactError(
                f"{p}: was made with {key}={recorded_params.get(key)!r}, this run asks for {key}={value!r}; {fix}"
            )
