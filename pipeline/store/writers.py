"""Writers of safetensors files and Zarr v3 stores. Both write into a temporary sibling
(`pipeline.store.atomic`) and rename it into place on `close()`; Zarr writers record a CRC-32
of every array, which the readers verify."""

from __future__ import annotations

import copy
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.store.atomic import (
    check_output_path,
    fault_point,
    make_parents,
    remove,
    remove_created,
    rename_into_place,
    temporary_sibling,
)
from pipeline.store.errors import ArtifactError, check_tensor_name
from pipeline.store.readers import TORCH_TO_ST, array_checksum, single_chunk_path


def _all_finite(data: np.ndarray) -> bool:
    """No NaN or Inf in a NumPy array (integers: always). One read pass in the usual case: a
    sum is finite only if every term is; a finite array whose sum overflows takes the exact
    check."""
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
        f"{path}: computed tensor `{name}` holds NaN or Inf, so nothing is written; the inputs "
        "hold values near the floating-point limits or a numeric option (--alpha, --eps) is too "
        "large for them"
    )


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
            if dtype not in TORCH_TO_ST:
                raise ArtifactError(f"{self.path}: tensor `{name}` has unsupported dtype {dtype}")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._layout[name] = (offset, tuple(shape), dtype)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        self._created = make_parents(self.path)
        self._tmp = temporary_sibling(self.path)
        try:
            self._file = open(self._tmp, "wb")
            self._file.write(struct.pack("<Q", len(raw)))
            self._file.write(raw)
            self._file.truncate(self._data_start + offset)
        except OSError as err:
            self._tmp.unlink(missing_ok=True)
            remove_created(self._created)
            raise ArtifactError(
                f"{self.path}: cannot write its header ({err.strerror or err})"
            ) from err

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._layout:
            raise ArtifactError(f"{self.path}: tensor `{name}` is not in the declared layout")
        offset, shape, dtype = self._layout[name]
        if tuple(tensor.shape) != shape:
            raise ArtifactError(
                f"{self.path}: tensor `{name}` has shape {tuple(tensor.shape)}, declared {shape}"
            )
        fault_point(self.path)
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        if self._finite and dtype.is_floating_point:
            finite = (
                bool(torch.isfinite(data).all())
                if dtype == torch.bfloat16
                else _all_finite(data.numpy())
            )
            if not finite:
                raise _not_finite(self.path, name)
        # Raw little-endian bytes, as the format stores them (via uint8 view: bf16 has no numpy),
        # written from the tensor's memory: no intermediate bytes copy.
        payload = data.reshape(-1).view(torch.uint8).numpy()
        try:
            self._file.seek(self._data_start + offset)
            self._file.write(memoryview(payload))
        except OSError as err:  # disk full, quota, I/O error
            raise ArtifactError(
                f"{self.path}: cannot write tensor `{name}` ({err.strerror or err})"
            ) from err
        self._written.add(name)

    def close(self) -> None:
        missing = set(self._layout) - self._written
        try:
            try:
                self._file.close()
            except OSError as err:  # the last buffered bytes did not fit
                raise ArtifactError(
                    f"{self.path}: cannot write it ({err.strerror or err})"
                ) from err
            if missing:
                raise ArtifactError(f"{self.path}: tensors never written: {sorted(missing)[:5]}")
            rename_into_place(self._tmp, self.path)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            remove_created(self._created)
            raise

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:  # a failed write's buffered bytes: the file goes anyway
            pass
        self._tmp.unlink(missing_ok=True)
        remove_created(self._created)

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
    attributes; `provenance(...)` builds the standard ones. The CRC-32 of every array is
    recorded in the root attribute `checksums` (`name` or `group/name` → `crc32:…`), which
    `ZarrReader` verifies on every read.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        attrs: Mapping[str, Any] | None = None,
        *,
        finite: bool = False,
    ) -> None:
        """finite: refuse a floating tensor holding NaN or Inf (every stage's output is
        written with it; off for test fixtures and artifacts where NaN is a value)."""
        import zarr

        self.path = Path(path)
        self._finite = finite
        check_output_path(self.path, store=True, artifact=(attrs or {}).get("artifact"))
        self._created = make_parents(self.path)
        self._tmp = temporary_sibling(self.path)
        try:
            self._root = zarr.open_group(str(self._tmp), mode="w")
        except BaseException:
            remove(self._tmp)
            remove_created(self._created)
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
        fault_point(self.path)
        try:
            self._write(name, data, group)
        except OSError as err:  # disk full, quota, I/O error
            raise ArtifactError(
                f"{self.path}: cannot write tensor `{key}` ({err.strerror or err})"
            ) from err
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
                name=name,
                shape=data.shape,
                dtype=data.dtype,
                chunks=chunks or "auto",
                compressors=None,
            )
            chunk = single_chunk_path(self._tmp, arr, data.dtype, shape)
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

    def _remember_template(
        self, kind: tuple[str, int], folder: Path, chunk: Path, shape: tuple[int, ...]
    ) -> None:
        """Keep the zarr.json zarr wrote for this array as the template of its kind, if it
        re-serialises to the same bytes and has nothing but the shape to change."""
        raw = (folder / "zarr.json").read_bytes()
        meta = json.loads(raw)
        grid = meta.get("chunk_grid", {}).get("configuration", {})
        if (
            meta.get("shape") == list(shape)
            and grid.get("chunk_shape") == list(shape)
            and _zarr_json(meta) == raw
        ):
            self._templates[kind] = (meta, chunk.relative_to(folder).as_posix())

    def set_attrs(self, attrs: Mapping[str, Any], group: str | None = None) -> None:
        if group is None:
            self._attrs.update(attrs)
        else:
            check_tensor_name(group, self.path)
            self._root.require_group(group).attrs.update(jsonable(dict(attrs)))

    def close(self) -> None:
        try:
            attrs = {**self._attrs, "checksums": dict(sorted(self._checksums.items()))}
            try:
                self._root.attrs.update(jsonable(attrs))
            except OSError as err:
                raise ArtifactError(
                    f"{self.path}: cannot write its attributes ({err.strerror or err})"
                ) from err
            rename_into_place(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        remove(self._tmp)
        remove_created(self._created)

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


def jsonable(value: Any) -> Any:
    """Turn tensors, numpy scalars and paths into plain JSON values for Zarr attributes."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
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
