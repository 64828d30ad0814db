"""Shared fixtures: small state dicts written in the real formats (safetensors, Zarr)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.store import DIGEST_CACHE_ENV, write_safetensors


@pytest.fixture(autouse=True, scope="session")
def _digest_cache_in_tmp(tmp_path_factory):
    """The input-digest cache of every stage the tests run (in-process and in subprocesses)
    goes to the session's temporary folder, not the user's ~/.cache."""
    import os

    saved = os.environ.get(DIGEST_CACHE_ENV)
    os.environ[DIGEST_CACHE_ENV] = str(tmp_path_factory.mktemp("digest-cache") / "digests.json")
    yield
    if saved is None:
        os.environ.pop(DIGEST_CACHE_ENV, None)
    else:
        os.environ[DIGEST_CACHE_ENV] = saved


#: Test files that share a session-scoped fixture (`finished_run`: the tiny workflow run to
#: completion). `make test` runs the suite on pytest-xdist workers, each taking whole files;
#: the files of one fixture go to the same worker, so it is computed once.
SHARED_FIXTURE_FILES = {
    "tests/workflow/test_workflow.py": "finished_run",
    "tests/workflow/test_reruns.py": "finished_run",
    "tests/workflow/test_readme_commands.py": "finished_run",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile` (`make test`): one unit of work per test file, as pytest-xdist's own
    (each file's module-scoped fixtures run once), except that the files of
    `SHARED_FIXTURE_FILES` are one unit per fixture."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureFiles(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SHARED_FIXTURE_FILES.get(scope, scope)

    return SharedFixtureFiles(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a pytest-xdist worker, the order the units of work are handed out (with
    `--no-loadscope-reorder`, as `make test` runs): the shared fixtures' files, then the
    other files with tests marked slow, then the other workflow tests (each runs Snakemake),
    then the rest, so the workers start on the long end-to-end runs and end on short tests.
    Collection order within each; a run without pytest-xdist keeps the collection order."""
    if not hasattr(config, "workerinput"):
        return

    def path(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    slow = {path(item) for item in items if item.get_closest_marker("slow") is not None}

    def rank(item: pytest.Item) -> int:
        p = path(item)
        if p in SHARED_FIXTURE_FILES:
            return 0
        if p in slow:
            return 1
        return 2 if p.startswith(("tests/workflow/", "tests/slurm/")) else 3

    items.sort(key=rank)  # stable


# A toy encoder with every kind of tensor the matrix-layer rule distinguishes.
TOY_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (8, 3, 2, 2),  # 4-D: vector tensor
    "class_embedding": (8,),
    "positional_embedding": (10, 8),  # 2-D: matrix layer
    "transformer.resblocks.0.attn.in_proj_weight": (24, 8),
    "transformer.resblocks.0.attn.in_proj_bias": (24,),
    "transformer.resblocks.0.mlp.c_fc.weight": (32, 8),
    "transformer.resblocks.0.mlp.c_proj.weight": (8, 32),
    "ln_post.weight": (8,),
    "proj": (8, 6),
}


def low_rank_delta(
    shape: tuple[int, ...], rank: int, scale: float, g: torch.Generator
) -> torch.Tensor:
    if len(shape) != 2:
        return scale * torch.randn(shape, generator=g)
    a = torch.randn(shape[0], rank, generator=g)
    b = torch.randn(rank, shape[1], generator=g)
    return scale * (a @ b) / rank**0.5


def write_toy_checkpoints(
    root: Path,
    num_tasks: int,
    *,
    seed: int = 0,
    rank: int = 1,
    identical: bool = False,
    fisher: str = "random",  # "random", "identical", "none"
    shapes: dict[str, tuple[int, ...]] = TOY_SHAPES,
    with_int_buffer: bool = True,
) -> dict[str, object]:
    """θ0, T fine-tuned checkpoints (θ0 + low-rank deltas) and T Fisher files, as safetensors."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    if with_int_buffer:
        base["num_batches_tracked"] = torch.tensor([7], dtype=torch.int64)
    write_safetensors(root / "pretrained.safetensors", base)
    shared = {n: low_rank_delta(s, rank, 0.1, g) for n, s in shapes.items()}
    shared_fisher = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    paths: dict[str, object] = {
        "pretrained": root / "pretrained.safetensors",
        "finetuned": [],
        "fisher": [],
    }
    for t in range(num_tasks):
        ft = dict(base)
        for n, s in shapes.items():
            ft[n] = base[n] + (shared[n] if identical else low_rank_delta(s, rank, 0.1, g))
        path = root / f"task{t}.safetensors"
        write_safetensors(path, ft)
        paths["finetuned"].append(path)
        if fisher != "none":
            fis = (
                shared_fisher
                if fisher == "identical"
                else {n: torch.rand(s, generator=g) ** 3 for n, s in shapes.items()}
            )
            fpath = root / f"fisher{t}.safetensors"
            write_safetensors(fpath, fis)
            paths["fisher"].append(fpath)
    return paths


@pytest.fixture
def toy(tmp_path: Path):
    """Factory: toy(num_tasks, **kwargs) -> paths of θ0, θ_t and Fisher files."""

    def make(num_tasks: int = 3, **kwargs):
        make.calls += 1
        return write_toy_checkpoints(tmp_path / f"toy{make.calls}", num_tasks, **kwargs)

    make.calls = 0
    return make
