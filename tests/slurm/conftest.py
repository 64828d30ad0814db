"""The test Slurm cluster, once per session: installed from Debian's packages when missing and
this process may (root with apt-get), started under a temporary folder, stopped at the end.

They change the system (Debian packages, daemons), so they run only when asked:
EPIMER_SLURM_TESTS=1 (set by .ci/run). Asked for where the cluster cannot be brought up (not
root, no apt-get), they are skipped with the reason; where it can, any failure to install or
start it fails them."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def load_module(path: Path, name: str):
    """Import a file that is not in a package (tests are collected with --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


cluster = load_module(HERE / "cluster.py", "epimer_test_slurm_cluster")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-node cluster; SLURM_CONF (and PATH, see cluster.write_srun_wrapper)
    point at it for the whole session."""
    if os.environ.get("EPIMER_SLURM_TESTS") != "1":
        pytest.skip("the Slurm tests install and start a cluster; EPIMER_SLURM_TESTS=1 runs them")
    missing = cluster.missing_commands()
    if missing and not cluster.can_install():
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing) and installing it needs root and apt-get"
        )
    if os.geteuid() != 0:
        pytest.skip("the test cluster's slurmd must run as root")
    state = tmp_path_factory.mktemp("slurm")
    if missing:
        cluster.install(state / "log" / "apt.log")
    running = cluster.start(state)
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(running.conf))
    patch.setenv("PATH", running.env["PATH"])
    try:
        yield running
    finally:
        patch.undo()
        cluster.stop(state)
