"""Parsing the workflow does not import torch.

Every Snakemake process parses the Snakefile: each dry run, each run, and on a cluster each job
(the Slurm executor starts Snakemake again for every job it submits). Importing torch there
would cost every one of them about a second and a half. Here torch cannot be imported at all
(`sys.modules["torch"] = None` makes `import torch` raise), and Snakemake must still plan the
configs' jobs, so a parse-time import of torch anywhere in the rules fails the test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.workflow.test_workflow import REPO, TINY

# Runs Snakemake in a process where torch cannot be imported.
WITHOUT_TORCH = """
import runpy, sys
sys.modules["torch"] = None
sys.argv = ["snakemake", *sys.argv[1:]]
runpy.run_module("snakemake", run_name="__main__")
"""


def dry_run_without_torch(workdir: Path, config: dict | None) -> subprocess.CompletedProcess:
    args = ["--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "-n"]
    if config is not None:
        (workdir / "run.yaml").write_text(yaml.safe_dump(config))
        args += ["--configfile", str(workdir / "run.yaml")]
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *args, "--cores", "2"],
        capture_output=True,
        text=True,
    )


def _paper_config(root: Path) -> dict:
    """config/vit-b-32.yaml on placeholder release files and a tiny data tree (as
    tests/workflow/test_paper_configs.py plans it)."""
    from tests.data.layouts import write_task_vectors_tree
    from tests.workflow.test_paper_configs import release_files

    config = yaml.safe_load((REPO / "config" / "vit-b-32.yaml").read_text())
    release_files(root, config["backbone"])
    write_task_vectors_tree(root / "data")
    config["data"]["root"] = str(root / "data")
    return config


def _tiny_with_noise_study() -> dict:
    config = yaml.safe_load(TINY.read_text())
    config["study"] = {"noise": {"enabled": True, "cells": [{"lr": 1e-3}]}}
    return config


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(None, id="demo"),  # the shipped θ0 (train.smk reads its record)
        pytest.param(yaml.safe_load(TINY.read_text()), id="tiny"),  # θ0 pretrained here
        pytest.param(_tiny_with_noise_study(), id="noise-study"),  # noise.smk
        pytest.param(_paper_config, id="vit-b-32"),  # the release's checkpoints imported
    ],
)
def test_the_workflow_plans_its_jobs_without_torch(tmp_path, config):
    if callable(config):
        config = config(tmp_path)
    res = dry_run_without_torch(tmp_path, config)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "Job stats:" in out and "merge_epimer" in out


def test_the_check_fails_when_a_rule_imports_torch(tmp_path):
    """The harness itself: a Snakefile that imports torch at parse time is refused."""
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text("import torch\n\nrule all:\n    shell: 'true'\n")
    res = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, "--snakefile", str(snakefile), "-n", "--cores", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode != 0
    assert "torch" in res.stdout + res.stderr
