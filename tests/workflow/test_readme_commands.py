"""README.md's commands as a new user pastes them: every shell line of its code blocks, in a
fresh shell (no activated environment, a bare PATH) in a folder laid out like a clone after
`make demo`, with the tiny run's results standing in for the demo's. Lines that cannot run in
the suite (network, a cluster, a browser, the suite itself) are listed in NOT_IN_THE_SUITE
with the reason, and are still checked for a program that a fresh shell finds."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.workflow.test_workflow import REPO, TINY

README = REPO / "README.md"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}

# (pattern found in the line, why the suite does not run it)
NOT_IN_THE_SUITE = [
    (
        "make demo",
        "the demo end to end: tens of minutes on 2 cores; its snakemake lines run on the tiny run here",
    ),
    ("make test", "runs this test suite"),
    ("make venv", "creates the environment (network, torch's 6 GB of wheels)"),
    ("xdg-open", "opens a browser (the report it opens is checked instead)"),
    ("config/vit-b-32.yaml", "needs the task-vectors release's checkpoints and datasets (network)"),
    ("--workflow-profile workflow/profiles/slurm", "needs a Slurm cluster (tests/slurm runs one)"),
    (" ... ", "a fragment: `...` stands for the options of the example above it"),
]

# Lines that fail as written in a fresh shell, with the fix the README needs. The test below
# fails when this list and the README disagree: empty it when the README is fixed.
KNOWN_BROKEN: dict[str, str] = {}


def shell_lines(text: str) -> list[str]:
    """Every command of the README's shell code blocks: continuation lines joined, comment-only
    and empty lines left out, trailing comments kept (the shell ignores them)."""
    lines: list[str] = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang not in SHELL_LANGUAGES:
            continue
        for command in re.sub(r"\\\n\s*", "", body).splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                lines.append(command.strip())
    return lines


def _without_comment(line: str) -> str:
    return " ".join(shlex.split(line, comments=True))


def why_not_run(line: str) -> str | None:
    for pattern, why in NOT_IN_THE_SUITE:
        if pattern in line:
            return why
    return None


def test_shell_lines_are_found_and_joined():
    text = "```bash\na --x 1 \\\n    --y 2   # two lines\n# only a comment\n\nb\n```\n```yaml\nc: 1\n```\n"
    assert shell_lines(text) == ["a --x 1 --y 2   # two lines", "b"]
    assert _without_comment("a --x 1   # two lines") == "a --x 1"


def test_readme_has_shell_lines_and_every_excluded_line_has_a_reason():
    lines = shell_lines(README.read_text())
    assert any(".venv/bin/snakemake" in line for line in lines)
    assert [line for line in lines if why_not_run(line) is None], "no README line runs in the suite"


def test_readme_links_name_files_in_the_repository():
    text = README.read_text()
    targets = [
        t
        for t in re.findall(r"\]\(([^)\s]+)\)", text)
        if not re.match(r"[a-z]+:", t) and not t.startswith("#")
    ]
    missing = sorted({t for t in targets if not (REPO / t.split("#")[0]).exists()})
    assert missing == [], f"README.md links to files that are not in the repository: {missing}"


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def _fresh_env() -> dict[str, str]:
    """A new login's environment: no virtual environment, PATH without it. PYTHONPATH points at
    this checkout, as the editable install of a clone does."""
    env = {
        "HOME": os.environ.get("HOME", "/tmp"),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO),
    }
    for key in ("PIPELINE_DIGEST_CACHE", "TMPDIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


@pytest.fixture(scope="module")
def clone(finished_run, tmp_path_factory):
    """A folder laid out like a clone after `make demo`: the workflow, .venv (this interpreter's
    environment), config/config.yaml the tiny grid under the demo's name, results/demo the
    finished tiny run, and the example files the README's merge command names."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copy(REPO / "Snakefile", root / "Snakefile")
    for name in ("workflow", "benchmarks"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / "config").mkdir()
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    (root / "config" / "config.yaml").write_text(
        yaml.safe_dump(_deep_merge(demo, {**yaml.safe_load(TINY.read_text()), "name": "demo"}))
    )
    (root / "my-run.yaml").write_text("name: demo\n")
    shutil.copytree(finished_run / "results" / "tiny", root / "results" / "demo", symlinks=True)
    run = root / "results" / "demo"
    examples = {"zeroshot": "pretrained", "cars": "shapes", "dtd": "colour", "eurosat": "position"}
    for name, source in examples.items():
        (root / f"{name}.safetensors").symlink_to(run / "checkpoints" / f"{source}.safetensors")
    (root / "fisher").mkdir()
    for name, task in list(examples.items())[1:]:
        (root / "fisher" / f"{name}.zarr").symlink_to(
            run / "fisher" / "per_sample" / task / "f1.0.zarr"
        )
    return root


def _bash(root: Path, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", command],
        cwd=root,
        env=_fresh_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_every_readme_command_runs_in_a_fresh_shell(clone):
    lines = shell_lines(README.read_text())
    ran = []
    for line in lines:
        if why_not_run(line) is not None:
            continue
        res = _bash(clone, line)
        assert res.returncode == 0, (
            f"README line fails in a fresh shell: {line}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        )
        if "snakemake" in line and "--report" not in line:
            # The tiny run stands in for the demo: nothing is left to do, and nothing runs.
            assert "Nothing to be done" in res.stdout + res.stderr, f"{line}\n{res.stderr[-3000:]}"
        ran.append(line)
    assert (
        any("--report" in line for line in ran)
        and (clone / "results" / "demo" / "report.html").is_file()
    )
    assert (
        any("pipeline merge epimer" in line for line in ran) and (clone / "report.json").is_file()
    )


@pytest.mark.slow
def test_every_readme_command_names_a_program_a_fresh_shell_finds(clone):
    broken = {}
    for line in shell_lines(README.read_text()):
        program = shlex.split(line, comments=True)[0]
        if program in ("make", "xdg-open"):
            continue  # system programs; make is the README's first requirement
        if _bash(clone, f"command -v {shlex.quote(program)}").returncode != 0:
            broken[_without_comment(line)] = program
    assert set(broken) == set(KNOWN_BROKEN), (
        "README lines whose program a fresh shell does not find (update KNOWN_BROKEN when the README "
        f"changes): {broken}"
    )
