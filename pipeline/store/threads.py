"""Background writes: a writer's calls on one low-priority thread, so the merge computes the
next layer while the last one is written."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any


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
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="write-behind", initializer=_lower_priority
        )
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
