"""EpiMer: curvature-aware model merging in a low-rank tagged subspace, and its baselines."""

import os

# OpenMP threads that wait at a barrier sleep instead of spinning. On a shared or
# oversubscribed CPU a spinning thread burns the core its descheduled partner needs, and each
# parallel region then waits for a time slice (docs/performance.md, "Threads and contention").
# libgomp reads this when torch loads it, so it is set before any torch import of the package;
# a value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

#: The version of what an artifact contains: recorded in every artifact's provenance and in the
#: workflow's params, so that bumping it re-runs every stage. The CLI and the workflow read it
#: from here.
ARTIFACT_VERSION = 3


def load_plugins(names: "str | list[str] | tuple[str, ...] | None") -> list[str]:
    """Import plugin modules by name (a list, or one comma-separated string such as the
    EPIMER_PLUGINS environment variable); a plugin registers its merge methods as rows of
    `pipeline.methods.METHODS` when imported (docs/adding-a-method.md). Returns the names
    imported; raises ImportError naming a module that cannot be imported."""
    import importlib

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    imported = []
    for name in names or ():
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(
                f"plugin `{name}` cannot be imported ({err}); put the folder that holds it on "
                "PYTHONPATH, or correct its name in config `plugins` / EPIMER_PLUGINS"
            ) from err
        imported.append(name)
    return imported
