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
- ``state_dict``: a plain pickled state dict (torch zip archive or legacy stream), read by the
  same restricted unpickler with module classes refused, with or without a ``module.`` /
  ``visual.`` / ``model.visual.`` prefix.
- ``hf``: Hugging Face ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel``
  weights (``vision_model.*``, ``visual_projection.weight``), mapped to open_clip names
  (q, k, v concatenated into ``in_proj_*``; the projection transposed into ``proj``).
- ``open_clip``: safetensors already in open_clip visual naming (validated only).

Text-tower tensors (``token_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``,
the text ``transformer`` and ``positional_embedding``) are dropped in every format.

A pickle's work is bounded by its file (``docs/guarantees.md`` names each bound's test): storage
records may not exceed the file, tensor views may not reach past or expand beyond their
storage, dict keys and set members may not be tuple DAGs whose hash is exponential, module
trees are walked iteratively to a fixed depth, and error messages describe unpickled values
in a few bounded words (`_brief`), never with ``str()``/``repr()`` of the whole value.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from pipeline.store import ArtifactError, SafetensorsReader, load_tensors, open_tensors

__all__ = [
    "FORMATS",
    "check_torch_checkpoint",
    "detect_format",
    "expected_shapes",
    "foreign_checkpoint",
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


def validate_visual(
    state: Mapping[str, Tensor], backbone: BackboneLike, source: str | os.PathLike = "state dict"
) -> None:
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
        raise ArtifactError(
            f"{source}: tensor `{missing[0]}` is missing for backbone `{name}`{more}"
        )
    extra = [n for n in state if n not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ArtifactError(
            f"{source}: unexpected tensor `{_clip(extra[0])}` for backbone `{name}`{more}"
        )
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

# Bounds on what a checkpoint's pickle may make us build or compute. The pickle of a ViT-B/32
# task-vectors checkpoint is about 50 KiB, its deepest module (attn.out_proj) 7 levels below
# the wrapper, its dict keys strings.
_MAX_PICKLE_BYTES = 64 << 20
"""Largest pickle read (a zip's ``data.pkl`` record, or one pickle of a stream): parsing is
linear in it, so this bounds the time spent on a file of any size."""
_MAX_KEY_OBJECTS = 1000
"""Most objects hashing one dict key or set member may visit. Tuples do not cache their hash,
so a tuple of tuples sharing one child n levels deep costs 2ⁿ to hash: such keys are refused."""
_MAX_HASH_WORK = 1_000_000
"""Most objects one pickle may have hashed or copied into dicts and sets in all: a shared
container given to ``set()`` or ``BUILD`` many times would otherwise cost its size each time.
A checkpoint's pickle hashes about one string per dict entry: some 6,000 for a ViT-B/32
task-vectors ``finetuned.pt``."""
_MAX_CALL_ARGS = 16
"""Most arguments of a pickled call (``REDUCE``/``NEWOBJ``): torch's rebuild functions take 6;
a shared tuple of 10⁵ arguments would be copied on every call."""
_MAX_MODULE_DEPTH = 64
"""Deepest module nesting walked (a CLIP ViT's parameters sit at most 7 levels below the wrapper)."""
_MAX_NDIM = 32
_MAX_INDEX = 1 << 48
"""Bound on every tensor size, stride and offset (in elements): far beyond any real checkpoint,
small enough that no product or sum of them overflows torch's int64 arithmetic."""


def _brief(value: Any, budget: int = 12) -> str:
    """A short description of an unpickled value, for error messages.

    Never ``str()``/``repr()`` of the value itself: a few hundred pickle bytes can build a list
    DAG whose full text is exponentially long. At most `budget` items over two levels are
    shown; long strings and integers are cut.
    """
    left = [budget]

    def render(x: Any, depth: int) -> str:
        left[0] -= 1
        if isinstance(x, (str, bytes)):
            return repr(x[:40]) + ("…" if len(x) > 40 else "")
        if x is None or isinstance(x, (bool, float)):
            return repr(x)
        if isinstance(x, int):
            return repr(x) if x.bit_length() <= 64 else f"<int of {x.bit_length()} bits>"
        if isinstance(x, (tuple, list, dict, set, frozenset)):
            kind = type(x).__name__
            if depth >= 2 or left[0] <= 0:
                return f"<{kind} of {len(x)} items>"
            parts = []
            for item in x.items() if isinstance(x, dict) else x:
                if left[0] <= 0:
                    parts.append("…")
                    break
                if isinstance(x, dict):
                    parts.append(f"{render(item[0], depth + 1)}: {render(item[1], depth + 1)}")
                else:
                    parts.append(render(item, depth + 1))
            body = ", ".join(parts)
            if type(x) is list:
                return f"[{body}]"
            if type(x) is tuple:
                return f"({body})"
            if type(x) is dict:
                return f"{{{body}}}"
            if isinstance(x, (dict, set, frozenset)):
                return f"{kind}({{{body}}})"
            return f"{kind}({body})"  # torch.Size and other tuple or list subclasses
        if isinstance(x, _Inert):
            return f"<{type(x)._pickled_global} object>"
        if isinstance(x, type):
            return f"<class {x._pickled_global if issubclass(x, _Inert) else f'{x.__module__}.{x.__qualname__}'}>"
        if isinstance(x, _StorageType):
            return f"<{x.dtype} storage type>"
        if isinstance(x, _TensorRef):
            return f"<tensor {list(x.size)}>"
        return f"<{type(x).__name__}>"

    return render(value, 0)


def _clip(text: str, n: int = 120) -> str:
    """`text` cut to `n` characters (tensor names and globals come from the file)."""
    return text if len(text) <= n else text[:n] + f"… ({len(text)} characters)"


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
        return f"<inert {type(self)._pickled_global}>"


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
    "float32",
    "float",
    "float64",
    "double",
    "float16",
    "half",
    "bfloat16",
    "int64",
    "long",
    "int32",
    "int",
    "int16",
    "short",
    "int8",
    "uint8",
    "bool",
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

    def __init__(
        self, dtype: torch.dtype, numel: int, load: Callable[[_Storage], Tensor] | None
    ) -> None:
        self.dtype, self.numel, self._load = dtype, numel, load
        self.data: Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * _element_size(self.dtype)

    def tensor(self) -> Tensor:
        if self.data is None:
            if self._load is None:
                raise ArtifactError("storage data was never read")
            self.data = self._load(self)
        return self.data


@dataclass
class _TensorRef:
    """A tensor of the checkpoint, not yet read: a strided view of one storage.

    `_rebuild_tensor` only creates views that stay inside their storage and have at most as
    many elements as it, so materialising one allocates no more than the storage's bytes.
    """

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * _element_size(self.storage.dtype)

    def materialize(self) -> Tensor:
        flat = self.storage.tensor()
        view = torch.as_strided(flat, self.size, self.stride, self.offset)
        return view.clone(memory_format=torch.contiguous_format)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) > _MAX_NDIM
        or not all(type(v) is int and 0 <= v < _MAX_INDEX for v in value)
    ):
        raise ArtifactError(
            f"tensor {what} must be at most {_MAX_NDIM} non-negative ints below 2**48, got {_brief(value)}"
        )
    return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRef:
    """Our replacement of torch._utils._rebuild_tensor(_v2): checks the layout, reads nothing.

    A view may not reach past its storage, nor have more elements than it: a stride-0 or
    otherwise overlapping expansion (a [10⁵, 10⁵] view of one float) would make a small file
    allocate gigabytes when the tensor is copied out.
    """
    if not isinstance(storage, _Storage):
        raise ArtifactError(f"tensor rebuilt from {_brief(storage)}, expected a storage record")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or not 0 <= offset < _MAX_INDEX or len(size) != len(stride):
        raise ArtifactError(
            f"tensor has an invalid layout (offset {_brief(offset)}, size {list(size)}, stride {list(stride)})"
        )
    numel = math.prod(size)
    if numel > storage.numel:
        raise ArtifactError(
            f"tensor of size {list(size)} (stride {list(stride)}) has {numel} elements, more than the "
            f"{storage.numel} of its storage: an overlapping (stride-0) expansion, refused"
        )
    if numel > 0:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise ArtifactError(
                f"tensor of size {list(size)} reaches element {last} of a storage of {storage.numel} elements"
            )
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data  # a Parameter's data tensor; requires_grad and hooks do not matter here


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # torch pickles a tensor with Python attributes as (rebuild function, its args, ...): only
    # our own rebuild functions may be called here, never another allowed global (e.g. `set`).
    if (
        not any(func is f for f in _TORCH_FUNCTIONS.values())
        or type(args) is not tuple
        or len(args) > _MAX_CALL_ARGS
    ):
        raise ArtifactError(
            f"_rebuild_from_type_v2 of {_brief(func)}: expected a tensor rebuild function"
        )
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
    if (
        module in _INERT_MODULES
        or module.startswith(_INERT_PREFIXES)
        or module == "torch.nn.parameter"
    ):
        return _inert_class(module, name)
    return None


class _BoundedReader:
    """Reads of one pickle in a file, capped at the bytes the file still holds and at
    `_MAX_PICKLE_BYTES` from where the pickle starts.

    A pickle's length fields are not trusted: a buffered ``read(n)`` allocates `n` bytes
    before reading, so an 8-byte length of 2⁴⁰ in a small file would allocate a terabyte.
    """

    def __init__(self, fh: BinaryIO, size: int, path: Path) -> None:
        self._fh, self._size, self._path = fh, size, path
        self._end = fh.tell() + _MAX_PICKLE_BYTES

    def _left(self) -> int:
        at = self._fh.tell()
        if at >= self._end:
            raise ArtifactError(
                f"{self._path}: its pickle runs past {_MAX_PICKLE_BYTES >> 20} MiB; a checkpoint's is far "
                "smaller (its tensors are stored apart): not a checkpoint"
            )
        return max(min(self._size, self._end) - at, 0)

    def read(self, n: int = -1) -> bytes:
        left = self._left()
        return self._fh.read(left if n is None or n < 0 else min(n, left))

    def readline(self, n: int = -1) -> bytes:
        left = self._left()
        return self._fh.readline(left if n is None or n < 0 else min(n, left))


_U = pickle._Unpickler  # the Python implementation: its opcode handlers can be checked one by one


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only allow-listed globals (see `_resolve_global`) and bounds work.

    Storage records (persistent ids) become `_Storage` objects read through `storage_loader`,
    and tensors become `_TensorRef` views of them, so no tensor bytes are read while the
    pickle is parsed and none at all for tensors that are later dropped.

    The Python implementation of the unpickler is used so that opcodes can be checked before
    they run: what ``DICT``, ``SETITEM(S)``, ``ADDITEMS``, ``FROZENSET``, ``BUILD`` and the
    ``set``/``frozenset``/``OrderedDict`` globals hash or copy is sized first (`_MAX_KEY_OBJECTS`
    per key, `_MAX_HASH_WORK` in all); ``BUILD`` sets state only on inert stand-ins and on
    OrderedDicts (new attributes only); ``NEWOBJ`` creates only stand-ins; calls take at most
    `_MAX_CALL_ARGS` arguments and ``torch.Size`` at most `_MAX_NDIM` ints.

    Args:
        modules: allow module classes (as inert stand-ins); False for a plain state dict.
        max_storage_bytes: the most bytes one storage record may declare (the file's size).
    """

    dispatch = dict(_U.dispatch)

    def __init__(
        self,
        fh: Any,
        path: Path,
        storage_loader: Callable[[str, _Storage], Tensor] | None,
        *,
        modules: bool = True,
        max_storage_bytes: int | None = None,
    ) -> None:
        super().__init__(fh)
        self._path = path
        self._loader = storage_loader
        self._modules = modules
        self._max_storage_bytes = max_storage_bytes
        self.storages: dict[str, _Storage] = {}
        # id → (tuple, objects hashing it visits): tuples are immutable, so each is sized once.
        self._tuple_sizes: dict[int, tuple[tuple[Any, ...], int]] = {}
        self._hash_work = 0  # objects hashed or copied into dicts and sets so far

    # ---------------------------------------------------------------- globals and records

    def _refuse(self, what: str) -> ArtifactError:
        return ArtifactError(f"{self._path}: {what} (the file is malicious or not a checkpoint)")

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module
        value = _resolve_global(module, name)
        if value is None:
            raise ArtifactError(
                f"{self._path}: refusing to unpickle global `{_clip(module)}.{_clip(name)}`: only tensors, "
                "containers and known model classes are allowed (the file is malicious or not a checkpoint)"
            )
        if not self._modules and isinstance(value, type) and issubclass(value, _Inert):
            raise ArtifactError(
                f"{self._path}: holds pickled classes (`{_clip(module)}.{_clip(name)}`), not a plain state "
                "dict of tensors; a task-vectors checkpoint is imported with --format taskvectors"
            )
        if value is set:
            return self._new_set
        if value is frozenset:
            return self._new_frozenset
        if value is OrderedDict:
            return self._new_ordered_dict
        if value is torch.Size:
            return self._new_size
        return value

    def persistent_load(self, pid: Any) -> Any:
        # Zip: ('storage', type, key, location, numel); legacy: (..., numel, view_metadata).
        # The legacy stream also names module classes as ('module', class, source file, source).
        if type(pid) is tuple and len(pid) == 4 and pid[0] == "module":
            if not (isinstance(pid[1], type) and issubclass(pid[1], _Inert)):
                raise self._refuse(f"malformed module record {_brief(pid)}")
            return pid[1]
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage"):
            raise self._refuse(f"unsupported persistent record {_brief(pid)}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if (
            not isinstance(storage_type, _StorageType)
            or type(key) is not str
            or len(key) > 256
            or type(numel) is not int
            or not 0 <= numel < _MAX_INDEX
        ):
            raise self._refuse(f"malformed storage record {_brief(pid)}")
        if len(pid) == 6 and pid[5] is not None:
            raise ArtifactError(
                f"{self._path}: storage views of the legacy format are not supported"
            )
        nbytes = numel * _element_size(storage_type.dtype)
        if self._max_storage_bytes is not None and nbytes > self._max_storage_bytes:
            raise self._refuse(
                f"storage `{_clip(key)}` declares {nbytes} bytes, more than the whole file ({self._max_storage_bytes})"
            )
        known = self.storages.get(key)
        if known is None:
            loader = self._loader
            known = self.storages[key] = _Storage(
                storage_type.dtype, numel, (lambda s, k=key: loader(k, s)) if loader else None
            )
        elif (known.dtype, known.numel) != (storage_type.dtype, numel):
            raise self._refuse(
                f"storage `{_clip(key)}` is declared twice, as {known.numel} × {known.dtype} and {numel} × {storage_type.dtype}"
            )
        return known

    # ---------------------------------------------------------------- hashing

    def _hash_size(self, obj: Any) -> int:
        """How many objects hashing `obj` visits (capped just above the limit).

        Only tuples (and tuple subclasses such as torch.Size) hash their items on every call;
        strings, numbers and frozensets cache or are O(1) per object, lists and dicts refuse.
        """
        if not isinstance(obj, tuple):
            return 1
        sizes = self._tuple_sizes
        cap = _MAX_KEY_OBJECTS + 1
        stack: list[tuple[Any, bool]] = [(obj, False)]
        while stack:  # post-order over the tuple DAG; each distinct tuple is sized once
            t, children_done = stack.pop()
            hit = sizes.get(id(t))
            if hit is not None and hit[0] is t:
                continue
            if children_done:
                total = 1
                for item in t:
                    if isinstance(item, tuple):
                        total += sizes[id(item)][1]
                    else:
                        total += 1
                    if total >= cap:
                        break
                sizes[id(t)] = (t, min(total, cap))
            else:
                stack.append((t, True))
                stack.extend((item, False) for item in t if isinstance(item, tuple))
        return sizes[id(obj)][1]

    def _check_keys(self, keys: Any) -> None:
        """Account for hashing `keys` (dict keys or set members about to be inserted or copied)."""
        for key in keys:
            size = 1 if type(key) is str else self._hash_size(key)
            if size > _MAX_KEY_OBJECTS:
                raise self._refuse(
                    f"a dict key or set member is a nested tuple of more than {_MAX_KEY_OBJECTS} objects "
                    "(hashing it would take exponential time)"
                )
            self._hash_work += size
            if self._hash_work > _MAX_HASH_WORK:
                raise self._refuse(
                    f"building its dicts and sets would hash or copy more than {_MAX_HASH_WORK} objects "
                    "(shared containers inserted over and over)"
                )

    def _new_set(self, items: Any = ()) -> set[Any]:
        items = list(items)
        self._check_keys(items)
        return set(items)

    def _new_frozenset(self, items: Any = ()) -> frozenset[Any]:
        items = list(items)
        self._check_keys(items)
        return frozenset(items)

    def _new_size(self, items: Any = ()) -> torch.Size:
        if type(items) not in (tuple, list) or len(items) > _MAX_NDIM:
            raise self._refuse(f"torch.Size of {_brief(items)}: expected at most {_MAX_NDIM} ints")
        return torch.Size(items)

    def _new_ordered_dict(self, items: Any = ()) -> OrderedDict[Any, Any]:
        if isinstance(items, Mapping):
            self._check_keys(items.keys())  # sized when built; copying costs their count again
            return OrderedDict(items)
        pairs = list(items)
        if not all(type(p) in (tuple, list) and len(p) == 2 for p in pairs):
            raise self._refuse("OrderedDict built from something other than (key, value) pairs")
        self._check_keys(p[0] for p in pairs)
        return OrderedDict(pairs)

    def _load_dict(self) -> None:
        self._check_keys(self.stack[0::2])  # the items since the mark: key, value, key, ...
        _U.load_dict(self)

    def _load_setitem(self) -> None:
        self._check_keys(self.stack[-2:-1])
        _U.load_setitem(self)

    def _load_setitems(self) -> None:
        self._check_keys(self.stack[0::2])
        _U.load_setitems(self)

    def _load_additems(self) -> None:
        self._check_keys(self.stack)
        _U.load_additems(self)

    def _load_frozenset(self) -> None:
        self._check_keys(self.stack)
        _U.load_frozenset(self)

    # ---------------------------------------------------------------- object construction

    def _load_build(self) -> None:
        # State goes to stand-ins and to OrderedDicts (a state dict carries `_metadata`), never
        # to an allowed class or function, whose attributes would outlive this file.
        state, inst = self.stack[-1], self.stack[-2]
        if not isinstance(inst, _Inert) and type(inst) is not OrderedDict:
            raise self._refuse(f"BUILD sets the state of {_brief(inst)}, not of a pickled object")
        for part in state if type(state) is tuple and len(state) == 2 else (state,):
            if isinstance(part, Mapping):  # copied into the object's attributes
                self._check_keys(part.keys())
        # An attribute named like a method (`items`, `get`) would shadow it for our own code.
        if type(inst) is OrderedDict and not (
            type(state) is dict
            and all(type(k) is str and not hasattr(OrderedDict, k) for k in state)
        ):
            raise self._refuse(
                f"BUILD gives an OrderedDict the state {_brief(state)}: only new attributes such as `_metadata`"
            )
        _U.load_build(self)

    def _check_args(self, op: str, args: Any, kind: type = tuple) -> None:
        if type(args) is not kind or len(args) > _MAX_CALL_ARGS:
            raise self._refuse(
                f"{op} with arguments {_brief(args)}: expected a {kind.__name__} of at most {_MAX_CALL_ARGS}"
            )

    def _load_newobj(self) -> None:
        cls = self.stack[-2]
        if not (isinstance(cls, type) and issubclass(cls, _Inert)):
            raise self._refuse(f"NEWOBJ creates {_brief(cls)}, not a pickled class")
        self._check_args("NEWOBJ", self.stack[-1])
        _U.load_newobj(self)

    def _load_newobj_ex(self) -> None:
        cls = self.stack[-3]
        if not (isinstance(cls, type) and issubclass(cls, _Inert)):
            raise self._refuse(f"NEWOBJ_EX creates {_brief(cls)}, not a pickled class")
        self._check_args("NEWOBJ_EX", self.stack[-2])
        self._check_args("NEWOBJ_EX", self.stack[-1], dict)
        _U.load_newobj_ex(self)

    def _load_reduce(self) -> None:
        self._check_args("REDUCE", self.stack[-1])
        _U.load_reduce(self)

    for _op, _handler in (
        (pickle.DICT, _load_dict),
        (pickle.SETITEM, _load_setitem),
        (pickle.SETITEMS, _load_setitems),
        (pickle.ADDITEMS, _load_additems),
        (pickle.FROZENSET, _load_frozenset),
        (pickle.BUILD, _load_build),
        (pickle.NEWOBJ, _load_newobj),
        (pickle.NEWOBJ_EX, _load_newobj_ex),
        (pickle.REDUCE, _load_reduce),
    ):
        dispatch[_op[0]] = _handler
    del _op, _handler


def _corrupt_hint() -> str:
    return "truncated or corrupt file (some released task-vectors Cars checkpoints are); re-download it"


def _unpickle(unpickler: pickle._Unpickler, path: Path) -> Any:
    try:
        return unpickler.load()
    except ArtifactError as err:
        if str(err).startswith(str(path)):
            raise
        raise ArtifactError(f"{path}: {err}") from err
    except Exception as err:  # truncated pickles and garbage surface with assorted types
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ArtifactError(
            f"{path}: cannot unpickle ({type(err).__name__}: {_clip(text, 200)}): {_corrupt_hint()}"
        ) from err


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

    Work is bounded by the file's size: every storage record may hold at most the file's
    bytes (a small zip cannot declare a gigabyte record and have it decompressed), the
    records read together at most the file's bytes, and the tensors copied out at most twice
    the file's bytes (tensor views are checked against their storage by `_rebuild_tensor`).

    Args:
        modules: allow module classes (inert stand-ins); False reads a plain state dict only.
        read_data: False checks a legacy stream's storage records without reading them.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        recorder: set[str] | None = None,
        *,
        modules: bool = True,
        read_data: bool = True,
    ) -> None:
        self.path = Path(path)
        self._archive: zipfile.ZipFile | None = None
        self._recorder = recorder
        self._modules = modules
        self._read_data = read_data
        kind = _file_kind(self.path)
        self.size = self.path.stat().st_size
        self._records_read = 0
        self._copied = 0
        if kind == "zip":
            self.root, self.storages = self._load_zip()
        elif kind == "pickle":
            with open(self.path, "rb") as fh:
                self.root, self.storages = self._load_stream(fh)
        else:
            raise ArtifactError(
                f"{self.path}: neither a torch zip archive nor a pickle (first bytes unrecognised)"
            )

    def _unpickler(
        self, fh: Any, loader: Callable[[str, _Storage], Tensor] | None
    ) -> _RestrictedUnpickler:
        if self._recorder is None:
            return _RestrictedUnpickler(
                fh, self.path, loader, modules=self._modules, max_storage_bytes=self.size
            )
        return _RecordingUnpickler(fh, self.path, None, self._recorder, max_storage_bytes=self.size)

    def _load_zip(self) -> tuple[Any, dict[str, _Storage]]:
        """A torch zip archive: its one ``data.pkl`` record unpickled, each storage read from
        its record ``data/<key>`` under the same prefix when a tensor needs it."""
        archive, names, pkl = self._open_zip()
        prefix = pkl[: -len("data.pkl")]
        unpickler = self._unpickler(
            io.BytesIO(self._read_pickle_record(archive, pkl)),
            lambda key, storage: self._read_storage_record(archive, f"{prefix}data/{key}", storage),
        )
        root = _unpickle(unpickler, self.path)
        # Every referenced record must exist and hold exactly its storage's bytes, even if it
        # is never read: checked before allocating anything, as the pickle's numel is not trusted.
        for key, storage in unpickler.storages.items():
            record = f"{prefix}data/{key}"
            if record not in names:
                raise ArtifactError(
                    f"{self.path}: storage record `{_clip(record)}` is missing: {_corrupt_hint()}"
                )
            size = self._record_size(archive, record)
            if size != storage.nbytes:
                raise ArtifactError(
                    f"{self.path}: storage record `{_clip(record)}` holds {size} bytes, expected {storage.nbytes}: {_corrupt_hint()}"
                )
        return root, unpickler.storages

    def _open_zip(self) -> tuple[zipfile.ZipFile, set[str], str]:
        """The opened archive, its record names and its one ``data.pkl`` record, checked to be
        of a little-endian checkpoint."""
        path = self.path
        try:
            self._archive = archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise ArtifactError(
                f"{path}: not a complete zip archive ({err}): {_corrupt_hint()}"
            ) from err
        names = set(archive.namelist())
        pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ArtifactError(
                f"{path}: zip archive without exactly one data.pkl record: not a torch checkpoint"
            )
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names:
            if archive.getinfo(f"{prefix}byteorder").file_size > 16:
                raise ArtifactError(
                    f"{path}: record `{_clip(prefix)}byteorder` is not a byte-order name"
                )
            if archive.read(f"{prefix}byteorder").strip() != b"little":
                raise ArtifactError(f"{path}: big-endian checkpoints are not supported")
        return archive, names, pkl[0]

    def _record_size(self, archive: zipfile.ZipFile, record: str) -> int:
        """The record's declared size, refused past the file's (a zip bomb)."""
        size = archive.getinfo(record).file_size
        if size > self.size:  # a compressed record inflating past the file: a zip bomb
            raise ArtifactError(
                f"{self.path}: record `{_clip(record)}` declares {size} bytes, more than the whole file "
                f"({self.size}): the file is malicious or corrupt"
            )
        return size

    def _read_pickle_record(self, archive: zipfile.ZipFile, record: str) -> bytes:
        """The bytes of the ``data.pkl`` record, refused past `_MAX_PICKLE_BYTES`."""
        size = self._record_size(archive, record)
        if size > _MAX_PICKLE_BYTES:
            raise ArtifactError(
                f"{self.path}: record `{record}` holds a {size}-byte pickle; a checkpoint's is under "
                f"{_MAX_PICKLE_BYTES >> 20} MiB (its tensors are separate records): not a checkpoint"
            )
        try:
            return archive.read(record)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ArtifactError(
                f"{self.path}: record `{record}` cannot be read ({err}): {_corrupt_hint()}"
            ) from err

    def _read_storage_record(
        self, archive: zipfile.ZipFile, record: str, storage: _Storage
    ) -> Tensor:
        """A storage's elements from its record; the records read together stay within the
        file's size."""
        path, nbytes = self.path, storage.nbytes
        if self._records_read + nbytes > self.size:
            raise ArtifactError(
                f"{path}: the storage records read add up to more than the file's {self.size} bytes: "
                "the file is malicious or corrupt"
            )
        self._records_read += nbytes
        out = torch.empty(storage.numel, dtype=storage.dtype)
        try:
            with archive.open(record) as fh:  # zipfile checks the record's CRC-32 at its end
                got = fh.readinto(memoryview(out.view(torch.uint8).numpy()))
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ArtifactError(
                f"{path}: storage record `{record}` cannot be read ({err}): {_corrupt_hint()}"
            ) from err
        if got != nbytes:
            raise ArtifactError(
                f"{path}: storage record `{record}` is truncated: {_corrupt_hint()}"
            )
        return out

    def _load_stream(self, fh: BinaryIO) -> tuple[Any, dict[str, _Storage]]:
        """A plain pickle, or torch's legacy stream: magic number, protocol, system info, the
        object, its storage keys, then each storage as an int64 element count and raw bytes."""
        path = self.path

        def bounded() -> _BoundedReader:  # one per pickle of the stream
            return _BoundedReader(fh, self.size, path)

        first = self._unpickler(bounded(), None)
        magic = _unpickle(first, path)
        if magic != _LEGACY_MAGIC:  # a plain pickle: only allowed globals got this far
            return magic, first.storages
        for _ in range(2):  # protocol version, system info
            _unpickle(self._unpickler(bounded(), None), path)
        unpickler = self._unpickler(bounded(), None)
        root = _unpickle(unpickler, path)
        if self._recorder is not None:
            return root, unpickler.storages
        keys = _unpickle(self._unpickler(bounded(), None), path)
        if type(keys) is not list:
            raise ArtifactError(
                f"{path}: legacy checkpoint without its storage key list: {_corrupt_hint()}"
            )
        found: set[str] = set()
        for key in keys:
            storage = unpickler.storages.get(key) if type(key) is str else None
            if storage is None:
                raise ArtifactError(
                    f"{path}: legacy storage {_brief(key)} is not referenced by the pickle: {_corrupt_hint()}"
                )
            header = fh.read(8)
            if len(header) != 8:
                raise ArtifactError(f"{path}: legacy storage `{key}` is missing: {_corrupt_hint()}")
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise ArtifactError(
                    f"{path}: legacy storage `{key}` holds {numel} elements, expected {storage.numel}"
                )
            nbytes = storage.nbytes
            if nbytes > self.size - fh.tell():  # before allocating
                raise ArtifactError(
                    f"{path}: legacy storage `{key}` is truncated: {_corrupt_hint()}"
                )
            found.add(key)
            if not self._read_data:
                fh.seek(nbytes, os.SEEK_CUR)
                continue
            out = torch.empty(numel, dtype=storage.dtype)
            if fh.readinto(memoryview(out.view(torch.uint8).numpy())) != nbytes:
                raise ArtifactError(
                    f"{path}: legacy storage `{key}` is truncated: {_corrupt_hint()}"
                )
            storage.data = out
        missing = [k for k in unpickler.storages if k not in found]
        if missing:
            raise ArtifactError(
                f"{path}: legacy storage `{_clip(missing[0])}` has no data: {_corrupt_hint()}"
            )
        return root, unpickler.storages

    def tensor(self, value: Any) -> Tensor:
        """The tensor behind a reference found in `root` (a fresh contiguous CPU tensor).

        Raises:
            ArtifactError: `value` is not a tensor, or the tensors copied out of this file would
                exceed twice its size (only tensors sharing storage can; a checkpoint's do not).
        """
        if isinstance(value, _TensorRef):
            if self._copied + value.nbytes > 2 * self.size + (1 << 20):
                raise ArtifactError(
                    f"{self.path}: its tensors would take more than twice the file's {self.size} bytes "
                    "(many tensors view the same storage): the file is malicious or not a checkpoint"
                )
            self._copied += value.nbytes
            return value.materialize()
        if isinstance(value, Tensor):
            return value
        raise ArtifactError(f"{self.path}: expected a tensor, found {_brief(value)}")

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None

    def __enter__(self) -> PickledCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_restricted(path: str | os.PathLike, *, modules: bool = True) -> PickledCheckpoint:
    """Unpickle a torch checkpoint (zip or legacy) without importing or running its classes.

    Allowed globals: torch's tensor/parameter rebuild functions (replaced by ours), typed
    storage classes, dtypes, ``torch.Size``/``torch.device``, ``collections.OrderedDict``,
    ``set``; classes of ``src.modeling``, ``open_clip.*``, ``clip.model``, ``torch.nn.modules.*``
    and ``torchvision.transforms.*`` become inert stand-ins (refused if `modules` is False).
    Anything else is refused. Work and memory are bounded by the file's size (see
    `PickledCheckpoint`).

    Raises:
        ArtifactError: a disallowed global (named, with the file) before anything runs; a
            truncated, corrupt or malicious archive or stream.
    """
    return PickledCheckpoint(path, modules=modules)


class _RecordingUnpickler(_RestrictedUnpickler):
    """Parses a pickle only to list its globals: every global becomes inert (nothing runs)."""

    def __init__(
        self,
        fh: Any,
        path: Path,
        loader: Any,
        record: set[str],
        *,
        max_storage_bytes: int | None = None,
    ) -> None:
        super().__init__(fh, path, None, max_storage_bytes=max_storage_bytes)
        self._record = record

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module
        self._record.add(f"{module}.{name}")
        if _resolve_global(module, name) is None:
            return _inert_class(module, name)
        return super().find_class(module, name)


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
    raise ArtifactError(
        f"{p}: unrecognised file (not safetensors, not a torch zip archive, not a pickle)"
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _plain_message(err: BaseException) -> str:
    """The gist of a third-party loader's error on one line: no colour codes, and none of
    torch's advice to re-run with ``weights_only=False`` (which would run the file's code)."""
    text = _ANSI.sub("", str(err))
    found = re.search(r"WeightsUnpickler error:\s*(.*)", text, re.S)
    if found:
        text = found.group(1)
    elif "Weights only load failed" in text:
        text = text.split("\n\n", 1)[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if "weights_only" not in ln and "Weights only load failed" not in ln]
    line = keep[0] if keep else (lines[0] if lines else type(err).__name__)
    line = re.split(r"\s(?:Please use|Check the documentation|You can use)\b", line)[0]
    return _clip(line, 300)


def check_torch_checkpoint(path: str | os.PathLike) -> None:
    """Check a θ0 file before a third-party loader (open_clip's ``torch.load``) reads it.

    A torch zip archive or pickle must be a plain state dict (``{name: tensor}``, optionally
    under ``state_dict``): it is parsed by the restricted, bounded unpickler without reading
    any tensor bytes, so everything ``torch.load`` will then allocate (each storage record's
    bytes, lazy views of them) is bounded by the file's size; a safetensors header is
    validated. Other files (``.npz``) are left to the loader.

    Raises:
        ArtifactError: naming the file, for a malicious, corrupt or non-state-dict file.
    """
    p = Path(path)
    kind = _file_kind(p)
    if kind == "safetensors":
        with SafetensorsReader(p):
            pass
    elif kind in ("zip", "pickle"):
        with PickledCheckpoint(p, modules=False, read_data=False) as ckpt:
            module_tensors(ckpt.root, p)


@contextlib.contextmanager
def foreign_checkpoint(path: str | os.PathLike) -> Iterator[None]:
    """Guard a third-party load of `path` (open_clip's ``create_model(pretrained=path)``).

    Runs `check_torch_checkpoint` first, then turns any failure of the loader into one
    `ArtifactError` naming the file, with torch's message reduced to its gist (`_plain_message`).
    """
    check_torch_checkpoint(path)
    try:
        yield
    except ArtifactError:
        raise
    except Exception as err:
        raise ArtifactError(f"{path}: cannot load these weights: {_plain_message(err)}") from err


# --------------------------------------------------------------------------- tensor trees and names


def _tensor_entries(
    state: Mapping[Any, Any], source: str | os.PathLike, where: str
) -> dict[str, Any]:
    """`state`'s entries, checked to be ``{str name: tensor}`` before any name is formatted."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if type(key) is not str:
            raise ArtifactError(f"{source}: {where} has a key {_brief(key)}, not a tensor name")
        if not isinstance(value, (Tensor, _TensorRef)):
            raise ArtifactError(
                f"{source}: entry `{_clip(key)}` of {where} is {_brief(value)}, not a tensor"
            )
        out[key] = value
    return out


def _module_state(
    obj: _Inert, where: str, source: str | os.PathLike
) -> tuple[dict[str, Mapping[str, Any]], set[str] | frozenset[str]]:
    """A pickled module's ``_parameters``, ``_buffers`` and ``_modules`` (each a mapping of
    names; absent or None: empty) and its non-persistent buffer names, checked."""
    state = vars(obj)
    groups = {}
    for group in ("_parameters", "_buffers", "_modules"):
        value = state.get(group)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ArtifactError(
                f"{source}: `{group}` of {where} ({type(obj)._pickled_global}) is {_brief(value)}, "
                "not a mapping: a malformed module pickle"
            )
        for key in value:
            if type(key) is not str:
                raise ArtifactError(
                    f"{source}: `{group}` of {where} has a key {_brief(key)}, not a name"
                )
        groups[group] = value
    skip = state.get("_non_persistent_buffers_set")
    if skip is None:
        skip = set()
    if not isinstance(skip, (set, frozenset)) or not all(type(n) is str for n in skip):
        raise ArtifactError(
            f"{source}: `_non_persistent_buffers_set` of {where} is {_brief(skip)}, not a set of names"
        )
    return groups, skip


def module_tensors(root: Any, source: str | os.PathLike = "checkpoint") -> dict[str, Any]:
    """Flatten an unpickled module tree (or a state dict) into ``{dotted name: tensor}``.

    Names follow ``nn.Module.state_dict()``: parameters, then persistent buffers, then child
    modules, each under ``<child name>.``. A mapping root is taken as a state dict (or a
    ``{"state_dict": ...}`` wrapper). Values are tensors or tensor references. The walk is
    iterative, visits a module shared by two parents once (as ``state_dict`` does) and stops
    at `_MAX_MODULE_DEPTH` levels.

    Raises:
        ArtifactError: naming `source`, for a root that is neither a module nor a mapping, a
            ``_parameters``/``_buffers``/``_modules`` that is not a mapping of names, a value
            that is not a tensor (or child module), or a module tree nested too deep.
    """
    if isinstance(root, Mapping):
        inner = root.get("state_dict")
        if isinstance(inner, Mapping):
            return _tensor_entries(inner, source, "the state dict under `state_dict`")
        return _tensor_entries(root, source, "the state dict")
    if not isinstance(root, _Inert) or "_modules" not in vars(root):
        raise ArtifactError(
            f"{source}: the pickled object ({_brief(root)}) is neither a module nor a state dict"
        )
    out: dict[str, Any] = {}
    seen: set[int] = set()
    stack: list[tuple[_Inert, str, int]] = [(root, "", 0)]
    while stack:  # pre-order, children pushed in reverse: the order of state_dict()
        obj, prefix, depth = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if depth > _MAX_MODULE_DEPTH:
            raise ArtifactError(
                f"{source}: module tree nested deeper than {_MAX_MODULE_DEPTH} levels (at `{_clip(prefix)}`): "
                "not a model checkpoint"
            )
        where = f"module `{_clip(prefix[:-1])}`" if prefix else "the root module"
        groups, skip = _module_state(obj, where, source)
        for group in ("_parameters", "_buffers"):
            for name, value in groups[group].items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, (Tensor, _TensorRef)):
                    raise ArtifactError(
                        f"{source}: `{_clip(prefix + name)}` is {_brief(value)}, not a tensor"
                    )
                out[prefix + name] = value
        children = []
        for name, child in groups["_modules"].items():
            if child is None:
                continue
            if not isinstance(child, _Inert):
                raise ArtifactError(
                    f"{source}: child `{_clip(prefix + name)}` is {_brief(child)}, not a module"
                )
            children.append((child, f"{prefix}{name}.", depth + 1))
        stack.extend(reversed(children))
    return out


def select_visual(
    state: Mapping[str, Any], source: str | os.PathLike = "checkpoint"
) -> dict[str, Any]:
    """The visual tower's tensors with their prefix removed; everything else is dropped.

    The prefix is the one in front of the unique ``conv1.weight`` (``""``, ``visual.``,
    ``model.visual.``, ``module.visual.``, ...); the text tower (``token_embedding``,
    ``ln_final``, ``text_projection``, ``logit_scale``, text ``transformer``) lies outside it.
    """
    anchors = [k for k in state if k == "conv1.weight" or k.endswith(".conv1.weight")]
    if len(anchors) != 1:
        found = "no" if not anchors else f"{len(anchors)}"
        raise ArtifactError(
            f"{source}: {found} `conv1.weight` tensors found: not one CLIP ViT visual tower"
        )
    prefix = anchors[0][: -len("conv1.weight")]
    kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    dropped = len(state) - len(kept)
    if dropped:
        log.info(
            "%s: kept %d tensors under `%s`, dropped %d others (text tower, heads)",
            source,
            len(kept),
            _clip(prefix),
            dropped,
        )
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
        raise ArtifactError(
            f"{source}: no unique `vision_model.{_HF_PATCH}`: not a Hugging Face CLIP vision checkpoint"
        )
    p = anchors[0][: -len(_HF_PATCH)]  # "vision_model." in the released files
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if p + key not in hf:
            raise ArtifactError(
                f"{source}: tensor `{p + key}` is missing (Hugging Face CLIP vision layout)"
            )
        used.add(p + key)
        return hf[p + key]

    out: dict[str, Tensor] = {
        "class_embedding": take("embeddings.class_embedding"),
        "positional_embedding": take("embeddings.position_embedding.weight"),
        "proj": torch.empty(0),  # placeholder: keeps open_clip's key order
        "conv1.weight": take(_HF_PATCH),
    }
    # ln_pre: HF spells it "pre_layrnorm"
    out |= _hf_affine(
        take, "ln_pre", "pre_layrnorm" if f"{p}pre_layrnorm.weight" in hf else "pre_layernorm"
    )
    pattern = re.compile(re.escape(p) + r"encoder\.layers\.(\d+)\.")
    layers = sorted({int(m.group(1)) for k in hf if (m := pattern.match(k))})
    if layers != list(range(len(layers))):
        raise ArtifactError(f"{source}: encoder layer indices {layers} are not 0 … L-1")
    for i in layers:
        out |= _hf_block(take, f"transformer.resblocks.{i}.", f"encoder.layers.{i}.")
    out |= _hf_affine(take, "ln_post", "post_layernorm")
    out["proj"] = _hf_projection(hf, source, proj)
    ignored = {
        f"{p}embeddings.position_ids",
        "visual_projection.weight",
    }  # position_ids: an index buffer
    left = [
        k
        for k in hf
        if k.startswith(p) and k not in used and k not in ignored and not _hf_text_key(k)
    ]
    if left:
        raise ArtifactError(
            f"{source}: tensor `{_clip(left[0])}` has no open_clip counterpart (and {len(left) - 1} more)"
        )
    return out


def _hf_affine(take: Callable[[str], Tensor], ours: str, theirs: str) -> dict[str, Tensor]:
    """The weight and bias of HF's layer `theirs` under open_clip's name `ours`."""
    return {f"{ours}.weight": take(f"{theirs}.weight"), f"{ours}.bias": take(f"{theirs}.bias")}


#: open_clip's names of a residual block's layers after its attention's input projection, and
#: Hugging Face's.
_HF_BLOCK_LAYERS = (
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


def _hf_block(take: Callable[[str], Tensor], ours: str, theirs: str) -> dict[str, Tensor]:
    """One residual block under open_clip's prefix `ours`, in open_clip's order, from HF's
    layer under `theirs`: q, k, v concatenated into the attention's input projection."""
    out = _hf_affine(take, f"{ours}ln_1", f"{theirs}layer_norm1")
    out[f"{ours}attn.in_proj_weight"] = torch.cat(
        [take(f"{theirs}self_attn.{x}_proj.weight") for x in "qkv"]
    )  # [3w, w]
    out[f"{ours}attn.in_proj_bias"] = torch.cat(
        [take(f"{theirs}self_attn.{x}_proj.bias") for x in "qkv"]
    )  # [3w]
    for o, t in _HF_BLOCK_LAYERS:
        out |= _hf_affine(take, ours + o, theirs + t)
    return out


def _hf_projection(
    hf: Mapping[str, Tensor], source: str | os.PathLike, proj: Tensor | None
) -> Tensor:
    """open_clip's ``proj`` [w, d]: the transpose of HF's ``visual_projection.weight`` [d, w],
    else `proj`."""
    if "visual_projection.weight" in hf:
        return hf["visual_projection.weight"].T.contiguous()
    if proj is not None:
        return proj
    raise ArtifactError(
        f"{source}: no `visual_projection.weight` (a plain CLIPVisionModel): pass the pretrained θ0 "
        "(--pretrained) to take `proj` from it"
    )


# --------------------------------------------------------------------------- importers


def import_taskvectors(
    path: str | os.PathLike, backbone: BackboneLike, *, keep_dtype: bool = False
) -> dict[str, Tensor]:
    """Visual state dict of a task-vectors ``finetuned.pt`` / ``zeroshot.pt`` (restricted unpickling).

    Only the tensors under the encoder's ``model.visual.`` are read; the text-tower leftovers
    are dropped unread.
    """
    with load_restricted(path) as ckpt:
        refs = select_visual(module_tensors(ckpt.root, path), path)
        validate_visual(refs, backbone, path)  # shapes are known before any bytes are read
        state = {n: ckpt.tensor(r) for n, r in refs.items()}
    return _finish(state, backbone, path, keep_dtype)


class _LazyTensors(Mapping[str, Tensor]):
    """The tensors of an open checkpoint, each read when it is looked up (so entries a
    mapping such as `hf_to_open_clip` never takes, e.g. the text tower, are never read)."""

    def __init__(self, ckpt: PickledCheckpoint, refs: Mapping[str, Any]) -> None:
        self._ckpt, self._refs = ckpt, refs

    def __getitem__(self, key: str) -> Tensor:
        return self._ckpt.tensor(self._refs[key])

    def __contains__(self, key: object) -> bool:
        return key in self._refs

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)


def _pretrained_proj(pretrained: str | os.PathLike | Tensor | None) -> Tensor | None:
    if pretrained is None or isinstance(pretrained, Tensor):
        return pretrained
    with open_tensors(pretrained) as reader:
        if "proj" not in reader:
            raise ArtifactError(
                f"{pretrained}: no tensor `proj` to complete a CLIPVisionModel with"
            )
        return reader.get("proj")


def _hf_import(
    hf: Mapping[str, Tensor],
    path: Path,
    backbone: BackboneLike,
    pretrained: str | os.PathLike | Tensor | None,
    keep_dtype: bool,
) -> dict[str, Tensor]:
    has_proj = "visual_projection.weight" in hf
    proj = None if has_proj else _pretrained_proj(pretrained)
    if proj is not None:
        log.info(
            "%s: no visual_projection in the file (CLIPVisionModel); taking `proj` from θ0 %s",
            path,
            pretrained if not isinstance(pretrained, Tensor) else "(given tensor)",
        )
    return _finish(hf_to_open_clip(hf, path, proj), backbone, path, keep_dtype)


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
    if _file_kind(p) == "safetensors":
        return _hf_import(load_tensors(p), p, backbone, pretrained, keep_dtype)
    with load_restricted(p, modules=False) as ckpt:
        return _hf_import(
            _LazyTensors(ckpt, module_tensors(ckpt.root, p)), p, backbone, pretrained, keep_dtype
        )


def import_state_dict(
    path: str | os.PathLike,
    backbone: BackboneLike,
    *,
    pretrained: str | os.PathLike | Tensor | None = None,
    keep_dtype: bool = False,
) -> dict[str, Tensor]:
    """Visual state dict of a plain pickled state dict (torch zip archive or legacy stream).

    Read by the restricted unpickler with module classes refused, as ``torch.load(weights_only=
    True)`` would, but with its work bounded by the file's size and only the kept tensors read.
    A ``module.`` / ``visual.`` / ``model.visual.`` prefix is stripped and other tensors (the
    text tower) dropped; Hugging Face names (a ``pytorch_model.bin``) go through `hf_to_open_clip`.
    """
    p = Path(path)
    with load_restricted(p, modules=False) as ckpt:
        refs = module_tensors(ckpt.root, p)
        if any(k.endswith(_HF_PATCH) for k in refs):
            return _hf_import(_LazyTensors(ckpt, refs), p, backbone, pretrained, keep_dtype)
        kept = select_visual(refs, p)
        validate_visual(kept, backbone, p)  # shapes are known before any bytes are read
        state = {n: ckpt.tensor(r) for n, r in kept.items()}
    return _finish(state, backbone, p, keep_dtype)


def import_open_clip(
    path: str | os.PathLike, backbone: BackboneLike, *, keep_dtype: bool = False
) -> dict[str, Tensor]:
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
        raise ValueError(
            f"unknown checkpoint format `{fmt}`; known formats: auto, {', '.join(FORMATS)}"
        )
    log.info(
        "%s: imported %d tensors (%s format) for backbone `%s`",
        path,
        len(state),
        fmt,
        _backbone_name(backbone),
    )
    return state


def _head_from_module(root: Any, source: Path) -> Mapping[str, Any]:
    if not isinstance(root, _Inert):
        return module_tensors(root, source)
    state = vars(root)
    normalize = state.get("normalize")
    if normalize is not True:
        raise ArtifactError(
            f"{source}: classification head ({type(root)._pickled_global}) has normalize={_brief(normalize)}; our "
            "heads apply to L2-normalised features (logits = normalize(f) @ weight.T + bias), so it cannot be used as is"
        )
    params = state.get("_parameters")
    if not isinstance(params, Mapping):
        raise ArtifactError(
            f"{source}: `_parameters` of the head ({type(root)._pickled_global}) is {_brief(params)}, not a mapping: "
            "a malformed module pickle"
        )
    return _tensor_entries(
        {k: v for k, v in params.items() if v is not None}, source, "the head's `_parameters`"
    )


def _check_head_names(names: Any, p: Path) -> None:
    for name in ("weight", "bias"):
        if name not in names:
            raise ArtifactError(
                f"{p}: head tensor `{name}` is missing (a head holds `weight` [C, D] and `bias` [C])"
            )
    extra = sorted(set(names) - {"weight", "bias"})
    if extra:
        raise ArtifactError(
            f"{p}: unexpected tensor `{_clip(extra[0])}` in a head (expected only `weight` and `bias`)"
        )


def import_head(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Classification head of a ``head_<Dataset>.pt`` or a ``{weight, bias}`` file.

    Accepts a pickled task-vectors ``ClassificationHead`` (restricted unpickling; its
    ``normalize`` flag must be True), a pickled ``{weight, bias}`` state dict (restricted
    unpickling, module classes refused), or safetensors with ``weight`` and ``bias``.

    Returns:
        weight [C, D] and bias [C], float32: logits = normalize(features) @ weight.T + bias.
    """
    p = Path(path)
    kind = _file_kind(p)
    if kind == "safetensors":
        state: Mapping[str, Any] = load_tensors(p)
        _check_head_names(state, p)
    elif kind in ("zip", "pickle"):
        with load_restricted(p) as ckpt:
            refs = _head_from_module(ckpt.root, p)
            _check_head_names(refs, p)
            if any(not isinstance(refs[n], _TensorRef) for n in ("weight", "bias")):
                raise ArtifactError(f"{p}: head `weight` and `bias` must be tensors")
            weight_ref, bias_ref = refs["weight"], refs["bias"]
            if len(weight_ref.shape) != 2 or tuple(bias_ref.shape) != (weight_ref.shape[0],):
                raise ArtifactError(
                    f"{p}: head `weight` has shape {list(weight_ref.shape)} and `bias` {list(bias_ref.shape)}; "
                    "expected [C, D] and [C]"
                )
            state = {k: ckpt.tensor(v) for k, v in refs.items()}
    else:
        raise ArtifactError(f"{p}: unrecognised file (not safetensors, not a torch checkpoint)")
    weight, bias = state["weight"], state["bias"]
    if weight.ndim != 2 or tuple(bias.shape) != (weight.shape[0],):
        raise ArtifactError(
            f"{p}: head `weight` has shape {list(weight.shape)} and `bias` {list(bias.shape)}; expected [C, D] and [C]"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ArtifactError(
                f"{p}: head tensor `{name}` is not a finite floating-point tensor: the file is corrupt"
            )
    return weight.float().contiguous(), bias.float().contiguous()
