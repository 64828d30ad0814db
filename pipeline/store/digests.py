"""Content digests of input files (SHA-256 of every byte), cached across processes by path,
device, inode, size and modification time, and the fingerprints that provenance records."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.store.atomic import HOST
from pipeline.store.errors import ArtifactError

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
    return (
        {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(data, dict)
        else {}
    )


def _store_digest(key: str, digest: str) -> None:
    """Add one entry to the digest cache file (atomically; any failure leaves the cache
    as it was: a digest that is not cached is computed again next time)."""
    path = _digest_cache_path()
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
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
    files = [
        f
        for f in sorted(p.rglob("*"))
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
    ]
    size = sum(f.stat().st_size for f in files)
    meta = p / "zarr.json"
    if meta.is_file() and b'"checksums"' in meta.read_bytes():
        return {
            "size": size,
            "files": len(files),
            "digest": _file_digest(meta, meta.stat().st_size),
        }
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p).as_posix()}\0{_cached_file_digest(f)[1]}\0".encode())
    return {"size": size, "files": len(files), "digest": f"sha256-tree:{h.hexdigest()}"}
