"""Paper-shaped tables: every number equals summary.csv, selections read only what they
should (validation never sees test), renderers agree with each other."""

from __future__ import annotations

import csv
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.report import write_summary
from pipeline.store import ArtifactError
from pipeline.tables import (
    LABELS,
    TABLES,
    Cell,
    Table,
    alpha_groups,
    best_on_test,
    build_tables,
    choose_on_validation,
    read_summary,
    to_csv,
    to_html,
    to_markdown,
    write_tables,
)

TASKS = ["shapes", "colour", "position"]
ALPHAS = ["0.3", "0.5", "1.0"]


def _runs() -> list[str]:
    runs = ["zeroshot/theta0", "finetuned/own"]
    runs += [f"ta/a{a}" for a in ALPHAS] + [f"ties/a{a}" for a in ALPHAS]
    runs += [f"fisher/f{f}" for f in ("0.05", "1.0")]
    runs += [f"tsvm/k{k}_a{a}" for k in (2, 4) for a in ALPHAS]
    runs += [f"epimer/k{k}_a{a}_f{f}" for k in (2, 4) for a in ALPHAS for f in ("0.05", "1.0")]
    return runs


def _write_eval(path: Path, rows: dict[str, dict[str, float]]) -> None:
    """rows: split → task → accuracy, written in the evaluate command's CSV layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["task", "split", "accuracy", "n"])
        writer.writeheader()
        for split, accs in rows.items():
            for task, acc in accs.items():
                writer.writerow({"task": task, "split": split, "accuracy": f"{acc:.6f}", "n": 500})


def make_run(root: Path, seed: int = 0, val: bool = True, test_seed: int | None = None) -> Path:
    """A results folder with random evaluation CSVs for the whole grid and its summary.csv.
    `test_seed` redraws the test accuracies only (validation ones stay those of `seed`)."""
    rng_val, rng_test = (
        random.Random(seed),
        random.Random((seed if test_seed is None else test_seed) + 1000),
    )
    for run in _runs():
        method, setting = run.split("/")
        val_acc = {t: round(rng_val.uniform(0.2, 0.9), 3) for t in TASKS}
        test_acc = {t: round(rng_test.uniform(0.2, 0.9), 3) for t in TASKS}
        splits = {"test": test_acc, **({"val": val_acc} if val else {})}
        if method == "finetuned":
            for t in TASKS:
                _write_eval(
                    root / "eval" / "finetuned" / f"{t}.csv",
                    {s: {t: a[t]} for s, a in splits.items()},
                )
        else:
            _write_eval(root / "eval" / method / f"{setting}.csv", splits)
    write_summary(root, TASKS, _runs(), root / "summary.csv")
    return root / "summary.csv"


def _summary_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as fh:
        return {(r["method"], r["setting"]): r for r in csv.DictReader(fh)}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def summary(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


def test_summary_round_trip_and_validation_columns(summary: Path):
    tasks, runs = read_summary(summary)
    assert tasks == TASKS
    assert len(runs) == len(_runs())
    raw = _summary_rows(summary)
    for run in runs:
        row = raw[(run.method, run.setting)]
        assert run.average == float(row["average"]) and run.val_average == float(row["val_average"])
        assert run.test == {t: float(row[t]) for t in TASKS}
    epimer = next(r for r in runs if r.setting == "k4_a0.5_f1.0")
    assert (epimer.k, epimer.alpha, epimer.fraction) == (4, 0.5, 1.0)


def test_main_and_per_task_tables_equal_the_summary(summary: Path, tmp_path: Path):
    out = tmp_path / "tables"
    write_tables(summary, out)
    raw = _summary_rows(summary)
    main = _read_csv(out / "main.csv")
    assert [r["Method"] for r in main][0].startswith("θ0") and main[-1]["Method"].startswith(
        "Fine-tuned"
    )
    labels = {v: k for k, v in LABELS.items()}
    for row in main:
        method = labels[row["Method"]]
        val_row = raw[(method, row["Setting (val.)"])]
        test_row = raw[(method, row["Setting (best on test)"])]
        assert float(row["Avg."]) == float(val_row["average"])
        assert (
            float(row["Worst"]) == float(val_row["worst"])
            and row["Worst task"] == val_row["worst_task"]
        )
        assert float(row["Avg. (best on test)"]) == float(test_row["average"])
        if method not in ("zeroshot", "finetuned"):
            mine = [r for (m, _), r in raw.items() if m == method]
            assert float(val_row["val_average"]) == max(float(r["val_average"]) for r in mine)
            assert float(test_row["average"]) == max(float(r["average"]) for r in mine)
    for row in _read_csv(out / "per_task.csv"):
        method = labels[row["Method"]]
        src = raw[(method, row["Setting"])]
        for t in [*TASKS, "Avg."]:
            assert float(row[t]) == float(src["average" if t == "Avg." else t])


def test_alpha_tables_equal_the_summary(summary: Path, tmp_path: Path):
    out = tmp_path / "tables"
    write_tables(summary, out)
    raw = _summary_rows(summary)
    sens = _read_csv(out / "alpha_sensitivity.csv")
    assert [c for c in sens[0] if c.startswith("α=")] == [f"α={float(a):g}" for a in ALPHAS]
    rows = {(r["Method"], r["k"], r["f"]): r for r in sens}
    assert len(rows) == len(sens) == 1 + 1 + 2 + 4  # ta, ties, tsvm per k, epimer per (k, f)
    for a in ALPHAS:
        col = f"α={float(a):g}"
        assert float(rows[("TSV-M", "4", "")][col]) == float(raw[("tsvm", f"k4_a{a}")]["average"])
        assert float(rows[("EpiMer", "2", "0.05")][col]) == float(
            raw[("epimer", f"k2_a{a}_f0.05")]["average"]
        )
        assert float(rows[("TIES", "", "")][col]) == float(raw[("ties", f"a{a}")]["average"])
    for (method, k, f), r in rows.items():
        if method == "EpiMer":
            group = {a: raw[("epimer", f"k{k}_a{a}_f{f}")] for a in ALPHAS}
            best = max(ALPHAS, key=lambda a: float(group[a]["average"]))
            assert float(r["Best α (test)"]) == float(best)
    selection = _read_csv(out / "alpha_selection.csv")
    assert len(selection) == 1 + 1 + 2 + 4  # ta, ties, tsvm per k, epimer per (k, f)
    for r in selection:
        if r["Method"] != "EpiMer":
            continue
        group = {a: raw[("epimer", f"k{r['k']}_a{a}_f{float(r['f'])}")] for a in ALPHAS}
        val_alpha = max(ALPHAS, key=lambda a: float(group[a]["val_average"]))
        test_alpha = max(ALPHAS, key=lambda a: float(group[a]["average"]))
        assert float(r["α (val.)"]) == float(val_alpha) and float(r["α (best on test)"]) == float(
            test_alpha
        )
        assert float(r["Test avg. at α (val.)"]) == float(group[val_alpha]["average"])
        assert float(r["Gap (test)"]) == pytest.approx(
            float(group[test_alpha]["average"]) - float(group[val_alpha]["average"])
        )
        assert float(r["Gap (test)"]) >= 0
    # Figure 3: EpiMer at the fixed α = 1.0 for every f (no α chosen per f); the largest k is the
    # paper's curve when report.paper_k is not set.
    eff = _read_csv(out / "data_efficiency.csv")
    assert [float(r["f"]) for r in eff] == [0.05, 1.0]
    for r in eff:
        f = float(r["f"])
        assert float(r["Fisher averaging"]) == float(raw[("fisher", f"f{f}")]["average"])
        assert float(r["EpiMer k=4, α=1 (Figure 3)"]) == float(
            raw[("epimer", f"k4_a1.0_f{f}")]["average"]
        )
        assert float(r["EpiMer k=2, α=1"]) == float(raw[("epimer", f"k2_a1.0_f{f}")]["average"])


def test_normalised_table_is_accuracy_over_finetuned(summary: Path, tmp_path: Path):
    out = tmp_path / "tables"
    write_tables(summary, out)
    raw = _summary_rows(summary)
    ft = raw[("finetuned", "own")]
    rows = _read_csv(out / "normalised.csv")
    assert rows[0]["Method"].startswith("θ0")
    for r in rows:
        method = {v: k for k, v in LABELS.items()}[r["Method"]]
        src = raw[(method, r["Setting"])]
        ratios = [float(src[t]) / float(ft[t]) for t in TASKS]
        for t, ratio in zip(TASKS, ratios):
            assert float(r[t]) == pytest.approx(ratio, rel=1e-12)
        assert float(r["Avg."]) == pytest.approx(sum(ratios) / len(ratios), rel=1e-12)


def test_markdown_shows_the_csv_numbers_rounded(summary: Path, tmp_path: Path):
    out = tmp_path / "tables"
    written = write_tables(summary, out)
    names = {f"{n}.{e}" for n in TABLES for e in ("md", "csv", "html")}
    assert {p.name for p in written} == names | {"tables.md", "summary.html"}
    page = (out / "summary.html").read_text()  # summary.csv as a page: accuracies, diagnostics
    assert page.count("<table>") == 2 and "merge diagnostics" in page and "<th>se</th>" in page
    compared = 0
    for name in TABLES:
        rows = _read_csv(out / f"{name}.csv")
        md = (out / f"{name}.md").read_text()
        lines = [line for line in md.splitlines() if line.startswith("| ")]
        header = [c.strip() for c in lines[0].strip("|").split(" | ")]
        assert len(lines) - 1 == len(rows), name
        for line, row in zip(lines[1:], rows):
            cells = [c.strip().strip("*").rstrip("†") for c in line.strip("|").split(" | ")]
            for column, cell in zip(header, cells):
                value = row[column]
                if " ± " in cell:  # value ± SE: the CSV has the SE in its own column
                    cell, se = cell.split(" ± ")
                    assert float(se) == pytest.approx(float(row[f"{column} SE"]), abs=5e-4 + 1e-12)
                if re.fullmatch(r"-?\d+\.\d+", value) and re.fullmatch(r"[-+]?\d+\.\d{2,3}", cell):
                    digits = len(cell.split(".")[1])
                    assert float(cell) == pytest.approx(
                        round(float(value), digits), abs=10**-digits / 2 + 1e-12
                    ), (name, cell, value)
                    compared += 1
        assert "<table>" in (out / f"{name}.html").read_text()
    assert compared > 100
    assert all(
        f"### {t.title}" in (out / "tables.md").read_text()
        for t in build_tables(*read_summary(summary))
    )


def test_validation_choice_ignores_test_accuracies(summary: Path):
    _, runs = read_summary(summary)
    rng = random.Random(1)
    for group in alpha_groups(runs).values():
        chosen = choose_on_validation(group)
        assert chosen is not None and chosen.val_average == max(r.val_average for r in group)
        for _ in range(20):
            shuffled = [replace(r, average=rng.random(), worst=rng.random()) for r in group]
            again = choose_on_validation(shuffled)
            assert again is not None and again.alpha == chosen.alpha
    # ... whereas best on test follows the test accuracies.
    group = next(iter(alpha_groups(runs).values()))
    flipped = [replace(r, average=1.0 if r.alpha == group[-1].alpha else 0.0) for r in group]
    assert best_on_test(flipped).alpha == group[-1].alpha


def test_changing_test_accuracies_changes_no_validation_choice(tmp_path: Path):
    """Two runs with the same validation and different test accuracies: every α, setting and
    validation number chosen on validation is the same; the test numbers differ."""
    a = make_run(tmp_path / "a", seed=3)
    b = make_run(tmp_path / "b", seed=3, test_seed=7)
    out_a, out_b = tmp_path / "ta", tmp_path / "tb"
    write_tables(a, out_a)
    write_tables(b, out_b)
    sel_a, sel_b = (
        _read_csv(out_a / "alpha_selection.csv"),
        _read_csv(out_b / "alpha_selection.csv"),
    )
    assert [r["α (val.)"] for r in sel_a] == [r["α (val.)"] for r in sel_b]
    assert [r["Val. avg. at α (val.)"] for r in sel_a] == [
        r["Val. avg. at α (val.)"] for r in sel_b
    ]
    assert [r["Test avg. at α (val.)"] for r in sel_a] != [
        r["Test avg. at α (val.)"] for r in sel_b
    ]
    main_a, main_b = _read_csv(out_a / "main.csv"), _read_csv(out_b / "main.csv")
    assert [r["Setting (val.)"] for r in main_a] == [r["Setting (val.)"] for r in main_b]


def test_summary_without_validation_gives_empty_validation_cells(tmp_path: Path):
    summary = make_run(tmp_path / "run", val=False)
    _, runs = read_summary(summary)
    assert all(r.val_average is None for r in runs)
    out = tmp_path / "tables"
    write_tables(summary, out)
    selection = _read_csv(out / "alpha_selection.csv")
    assert all(r["α (val.)"] == "" and r["α (best on test)"] != "" for r in selection)
    assert "—" in (out / "alpha_selection.md").read_text()


def test_bad_summary_is_rejected_by_file_and_column(tmp_path: Path):
    bad = tmp_path / "summary.csv"
    bad.write_text(
        "method,setting,k,alpha,shapes,average,worst,worst_task\nta,a0.3,,0.3,0.5,0.5,0.5,shapes\n"
    )
    with pytest.raises(ArtifactError, match=r"summary.csv: column `fraction` is missing"):
        read_summary(bad)
    bad.write_text(
        "method,setting,k,alpha,fraction,shapes,average,worst,worst_task\nta,a0.3,,0.3,,oops,0.5,0.5,shapes\n"
    )
    with pytest.raises(ArtifactError, match=r"summary.csv: field `shapes` holds 'oops'"):
        read_summary(bad)
    with pytest.raises(ArtifactError, match="not found"):
        read_summary(tmp_path / "missing.csv")


def test_table_renderers():
    t = Table("x", "A | title", ["name", "value"], note="note")
    t.add("a|b", 0.12345)
    t.add(None, Cell(1e-5, mark="†"))
    t.bold_best(["value"])
    md = to_markdown(t)
    # Columns padded to a common width: the Markdown reads as a table in a terminal too.
    assert md.splitlines()[2:] == [
        "| name | value     |",
        "|------|-----------|",
        "| a\\|b | **0.123** |",
        "| —    | 1e-05†    |",
        "",
        "note",
    ]
    assert to_csv(t).splitlines() == ["name,value", "a|b,0.12345", ",1e-05"]
    assert "<td><b>0.123</b></td>" in to_html(t) and "A | title" in to_html(t)
    with pytest.raises(ValueError, match="row of 1 cells for 2 columns"):
        t.add("only one")


# --------------------------------------------------------------------------- Tables 2 and 6 at the paper's setting


def _with_flat_alpha(root: Path) -> Path:
    """make_run's grid plus Task Arithmetic at α = 0.125 (the paper's λ_t), summary rewritten."""
    make_run(root)
    _write_eval(
        root / "eval" / "ta" / "a0.125.csv",
        {"test": {t: 0.3 + 0.1 * i for i, t in enumerate(TASKS)}, "val": {t: 0.2 for t in TASKS}},
    )
    write_summary(root, TASKS, [*_runs(), "ta/a0.125"], root / "summary.csv")
    return root / "summary.csv"


def test_table2_and_table6_rows_are_the_paper_settings_best_alpha_on_test(tmp_path: Path):
    from pipeline.tables import PaperSettings

    summary = _with_flat_alpha(tmp_path / "run")
    out = tmp_path / "tables"
    write_tables(summary, out, PaperSettings(k=2, fraction=0.05, heads="zeroshot"))
    raw = _summary_rows(summary)
    table2 = {r["Method"]: r for r in _read_csv(out / "table2.csv")}
    table6 = {r["Method"]: r for r in _read_csv(out / "table6.csv")}
    assert list(table2) == [
        "θ0 + zero-shot heads",
        "Task Arithmetic",
        "TIES",
        "TSV-M",
        "Fisher averaging",
        "EpiMer",
        "Fine-tuned (own task)",
    ]

    def best(method, keep):
        return max(
            (r for (m, _), r in raw.items() if m == method and keep(r)),
            key=lambda r: float(r["average"]),
        )

    want = {
        "Task Arithmetic": raw[("ta", "a0.125")],  # the paper's λ_t, not the best α
        "TIES": best("ties", lambda r: True),  # no α = 0.125 run: best on test, said so
        "TSV-M": best("tsvm", lambda r: r["k"] == "2"),
        "Fisher averaging": raw[("fisher", "f0.05")],
        "EpiMer": best("epimer", lambda r: r["k"] == "2" and float(r["fraction"]) == 0.05),
        "θ0 + zero-shot heads": raw[("zeroshot", "theta0")],
    }
    for name, src in want.items():
        assert table2[name]["Setting"] == src["setting"], name
        assert float(table2[name]["Avg."]) == float(src["average"]) and float(
            table2[name]["Worst"]
        ) == float(src["worst"])
        assert table2[name]["Worst task"] == src["worst_task"]
        assert table6[name]["Setting"] == src["setting"]
        for t in [*TASKS, "Avg."]:
            assert float(table6[name][t]) == float(src["average" if t == "Avg." else t])
    assert table2["Task Arithmetic"]["Selection"] == "α = 0.125 (the paper's λ_t)"
    assert table2["TIES"]["Selection"] == "best α on test (no α = 0.125 in this run)"
    assert table2["EpiMer"]["Selection"] == "k = 2, f = 0.05, best α on test"
    assert (
        "Table 2" in (out / "table2.md").read_text()
        and "all settings" in (out / "main.md").read_text()
    )
    assert "Table 6, all settings" in (out / "per_task.md").read_text()


def test_paper_tables_ignore_every_run_outside_the_paper_setting(tmp_path: Path):
    """Raising the test accuracy of a k = 4 run (paper k = 2) changes the all-settings table's best
    on test but not Table 2."""
    from pipeline.tables import PaperSettings, table2

    tasks, runs = read_summary(make_run(tmp_path / "run"))
    paper = PaperSettings(k=2, fraction=1.0)
    before = to_csv(table2(tasks, runs, paper))
    boosted = [replace(r, average=0.99) if r.setting == "k4_a0.5_f1.0" else r for r in runs]
    assert to_csv(table2(tasks, boosted, paper)) == before
    from pipeline.tables import main_table

    epimer = next(
        r for r in _read_csv_text(to_csv(main_table(tasks, boosted))) if r["Method"] == "EpiMer"
    )
    assert epimer["Setting (best on test)"] == "k4_a0.5_f1.0"


def _read_csv_text(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(text.splitlines()))


def test_paper_settings_default_to_the_largest_k_and_fraction_and_report_missing_ones(
    tmp_path: Path,
):
    from pipeline.tables import PaperSettings, paper_choice, table2, theta0_label

    tasks, runs = read_summary(make_run(tmp_path / "run"))
    resolved = PaperSettings().resolve(runs)
    assert (resolved.k, resolved.fraction, resolved.alpha, resolved.flat_alpha) == (
        4,
        1.0,
        1.0,
        0.125,
    )
    run, rule = paper_choice(runs, "tsvm", PaperSettings(k=32, fraction=1.0))
    assert run is None and rule == "no run at k = 32"
    rows = {
        r["Method"]: r for r in _read_csv_text(to_csv(table2(tasks, runs, PaperSettings(k=32))))
    }
    assert rows["TSV-M"]["Avg."] == "" and rows["TSV-M"]["Selection"] == "no run at k = 32"
    assert rows["θ0 + heads"]["Selection"] == "single setting"
    assert (
        theta0_label("train") == "θ0 + linear-probe heads"
        and theta0_label("import") == "θ0 + imported heads"
    )
    with pytest.raises(ValueError, match="unknown heads source `probe`"):
        theta0_label("probe")


def test_a_method_registered_at_run_time_appears_in_tables_and_figures(tmp_path: Path, monkeypatch):
    """A new registry row (label, colour, order) reaches every table and figure with no other
    file edited: LABELS, the method order and COLOURS are read from the registry."""
    from pipeline.methods import METHODS, Method
    from pipeline.plots import COLOURS, alpha_sweep_figure, per_task_figure
    from pipeline.tables import alpha_sensitivity_table, main_table, method_order

    toy = Method(
        "toy",
        "Toy: the mean task vector",
        lambda layer, s: None,
        ("alpha",),
        label="Toy merge",
        colour="#123456",
        citation="none",
        order=2,
    )
    monkeypatch.setitem(METHODS, "toy", toy)
    assert method_order().index("toy") < method_order().index(
        "tsvm"
    )  # order 2 ties TSV-M's; by name
    root = tmp_path / "run"
    make_run(root)
    for a in ALPHAS:
        _write_eval(
            root / "eval" / "toy" / f"a{a}.csv",
            {
                "test": {t: 0.5 + 0.1 * float(a) for t in TASKS},
                "val": {t: 0.4 + 0.1 * float(a) for t in TASKS},
            },
        )
    write_summary(root, TASKS, _runs() + [f"toy/a{a}" for a in ALPHAS], root / "summary.csv")
    tasks, runs = read_summary(root / "summary.csv")
    assert LABELS["toy"] == "Toy merge" and COLOURS["toy"] == "#123456"
    main = [r["Method"] for r in _read_csv_text(to_csv(main_table(tasks, runs)))]
    assert main.index("Toy merge") == main.index("TIES") + 1  # order 2, before TSV-M
    sens = {r["Method"]: r for r in _read_csv_text(to_csv(alpha_sensitivity_table(tasks, runs)))}
    assert float(sens["Toy merge"]["α=1"]) == pytest.approx(0.6)
    ax = alpha_sweep_figure(tasks, runs).axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "Toy merge"]
    assert line.get_color() == "#123456" and list(line.get_ydata()) == pytest.approx(
        [0.53, 0.55, 0.6]
    )
    bars = per_task_figure(tasks, runs).axes[0].containers
    toy_bars = [c for c in bars if c.get_label().startswith("Toy merge (a1.0)")]
    assert len(toy_bars) == 1
    assert toy_bars[0].patches[0].get_facecolor()[:3] == pytest.approx(
        (0x12 / 255, 0x34 / 255, 0x56 / 255)
    )


def test_tables_show_standard_errors_and_mark_alpha_at_the_grid_edge(summary: Path):
    from pipeline.tables import alpha_selection_table, main_table

    tasks, runs = read_summary(summary)
    md = to_markdown(main_table(tasks, runs))
    ta_val = choose_on_validation([r for r in runs if r.method == "ta"])
    # n = 500 per task (make_run): the SE printed is the binomial SE of the average.
    se = (sum(p * (1 - p) / 500 for p in ta_val.test.values())) ** 0.5 / len(TASKS)
    assert f"{ta_val.average:.3f} ± {se:.3f}" in md
    table = alpha_selection_table(tasks, runs)
    best_col, val_col = table.columns.index("α (best on test)"), table.columns.index("α (val.)")
    lo, hi = min(float(a) for a in ALPHAS), max(float(a) for a in ALPHAS)
    marks = []
    for row in table.rows:
        for cell in (row[best_col], row[val_col]):
            edge = cell.value in (lo, hi)
            assert cell.text() == (f"{cell.value:g} ◂ edge" if edge else f"{cell.value:g}")
            marks.append(edge)
    assert any(marks) and not all(marks)


def test_eta_is_printed_in_one_notation():
    from pipeline.tables import SCI

    assert Cell(8.07e-05, fmt=SCI).text() == "8.07e-05"
    assert Cell(0.000127, fmt=SCI).text() == "1.27e-04"
