"""EpiMer: curvature-aware model merging in a low-rank tagged subspace, and its baselines."""

import os

# OpenMP threads that wait at a barrier sleep instead of spinning. On a shared or
# oversubscribed CPU a spinning thread burns the core its descheduled partner needs, and each
# parallel region then waits for a time slice (docs/performance.md, "Threads and contention").
# libgomp reads this when torch loads it, so it is set before any torch import of the package;
# a value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
