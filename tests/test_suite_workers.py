"""How `make test` spreads the suite over pytest-xdist workers (tests/conftest.py): whole
files per worker, the files that share the tiny workflow run on one worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SHARED_FIXTURE_FILES, pytest_xdist_make_scheduler

REPO = Path(__file__).resolve().parents[1]


def test_every_file_that_uses_the_finished_run_is_listed():
    uses = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "tests").rglob("test_*.py")
        if p != Path(__file__).resolve() and "finished_run" in p.read_text(encoding="utf-8")
    }
    listed = {f for f, fixture in SHARED_FIXTURE_FILES.items() if fixture == "finished_run"}
    assert uses == listed


class _Config:
    def __init__(self, dist: str) -> None:
        self.values = {"dist": dist, "tx": ["2*popen"]}

    def getvalue(self, name: str):
        return self.values[name]


def test_loadfile_units_are_files_and_the_shared_fixtures_files_are_one():
    pytest.importorskip("xdist")
    sched = pytest_xdist_make_scheduler(_Config("loadfile"), None)
    unit = sched._split_scope
    assert unit("tests/test_lapack.py::test_a[C-float32]") == "tests/test_lapack.py"
    assert unit("tests/test_lapack.py::test_b") == "tests/test_lapack.py"
    shared = {unit(f"{f}::test_x") for f in SHARED_FIXTURE_FILES}
    assert shared == {"finished_run"}
    assert unit("tests/workflow/test_smoke.py::test_x") == "tests/workflow/test_smoke.py"


def test_other_distribution_modes_keep_pytest_xdists_scheduler():
    assert pytest_xdist_make_scheduler(_Config("load"), None) is None
