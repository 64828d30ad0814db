"""Every artifact on disk goes through this module: safetensors and Zarr.

Reads are lazy (one tensor at a time, so a merge never holds T full models), writes are
atomic (into a temporary sibling, renamed into place on success, removed on failure), and
every Zarr artifact carries provenance attributes (what it is, the parameters and inputs it
was made from, the package version).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import struct
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
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


def _zarr_dtype(dtype: torch.dtype) -> str:
    # numpy (and so Zarr) has no bfloat16: such tensors are stored as float32.
    if dtype == torch.bfloat16:
        return "float32"
    return str(torch.empty((), dtype=dtype).numpy().dtype)


# --------------------------------------------------------------------------- readers


class TensorReader:
    """Lazy read access to named tensors in one file (safetensors) or store (Zarr group).

    Subclasses implement `keys`, `shape`, `dtype` and `_load`. `get` wraps `_load` so a
    read failure names the file and the tensor.
    """

    path: Path

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
        out.copy_(self.get(name))
        return out

    def attrs(self) -> dict[str, Any]:
        """Metadata stored with the tensors (safetensors `__metadata__`, Zarr attributes)."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsReader(TensorReader):
    """Lazy reader of a safetensors file: the header is parsed once, each `get` reads one
    tensor's bytes with a plain seek + read.

    No memory map: mapped pages of every input would count towards the process's resident
    memory, and a merge reads T + 1 (or 2T + 1) whole files. The header is checked against
    the file size, so a truncated or corrupt file is reported by name before any merge.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(fh.read(n))
        except (ValueError, struct.error, UnicodeDecodeError) as err:
            raise ArtifactError(
                f"{self.path}: not a readable safetensors file ({err}); re-create or re-download it"
            ) from err
        self._meta = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = _ST_TO_TORCH[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise ArtifactError(f"{self.path}: tensor `{name}` has a malformed header entry ({err})") from err
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0 or self._data_start + end > size:
                raise ArtifactError(
                    f"{self.path}: tensor `{name}` lies outside the file or has the wrong byte count "
                    "(truncated or corrupt file); re-create or re-download it"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._keys = list(self._entries)
        self._file = open(self.path, "rb")

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
        self._file.seek(self._data_start + begin)
        if self._file.readinto(buf) != len(buf):
            raise ArtifactError(f"{self.path}: tensor `{name}` is truncated")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        dtype, shape, begin, end = self._entries.get(name, (None, (), 0, 0))
        if dtype != out.dtype or not out.is_contiguous() or out.device.type != "cpu" or dtype == torch.bfloat16:
            return super().read_into(name, out)
        if tuple(out.shape) != shape:
            raise ArtifactError(f"{self.path}: tensor `{name}` has shape {list(shape)}, expected {list(out.shape)}")
        # Straight from the file into the caller's buffer: no intermediate copy.
        view = memoryview(out.numpy()).cast("B")
        self._file.seek(self._data_start + begin)
        if self._file.readinto(view) != end - begin:
            raise ArtifactError(f"{self.path}: tensor `{name}` is truncated")
        return out

    def attrs(self) -> dict[str, Any]:
        return dict(self._meta)

    def close(self) -> None:
        self._file.close()


class ZarrReader(TensorReader):
    """Lazy reader over the arrays at the root of a Zarr v3 group (subgroups are not tensors)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import zarr

        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise ArtifactError(
                f"{self.path}: not a Zarr store (no zarr.json); it is missing, truncated or was "
                "written by an interrupted job: delete it and re-run"
            )
        try:
            self._group = zarr.open_group(str(self.path), mode="r")
            self._keys = sorted(self._group.array_keys())
        except Exception as err:
            raise ArtifactError(f"{self.path}: cannot open Zarr group ({err}); delete it and re-run") from err
        self._key_set = set(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._key_set

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._group[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return torch.from_numpy(np.empty((), dtype=self._group[name].dtype)).dtype

    def _load(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._group[name][...]))

    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    def group(self, name: str) -> ZarrReader:
        """A reader over a subgroup (e.g. `basis.zarr/<layer>`)."""
        return ZarrReader(self.path / name)

    def group_keys(self) -> list[str]:
        return sorted(self._group.group_keys())


def open_tensors(path: str | os.PathLike) -> TensorReader:
    """Open a safetensors file or a Zarr group for lazy, by-name tensor reads."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".zarr":
        return ZarrReader(p)
    return SafetensorsReader(p)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a small file at once (heads, test fixtures); prefer `open_tensors`."""
    with open_tensors(path) as reader:
        return {name: reader.get(name) for name in reader.keys()}


# --------------------------------------------------------------------------- atomic writes


def _temporary_sibling(path: Path) -> Path:
    # Same directory, so the final rename stays on one file system and is atomic.
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _replace(tmp: Path, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # a directory cannot be renamed over a non-empty one
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write to; rename it into place on success.

    On any exception the temporary is removed and `path` is left as it was, so a failed or
    killed job never leaves something that looks like a finished artifact.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _replace(tmp, final)


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
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temporary_sibling(self.path)
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
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._layout:
            raise ArtifactError(f"{self.path}: tensor `{name}` is not in the declared layout")
        offset, shape, dtype = self._layout[name]
        if tuple(tensor.shape) != shape:
            raise ArtifactError(
                f"{self.path}: tensor `{name}` has shape {tuple(tensor.shape)}, declared {shape}"
            )
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        # Raw little-endian bytes, as the format stores them (via uint8 view: bf16 has no numpy).
        payload = data.reshape(-1).view(torch.uint8).numpy().tobytes()
        self._file.seek(self._data_start + offset)
        self._file.write(payload)
        self._written.add(name)

    def close(self) -> None:
        missing = set(self._layout) - self._written
        self._file.close()
        if missing:
            self._tmp.unlink(missing_ok=True)
            raise ArtifactError(f"{self.path}: tensors never written: {sorted(missing)[:5]}")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ZarrWriter:
    """Write a Zarr v3 group into a temporary sibling and rename it into place on `close()`.

    Tensors are written uncompressed, one chunk each (float weights barely compress, and
    compression would dominate the cost of cheap stages). `attrs` become the group's
    attributes; `provenance(...)` builds the standard ones.
    """

    def __init__(self, path: str | os.PathLike, attrs: Mapping[str, Any] | None = None) -> None:
        import zarr

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temporary_sibling(self.path)
        self._root = zarr.open_group(str(self._tmp), mode="w")
        self._attrs = dict(attrs or {})

    def write(self, name: str, tensor: torch.Tensor | np.ndarray, group: str | None = None) -> None:
        """Store one tensor as an array `name` (in subgroup `group`, created on first use)."""
        if isinstance(tensor, torch.Tensor):
            t = tensor.detach().cpu()
            if t.dtype == torch.bfloat16:
                t = t.float()
            data = t.contiguous().numpy()
        else:
            data = np.ascontiguousarray(tensor)
        target = self._root if group is None else self._root.require_group(group)
        chunks = data.shape if data.ndim > 0 else ()
        arr = target.create_array(
            name=name, shape=data.shape, dtype=data.dtype, chunks=chunks or "auto", compressors=None
        )
        arr[...] = data

    def set_attrs(self, attrs: Mapping[str, Any], group: str | None = None) -> None:
        if group is None:
            self._attrs.update(attrs)
        else:
            self._root.require_group(group).attrs.update(_jsonable(dict(attrs)))

    def close(self) -> None:
        self._root.attrs.update(_jsonable(self._attrs))
        _replace(self._tmp, self.path)

    def abort(self) -> None:
        _remove(self._tmp)

    def __enter__(self) -> ZarrWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


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
) -> None:
    """Write small tensor dicts (heads, checkpoints) atomically as safetensors."""
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


def write_zarr(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write a dict of tensors as the root arrays of a Zarr group, atomically."""
    with ZarrWriter(path, attrs) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


# --------------------------------------------------------------------------- provenance


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size and modification time of a file, or of every file under a directory."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file()]
        return {
            "size": sum(f.stat().st_size for f in files),
            "files": len(files),
            "mtime": max((f.stat().st_mtime for f in files), default=0.0),
        }
    st = p.stat()
    return {"size": st.st_size, "mtime": st.st_mtime}


def provenance(
    artifact: str,
    parameters: Mapping[str, Any],
    inputs: Iterable[str | os.PathLike] = (),
    artifact_version: int = 1,
) -> dict[str, Any]:
    """Standard provenance attributes for a Zarr artifact."""
    return {
        "artifact": artifact,
        "artifact_version": artifact_version,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "parameters": _jsonable(dict(parameters)),
        "inputs": {str(p): file_fingerprint(p) for p in inputs},
    }
