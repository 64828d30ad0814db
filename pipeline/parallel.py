"""One process-wide pool of worker threads for the CPU passes that release the GIL: file reads
(`pread`), NumPy element-wise loops over ranges of a flat array (TIES, Fisher averaging), and
the truncated SVD's exact path (`pipeline.lapack`: SciPy's BLAS and LAPACK on one thread each).

NumPy runs each call on one thread, so a pass split into one contiguous range per core runs
side by side without torch's intra-op pool, on data that stays in cache step by step.

Work on these threads must not call torch operations that run in parallel (large element-wise
ops, reductions, copies): each calling thread starts an OpenMP team of its own, and once the
process holds more OpenMP threads than cores, libgomp stops spinning at barriers, which makes
the main thread's LAPACK calls several times slower for the rest of the process (on 2 cores a
256 × 256 eigh then takes 17–26 ms instead of 3 ms, and the EpiMer benchmark's basis 9.7 s
instead of 5.8 s). Hence NumPy in the readers' checks and conversions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

R = TypeVar("R")

_POOL: ThreadPoolExecutor | None = None


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity mask (taskset, Slurm's cgroups),
    or the machine's count where the platform has no mask."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pool() -> ThreadPoolExecutor:
    """The shared workers: as many as the cores given to the process (`available_cores`; 8 at
    most, 2 at least: one thread copies about 6 GB/s from the page cache, two about 10 GB/s on
    a 2-core machine). Work submitted here must not wait on other work submitted here."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(
            max_workers=min(8, max(2, available_cores())), thread_name_prefix="pipeline"
        )
    return _POOL


def for_each(one: Callable[[int], object], count: int, parallel: bool = True) -> None:
    """one(0), ..., one(count − 1), on the pool when `parallel` (and count > 1). The first
    failing call in index order raises, the same error as a sequential loop."""
    if not parallel or count < 2:
        for i in range(count):
            one(i)
        return
    for _ in pool().map(one, range(count)):
        pass


def split(n: int, step: int) -> list[tuple[int, int]]:
    """[0, n) as one contiguous range of whole steps per CPU thread (torch's thread count)."""
    if n == 0:
        return []
    parts = max(1, min(torch.get_num_threads(), -(-n // step)))
    per = -(-n // parts // step) * step
    return [(s, min(n, s + per)) for s in range(0, n, per)]


def map_ranges(fn: Callable[[int, int], R], ranges: Iterable[tuple[int, int]]) -> list[R]:
    """[fn(start, stop) for each range], on the pool when there are several. Results in
    order; the first exception raises."""
    ranges = list(ranges)
    if len(ranges) < 2:
        return [fn(*r) for r in ranges]
    return list(pool().map(lambda r: fn(*r), ranges))
