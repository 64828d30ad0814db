"""Per-method α grids and the TIES settings, through Snakemake dry-runs.

`merge.alpha` is a list (every method that takes α sweeps it) or a mapping from method to its
own list; the paper configs run Task Arithmetic and TIES at the paper's λ_t = 0.125 beside their
sweeps and TSV-M/EpiMer on the paper's grid. Each merge job's command carries only its own
method's settings, so a TIES setting never re-runs Task Arithmetic.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from tests.data.layouts import write_task_vectors_tree
from tests.workflow.test_paper_configs import release_files
from tests.workflow.test_workflow import REPO, TINY, snakemake

PAPER_ALPHAS = [0.2, 0.3, 0.4, 0.5, 0.7, 1.0]  # appendix D.2, Tables 7-9
PAPER_KS = [4, 16, 32]


def _paper_config(tmp_path: Path, name: str) -> dict:
    """The paper config, with placeholder checkpoints and heads where its patterns point and a
    small generated data tree in the release's layout (a dry-run reads neither's contents)."""
    config = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    release_files(tmp_path, config["backbone"])
    data = tmp_path / "data"
    write_task_vectors_tree(data)
    config["data"]["root"] = str(data)
    return config


def _planned(
    tmp_path: Path, config: dict
) -> tuple[dict[str, set[str]], dict[str, set[str]], list[str]]:
    """(method → settings of the planned merges, method → settings of the planned evaluations,
    the shell commands of the planned merges) of a dry-run."""
    res = snakemake(tmp_path, "-n", "-p", "--cores", "1", config=config)
    out = res.stdout + res.stderr
    merged, evaluated = defaultdict(set), defaultdict(set)
    outputs = " ".join(line for line in out.splitlines() if line.strip().startswith("output: "))
    for method, setting in re.findall(
        r"/merged/(\w+)/([^/\s,]+)\.zarr", outputs
    ):  # a sweep job: one per α
        merged[method].add(setting)
    for method, setting in re.findall(r"/eval/(\w+)/([^/\s,]+)\.csv", outputs):
        evaluated[method].add(setting)
    commands = [line for line in out.splitlines() if "python -m pipeline merge " in line]
    return dict(merged), dict(evaluated), commands


def _a(values) -> set[str]:
    return {f"a{float(a)}" for a in values}


@pytest.mark.parametrize("name", ["vit-b-32", "vit-b-16", "vit-l-14"])
def test_paper_config_runs_ta_and_ties_at_0125_beside_their_sweeps(tmp_path, name):
    config = _paper_config(tmp_path, name)
    merged, evaluated, commands = _planned(tmp_path, config)
    fractions = [float(f) for f in config["fisher"]["fractions"]]
    assert merged["ta"] == merged["ties"] == _a([0.125, *PAPER_ALPHAS])
    # TSV-M and EpiMer on the paper's grid: no 0.125 added to them.
    assert merged["tsvm"] == {f"k{k}_a{float(a)}" for k in PAPER_KS for a in PAPER_ALPHAS}
    assert merged["epimer"] == {
        f"k{k}_a{float(a)}_f{f}" for k in PAPER_KS for a in PAPER_ALPHAS for f in fractions
    }
    assert merged["fisher"] == {f"f{f}" for f in fractions}
    assert {m: v for m, v in evaluated.items() if m in merged} == merged  # every merge is evaluated
    # TIES as appendix C.3 states it; Task Arithmetic's commands carry no TIES setting. Each
    # method's α sweep is one command.
    ties = [c for c in commands if " merge ties " in c]
    ta = [c for c in commands if " merge ta " in c]
    assert len(ties) == len(ta) == 1
    assert all(
        f"--alpha {' '.join(str(float(a)) for a in [0.125, *PAPER_ALPHAS])} " in c
        for c in ta + ties
    )
    assert all("--ties-density 20.0 --ties-sign frequency --ties-disjoint mean" in c for c in ties)
    assert not any("--ties" in c for c in ta)


def test_a_plain_alpha_list_is_every_alpha_methods_grid(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    config["merge"]["alpha"] = [0.25, 1.0]
    merged, _, _ = _planned(tmp_path, config)
    ks, fractions = config["merge"]["k"], [float(f) for f in config["fisher"]["fractions"]]
    assert merged["ta"] == merged["ties"] == {"a0.25", "a1.0"}
    assert merged["tsvm"] == {f"k{k}_a{a}" for k in ks for a in (0.25, 1.0)}
    assert merged["epimer"] == {
        f"k{k}_a{a}_f{f}" for k in ks for a in (0.25, 1.0) for f in fractions
    }
    assert merged["fisher"] == {f"f{f}" for f in fractions}  # fisher takes no α


def test_an_alpha_mapping_gives_each_method_its_own_list(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    config["merge"]["alpha"] = {"ta": [0.125], "ties": [0.125, 1], "tsvm": [0.5], "epimer": [1.0]}
    merged, _, _ = _planned(tmp_path, config)
    ks = config["merge"]["k"]
    assert merged["ta"] == {"a0.125"} and merged["ties"] == {
        "a0.125",
        "a1.0",
    }  # 1 and 1.0: one spelling
    assert merged["tsvm"] == {f"k{k}_a0.5" for k in ks}
    assert {s.split("_")[1] for s in merged["epimer"]} == {"a1.0"}


def test_an_alpha_mapping_with_an_unknown_method_is_rejected(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    config["merge"]["alpha"] = {
        "ta": [0.125],
        "ties": [0.125],
        "tsvn": [1.0],
        "tsvm": [1.0],
        "epimer": [1.0],
    }
    res = snakemake(tmp_path, "-n", "--cores", "1", config=config, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "config merge.alpha: 'tsvn' is not a merge method that takes α" in out
    assert "ta, ties, tsvm, epimer" in out  # the keys it accepts
    # fisher is a method, but takes no α: the same message.
    config["merge"]["alpha"] = {
        "ta": [0.125],
        "ties": [0.125],
        "fisher": [1.0],
        "tsvm": [1.0],
        "epimer": [1.0],
    }
    res = snakemake(tmp_path, "-n", "--cores", "1", config=config, check=False)
    assert (
        res.returncode != 0
        and "'fisher' is not a merge method that takes α" in res.stdout + res.stderr
    )
    assert not (tmp_path / "results").exists()


def test_an_alpha_mapping_missing_a_configured_method_is_rejected(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    config["merge"]["alpha"] = {"ta": [0.125], "ties": [0.125], "tsvm": [1.0]}
    res = snakemake(tmp_path, "-n", "--cores", "1", config=config, check=False)
    assert res.returncode != 0
    assert (
        "config merge.alpha gives no α list for epimer (in merge.methods)"
        in res.stdout + res.stderr
    )
    # Without epimer in merge.methods the same mapping is complete.
    config["merge"]["methods"] = ["ta", "ties", "tsvm"]
    merged, _, _ = _planned(tmp_path, config)
    assert set(merged) == {"ta", "ties", "tsvm"}


def test_ties_settings_reach_only_the_ties_merges(tmp_path):
    """A merge re-runs when its params change; the params are what its command line shows. The
    TIES settings change the TIES commands and leave Task Arithmetic's untouched."""
    config = yaml.safe_load(TINY.read_text())
    config["merge"]["methods"] = ["ta", "ties"]
    _, _, base = _planned(tmp_path, config)
    changed = dict(
        config,
        merge=dict(config["merge"], ties_sign="frequency", ties_disjoint="sum", ties_density=30),
    )
    _, _, other = _planned(tmp_path, changed)
    ta = lambda cmds: sorted(c for c in cmds if " merge ta " in c)  # noqa: E731
    ties = lambda cmds: sorted(c for c in cmds if " merge ties " in c)  # noqa: E731
    assert ta(base) and ta(base) == ta(other)
    assert all("--ties-density 20.0 --ties-sign mass --ties-disjoint mean" in c for c in ties(base))
    assert all(
        "--ties-density 30.0 --ties-sign frequency --ties-disjoint sum" in c for c in ties(other)
    )
    # 20 and 20.0 are one spelling: the same params, nothing re-runs.
    _, _, same = _planned(tmp_path, dict(config, merge=dict(config["merge"], ties_density=20.0)))
    assert sorted(same) == sorted(base)


def test_an_unknown_ties_sign_fails_validation(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    config["merge"]["ties_sign"] = "count"
    res = snakemake(tmp_path, "-n", "--cores", "1", config=config, check=False)
    assert (
        res.returncode != 0
        and "'count' is not one of ['mass', 'frequency']" in res.stdout + res.stderr
    )


def test_setting_names_are_the_registrys_setting_name_over_the_grid():
    """The workflow's names (`setting_names`) and the package's (`setting_name`) are one rule."""
    from itertools import product

    from pipeline.methods import METHODS, setting_name, setting_names

    ks, alphas, fractions = [4, 32], [0.125, 1.0], [0.05, 1.0]
    for method, m in METHODS.items():
        want = [
            setting_name(method, k=k, alpha=a, fraction=f)
            for k, a, f in product(
                *(
                    v if key in m.uses else [None]
                    for key, v in (("k", ks), ("alpha", alphas), ("fraction", fractions))
                )
            )
        ]
        assert setting_names(method, alphas=alphas, ks=ks, fractions=fractions) == want
    assert setting_names("epimer", alphas=["1.0"], ks=[32], fractions=["0.05"]) == [
        "k32_a1.0_f0.05"
    ]
