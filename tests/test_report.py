"""summary.csv with validation accuracies, the α chosen on validation through the real
evaluate → report path (test labels cannot move it), the tables/plots commands and the
one-line-per-stage help."""

from __future__ import annotations

import csv

import pytest
import torch

from pipeline import cli
from pipeline.report import format_summary, read_eval, summary_rows, write_summary
from pipeline.store import write_safetensors
from pipeline.tables import alpha_groups, best_on_test, choose_on_validation, read_summary

TASKS = ["shapes", "colour"]
ALPHAS = ["0.3", "0.6", "1.0"]
DATA = '{"source": "synthetic", "train_size": 300, "test_size": 60}'


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny encoder gains nothing from a second thread, which spin-waits on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["task", "split", "accuracy", "n"])
        writer.writeheader()
        writer.writerows(rows)


def test_read_eval_filters_the_split(tmp_path):
    path = tmp_path / "e.csv"
    _write_csv(
        path,
        [
            {"task": "a", "split": "test", "accuracy": 0.5, "n": 10},
            {"task": "a", "split": "val", "accuracy": 0.25, "n": 4},
        ],
    )
    assert read_eval(path) == {"a": 0.5} and read_eval(path, "val") == {"a": 0.25}
    old = tmp_path / "old.csv"  # written before the split column existed: test accuracies
    old.write_text("task,accuracy,n\na,0.75,10\n")
    assert read_eval(old) == {"a": 0.75} and read_eval(old, "val") == {}


def test_summary_has_validation_average_and_worst(tmp_path):
    _write_csv(
        tmp_path / "eval" / "ta" / "a0.5.csv",
        [
            {"task": "a", "split": "test", "accuracy": 0.5, "n": 10},
            {"task": "b", "split": "test", "accuracy": 0.7, "n": 10},
            {"task": "a", "split": "val", "accuracy": 0.2, "n": 4},
            {"task": "b", "split": "val", "accuracy": 0.6, "n": 4},
        ],
    )
    for t, (test, val) in {"a": (0.9, 0.8), "b": (0.95, 0.85)}.items():
        _write_csv(
            tmp_path / "eval" / "finetuned" / f"{t}.csv",
            [
                {"task": t, "split": "test", "accuracy": test, "n": 10},
                {"task": "b" if t == "a" else "a", "split": "test", "accuracy": 0.1, "n": 10},
                {"task": t, "split": "val", "accuracy": val, "n": 4},
            ],
        )
    _write_csv(
        tmp_path / "eval" / "ties" / "a0.5.csv",
        [  # no validation rows
            {"task": "a", "split": "test", "accuracy": 0.5, "n": 10},
            {"task": "b", "split": "test", "accuracy": 0.7, "n": 10},
        ],
    )
    rows = {
        r["method"]: r
        for r in summary_rows(tmp_path, ["a", "b"], ["ta/a0.5", "finetuned/own", "ties/a0.5"])
    }
    assert rows["ta"]["average"] == pytest.approx(0.6) and rows["ta"][
        "val_average"
    ] == pytest.approx(0.4)
    assert rows["ta"]["val_worst"] == pytest.approx(0.2)
    assert rows["finetuned"]["average"] == pytest.approx(0.925) and rows["finetuned"][
        "val_average"
    ] == pytest.approx(0.825)
    assert rows["ties"]["val_average"] == "" and rows["ties"]["val_worst"] == ""


def _checkpoints(tmp_path):
    """θ0 + α·δ of the tiny demo encoder for each α, and a random head per task."""
    from pipeline.data import num_classes
    from pipeline.models.backbone import build_visual

    g = torch.Generator().manual_seed(0)
    theta0 = build_visual().state_dict()
    delta = {n: 0.3 * torch.randn(v.shape, generator=g) for n, v in theta0.items()}
    paths = {}
    for a in ALPHAS:
        paths[a] = tmp_path / "ckpt" / f"a{a}.safetensors"
        write_safetensors(paths[a], {n: v + float(a) * delta[n] for n, v in theta0.items()})
    heads = []
    for t in TASKS:
        c = num_classes({"source": "synthetic"}, t)
        heads.append(tmp_path / "heads" / f"{t}.safetensors")
        write_safetensors(
            heads[-1], {"weight": 20 * torch.randn(c, 64, generator=g), "bias": torch.zeros(c)}
        )
    return paths, heads


def _evaluate_grid(root, paths, heads):
    for a, path in paths.items():
        rc = cli.main(
            [
                "evaluate",
                "--checkpoint",
                str(path),
                "--tasks",
                *TASKS,
                "--heads",
                *map(str, heads),
                "--data",
                DATA,
                "--splits",
                "test",
                "val",
                "--threads",
                "1",
                "--quiet",
                "--out",
                str(root / "eval" / "ta" / f"a{a}.csv"),
            ]
        )
        assert rc == 0
    write_summary(root, TASKS, [f"ta/a{a}" for a in ALPHAS], root / "summary.csv")
    _, runs = read_summary(root / "summary.csv")
    return runs


def test_summary_and_evaluation_csvs_end_lines_with_lf(tmp_path):
    """summary.csv and the evaluation CSVs use LF line endings (csv's default is CRLF)."""
    _write_csv(
        tmp_path / "eval" / "ta" / "a0.5.csv",
        [
            {"task": "a", "split": "test", "accuracy": 0.5, "n": 10},
        ],
    )
    out = tmp_path / "summary.csv"
    write_summary(tmp_path, ["a"], ["ta/a0.5"], out)
    raw = out.read_bytes()
    assert b"\r" not in raw and raw.count(b"\n") == 2


def test_changing_test_labels_does_not_change_the_alpha_chosen_on_validation(tmp_path, monkeypatch):
    """The real path: `evaluate --splits test val` → summary.csv → α chosen on validation.
    Scrambling every test label changes the test accuracies but not the choice."""
    from pipeline.data import synthetic

    paths, heads = _checkpoints(tmp_path)
    runs = _evaluate_grid(tmp_path / "a", paths, heads)
    with open(tmp_path / "a" / "eval" / "ta" / "a0.3.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["task"], r["split"], r["n"]) for r in rows] == [
        ("shapes", "test", "60"),
        ("colour", "test", "60"),
        ("shapes", "val", "30"),
        ("colour", "val", "30"),
    ]

    make_split = synthetic.make_split

    def scrambled(task, split, n, *args, **kwargs):
        images, labels = make_split(task, split, n, *args, **kwargs)
        if split == "test":  # a seeded relabelling of the test split only
            g = torch.Generator().manual_seed(123)
            labels = torch.randint(0, synthetic.num_classes(task), labels.shape, generator=g)
        return images, labels

    monkeypatch.setattr(synthetic, "make_split", scrambled)
    scrambled_runs = _evaluate_grid(tmp_path / "b", paths, heads)

    (group,) = alpha_groups(runs).values()
    (group_b,) = alpha_groups(scrambled_runs).values()
    assert len({r.val_average for r in group}) > 1  # the choice is not a tie
    assert [r.val_average for r in group] == [r.val_average for r in group_b]
    assert [r.average for r in group] != [r.average for r in group_b]
    chosen, chosen_b = choose_on_validation(group), choose_on_validation(group_b)
    assert chosen.alpha == chosen_b.alpha
    assert chosen.val_average == max(r.val_average for r in group)
    assert best_on_test(group).average == max(r.average for r in group)


def test_tables_and_plots_commands(tmp_path):
    for a, (acc, val) in {"0.3": (0.5, 0.6), "1.0": (0.7, 0.4)}.items():
        _write_csv(
            tmp_path / "eval" / "ta" / f"a{a}.csv",
            [
                {"task": t, "split": s, "accuracy": v, "n": 10}
                for t in TASKS
                for s, v in (("test", acc), ("val", val))
            ],
        )
    write_summary(tmp_path, TASKS, ["ta/a0.3", "ta/a1.0"], tmp_path / "summary.csv")
    assert (
        cli.main(
            [
                "tables",
                "--summary",
                str(tmp_path / "summary.csv"),
                "--out-dir",
                str(tmp_path / "tables"),
                "-q",
            ]
        )
        == 0
    )
    with open(tmp_path / "tables" / "alpha_selection.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (float(row["α (val.)"]), float(row["α (best on test)"])) == (0.3, 1.0)
    assert float(row["Gap (test)"]) == pytest.approx(0.2)
    text = format_summary(tmp_path / "summary.csv")  # what `make demo` prints last
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("Task Arithmetic"))
    assert "α=0.3 (50.0)" in line and "best on test: α=1 (70.0)" in line
    rc = cli.main(
        [
            "plots",
            "--summary",
            str(tmp_path / "summary.csv"),
            "--out-dir",
            str(tmp_path / "plots"),
            "--formats",
            "png",
            "--dpi",
            "40",
            "-q",
        ]
    )
    assert rc == 0 and (tmp_path / "plots" / "alpha_sweep.png").stat().st_size > 1000
    assert (
        cli.main(
            [
                "tables",
                "--summary",
                str(tmp_path / "nope.csv"),
                "--out-dir",
                str(tmp_path / "t2"),
                "-q",
            ]
        )
        == 2
    )


def test_help_lists_every_stage_on_one_line():
    parser = cli.build_parser()
    text = parser.format_help()
    sub = next(
        a for a in parser._actions if a.choices and isinstance(a.choices, dict)
    )  # the STAGE action
    stages = {c.dest: c.help for c in sub._choices_actions}
    assert {"evaluate", "report", "tables", "plots", "landscape", "merge"} <= set(stages)
    lines = text.splitlines()
    for name, description in stages.items():
        assert description, f"stage `{name}` has no description"
        assert any(
            line.split() and line.split()[0] == name and description in line for line in lines
        ), name


def test_tables_command_takes_the_paper_settings(tmp_path):
    """--paper-k/--paper-fraction/--heads-source reach Table 2; a fraction outside (0, 1] is refused."""
    rows = {"tsvm/k2_a0.5": 0.6, "tsvm/k2_a1.0": 0.5, "tsvm/k4_a0.5": 0.9, "tsvm/k4_a1.0": 0.8}
    for run, acc in rows.items():
        _write_csv(
            tmp_path / "eval" / f"{run}.csv",
            [{"task": t, "split": "test", "accuracy": acc, "n": 10} for t in TASKS],
        )
    _write_csv(
        tmp_path / "eval" / "zeroshot" / "theta0.csv",
        [{"task": t, "split": "test", "accuracy": 0.2, "n": 10} for t in TASKS],
    )
    write_summary(tmp_path, TASKS, ["zeroshot/theta0", *rows], tmp_path / "summary.csv")
    out = tmp_path / "tables"
    assert (
        cli.main(
            [
                "tables",
                "--summary",
                str(tmp_path / "summary.csv"),
                "--out-dir",
                str(out),
                "--paper-k",
                "2",
                "--heads-source",
                "zeroshot",
                "-q",
            ]
        )
        == 0
    )
    with open(out / "table2.csv", newline="") as fh:
        table = {r["Method"]: r for r in csv.DictReader(fh)}
    assert table["TSV-M"]["Setting"] == "k2_a0.5" and float(
        table["TSV-M"]["Avg."]
    ) == pytest.approx(0.6)
    assert "θ0 + zero-shot heads" in table
    with open(out / "main.csv", newline="") as fh:  # all settings: the best over both k
        main = {r["Method"]: r for r in csv.DictReader(fh)}
    assert main["TSV-M"]["Setting (best on test)"] == "k4_a0.5"
    assert (
        cli.main(
            [
                "tables",
                "--summary",
                str(tmp_path / "summary.csv"),
                "--out-dir",
                str(out),
                "--paper-fraction",
                "1.5",
                "-q",
            ]
        )
        == 2
    )


# ----------------------------------------------------------------------- standard errors, paired


def _packed(bits) -> str:
    import base64

    import numpy as np

    return base64.b64encode(
        np.packbits(np.asarray(bits, dtype=bool), bitorder="big").tobytes()
    ).decode()


def test_average_se_is_the_binomial_se_of_the_mean():
    import numpy as np

    from pipeline.report import average_se

    p, n = np.array([0.9, 0.5, 0.72]), np.array([2000, 100, 1797])
    direct = np.sqrt(np.sum(p * (1 - p) / n)) / len(p)
    assert average_se(list(p), list(n)) == pytest.approx(float(direct), rel=1e-14)
    # One task: the textbook sqrt(p(1 − p)/n).
    assert average_se([0.5], [100]) == pytest.approx(0.05, rel=1e-14)
    with pytest.raises(ValueError, match="at least one image"):
        average_se([0.5], [0])


def test_decode_correct_reads_packbits_big_endian_base64():
    import numpy as np

    from pipeline.report import decode_correct
    from pipeline.store import ArtifactError

    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 1797):
        bits = rng.random(n) < 0.6
        np.testing.assert_array_equal(decode_correct(_packed(bits), n), bits)
    # Big-endian bit order: the first image is the byte's most significant bit.
    assert decode_correct("gA==", 3).tolist() == [True, False, False]
    with pytest.raises(ArtifactError, match="holds 2 bytes, expected 1 for n = 3"):
        decode_correct(_packed([1] * 9), 3, "e.csv")
    with pytest.raises(ArtifactError, match="not base64"):
        decode_correct("not base64!", 3, "e.csv")


def test_paired_difference_equals_a_direct_numpy_computation():
    import numpy as np

    from pipeline.report import paired_difference

    rng = np.random.default_rng(1)
    a = {t: rng.random(n) < p for t, n, p in (("x", 500, 0.8), ("y", 300, 0.6), ("z", 1000, 0.9))}
    b = {t: np.where(rng.random(v.size) < 0.1, ~v, v) for t, v in a.items()}  # disagree on ~10 %
    diff, se = paired_difference(a, b)
    d = {t: a[t].astype(np.float64) - b[t].astype(np.float64) for t in a}
    expected = np.mean([d[t].mean() for t in d])
    # Var of each task's mean difference, by the definition E[(d − d̄)²]/n, summed; /T.
    var = sum(np.mean((d[t] - d[t].mean()) ** 2) / d[t].size for t in d)
    assert diff == pytest.approx(float(expected), abs=1e-15)
    assert se == pytest.approx(float(np.sqrt(var) / 3), rel=1e-12)
    # The same difference in task averages as the accuracies give.
    acc = np.mean([a[t].mean() for t in a]) - np.mean([b[t].mean() for t in b])
    assert diff == pytest.approx(float(acc), abs=1e-15)
    with pytest.raises(ValueError, match="not the same test set"):
        paired_difference({"x": a["x"]}, {"x": a["x"][:-1]})


def _eval_with_correct(path, tasks_bits, val=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["task", "split", "accuracy", "n", "correct"])
        writer.writeheader()
        for task, bits in tasks_bits.items():
            writer.writerow(
                {
                    "task": task,
                    "split": "test",
                    "accuracy": f"{sum(bits) / len(bits):.6f}",
                    "n": len(bits),
                    "correct": _packed(bits),
                }
            )
            if val is not None:
                writer.writerow(
                    {"task": task, "split": "val", "accuracy": val, "n": 4, "correct": ""}
                )


def test_summary_has_se_and_paired_csv_compares_with_tsvm(tmp_path):
    import numpy as np

    from pipeline.report import paired_difference

    rng = np.random.default_rng(2)
    tasks = ["a", "b"]
    bits = {}
    for run, val in (
        ("tsvm/k2_a1.0", 0.5),
        ("tsvm/k2_a0.5", 0.4),
        ("epimer/k2_a1.0_f1.0", 0.6),
        ("ta/a0.5", 0.3),
    ):
        method, setting = run.split("/")
        bits[run] = {t: (rng.random(40 + 10 * i) < 0.7).tolist() for i, t in enumerate(tasks)}
        _eval_with_correct(tmp_path / "eval" / method / f"{setting}.csv", bits[run], val)
    runs = list(bits)
    write_summary(tmp_path, tasks, runs, tmp_path / "summary.csv")
    with open(tmp_path / "summary.csv", newline="") as fh:
        summary = {r["method"] + "/" + r["setting"]: r for r in csv.DictReader(fh)}
    for run, per_task in bits.items():
        p = np.array([np.mean(per_task[t]) for t in tasks])
        n = np.array([len(per_task[t]) for t in tasks])
        assert float(summary[run]["se"]) == pytest.approx(
            float(np.sqrt(np.sum(p * (1 - p) / n)) / 2), rel=1e-5
        )
    with open(tmp_path / "paired.csv", newline="") as fh:
        paired = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(paired) == {"ta", "epimer"}  # every merge method but TSV-M, at its chosen setting
    assert paired["epimer"]["versus"] == "tsvm" and paired["epimer"]["versus_setting"] == "k2_a1.0"
    as_arrays = {r: {t: np.array(v) for t, v in b.items()} for r, b in bits.items()}
    diff, se = paired_difference(as_arrays["epimer/k2_a1.0_f1.0"], as_arrays["tsvm/k2_a1.0"])
    assert float(paired["epimer"]["difference"]) == pytest.approx(diff, rel=1e-5)
    assert float(paired["epimer"]["se"]) == pytest.approx(se, rel=1e-5)
    assert paired["epimer"]["images"] == str(40 + 50) and paired["epimer"]["note"] == ""


def test_paired_csv_without_correct_column_says_so_and_never_fails(tmp_path):
    for run in ("tsvm/k2_a1.0", "epimer/k2_a1.0_f1.0"):
        method, setting = run.split("/")
        _write_csv(
            tmp_path / "eval" / method / f"{setting}.csv",
            [
                {"task": "a", "split": "test", "accuracy": 0.5, "n": 10},
                {"task": "a", "split": "val", "accuracy": 0.5, "n": 4},
            ],
        )
    write_summary(
        tmp_path, ["a"], ["tsvm/k2_a1.0", "epimer/k2_a1.0_f1.0"], tmp_path / "summary.csv"
    )
    with open(tmp_path / "paired.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["difference"] == "" and "no per-image correctness" in row["note"]
    from pipeline.tables import paired_table, read_paired, to_markdown

    text = to_markdown(paired_table(read_paired(tmp_path / "paired.csv")))
    assert "not available: tsvm/k2_a1.0: no per-image correctness" in text
    missing = to_markdown(paired_table(read_paired(tmp_path / "none.csv")))
    assert "not available: no paired.csv" in missing
