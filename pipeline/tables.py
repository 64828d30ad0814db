"""Paper-shaped tables from summary.csv, as Markdown, CSV and HTML.

Every number in a table is a number of summary.csv (or a ratio of two of them, for the
normalised table), so a table can always be checked against the summary. Two ways of
picking a setting are reported side by side and always labelled:

- **chosen on validation**: the setting with the highest average accuracy on the
  validation split (10 % of train, seed 0). It reads validation columns only, so it
  cannot see the test labels; its *test* accuracy is the honest number.
- **best on test**: the setting with the highest average test accuracy, the protocol of
  the paper's tables (α "per-method optimal" on test). An upper bound, not an estimate.

Shapes follow the paper (../shared/reference): main table (Tab. 2: methods × average,
worst task), per-task table (Tab. 6), α sensitivity per k (Tabs. 7–9), Fisher data
efficiency (Fig. 3, accuracy vs data fraction), plus the α selection, normalised
accuracy (merged / fine-tuned) and η tables.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.store import ArtifactError, atomic_path

# Merge methods in the paper's order (flat geometry first, then curvature-aware).
METHOD_ORDER = ("ta", "ties", "tsvm", "fisher", "epimer")
LABELS = {
    "zeroshot": "θ0 + heads (linear probe)",
    "finetuned": "Fine-tuned (own task)",
    "ta": "Task Arithmetic",
    "ties": "TIES",
    "tsvm": "TSV-M",
    "fisher": "Fisher averaging",
    "epimer": "EpiMer",
}
REFERENCES = ("zeroshot", "finetuned")
TABLES = ("main", "per_task", "alpha_sensitivity", "alpha_selection", "data_efficiency", "normalised", "eta")


# --------------------------------------------------------------------------- summary rows


@dataclass(frozen=True)
class Run:
    """One row of summary.csv: a merged (or reference) encoder and its accuracies in [0, 1]."""

    method: str
    setting: str
    k: int | None
    alpha: float | None
    fraction: float | None
    test: dict[str, float]  # task → test top-1
    average: float
    worst: float
    worst_task: str
    val_average: float | None = None  # None when the run has no validation evaluation
    val_worst: float | None = None
    eta: float | None = None
    V_S: float | None = None
    R_S: float | None = None

    @property
    def name(self) -> str:
        return f"{self.method}/{self.setting}"

    @property
    def group(self) -> tuple[str, int | None, float | None]:
        """The (method, k, fraction) an α sweep runs over."""
        return (self.method, self.k, self.fraction)


def _opt_float(value: str | None, path: Path, field_name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise ArtifactError(f"{path}: field `{field_name}` holds {value!r}, expected a number") from None


def read_summary(path: str | Path) -> tuple[list[str], list[Run]]:
    """The task names (in column order) and the rows of a summary.csv."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: summary CSV not found")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        rows = list(reader)
    for required in ("method", "setting", "k", "alpha", "fraction", "average", "worst", "worst_task"):
        if required not in fields:
            raise ArtifactError(f"{path}: column `{required}` is missing (not a summary.csv?)")
    tasks = fields[fields.index("fraction") + 1 : fields.index("average")]
    if not tasks:
        raise ArtifactError(f"{path}: no task columns between `fraction` and `average`")
    runs = []
    for row in rows:
        test = {}
        for t in tasks:
            value = _opt_float(row[t], path, t)
            if value is None:
                raise ArtifactError(f"{path}: run {row['method']}/{row['setting']} has no accuracy for task `{t}`")
            test[t] = value
        k = _opt_float(row["k"], path, "k")
        runs.append(
            Run(
                method=row["method"],
                setting=row["setting"],
                k=int(k) if k is not None else None,
                alpha=_opt_float(row["alpha"], path, "alpha"),
                fraction=_opt_float(row["fraction"], path, "fraction"),
                test=test,
                average=float(row["average"]),
                worst=float(row["worst"]),
                worst_task=row["worst_task"],
                val_average=_opt_float(row.get("val_average"), path, "val_average"),
                val_worst=_opt_float(row.get("val_worst"), path, "val_worst"),
                eta=_opt_float(row.get("eta"), path, "eta"),
                V_S=_opt_float(row.get("V_S"), path, "V_S"),
                R_S=_opt_float(row.get("R_S"), path, "R_S"),
            )
        )
    return tasks, runs


# --------------------------------------------------------------------------- selection


def choose_on_validation(runs: Iterable[Run]) -> Run | None:
    """The run with the highest validation average (ties: the first listed); None if no run
    has one. Reads `val_average` only: test accuracies cannot change the choice."""
    best: Run | None = None
    for run in runs:
        if run.val_average is not None and (best is None or run.val_average > best.val_average):  # type: ignore[operator]
            best = run
    return best


def best_on_test(runs: Iterable[Run]) -> Run | None:
    """The run with the highest average test accuracy (the paper's protocol); ties: first listed."""
    best: Run | None = None
    for run in runs:
        if best is None or run.average > best.average:
            best = run
    return best


def runs_of(runs: Sequence[Run], method: str) -> list[Run]:
    return [r for r in runs if r.method == method]


def reference(runs: Sequence[Run], method: str) -> Run | None:
    """The zero-shot or fine-tuned reference row, if present."""
    found = runs_of(runs, method)
    return found[0] if found else None


def merge_methods(runs: Sequence[Run]) -> list[str]:
    """The merge methods present, in the paper's order (unknown ones last, in file order)."""
    present = [m for m in dict.fromkeys(r.method for r in runs) if m not in REFERENCES]
    return [m for m in METHOD_ORDER if m in present] + [m for m in present if m not in METHOD_ORDER]


def alpha_groups(runs: Sequence[Run]) -> dict[tuple[str, int | None, float | None], list[Run]]:
    """(method, k, fraction) → its runs in ascending α, for every run that has an α."""
    groups: dict[tuple[str, int | None, float | None], list[Run]] = {}
    for method in merge_methods(runs):
        for run in runs_of(runs, method):
            if run.alpha is not None:
                groups.setdefault(run.group, []).append(run)
    ordered = sorted(groups, key=lambda g: (merge_methods(runs).index(g[0]), g[1] or 0, g[2] or 0.0))
    return {g: sorted(groups[g], key=lambda r: r.alpha) for g in ordered}  # type: ignore[arg-type, return-value]


def chosen_settings(runs: Sequence[Run]) -> dict[str, tuple[Run, str]]:
    """method → (run, "validation" | "test"): each merge method's setting chosen on validation,
    or its best on test when no run of the method has validation accuracies."""
    out: dict[str, tuple[Run, str]] = {}
    for method in merge_methods(runs):
        mine = runs_of(runs, method)
        chosen = choose_on_validation(mine)
        out[method] = (chosen, "validation") if chosen is not None else (best_on_test(mine), "test")  # type: ignore[assignment]
    return out


def group_label(method: str, k: int | None, fraction: float | None) -> str:
    """`TSV-M k=4`, `EpiMer k=4 f=0.05`, `TIES`."""
    parts = [LABELS.get(method, method)]
    if k is not None:
        parts.append(f"k={k}")
    if fraction is not None:
        parts.append(f"f={fraction:g}")
    return " ".join(parts)


# --------------------------------------------------------------------------- table model


@dataclass
class Cell:
    """A table cell: a number (rendered with `digits` decimals in Markdown/HTML, or in the
    shortest general form when `digits` is None; exactly in CSV), a string, or empty; `bold`
    marks a best value, `mark` a footnote sign (†)."""

    value: float | str | None
    bold: bool = False
    mark: str = ""
    digits: int | None = 3

    def text(self) -> str:
        if self.value is None:
            return "—"
        if isinstance(self.value, float):
            body = _fmt(self.value, self.digits)
        else:
            body = str(self.value)
        return body + self.mark

    def raw(self) -> str:
        if self.value is None:
            return ""
        return repr(self.value) if isinstance(self.value, float) else str(self.value)


def _fmt(value: float, digits: int | None) -> str:
    if not math.isfinite(value):
        return str(value)
    if digits is None:
        return f"{value:g}"
    if value != 0 and (abs(value) < 10 ** (-digits) or abs(value) >= 1e6):
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"


@dataclass
class Table:
    """A titled table: `columns` names, `rows` of cells (same length), `note` says what the
    marks mean and how the numbers were chosen."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    note: str = ""

    def add(self, *cells: Cell | float | str | None) -> None:
        row = [c if isinstance(c, Cell) else Cell(c) for c in cells]
        if len(row) != len(self.columns):
            raise ValueError(f"table `{self.name}`: row of {len(row)} cells for {len(self.columns)} columns")
        self.rows.append(row)

    def column(self, name: str) -> list[Cell]:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]

    def bold_best(self, columns: Iterable[str], rows: Callable[[int], bool] = lambda i: True) -> None:
        """Bold the largest number of each named column among the rows `rows(i)` accepts."""
        for name in columns:
            cells = [c for i, c in enumerate(self.column(name)) if rows(i) and isinstance(c.value, float)]
            if cells:
                top = max(c.value for c in cells)  # type: ignore[type-var]
                for c in cells:
                    c.bold = c.value == top


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table with a `###` title and the note below it."""
    def text(c: Cell) -> str:
        t = c.text().replace("|", "\\|")
        return f"**{t}**" if c.bold else t

    lines = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |"]
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    lines += ["| " + " | ".join(text(c) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The table's cells with full precision (Python's shortest round-trip float spelling)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    for row in table.rows:
        writer.writerow([c.raw() for c in row])
    return buf.getvalue()


def to_html(table: Table) -> str:
    """A standalone HTML page with the table (for the Snakemake report, which shows HTML inline)."""
    def td(c: Cell) -> str:
        t = html.escape(c.text())
        return f"<td><b>{t}</b></td>" if c.bold else f"<td>{t}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "\n".join("<tr>" + "".join(td(c) for c in row) + "</tr>" for row in table.rows)
    style = (
        "body{font-family:sans-serif;margin:1em} table{border-collapse:collapse}"
        " th,td{border:1px solid #bbb;padding:3px 8px;text-align:right} th{background:#eee}"
        " td:first-child,th:first-child{text-align:left}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(table.title)}</title>"
        f"<style>{style}</style></head><body><h3>{html.escape(table.title)}</h3>\n"
        f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>\n"
        f"<p>{html.escape(table.note)}</p></body></html>\n"
    )


# --------------------------------------------------------------------------- the tables

VAL_NOTE = (
    "Chosen on validation: highest average accuracy on the validation split (10 % of train, "
    "seed 0), reported with its test accuracy. Best on test: highest average test accuracy, "
    "the protocol of the paper's tables (an optimistic upper bound)."
)


def _setting(run: Run | None) -> str | None:
    return run.setting if run is not None else None


def main_table(tasks: Sequence[str], runs: Sequence[Run]) -> Table:
    """Tab. 2 shape: one row per method, average and worst-task test accuracy at the setting
    chosen on validation and at the best-on-test setting."""
    t = Table(
        "main",
        "Main results: average and worst-task top-1 accuracy",
        ["Method", "Setting (val.)", "Val. avg.", "Avg.", "Worst", "Worst task",
         "Setting (best on test)", "Avg. (best on test)", "Worst (best on test)", "Worst task (best on test)"],
        note=VAL_NOTE + " References (θ0 + heads, fine-tuned) have a single setting. Bold: best merge per column.",
    )
    order = [m for m in ("zeroshot",) if reference(runs, m)] + merge_methods(runs)
    order += [m for m in ("finetuned",) if reference(runs, m)]
    for method in order:
        mine = runs_of(runs, method)
        val, best = choose_on_validation(mine), best_on_test(mine)
        if method in REFERENCES:
            val = best = mine[0]
        t.add(
            LABELS.get(method, method),
            _setting(val), val.val_average if val else None, val.average if val else None,
            val.worst if val else None, val.worst_task if val else None,
            _setting(best), best.average if best else None, best.worst if best else None,
            best.worst_task if best else None,
        )
    merged_rows = [i for i, m in enumerate(order) if m not in REFERENCES]
    t.bold_best(["Avg.", "Worst", "Avg. (best on test)", "Worst (best on test)"], lambda i: i in merged_rows)
    return t


def per_task_table(tasks: Sequence[str], runs: Sequence[Run]) -> Table:
    """Tab. 6 shape: per-task test accuracy; each merge method twice (setting chosen on
    validation, setting best on test), the references once."""
    t = Table(
        "per_task",
        "Per-task top-1 accuracy",
        ["Method", "Selected by", "Setting", *tasks, "Avg."],
        note=VAL_NOTE + " Bold: best merge per task.",
    )
    for method in ("zeroshot",):
        if (ref := reference(runs, method)) is not None:
            t.add(LABELS[method], "—", ref.setting, *[ref.test[x] for x in tasks], ref.average)
    first_merged = len(t.rows)
    for method in merge_methods(runs):
        mine = runs_of(runs, method)
        for how, run in (("validation", choose_on_validation(mine)), ("best on test", best_on_test(mine))):
            if run is None:
                t.add(LABELS.get(method, method), how, None, *[None for _ in tasks], None)
            else:
                t.add(LABELS.get(method, method), how, run.setting, *[run.test[x] for x in tasks], run.average)
    last_merged = len(t.rows)
    if (ref := reference(runs, "finetuned")) is not None:
        t.add(LABELS["finetuned"], "—", ref.setting, *[ref.test[x] for x in tasks], ref.average)
    t.bold_best([*tasks, "Avg."], lambda i: first_merged <= i < last_merged)
    return t


def alpha_sensitivity_table(tasks: Sequence[str], runs: Sequence[Run]) -> Table:
    """Tabs. 7–9 shape: average test accuracy, one row per α, one column per
    (method, k, fraction) sweep. Bold: best per column; †: the α chosen on validation."""
    groups = alpha_groups(runs)
    alphas = sorted({r.alpha for g in groups.values() for r in g})  # type: ignore[type-var]
    t = Table(
        "alpha_sensitivity",
        "α sensitivity: average test top-1 per global scale α",
        ["α", *[group_label(*g) for g in groups]],
        note="Bold: best α per column on test (the paper's protocol). †: the α chosen on validation "
        "(10 % of train, seed 0) for that column.",
    )
    for alpha in alphas:
        cells: list[Cell | float | str | None] = [Cell(alpha, digits=2)]
        for group in groups.values():
            run = next((r for r in group if r.alpha == alpha), None)
            chosen = choose_on_validation(group)
            cells.append(Cell(run.average if run else None, mark="†" if run is not None and run is chosen else ""))
        t.add(*cells)
    t.bold_best(t.columns[1:])
    return t


def alpha_selection_table(tasks: Sequence[str], runs: Sequence[Run]) -> Table:
    """Per (method, k, fraction): the α chosen on validation and its test accuracy, beside the
    best-on-test α; the gap is what choosing on test would overstate."""
    t = Table(
        "alpha_selection",
        "α chosen on validation vs. best α on test",
        ["Method", "k", "f", "α (val.)", "Val. avg. at α (val.)", "Test avg. at α (val.)",
         "Test worst at α (val.)", "α (best on test)", "Test avg. at α (best on test)", "Gap (test)"],
        note="α (val.) maximises the validation average and never reads test labels. "
        "α (best on test) is the paper's protocol. Gap = test avg. at α (best on test) − test avg. at α (val.).",
    )
    for (method, k, fraction), group in alpha_groups(runs).items():
        val, best = choose_on_validation(group), best_on_test(group)
        if best is None:  # groups are never empty; keeps the type checker honest
            continue
        t.add(
            LABELS.get(method, method), str(k) if k is not None else None,
            Cell(fraction, digits=None) if fraction is not None else None,
            Cell(val.alpha, digits=2) if val else None, val.val_average if val else None,
            val.average if val else None, val.worst if val else None,
            Cell(best.alpha, digits=2), best.average, (best.average - val.average) if val else None,
        )
    return t


def data_efficiency_table(tasks: Sequence[str], runs: Sequence[Run]) -> Table:
    """Fig. 3 shape: average test accuracy per Fisher data fraction f for Fisher averaging and,
    per k, EpiMer at the α chosen on validation for that (k, f)."""
    fractions = sorted({r.fraction for r in runs if r.method in ("fisher", "epimer") and r.fraction is not None})
    ks = sorted({r.k for r in runs_of(runs, "epimer") if r.k is not None})
    columns = ["f"]
    if runs_of(runs, "fisher"):
        columns.append("Fisher averaging")
    for k in ks:
        columns += [f"EpiMer k={k}", f"α (k={k})"]
    t = Table(
        "data_efficiency",
        "Fisher data efficiency: average test top-1 vs. data fraction f",
        columns,
        note="f: fraction of each task's training split used for its empirical Fisher diagonal. "
        "EpiMer at the α chosen on validation for each (k, f) (best on test where no validation "
        "accuracy exists).",
    )
    groups = alpha_groups(runs)
    for f in fractions:
        cells: list[Cell | float | str | None] = [Cell(f, digits=None)]
        if "Fisher averaging" in columns:
            run = next((r for r in runs_of(runs, "fisher") if r.fraction == f), None)
            cells.append(run.average if run else None)
        for k in ks:
            group = groups.get(("epimer", k, f), [])
            run = choose_on_validation(group) or best_on_test(group)
            cells += [run.average if run else None, Cell(run.alpha, digits=2) if run else None]
        t.add(*cells)
    return t


def normalised_table(tasks: Sequence[str], runs: Sequence[Run]) -> Table:
    """Normalised accuracy: test accuracy of each encoder divided by each task's fine-tuned
    accuracy, per task, and their mean (merge methods at their setting chosen on validation)."""
    t = Table(
        "normalised",
        "Normalised accuracy (merged / fine-tuned)",
        ["Method", "Selected by", "Setting", *tasks, "Avg."],
        note="Each cell is accuracy / fine-tuned accuracy of the same task; Avg. is the mean of the "
        "per-task ratios. Merge methods at their setting chosen on validation.",
    )
    ft = reference(runs, "finetuned")
    if ft is None:
        return t
    rows: list[tuple[str, str, Run]] = []
    if (zs := reference(runs, "zeroshot")) is not None:
        rows.append(("zeroshot", "—", zs))
    for method, (run, how) in chosen_settings(runs).items():
        rows.append((method, how, run))
    for method, how, run in rows:
        ratios = [normalised(run.test[x], ft.test[x]) for x in tasks]
        finite = [r for r in ratios if r is not None]
        t.add(LABELS.get(method, method), how, run.setting, *ratios, sum(finite) / len(finite) if finite else None)
    return t


def normalised(accuracy: float, finetuned: float) -> float | None:
    """accuracy / finetuned, or None when the fine-tuned accuracy is 0."""
    return accuracy / finetuned if finetuned > 0 else None


def eta_table(tasks: Sequence[str], runs: Sequence[Run]) -> Table:
    """η (curvature heterogeneity, Theorem 3) per (k, f) with EpiMer's and TSV-M's average test
    accuracy at their α chosen on validation and the margin between them."""
    t = Table(
        "eta",
        "Curvature heterogeneity η and EpiMer's margin over TSV-M",
        ["k", "f", "η", "EpiMer avg.", "TSV-M avg.", "EpiMer − TSV-M"],
        note="η = cᵀ H̄⁻¹ c summed over layers (it does not depend on α). Accuracies at the α chosen "
        "on validation for each column (best on test where no validation accuracy exists).",
    )
    groups = alpha_groups(runs)
    for (method, k, f), group in groups.items():
        if method != "epimer":
            continue
        ep = choose_on_validation(group) or best_on_test(group)
        ts_group = groups.get(("tsvm", k, None), [])
        ts = choose_on_validation(ts_group) or best_on_test(ts_group)
        eta = next((r.eta for r in group if r.eta is not None), None)
        t.add(
            str(k), Cell(f, digits=None) if f is not None else None, Cell(eta, digits=3),
            ep.average if ep else None, ts.average if ts else None,
            (ep.average - ts.average) if ep and ts else None,
        )
    return t


BUILDERS: dict[str, Callable[[Sequence[str], Sequence[Run]], Table]] = {
    "main": main_table,
    "per_task": per_task_table,
    "alpha_sensitivity": alpha_sensitivity_table,
    "alpha_selection": alpha_selection_table,
    "data_efficiency": data_efficiency_table,
    "normalised": normalised_table,
    "eta": eta_table,
}


def build_tables(tasks: Sequence[str], runs: Sequence[Run]) -> list[Table]:
    """Every table, in the order of TABLES."""
    return [BUILDERS[name](tasks, runs) for name in TABLES]


def write_tables(summary: str | Path, out_dir: str | Path) -> list[Path]:
    """Write {name}.md, {name}.csv and {name}.html for every table, plus tables.md with all of
    them, into `out_dir`; returns the paths written."""
    tasks, runs = read_summary(summary)
    out = Path(out_dir)
    written = []
    tables = build_tables(tasks, runs)
    for table in tables:
        for suffix, render in ((".md", to_markdown), (".csv", to_csv), (".html", to_html)):
            path = out / f"{table.name}{suffix}"
            with atomic_path(path) as tmp:
                tmp.write_text(render(table), encoding="utf-8")
            written.append(path)
    index = out / "tables.md"
    with atomic_path(index) as tmp:
        tmp.write_text(
            f"# Results tables\n\nFrom `{Path(summary).name}`; accuracies are top-1 in [0, 1].\n\n"
            + "\n".join(to_markdown(t) for t in tables),
            encoding="utf-8",
        )
    written.append(index)
    return written
