"""Lazy readers of safetensors files and Zarr v3 stores: one tensor at a time, so a merge
never holds T full models. Every Zarr read is verified against the CRC-32 its writer recorded."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.store.errors import ArtifactError

# Snakemake leaves a `.snakemake_timestamp` marker inside directory outputs (our Zarr stores);
# Zarr warns about the foreign file on every open. It is expected, so it is not shown.
warnings.filterwarnings("ignore", message=r".*\.snakemake_timestamp.*")


# --------------------------------------------------------------------------- dtypes

ST_TO_TORCH = {
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
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
#: Stored (little-endian) NumPy dtypes of the safetensors dtypes NumPy has.
_NP_LITTLE_ENDIAN = {
    t: np.dtype(c)
    for t, c in [
        (torch.float64, "<f8"), (torch.float32, "<f4"), (torch.float16, "<f2"),
        (torch.int64, "<i8"), (torch.int32, "<i4"), (torch.int16, "<i2"), (torch.int8, "i1"),
        (torch.uint8, "u1"), (torch.bool, "?"),
    ]
}  # fmt: skip


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
        if (
            out.device.type == "cpu"
            and out.dtype in _NUMPY_COPY
            and src.dtype in _NUMPY_COPY
            and out.shape == src.shape
        ):
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
        n, header = self._read_header(size, fix)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ArtifactError(
                f"{self.path}: `__metadata__` is not a mapping of strings to strings; {fix}"
            )
        self._meta = meta
        self._data_start = 8 + n
        self._entries = self._parse_entries(header, size, fix)
        self._check_tiling(size, fix)
        self._keys = list(self._entries)
        self._file = open(self.path, "rb")
        self._map: mmap.mmap | None = None

    def _read_header(self, size: int, fix: str) -> tuple[int, dict[str, Any]]:
        """(length n of the JSON header, the header) of a file of `size` bytes; `fix` is the
        advice every error ends with."""
        try:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                if n > _MAX_HEADER_BYTES:
                    raise ValueError(
                        f"header length {n} exceeds the format's limit of {_MAX_HEADER_BYTES} bytes"
                    )
                header = json.loads(fh.read(n))
        except (ValueError, struct.error, UnicodeDecodeError) as err:
            raise ArtifactError(
                f"{self.path}: not a readable safetensors file ({err}); {fix}"
            ) from err
        except RecursionError:
            raise ArtifactError(
                f"{self.path}: not a readable safetensors file (its header nests too deeply); {fix}"
            ) from None
        if not isinstance(header, dict):
            raise ArtifactError(
                f"{self.path}: not a readable safetensors file (the header is a JSON "
                f"{type(header).__name__}, expected an object of tensor entries); {fix}"
            )
        return n, header

    def _parse_entries(
        self, header: Mapping[str, Any], size: int, fix: str
    ) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        """name → (dtype, shape, begin, end) of every tensor entry, each checked against the
        file's size (`self._data_start` is where the data section begins)."""
        entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                if not isinstance(entry, dict):
                    raise TypeError(f"expected an object, got a JSON {type(entry).__name__}")
                dtype = ST_TO_TORCH[entry["dtype"]]
                shape = tuple(_json_int(d) for d in entry["shape"])
                offsets = entry["data_offsets"]
                if not isinstance(offsets, list) or len(offsets) != 2:
                    raise ValueError(f"data_offsets {offsets!r} is not a pair [begin, end]")
                begin, end = (_json_int(x) for x in offsets)
                if any(d < 0 for d in shape):
                    raise ValueError(f"negative dimension in shape {list(shape)}")
            except (KeyError, TypeError, ValueError) as err:
                raise ArtifactError(
                    f"{self.path}: tensor `{name}` has a malformed header entry ({err})"
                ) from err
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0 or self._data_start + end > size:
                raise ArtifactError(
                    f"{self.path}: tensor `{name}` lies outside the file or has the wrong byte "
                    f"count (truncated or corrupt file); {fix}"
                )
            entries[name] = (dtype, shape, begin, end)
        return entries

    def _check_tiling(self, size: int, fix: str) -> None:
        """As the safetensors library checks: sorted by offset, the tensors tile the data
        section exactly (no overlap, so no tensor reads another's bytes; no gap)."""
        position = 0
        for name, (_, _, begin, end) in sorted(
            self._entries.items(), key=lambda item: (item[1][2], item[1][3])
        ):
            if begin != position:
                what = (
                    "overlaps the tensor before it"
                    if begin < position
                    else "leaves a gap before it"
                )
                raise ArtifactError(
                    f"{self.path}: tensor `{name}` has invalid data_offsets [{begin}, {end}]: it "
                    f"{what} (expected to start at byte {position}); corrupt or hand-edited file: "
                    f"{fix}"
                )
            position = end
        if self._data_start + position != size:
            raise ArtifactError(
                f"{self.path}: the tensors end at byte {self._data_start + position} but the file "
                f"has {size} bytes (corrupt file or trailing data); {fix}"
            )

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
            raise ArtifactError(
                f"{self.path}: cannot read tensor `{name}` ({err.strerror or err})"
            ) from err
        if not complete:
            raise ArtifactError(f"{self.path}: tensor `{name}` is truncated")

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        dtype, shape, begin, end = self._entries.get(name, (None, (), 0, 0))
        if (
            dtype != out.dtype
            or not out.is_contiguous()
            or out.device.type != "cpu"
            or dtype == torch.bfloat16
        ):
            return super().read_into(name, out)
        if tuple(out.shape) != shape:
            raise ArtifactError(
                f"{self.path}: tensor `{name}` has shape {list(shape)}, expected {list(out.shape)}"
            )
        # Straight from the file into the caller's buffer: no intermediate copy.
        self._pread_into(name, memoryview(out.numpy()).cast("B"), self._data_start + begin)
        return out

    def attrs(self) -> dict[str, Any]:
        return dict(self._meta)

    def mapped(self, name: str) -> np.ndarray | None:
        """The tensor's bytes in a shared read-only map of the file, for one pass over a whole
        model without copying it (TIES). Pages are mapped as they are read, so a pass can drop
        those it is done with (`pipeline.methods.ties`). bfloat16 has no NumPy type."""
        dtype, shape, begin, end = self._entries[name]
        np_dtype = _NP_LITTLE_ENDIAN.get(dtype)
        if np_dtype is None:
            return None
        if self._map is None:
            size = self.path.stat().st_size
            if size == 0:
                return None
            self._map = mmap.mmap(
                self._file.fileno(),
                size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ,
            )
        return np.frombuffer(
            self._map, dtype=np_dtype, count=math.prod(shape), offset=self._data_start + begin
        )

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
        self._prefix = (
            f"{self.path.relative_to(self._store).as_posix()}/" if _store is not None else ""
        )
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
            raise ArtifactError(
                f"{self.path}: cannot open Zarr group ({err}); delete it and re-run"
            ) from err
        self._key_set = set(self._keys)
        self._group_keys: list[str] | None = None  # listed on first use
        self._arrays: dict[str, Any] = {}  # zarr array handles, opened on first use
        if _checksums is None:
            recorded = self._attrs.get("checksums")
            valid = isinstance(recorded, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) and v.startswith("crc32:")
                for k, v in recorded.items()
            )
            if not valid:
                if require_checksums:
                    found = (
                        "missing"
                        if recorded is None
                        else f"a {type(recorded).__name__}, not a mapping of crc32 strings"
                    )
                    raise ArtifactError(
                        f"{self.path}: artifact has no checksums (its `checksums` attribute is "
                        f"{found}), so its arrays cannot be verified; delete {self.path} and re-run"
                    )
                recorded = {}
            _checksums = recorded
        self._all_checksums = dict(_checksums)
        # Checksums of this group's own arrays; deeper ones belong to subgroups.
        self._checksums = {k: v for k, v in self._all_checksums.items() if "/" not in k}
        for name in sorted(set(self._checksums) - self._key_set):
            raise ArtifactError(
                f"{self._store}: array `{self._prefix}{name}` is missing (truncated or corrupt "
                f"store); delete {self._store} and re-run"
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
        path = single_chunk_path(self.path, arr, dtype, shape)
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
                    f"{self._store}: array `{self._prefix}{name}` is truncated (corrupt store); "
                    f"delete {self._store} and re-run"
                )

    def _verify(self, name: str, data: np.ndarray) -> None:
        expected = self._checksums.get(name)
        if expected is None:
            if self._strict:
                raise ArtifactError(
                    f"{self._store}: array `{self._prefix}{name}` has no recorded checksum "
                    f"(corrupt or foreign store); delete {self._store} and re-run"
                )
        elif expected != array_checksum(data):
            raise ArtifactError(
                f"{self._store}: array `{self._prefix}{name}` does not match its recorded checksum "
                f"(corrupt store); delete {self._store} and re-run"
            )

    def _unreadable(self, name: str, err: Exception) -> ArtifactError:
        return ArtifactError(
            f"{self._store}: cannot read array `{self._prefix}{name}` ({err}); the store is "
            f"corrupt: delete {self._store} and re-run"
        )

    def _load(self, name: str) -> torch.Tensor:
        try:
            chunk = self._raw_chunk(name)
            if (
                chunk is not None
            ):  # the chunk's bytes straight into the result, as zarr would decode them
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
        if (
            name not in self
            or out.device.type != "cpu"
            or not out.is_contiguous()
            or out.dtype == torch.bfloat16
        ):
            return super().read_into(name, out)
        try:
            chunk = self._raw_chunk(name)
            direct = chunk is not None and tuple(out.shape) == self.shape(name)
            direct = direct and self.dtype(name) == out.dtype
            if direct:
                data = out.numpy()
                self._read_chunk(
                    name, chunk, data
                )  # into the caller's buffer: no intermediate copy
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
        inner = {
            k[len(prefix) :]: v for k, v in self._all_checksums.items() if k.startswith(prefix)
        }
        if inner and not (self.path / name / "zarr.json").is_file():
            raise ArtifactError(
                f"{self._store}: group `{self._prefix}{name}` is missing (truncated or corrupt "
                f"store); delete {self._store} and re-run"
            )
        try:
            return ZarrReader(
                self.path / name,
                require_checksums=self._strict,
                _checksums=inner,
                _store=self._store,
            )
        except ArtifactError as err:  # name the store to delete, not the subgroup
            if str(err).startswith(f"{self._store}:"):
                raise
            raise ArtifactError(
                f"{self._store}: group `{self._prefix}{name}` is unreadable (truncated or corrupt "
                f"store); delete {self._store} and re-run"
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


def single_chunk_path(root: Path, arr: Any, dtype: np.dtype, shape: tuple[int, ...]) -> Path | None:
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
