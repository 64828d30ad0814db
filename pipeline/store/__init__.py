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

from pipeline.store.atomic import (
    FAULT_AFTER_ENV,
    FAULT_ONCE_ENV,
    FAULT_PATH_ENV,
    atomic_path,
    check_output_path,
)
from pipeline.store.digests import DIGEST_CACHE_ENV, file_fingerprint
from pipeline.store.errors import ArtifactError, check_tensor_name
from pipeline.store.readers import (
    SafetensorsReader,
    TensorReader,
    ZarrReader,
    array_checksum,
    load_tensors,
    open_tensors,
)
from pipeline.store.records import check_provenance, provenance
from pipeline.store.threads import WriteBehind
from pipeline.store.writers import SafetensorsWriter, ZarrWriter, write_safetensors, write_zarr

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
