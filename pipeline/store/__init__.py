"""Every artifact on disk goes through this package: safetensors and Zarr.

Reads are lazy (one tensor at a time, so a merge never holds T full models), writes are
atomic (into a temporary sibling, renamed into place on success, removed on failure), and
every Zarr artifact carries provenance attributes (what it is, the parameters and inputs it
was made from, the package version) and a CRC-32 checksum of every array.

Modules, by concern:

- `errors`: `ArtifactError` and the check on tensor names.
- `readers`: lazy, verified readers of safetensors files and Zarr stores.
- `writers`: streaming writers of both formats (layout fixed up front, NaN/Inf refused).
- `atomic`: temporary siblings, renames into place, cleanup, and the fault-injection hook.
- `threads`: write-behind on a low-priority background thread.
- `digests`: content digests of files and their cache; `records`: provenance attributes.

Importing the package does not import torch (the workflow's Snakefile imports it to fingerprint
files): the readers, writers and provenance records load on first use.

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

import importlib
from typing import Any

from pipeline.store.atomic import (
    FAULT_AFTER_ENV,
    FAULT_ONCE_ENV,
    FAULT_PATH_ENV,
    atomic_path,
    check_output_path,
)
from pipeline.store.digests import DIGEST_CACHE_ENV, file_fingerprint
from pipeline.store.errors import ArtifactError, check_tensor_name
from pipeline.store.threads import WriteBehind

__all__ = [
    "DIGEST_CACHE_ENV",
    "FAULT_AFTER_ENV",
    "FAULT_ONCE_ENV",
    "FAULT_PATH_ENV",
    "ArtifactError",
    "SafetensorsReader",
    "SafetensorsWriter",
    "TensorReader",
    "WriteBehind",
    "ZarrReader",
    "ZarrWriter",
    "array_checksum",
    "atomic_path",
    "check_output_path",
    "check_provenance",
    "check_tensor_name",
    "file_fingerprint",
    "load_tensors",
    "open_tensors",
    "provenance",
    "write_safetensors",
    "write_zarr",
]

# The readers, writers and provenance records use torch and NumPy; they load on first use
# (PEP 562), so the workflow's Snakefile, which needs only the digests, parses without torch.
_LAZY = {
    "SafetensorsReader": "readers",
    "TensorReader": "readers",
    "ZarrReader": "readers",
    "array_checksum": "readers",
    "load_tensors": "readers",
    "open_tensors": "readers",
    "check_provenance": "records",
    "provenance": "records",
    "SafetensorsWriter": "writers",
    "ZarrWriter": "writers",
    "write_safetensors": "writers",
    "write_zarr": "writers",
}
_SUBMODULES = ("atomic", "digests", "errors", "readers", "records", "threads", "writers")


def __getattr__(name: str) -> Any:
    """The torch-side names and submodules, imported when first asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"pipeline.store.{_LAZY[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"pipeline.store.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
