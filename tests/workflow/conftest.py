"""Fixtures shared by the workflow tests."""

from __future__ import annotations

import shutil

import pytest

from tests.workflow.test_workflow import snakemake


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The tiny workflow run to completion once per session; tests work on copies of it."""
    workdir = tmp_path_factory.mktemp("run")
    snakemake(workdir, "--cores", "2")
    yield workdir
    shutil.rmtree(workdir, ignore_errors=True)
