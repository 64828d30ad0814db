"""Checkpoint importers: foreign checkpoint formats → open_clip visual state dicts.

Every importer returns the tensors of one CLIP-ViT image encoder under exactly the names of
``open_clip.create_model(name, pretrained=None).visual.state_dict()`` (``conv1.weight``,
``class_embedding``, ``positional_embedding``, ``ln_pre.*``,
``transformer.resblocks.{i}.{ln_1,attn,ln_2,mlp}.*``, ``ln_post.*``, ``proj``), float32
unless asked to keep the source dtype, checked against the backbone (missing, extra and
mis-shaped tensors are errors naming the tensor) and for NaN/Inf. Formats
(docs/sources.md, "Fine-tuned checkpoints"):

- ``taskvectors``: the task-vectors release (``finetuned.pt``, ``zeroshot.pt``,
  ``head_<Dataset>.pt``): whole pickled ``src.modeling`` modules wrapping an old open_clip
  CLIP model. They are read with a restricted unpickler that never imports or calls the
  pickled classes: module classes become inert stand-ins whose state is collected, tensors
  are rebuilt from the archive's storage records by our own code, and any other global
  (``os.system``, ``builtins.eval``, ...) is refused before anything runs. Torch zip archives
  and the legacy (pre-1.6) stream format are both read. The visual parameter names are the
  same in open_clip's old ``VisualTransformer``, OpenAI's CLIP and today's
  ``VisionTransformer``, so only the prefix (``model.visual.``) is stripped.
- ``state_dict``: a plain pickled state dict, read with ``torch.load(weights_only=True)``,
  with or without a ``module.`` / ``visual.`` / ``model.visual.`` prefix.
- ``hf``: Hugging Face ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel``
  weights (``vision_model.*``, ``visual_projection.weight``), mapped to open_clip names
  (q, k, v concatenated into ``in_proj_*``; the projection transposed into ``proj``).
- ``open_clip``: safetensors already in open_clip visual naming (validated only).

Text-tower tensors (``token_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``,
the text ``transformer`` and ``positional_embedding``) are dropped in every format.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from pipeline.store import ArtifactError, SafetensorsReader, load_tensors, open_tensors

__all__ = [
    "FORMATS",
    "detect_format",
    "expected_shapes",
    "hf_to_open_clip",
    "import_encoder",
    "import_head",
    "import_hf",
    "import_open_clip",
    "import_state_dict",
    "import_taskvectors",
    "load_restricted",
    "module_tensors",
    "select_visual",
    "validate_visual",
]

log = logging.getLogger(__name__)

FORMATS = ("taskvectors", "state_dict", "hf", "open_clip")
"""Checkpoint formats `import_encoder` reads; `detect_format` tells them apart by content."""

BackboneLike = nn.Module | str

# Magic number at the start of torch's legacy (non-zip) serialisation stream.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ZIP_MAGIC = b"PK\x03\x04"
_HF_PATCH = "embeddings.patch_embedding.weight"


# --------------------------------------------------------------------------- backbones


@functools.cache
def _named_backbone_shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(tensor name, shape) of the named backbone's visual state dict, in state-dict order.

    Names of `pipeline.models.clip.BACKBONES` (``demo``, ``ViT-B-32``, ...) are built as the rest
    of the pipeline builds them; any other open_clip model name through open_clip.
    """
    from pipeline.models.clip import BACKBONES, build_encoder

    def build() -> nn.Module:
        if name in BACKBONES:
            return build_encoder(name)
        import open_clip

        if name not in open_clip.list_models():
            raise ValueError(
                f"unknown backbone `{name}`: not one of {', '.join(BACKBONES)} nor an open_clip model name"
            )
        return open_clip.create_model(name, pretrained=None).visual

    try:
        # Only names and shapes are needed: build on the meta device (no memory, no init cost).
        with torch.device("meta"):
            visual = build()
    except ValueError:
        raise
    except Exception:  # an initialiser the meta device lacks: build for real
        visual = build()
    return tuple((n, tuple(t.shape)) for n, t in visual.state_dict().items())


def expected_shapes(backbone: BackboneLike) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a backbone's visual tower, in state-dict order.

    Args:
        backbone: an open_clip model name (``ViT-B-32``; built once per process with
            ``pretrained=None``), ``demo``, or a module: a visual tower, or a CLIP model
            whose ``.visual`` is used.
    """
    if isinstance(backbone, str):
        return dict(_named_backbone_shapes(backbone))
    visual = getattr(backbone, "visual", None)
    module = visual if isinstance(visual, nn.Module) else backbone
    return {n: tuple(t.shape) for n, t in module.state_dict().items()}


def _backbone_name(backbone: BackboneLike) -> str:
    return backbone if isinstance(backbone, str) else type(backbone).__name__


def validate_visual(state: Mapping[str, Tensor], backbone: BackboneLike, source: str | os.PathLike = "state dict") -> None:
    """Check that `state` holds exactly the backbone's visual tensors with their shapes.

    Raises:
        ArtifactError: naming `source`, the first offending tensor, what was expected and
            how many other tensors have the same problem.
    """
    expected = expected_shapes(backbone)
    name = _backbone_name(backbone)
    missing = [n for n in expected if n not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ArtifactError(f"{source}: tensor `{missing[0]}` is missing for backbone `{name}`{more}")
    extra = [n for n in state if n not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ArtifactError(f"{source}: unexpected tensor `{extra[0]}` for backbone `{name}`{more}")
    for n, shape in expected.items():
        if tuple(state[n].shape) != shape:
            raise ArtifactError(
                f"{source}: tensor `{n}` has shape {list(state[n].shape)}, backbone `{name}` expects {list(shape)}"
            )


def _finish(
    state: Mapping[str, Tensor], backbone: BackboneLike, source: str | os.PathLike, keep_dtype: bool
) -> dict[str, Tensor]:
    """Validate, check finiteness, convert to float32 and order as the backbone's state dict."""
    validate_visual(state, backbone, source)
    out: dict[str, Tensor] = {}
    for n in expected_shapes(backbone):
        t = state[n].detach().to("cpu")
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ArtifactError(
                    f"{source}: tensor `{n}` has {bad} non-finite values (NaN/Inf): the checkpoint is corrupt"
                )
            if not keep_dtype:
                t = t.to(torch.float32)
        out[n] = t.contiguous()
    return out


# --------------------------------------------------------------------------- restricted unpickling


class _Inert:
    """Stand-in for a pickled class: records constructor arguments and state, runs nothing.

    `_pickled_global` (a class attribute of each generated subclass) is the original
    ``module.qualname``. Module state lands in ``vars(obj)`` (``_parameters``, ``_buffers``,
    ``_modules``, plain attributes such as ``normalize``).
    """

    _pickled_global = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_inert_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            for part in state:
                if isinstance(part, Mapping):
                    self.__dict__.update(part)
        elif isinstance(state, Mapping):
            self.__dict__.update(state)
        else:
            self.__dict__["_inert_state"] = state

    # Containers reduced through their own methods (list/dict subclasses) stay inert too.
    def append(self, item: Any) -> None:
        self.__dict__.setdefault("_inert_items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("_inert_items", []).extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_inert_mapping", {})[key] = value

    def __repr__(self) -> str:
        return f"<inert {self._pickled_global}>"


@functools.cache
def _inert_class(module: str, name: str) -> type[_Inert]:
    return type(name.split(".")[-1], (_Inert,), {"_pickled_global": f"{module}.{name}"})


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

_DTYPE_NAMES = {
    "float32", "float", "float64", "double", "float16", "half", "bfloat16",
    "int64", "long", "int32", "int", "int16", "short", "int8", "uint8", "bool",
}

# Modules whose classes are replaced by inert stand-ins: the task-vectors wrappers, open_clip
# and OpenAI CLIP models, torch.nn layers, and the torchvision preprocessing pickled alongside.
_INERT_MODULES = ("src.modeling", "src.models.modeling")
_INERT_PREFIXES = ("open_clip.", "clip.model", "torch.nn.modules.", "torchvision.transforms.")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class _StorageType:
    """Marker for a pickled ``torch.<X>Storage`` class: only its dtype is used."""

    dtype: torch.dtype


class _Storage:
    """One storage record: `numel` elements of `dtype`, read on first use by `load`."""

    def __init__(self, dtype: torch.dtype, numel: int, load: Callable[[_Storage], Tensor] | None) -> None:
        self.dtype, self.numel, self._load = dtype, numel, load
        self.data: Tensor | None = None

    def tensor(self) -> Tensor:
        if self.data is None:
            if self._load is None:
                raise ArtifactError("storage data was never read")
            self.data = self._load(self)
        return self.data


@dataclass
class _TensorRef:
    """A tensor of the checkpoint, not yet read: a strided view of one storage."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size

    def materialize(self) -> Tensor:
        flat = self.storage.tensor()
        view = torch.as_strided(flat, self.size, self.stride, self.offset)
        return view.clone(memory_format=torch.contiguous_format)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(isinstance(v, int) for v in value):
        raise ArtifactError(f"tensor {what} must be a tuple of ints, got {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRef:
    """Our replacement of torch._utils._rebuild_tensor(_v2): checks bounds, reads nothing."""
    if not isinstance(storage, _Storage):
        raise ArtifactError(f"tensor rebuilt from {type(storage).__name__}, expected a storage record")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if not isinstance(offset, int) or offset < 0 or len(size) != len(stride) or min(size + stride, default=0) < 0:
        raise ArtifactError(f"tensor has an invalid layout (offset {offset}, size {size}, stride {stride})")
    if math.prod(size) > 0:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise ArtifactError(
                f"tensor of size {list(size)} reaches element {last} of a storage of {storage.numel} elements"
            )
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data  # a Parameter's data tensor; requires_grad and hooks do not matter here


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # `func` was itself resolved by find_class, so it is one of our rebuild functions.
    return func(*args)


_TORCH_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}

_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}


def _resolve_global(module: str, name: str) -> Any | None:
    """What a pickled global `module.name` becomes, or None if it is not allowed."""
    if module == "__builtin__":  # protocol-2 pickles spell builtins the Python 2 way
        module = "builtins"
    if (module, name) in _TORCH_FUNCTIONS:
        return _TORCH_FUNCTIONS[(module, name)]
    if (module, name) in _SAFE_GLOBALS:
        return _SAFE_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _DTYPE_NAMES:
        return getattr(torch, name)
    if module in _INERT_MODULES or module.startswith(_INERT_PREFIXES) or module == "torch.nn.parameter":
        return _inert_class(module, name)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals (see `_resolve_global`).

    Storage records (persistent ids) become `_Storage` objects read through `storage_loader`,
    and tensors become `_TensorRef` views of them, so no tensor bytes are read while the
    pickle is parsed and none at all for tensors that are later dropped.
    """

    def __init__(self, fh: BinaryIO, path: Path, storage_loader: Callable[[str, _Storage], Tensor] | None) -> None:
        super().__init__(fh)
        self._path = path
        self._loader = storage_loader
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module
        value = _resolve_global(module, name)
        if value is None:
            raise ArtifactError(
                f"{self._path}: refusing to unpickle global `{module}.{name}`: only tensors, containers "
                "and known model classes are allowed (the file is malicious or not a checkpoint)"
            )
        return value

    def persistent_load(self, pid: Any) -> _Storage:
        # Zip: ('storage', type, key, location, numel); legacy: (..., numel, view_metadata).
        # The legacy stream also names module classes as ('module', class, source file, source).
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            if not (isinstance(pid[1], type) and issubclass(pid[1], _Inert)):
                raise ArtifactError(f"{self._path}: malformed module record {str(pid)[:80]}")
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ArtifactError(f"{self._path}: unsupported persistent record {str(pid)[:80]}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise ArtifactError(f"{self._path}: malformed storage record {str(pid)[:80]}")
        if len(pid) > 5 and pid[5] is not None:
            raise ArtifactError(f"{self._path}: storage views of the legacy format are not supported")
        if key not in self.storages:
            loader = self._loader
            self.storages[key] = _Storage(
                storage_type.dtype, numel, (lambda s, k=key: loader(k, s)) if loader else None
            )
        return self.storages[key]


def _corrupt_hint() -> str:
    return "truncated or corrupt file (some released task-vectors Cars checkpoints are); re-download it"


def _unpickle(unpickler: pickle.Unpickler, path: Path) -> Any:
    try:
        return unpickler.load()
    except ArtifactError as err:
        if str(err).startswith(str(path)):
            raise
        raise ArtifactError(f"{path}: {err}") from err
    except Exception as err:  # truncated pickles and garbage surface with assorted types
        raise ArtifactError(f"{path}: cannot unpickle ({type(err).__name__}: {err}): {_corrupt_hint()}") from err


def _file_kind(path: Path) -> str:
    """'zip', 'pickle', 'safetensors' or 'unknown', from the first bytes of the file."""
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol ≥ 2 (torch's legacy stream starts with one too)
        return "pickle"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n <= path.stat().st_size - 8:
            return "safetensors"
    return "unknown"


class PickledCheckpoint:
    """A torch checkpoint (zip archive or legacy stream) unpickled without running its code.

    `root` is the pickled object with module classes replaced by inert stand-ins and tensors
    by references; `tensor(ref)` reads one tensor's bytes (so dropped tensors, e.g. the text
    tower, are never read from a zip archive). Use as a context manager: the archive stays
    open until `close()`.
    """

    def __init__(self, path: str | os.PathLike, recorder: set[str] | None = None) -> None:
        self.path = Path(path)
        self._archive: zipfile.ZipFile | None = None
        self._recorder = recorder
        kind = _file_kind(self.path)
        if kind == "zip":
            self.root, self.storages = self._load_zip()
        elif kind == "pickle":
            with open(self.path, "rb") as fh:
                self.root, self.storages = self._load_stream(fh)
        else:
            raise ArtifactError(f"{self.path}: neither a torch zip archive nor a pickle (first bytes unrecognised)")

    def _unpickler(self, fh: BinaryIO, loader: Callable[[str, _Storage], Tensor] | None) -> _RestrictedUnpickler:
        if self._recorder is None:
            return _RestrictedUnpickler(fh, self.path, loader)
        return _RecordingUnpickler(fh, self.path, None, self._recorder)

    def _load_zip(self) -> tuple[Any, dict[str, _Storage]]:
        path = self.path
        try:
            self._archive = archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise ArtifactError(f"{path}: not a complete zip archive ({err}): {_corrupt_hint()}") from err
        names = set(archive.namelist())
        pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ArtifactError(f"{path}: zip archive without exactly one data.pkl record: not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise ArtifactError(f"{path}: big-endian checkpoints are not supported")

        def read_record(key: str, storage: _Storage) -> Tensor:
            record = f"{prefix}data/{key}"
            if record not in names:
                raise ArtifactError(f"{path}: storage record `{record}` is missing: {_corrupt_hint()}")
            nbytes = storage.numel * _element_size(storage.dtype)
            size = archive.getinfo(record).file_size
            if size != nbytes:  # checked before allocating: the pickle's numel is not trusted
                raise ArtifactError(
                    f"{path}: storage record `{record}` holds {size} bytes, expected {nbytes}: {_corrupt_hint()}"
                )
            out = torch.empty(storage.numel, dtype=storage.dtype)
            try:
                with archive.open(record) as fh:  # zipfile checks the record's CRC-32 at its end
                    got = fh.readinto(memoryview(out.view(torch.uint8).numpy()))
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise ArtifactError(f"{path}: storage record `{record}` cannot be read ({err}): {_corrupt_hint()}") from err
            if got != nbytes:
                raise ArtifactError(f"{path}: storage record `{record}` is truncated: {_corrupt_hint()}")
            return out

        try:
            raw = archive.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ArtifactError(f"{path}: record `{pkl[0]}` cannot be read ({err}): {_corrupt_hint()}") from err
        unpickler = self._unpickler(io.BytesIO(raw), read_record)
        root = _unpickle(unpickler, path)
        for key in unpickler.storages:  # every referenced record must exist, even if never read
            if f"{prefix}data/{key}" not in names:
                raise ArtifactError(f"{path}: storage record `{prefix}data/{key}` is missing: {_corrupt_hint()}")
        return root, unpickler.storages

    def _load_stream(self, fh: BinaryIO) -> tuple[Any, dict[str, _Storage]]:
        """A plain pickle, or torch's legacy stream: magic number, protocol, system info, the
        object, its storage keys, then each storage as an int64 element count and raw bytes."""
        path = self.path
        first = self._unpickler(fh, None)
        magic = _unpickle(first, path)
        if magic != _LEGACY_MAGIC:  # a plain pickle: only allowed globals got this far
            return magic, first.storages
        for _ in range(2):  # protocol version, system info
            _unpickle(self._unpickler(fh, None), path)
        unpickler = self._unpickler(fh, None)
        root = _unpickle(unpickler, path)
        if self._recorder is not None:
            return root, unpickler.storages
        keys = _unpickle(self._unpickler(fh, None), path)
        file_size = path.stat().st_size
        if not isinstance(keys, list):
            raise ArtifactError(f"{path}: legacy checkpoint without its storage key list: {_corrupt_hint()}")
        for key in keys:
            storage = unpickler.storages.get(str(key))
            if storage is None:
                raise ArtifactError(f"{path}: legacy storage `{key}` is not referenced by the pickle: {_corrupt_hint()}")
            header = fh.read(8)
            if len(header) != 8:
                raise ArtifactError(f"{path}: legacy storage `{key}` is missing: {_corrupt_hint()}")
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise ArtifactError(f"{path}: legacy storage `{key}` holds {numel} elements, expected {storage.numel}")
            if numel * _element_size(storage.dtype) > file_size - fh.tell():  # before allocating
                raise ArtifactError(f"{path}: legacy storage `{key}` is truncated: {_corrupt_hint()}")
            out = torch.empty(numel, dtype=storage.dtype)
            if fh.readinto(memoryview(out.view(torch.uint8).numpy())) != numel * out.element_size():
                raise ArtifactError(f"{path}: legacy storage `{key}` is truncated: {_corrupt_hint()}")
            storage.data = out
        missing = [k for k, s in unpickler.storages.items() if s.data is None]
        if missing:
            raise ArtifactError(f"{path}: legacy storage `{missing[0]}` has no data: {_corrupt_hint()}")
        return root, unpickler.storages

    def tensor(self, value: Any) -> Tensor:
        """The tensor behind a reference found in `root` (a fresh contiguous CPU tensor)."""
        if isinstance(value, _TensorRef):
            return value.materialize()
        if isinstance(value, Tensor):
            return value
        raise ArtifactError(f"{self.path}: expected a tensor, found {type(value).__name__}")

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None

    def __enter__(self) -> PickledCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_restricted(path: str | os.PathLike) -> PickledCheckpoint:
    """Unpickle a torch checkpoint (zip or legacy) without importing or running its classes.

    Allowed globals: torch's tensor/parameter rebuild functions (replaced by ours), typed
    storage classes, dtypes, ``torch.Size``/``torch.device``, ``collections.OrderedDict``,
    ``set``; classes of ``src.modeling``, ``open_clip.*``, ``clip.model``, ``torch.nn.modules.*``
    and ``torchvision.transforms.*`` become inert stand-ins. Anything else is refused.

    Raises:
        ArtifactError: a disallowed global (named, with the file) before anything runs; a
            truncated or corrupt archive or stream.
    """
    return PickledCheckpoint(path)


class _RecordingUnpickler(_RestrictedUnpickler):
    """Parses a pickle only to list its globals: every global becomes inert (nothing runs)."""

    def __init__(self, fh: BinaryIO, path: Path, loader: Any, record: set[str]) -> None:
        super().__init__(fh, path, None)
        self._record = record

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module
        self._record.add(f"{module}.{name}")
        value = _resolve_global(module, name)
        return _inert_class(module, name) if value is None else value


def _pickle_globals(path: Path) -> set[str]:
    """The globals a torch checkpoint's pickle names, found without running any of them."""
    found: set[str] = set()
    try:
        PickledCheckpoint(path, recorder=found).close()
    except ArtifactError as err:
        if not found or "cannot unpickle" not in str(err):
            raise
    return found


def _names_module_classes(globals_: set[str]) -> bool:
    """True if a pickle names anything beyond what a plain state dict needs."""
    for g in globals_:
        module, _, name = g.rpartition(".")
        value = _resolve_global(module, name)
        if value is None or isinstance(value, type) and issubclass(value, _Inert):
            return True
    return False


def detect_format(path: str | os.PathLike) -> str:
    """Which importer reads `path`, from its content: one of `FORMATS`.

    - safetensors with ``…embeddings.patch_embedding.weight`` (``vision_model.`` names): ``hf``;
      other safetensors: ``open_clip``;
    - a torch zip archive or pickle that names module classes (or any global a state dict
      does not need, which the restricted importer then refuses): ``taskvectors``; one with
      only tensors and containers: ``state_dict``.
    """
    p = Path(path)
    kind = _file_kind(p)
    if kind == "safetensors":
        with SafetensorsReader(p) as reader:
            keys = reader.keys()
        return "hf" if any(k.endswith(_HF_PATCH) for k in keys) else "open_clip"
    if kind in ("zip", "pickle"):
        return "taskvectors" if _names_module_classes(_pickle_globals(p)) else "state_dict"
    raise ArtifactError(f"{p}: unrecognised file (not safetensors, not a torch zip archive, not a pickle)")


# --------------------------------------------------------------------------- tensor trees and names


def module_tensors(root: Any, source: str | os.PathLike = "checkpoint") -> dict[str, Any]:
    """Flatten an unpickled module tree (or a state dict) into ``{dotted name: tensor}``.

    Names follow ``nn.Module.state_dict()``: parameters, then persistent buffers, then child
    modules, each under ``<child name>.``. A mapping root is taken as a state dict (or a
    ``{"state_dict": ...}`` wrapper). Values are tensors or tensor references.
    """
    if isinstance(root, Mapping):
        inner = root.get("state_dict")
        state = inner if isinstance(inner, Mapping) else root
        bad = [k for k, v in state.items() if not isinstance(v, (Tensor, _TensorRef))]
        if bad:
            raise ArtifactError(f"{source}: entry `{bad[0]}` is a {type(state[bad[0]]).__name__}, not a tensor")
        return {str(k): v for k, v in state.items()}
    if not isinstance(root, _Inert) or "_modules" not in vars(root):
        raise ArtifactError(f"{source}: the pickled object ({type(root).__name__}) is neither a module nor a state dict")
    out: dict[str, Any] = {}
    seen: set[int] = set()

    def walk(obj: _Inert, prefix: str) -> None:
        if id(obj) in seen:  # a module shared by two parents is listed once, as state_dict does
            return
        seen.add(id(obj))
        state = vars(obj)
        skip = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for name, value in (state.get(group) or {}).items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, (Tensor, _TensorRef)):
                    raise ArtifactError(f"{source}: `{prefix}{name}` is a {type(value).__name__}, not a tensor")
                out[prefix + name] = value
        for name, child in (state.get("_modules") or {}).items():
            if isinstance(child, _Inert):
                walk(child, f"{prefix}{name}.")

    walk(root, "")
    return out


def select_visual(state: Mapping[str, Any], source: str | os.PathLike = "checkpoint") -> dict[str, Any]:
    """The visual tower's tensors with their prefix removed; everything else is dropped.

    The prefix is the one in front of the unique ``conv1.weight`` (``""``, ``visual.``,
    ``model.visual.``, ``module.visual.``, ...); the text tower (``token_embedding``,
    ``ln_final``, ``text_projection``, ``logit_scale``, text ``transformer``) lies outside it.
    """
    anchors = [k for k in state if k == "conv1.weight" or k.endswith(".conv1.weight")]
    if len(anchors) != 1:
        found = "no" if not anchors else f"{len(anchors)}"
        raise ArtifactError(f"{source}: {found} `conv1.weight` tensors found: not one CLIP ViT visual tower")
    prefix = anchors[0][: -len("conv1.weight")]
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    dropped = len(state) - len(kept)
    if dropped:
        log.info("%s: kept %d tensors under `%s`, dropped %d others (text tower, heads)", source, len(kept), prefix, dropped)
    return kept


def _hf_text_key(key: str) -> bool:
    return key.startswith(("text_model.", "text_projection.", "logit_scale"))


def hf_to_open_clip(
    hf: Mapping[str, Tensor], source: str | os.PathLike = "checkpoint", proj: Tensor | None = None
) -> dict[str, Tensor]:
    """Map Hugging Face CLIP vision weights to open_clip visual names.

    ``embeddings.patch_embedding.weight`` [w, 3, p, p] → ``conv1.weight``;
    ``embeddings.class_embedding`` [w] → ``class_embedding``;
    ``embeddings.position_embedding.weight`` [n, w] → ``positional_embedding``;
    ``pre_layrnorm`` → ``ln_pre``; ``post_layernorm`` → ``ln_post``; per layer i:
    ``layer_norm1/2`` → ``ln_1/2``, ``self_attn.{q,k,v}_proj.{weight [w, w], bias [w]}``
    concatenated (q, k, v) → ``attn.in_proj_{weight [3w, w], bias [3w]}``,
    ``self_attn.out_proj`` → ``attn.out_proj``, ``mlp.fc1/fc2`` → ``mlp.c_fc/c_proj``;
    ``visual_projection.weight`` [d, w] → ``proj`` = its transpose [w, d], or `proj` [w, d]
    (e.g. θ0's) when the file has none. HF scales q inside its attention and torch's
    ``MultiheadAttention`` does the same inside, so the weights carry over unchanged.

    Raises:
        ArtifactError: a missing HF tensor, a vision tensor with no open_clip counterpart,
            non-contiguous layer indices, or no projection at all.
    """
    anchors = [k for k in hf if k.endswith(_HF_PATCH)]
    if len(anchors) != 1:
        raise ArtifactError(f"{source}: no unique `vision_model.{_HF_PATCH}`: not a Hugging Face CLIP vision checkpoint")
    p = anchors[0][: -len(_HF_PATCH)]  # "vision_model." in the released files
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if p + key not in hf:
            raise ArtifactError(f"{source}: tensor `{p + key}` is missing (Hugging Face CLIP vision layout)")
        used.add(p + key)
        return hf[p + key]

    out: dict[str, Tensor] = {
        "class_embedding": take("embeddings.class_embedding"),
        "positional_embedding": take("embeddings.position_embedding.weight"),
        "proj": torch.empty(0),  # placeholder: keeps open_clip's key order
        "conv1.weight": take(_HF_PATCH),
    }
    pre = "pre_layrnorm" if f"{p}pre_layrnorm.weight" in hf else "pre_layernorm"  # HF spells it "layrnorm"
    out["ln_pre.weight"], out["ln_pre.bias"] = take(f"{pre}.weight"), take(f"{pre}.bias")
    pattern = re.compile(re.escape(p) + r"encoder\.layers\.(\d+)\.")
    layers = sorted({int(m.group(1)) for k in hf if (m := pattern.match(k))})
    if layers != list(range(len(layers))):
        raise ArtifactError(f"{source}: encoder layer indices {layers} are not 0 … L-1")
    for i in layers:
        a, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for ours, theirs in (("ln_1", "layer_norm1"),):
            out[f"{o}{ours}.weight"], out[f"{o}{ours}.bias"] = take(f"{a}{theirs}.weight"), take(f"{a}{theirs}.bias")
        out[f"{o}attn.in_proj_weight"] = torch.cat([take(f"{a}self_attn.{x}_proj.weight") for x in "qkv"])  # [3w, w]
        out[f"{o}attn.in_proj_bias"] = torch.cat([take(f"{a}self_attn.{x}_proj.bias") for x in "qkv"])  # [3w]
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{o}{ours}.weight"], out[f"{o}{ours}.bias"] = take(f"{a}{theirs}.weight"), take(f"{a}{theirs}.bias")
    out["ln_post.weight"], out["ln_post.bias"] = take("post_layernorm.weight"), take("post_layernorm.bias")
    if "visual_projection.weight" in hf:
        out["proj"] = hf["visual_projection.weight"].T.contiguous()  # [d, w] -> [w, d]
    elif proj is not None:
        out["proj"] = proj
    else:
        raise ArtifactError(
            f"{source}: no `visual_projection.weight` (a plain CLIPVisionModel): pass the pretrained θ0 "
            "(--pretrained) to take `proj` from it"
        )
    ignored = {f"{p}embeddings.position_ids", "visual_projection.weight"}  # position_ids: an index buffer
    left = [k for k in hf if k.startswith(p) and k not in used and k not in ignored and not _hf_text_key(k)]
    if left:
        raise ArtifactError(f"{source}: tensor `{left[0]}` has no open_clip counterpart (and {len(left) - 1} more)")
    return out


# --------------------------------------------------------------------------- importers


def import_taskvectors(path: str | os.PathLike, backbone: BackboneLike, *, keep_dtype: bool = False) -> dict[str, Tensor]:
    """Visual state dict of a task-vectors ``finetuned.pt`` / ``zeroshot.pt`` (restricted unpickling).

    Only the tensors under the encoder's ``model.visual.`` are read; the text-tower leftovers
    are dropped unread.
    """
    with load_restricted(path) as ckpt:
        refs = select_visual(module_tensors(ckpt.root, path), path)
        validate_visual(refs, backbone, path)  # shapes are known before any bytes are read
        state = {n: ckpt.tensor(r) for n, r in refs.items()}
    return _finish(state, backbone, path, keep_dtype)


def _torch_load_weights_only(path: Path) -> Mapping[str, Any]:
    kind = _file_kind(path)
    if kind == "zip":
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as err:
            raise ArtifactError(f"{path}: not a complete zip archive ({err}): {_corrupt_hint()}") from err
    elif kind != "pickle":
        raise ArtifactError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for refused globals, RuntimeError for corrupt data
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"{path}: cannot load with torch.load(weights_only=True): {first}") from err
    if not isinstance(obj, Mapping):
        raise ArtifactError(f"{path}: holds a {type(obj).__name__}, expected a state dict")
    return obj


def _load_plain(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file or a weights-only torch state dict."""
    if _file_kind(path) == "safetensors":
        return load_tensors(path)
    return module_tensors(_torch_load_weights_only(path), path)


def _pretrained_proj(pretrained: str | os.PathLike | Tensor | None) -> Tensor | None:
    if pretrained is None or isinstance(pretrained, Tensor):
        return pretrained
    with open_tensors(pretrained) as reader:
        if "proj" not in reader:
            raise ArtifactError(f"{pretrained}: no tensor `proj` to complete a CLIPVisionModel with")
        return reader.get("proj")


def import_hf(
    path: str | os.PathLike,
    backbone: BackboneLike,
    *,
    pretrained: str | os.PathLike | Tensor | None = None,
    keep_dtype: bool = False,
) -> dict[str, Tensor]:
    """Visual state dict of Hugging Face CLIP weights (``model.safetensors``, or a ``.bin``).

    Args:
        pretrained: θ0 (an open_clip visual safetensors/Zarr, or its ``proj`` [w, d]) to take
            ``proj`` from when the file has no ``visual_projection.weight``.
    """
    p = Path(path)
    hf = _load_plain(p)
    has_proj = "visual_projection.weight" in hf
    proj = None if has_proj else _pretrained_proj(pretrained)
    if proj is not None:
        log.info("%s: no visual_projection in the file (CLIPVisionModel); taking `proj` from θ0 %s", p,
                 pretrained if not isinstance(pretrained, Tensor) else "(given tensor)")
    return _finish(hf_to_open_clip(hf, p, proj), backbone, p, keep_dtype)


def import_state_dict(
    path: str | os.PathLike,
    backbone: BackboneLike,
    *,
    pretrained: str | os.PathLike | Tensor | None = None,
    keep_dtype: bool = False,
) -> dict[str, Tensor]:
    """Visual state dict of a plain pickled state dict (``torch.load(weights_only=True)``).

    A ``module.`` / ``visual.`` / ``model.visual.`` prefix is stripped and other tensors (the
    text tower) dropped; Hugging Face names (a ``pytorch_model.bin``) go through `hf_to_open_clip`.
    """
    p = Path(path)
    state = module_tensors(_torch_load_weights_only(p), p)
    if any(k.endswith(_HF_PATCH) for k in state):
        return import_hf(p, backbone, pretrained=pretrained, keep_dtype=keep_dtype)
    return _finish(select_visual(state, p), backbone, p, keep_dtype)


def import_open_clip(path: str | os.PathLike, backbone: BackboneLike, *, keep_dtype: bool = False) -> dict[str, Tensor]:
    """Visual state dict of a safetensors file in open_clip naming (a ``visual.`` prefix is allowed)."""
    p = Path(path)
    if _file_kind(p) != "safetensors":
        raise ArtifactError(f"{p}: not a safetensors file (format open_clip)")
    return _finish(select_visual(load_tensors(p), p), backbone, p, keep_dtype)


def import_encoder(
    path: str | os.PathLike,
    backbone: BackboneLike,
    *,
    format: str = "auto",
    pretrained: str | os.PathLike | Tensor | None = None,
    keep_dtype: bool = False,
) -> dict[str, Tensor]:
    """Import a fine-tuned (or zero-shot) image encoder as an open_clip visual state dict.

    Args:
        path: the checkpoint.
        backbone: open_clip model name (``ViT-B-32``), ``demo``, or a module to validate against.
        format: ``auto`` (`detect_format`) or one of `FORMATS`.
        pretrained: θ0, for Hugging Face files without a projection.
        keep_dtype: keep the source dtype instead of converting to float32.

    Returns:
        ``{name: tensor}`` in the backbone's state-dict order, validated, finite.
    """
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "taskvectors":
        state = import_taskvectors(path, backbone, keep_dtype=keep_dtype)
    elif fmt == "state_dict":
        state = import_state_dict(path, backbone, pretrained=pretrained, keep_dtype=keep_dtype)
    elif fmt == "hf":
        state = import_hf(path, backbone, pretrained=pretrained, keep_dtype=keep_dtype)
    elif fmt == "open_clip":
        state = import_open_clip(path, backbone, keep_dtype=keep_dtype)
    else:
        raise ValueError(f"unknown checkpoint format `{fmt}`; known formats: auto, {', '.join(FORMATS)}")
    log.info("%s: imported %d tensors (%s format) for backbone `%s`", path, len(state), fmt, _backbone_name(backbone))
    return state


def _head_from_module(root: Any, source: Path) -> Mapping[str, Any]:
    if not isinstance(root, _Inert):
        return module_tensors(root, source)
    state = vars(root)
    normalize = state.get("normalize")
    if normalize is not True:
        raise ArtifactError(
            f"{source}: classification head ({root._pickled_global}) has normalize={normalize!r}; our heads "
            "apply to L2-normalised features (logits = normalize(f) @ weight.T + bias), so it cannot be used as is"
        )
    return {k: v for k, v in (state.get("_parameters") or {}).items() if v is not None}


def import_head(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Classification head of a ``head_<Dataset>.pt`` or a ``{weight, bias}`` file.

    Accepts a pickled task-vectors ``ClassificationHead`` (restricted unpickling; its
    ``normalize`` flag must be True), a weights-only ``{weight, bias}`` state dict, or
    safetensors with ``weight`` and ``bias``.

    Returns:
        weight [C, D] and bias [C], float32: logits = normalize(features) @ weight.T + bias.
    """
    p = Path(path)
    kind = _file_kind(p)
    if kind == "safetensors":
        state: Mapping[str, Any] = load_tensors(p)
    elif kind in ("zip", "pickle") and _names_module_classes(_pickle_globals(p)):
        with load_restricted(p) as ckpt:
            state = {k: ckpt.tensor(v) for k, v in _head_from_module(ckpt.root, p).items()}
    elif kind in ("zip", "pickle"):
        state = module_tensors(_torch_load_weights_only(p), p)
    else:
        raise ArtifactError(f"{p}: unrecognised file (not safetensors, not a torch checkpoint)")
    for name in ("weight", "bias"):
        if name not in state:
            raise ArtifactError(f"{p}: head tensor `{name}` is missing (a head holds `weight` [C, D] and `bias` [C])")
    extra = sorted(set(state) - {"weight", "bias"})
    if extra:
        raise ArtifactError(f"{p}: unexpected tensor `{extra[0]}` in a head (expected only `weight` and `bias`)")
    weight, bias = state["weight"], state["bias"]
    if weight.ndim != 2 or tuple(bias.shape) != (weight.shape[0],):
        raise ArtifactError(
            f"{p}: head `weight` has shape {list(weight.shape)} and `bias` {list(bias.shape)}; expected [C, D] and [C]"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{p}: head tensor `{name}` is not a finite floating-point tensor: the file is corrupt")
    return weight.float().contiguous(), bias.float().contiguous()
