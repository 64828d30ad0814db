"""The paper's tables from summary.csv, as Markdown, CSV and HTML.

Every number in a table is a number of summary.csv (or a ratio of two of them, for the
normalised table), so a table can always be checked against the summary.

The paper's tables, at the paper's settings (`PaperSettings`, the config's `report` block):

- **Table 2** (`table2`): average and worst-task test top-1 per method; TSV-M and EpiMer at
  k = `paper_k` with their best α on test, EpiMer and Fisher averaging on the Fisher of
  fraction `paper_fraction`, Task Arithmetic and TIES at α = `paper_flat_alpha` (λ_t = 0.125,
  the paper's Appendix C.3).
- **Table 6** (`table6`): the same rows per task.
- **Tables 7–9** (`alpha_sensitivity`): average test top-1 per α for every k (and f).
- **Figure 3** (`data_efficiency`): average test top-1 against the Fisher fraction f, EpiMer at
  the fixed α = `paper_alpha` (1.0, Appendix D.4) for each k, with k = `paper_k` the paper's curve.

Beside them, labelled "all settings", Table 2 and Table 6 over the whole grid (`main`,
`per_task`), each method at two selections:

- **chosen on validation**: the setting with the highest average accuracy on the
  validation split. It reads validation columns only, so it cannot see the test labels;
  its *test* accuracy is the honest number.
- **best on test**: the setting with the highest average test accuracy, the protocol of
  the paper's tables (α "per-method optimal" on test). An upper bound, not an estimate.

and three tables the paper does not have: the α selection, normalised accuracy
(merged / fine-tuned) and η. Table 10 (merge wall-clock) is measured by
benchmarks/merge.py, outside the workflow.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.methods.registry import METHODS


def _artifact_error(message: str) -> Exception:
    """`pipeline.store.ArtifactError(message)`, imported on the error path only: this module
    stays free of torch (which `pipeline.store` imports), so `show` and the tables start fast."""
    from pipeline.store import ArtifactError as StoreError

    return StoreError(message)


#: The two references every run has; every other row is a merge method of the registry.
REFERENCE_LABELS = {"zeroshot": "θ0 + heads", "finetuned": "Fine-tuned (own task)"}
REFERENCES = tuple(REFERENCE_LABELS)


class _Labels(Mapping[str, str]):
    """method → its name in tables and figures: the two references, then every row of the
    method registry (read at each lookup, so a row registered at run time has its label)."""

    def _all(self) -> dict[str, str]:
        return {**REFERENCE_LABELS, **{m: meth.label or m for m, meth in METHODS.items()}}

    def __getitem__(self, key: str) -> str:
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


LABELS: Mapping[str, str] = _Labels()


def method_order() -> tuple[str, ...]:
    """The registered merge methods in the registry's `order` (the paper's: flat geometry
    first, then curvature-aware), ties by name."""
    return tuple(sorted(METHODS, key=lambda m: (METHODS[m].order, m)))


TABLES = (
    "table2",
    "table6",
    "main",
    "per_task",
    "paired",
    "alpha_sensitivity",
    "alpha_selection",
    "data_efficiency",
    "normalised",
    "eta",
)
#: The paper's name of each table (None: the project's own).
PAPER_NAMES = {
    "table2": "Table 2",
    "table6": "Table 6",
    "main": "Table 2, all settings",
    "per_task": "Table 6, all settings",
    "alpha_sensitivity": "Tables 7–9",
    "data_efficiency": "Figure 3",
    "paired": None,
    "alpha_selection": None,
    "normalised": None,
    "eta": None,
}
#: How the θ0 row's heads were made, per `heads.source` of the config.
HEADS = {
    "train": "linear-probe heads",
    "zeroshot": "zero-shot heads",
    "import": "imported heads",
    "smoke": "random heads",
}


def theta0_label(heads: str | None = None) -> str:
    """The θ0 row's name, saying which heads it uses (`heads`: the config's heads.source)."""
    if heads is None:
        return LABELS["zeroshot"]
    if heads not in HEADS:
        raise ValueError(f"unknown heads source `{heads}` (expected one of {', '.join(HEADS)})")
    return f"θ0 + {HEADS[heads]}"


def label(method: str, heads: str | None = None) -> str:
    """The row name of a method (θ0 named with its heads where known)."""
    return theta0_label(heads) if method == "zeroshot" else LABELS.get(method, method)


@dataclass(frozen=True)
class PaperSettings:
    """The setting of the paper's Table 2, Table 6 and Figure 3 (the config's `report` block).

    k: TSV-M's and EpiMer's rank in Tables 2 and 6 and the highlighted curve of Figure 3 (the
    paper: 32); None takes the largest k of the run. fraction: the Fisher data fraction of
    Fisher averaging and EpiMer in Tables 2 and 6 (the paper: 1.0, one pass over each task's
    training set, Appendix C.2); None takes the largest of the run. alpha: EpiMer's fixed α in
    Figure 3 (the paper: 1.0, Appendix D.4). flat_alpha: Task Arithmetic's and TIES' α in
    Tables 2 and 6 (the paper: λ_t = 0.125, Appendix C.3); where the run has no such α, the
    best α on test is used and the row says so. heads: the config's heads.source, named in the
    θ0 row.
    """

    k: int | None = None
    fraction: float | None = None
    alpha: float = 1.0
    flat_alpha: float = 0.125
    heads: str | None = None

    def resolve(self, runs: Sequence[Run]) -> PaperSettings:
        """These settings with k and fraction filled in from the run's grid where None."""
        ks = [r.k for r in runs if r.k is not None]
        fs = [r.fraction for r in runs if r.fraction is not None]
        return replace(
            self,
            k=self.k if self.k is not None else (max(ks) if ks else None),
            fraction=self.fraction if self.fraction is not None else (max(fs) if fs else None),
        )

    def describe(self) -> str:
        parts = []
        if self.k is not None:
            parts.append(f"k = {self.k}")
        if self.fraction is not None:
            parts.append(f"Fisher fraction f = {self.fraction:g}")
        parts.append(f"Task Arithmetic and TIES at α = {self.flat_alpha:g}")
        return ", ".join(parts)


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


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
    V_S: float | None = None  # Theorem 2's V_S, at the Fréchet-mean minimiser
    R_S: float | None = None
    V_S_merged: float | None = None  # the same objective at the merged coordinates
    se: float | None = None  # standard error of `average` (see pipeline.report.average_se)

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
        message = f"{path}: field `{field_name}` holds {value!r}, expected a number"
        raise _artifact_error(message) from None


def read_summary(path: str | Path) -> tuple[list[str], list[Run]]:
    """The task names (in column order) and the rows of a summary.csv."""
    path = Path(path)
    if not path.is_file():
        raise _artifact_error(f"{path}: summary CSV not found")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        rows = list(reader)
    for required in (
        "method",
        "setting",
        "k",
        "alpha",
        "fraction",
        "average",
        "worst",
        "worst_task",
    ):
        if required not in fields:
            raise _artifact_error(f"{path}: column `{required}` is missing (not a summary.csv?)")
    tasks = fields[fields.index("fraction") + 1 : fields.index("average")]
    if not tasks:
        raise _artifact_error(f"{path}: no task columns between `fraction` and `average`")
    runs = []
    for row in rows:
        test = {}
        for t in tasks:
            value = _opt_float(row[t], path, t)
            if value is None:
                raise _artifact_error(
                    f"{path}: run {row['method']}/{row['setting']} has no accuracy for task `{t}`"
                )
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
                V_S_merged=_opt_float(row.get("V_S_merged"), path, "V_S_merged"),
                se=_opt_float(row.get("se"), path, "se"),
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
    order = method_order()
    return [m for m in order if m in present] + [m for m in present if m not in order]


def alpha_groups(runs: Sequence[Run]) -> dict[tuple[str, int | None, float | None], list[Run]]:
    """(method, k, fraction) → its runs in ascending α, for every run that has an α."""
    groups: dict[tuple[str, int | None, float | None], list[Run]] = {}
    for method in merge_methods(runs):
        for run in runs_of(runs, method):
            if run.alpha is not None:
                groups.setdefault(run.group, []).append(run)
    ordered = sorted(
        groups, key=lambda g: (merge_methods(runs).index(g[0]), g[1] or 0, g[2] or 0.0)
    )
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


def paper_choice(runs: Sequence[Run], method: str, paper: PaperSettings) -> tuple[Run | None, str]:
    """(run, rule): `method`'s row of Tables 2 and 6 at the (resolved) paper settings.

    Task Arithmetic and TIES: the run at α = paper.flat_alpha (the paper's λ_t = 0.125), else
    their best α on test. Every other method: its runs at k = paper.k (where the run has a k)
    and f = paper.fraction (where it has an f), the best of them on test (the paper's
    per-method optimal α). `rule` says which applied; (None, rule) when no run qualifies.
    """
    mine = runs_of(runs, method)
    if method in REFERENCES:
        return (mine[0] if mine else None), "single setting"
    if method in ("ta", "ties"):
        exact = [r for r in mine if _same(r.alpha, paper.flat_alpha)]
        if exact:
            return exact[0], f"α = {paper.flat_alpha:g} (the paper's λ_t)"
        return best_on_test(mine), f"best α on test (no α = {paper.flat_alpha:g} in this run)"
    parts = []
    if any(r.k is not None for r in mine):
        mine = [r for r in mine if r.k is None or r.k == paper.k]
        parts.append(f"k = {paper.k}")
    if any(r.fraction is not None for r in mine):
        mine = [r for r in mine if r.fraction is None or _same(r.fraction, paper.fraction)]
        parts.append(f"f = {paper.fraction:g}" if paper.fraction is not None else "f = —")
    if any(r.alpha is not None for r in mine):
        parts.append("best α on test")
    rule = ", ".join(parts) or "single setting"
    if not mine:
        return None, f"no run at {rule.removesuffix(', best α on test')}"
    return best_on_test(mine), rule


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
    shortest general form when `digits` is None, or with the format spec `fmt` when given;
    exactly in CSV), a string, or empty; `bold` marks a best value, `mark` a footnote sign (†),
    `se` a standard error shown as `value ± se` (its own column in CSV)."""

    value: float | str | None
    bold: bool = False
    mark: str = ""
    digits: int | None = 3
    se: float | None = None
    fmt: str = ""

    def text(self) -> str:
        if self.value is None:
            return "—"
        if isinstance(self.value, float):
            body = format(self.value, self.fmt) if self.fmt else _fmt(self.value, self.digits)
            if self.se is not None:
                body += f" ± {_fmt(self.se, self.digits)}"
        else:
            body = str(self.value)
        return body + self.mark

    def raw(self) -> str:
        if self.value is None:
            return ""
        return repr(self.value) if isinstance(self.value, float) else str(self.value)


def acc(run: Run | None, value: float | None = None) -> Cell:
    """An accuracy cell of `run`: its average (or `value`) with the run's standard error when
    `value` is None and summary.csv has one."""
    if run is None:
        return Cell(None)
    if value is not None:
        return Cell(value)
    return Cell(run.average, se=run.se)


def _fmt(value: float, digits: int | None) -> str:
    if not math.isfinite(value):
        return str(value)
    if digits is None:
        return f"{value:g}"
    if value != 0 and (abs(value) < 10 ** (-digits) or abs(value) >= 1e6):
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"


#: η, V_S and other diagnostics spanning decades: always in scientific notation.
SCI = ".2e"


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
            raise ValueError(
                f"table `{self.name}`: row of {len(row)} cells for {len(self.columns)} columns"
            )
        self.rows.append(row)

    def column(self, name: str) -> list[Cell]:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]

    def bold_best(
        self, columns: Iterable[str], rows: Callable[[int], bool] = lambda i: True
    ) -> None:
        """Bold the largest number of each named column among the rows `rows(i)` accepts."""
        for name in columns:
            cells = [
                c for i, c in enumerate(self.column(name)) if rows(i) and isinstance(c.value, float)
            ]
            if cells:
                top = max(c.value for c in cells)  # type: ignore[type-var]
                for c in cells:
                    c.bold = c.value == top


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table with a `###` title and the note below it; columns are
    padded to a common width, so the file also reads as a table in a terminal (`cat`)."""

    def text(c: Cell) -> str:
        t = c.text().replace("|", "\\|")
        return f"**{t}**" if c.bold else t

    cells = [list(table.columns)] + [[text(c) for c in row] for row in table.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.columns))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    lines = [f"### {table.title}", "", line(cells[0])]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [line(r) for r in cells[1:]]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The table's cells with full precision (Python's shortest round-trip float spelling); a
    column whose cells carry standard errors is followed by `{column} SE`."""
    with_se = [any(row[i].se is not None for row in table.rows) for i in range(len(table.columns))]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = []
    for name, se in zip(table.columns, with_se):
        header += [name, f"{name} SE"] if se else [name]
    writer.writerow(header)
    for row in table.rows:
        cells = []
        for c, se in zip(row, with_se):
            cells += [c.raw(), repr(c.se) if c.se is not None else ""] if se else [c.raw()]
        writer.writerow(cells)
    return buf.getvalue()


def to_html(table: Table, *more: Table) -> str:
    """A standalone HTML page with the table (and `more` below it), for the Snakemake report,
    which shows HTML inline."""

    def td(c: Cell) -> str:
        t = html.escape(c.text())
        return f"<td><b>{t}</b></td>" if c.bold else f"<td>{t}</td>"

    def section(t: Table) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
        body = "\n".join("<tr>" + "".join(td(c) for c in row) + "</tr>" for row in t.rows)
        return (
            f"<h3>{html.escape(t.title)}</h3>\n"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>\n"
            f"<p>{html.escape(t.note)}</p>\n"
        )

    style = (
        "body{font-family:sans-serif;font-size:13px;margin:1em} table{border-collapse:collapse}"
        " th,td{border:1px solid #bbb;padding:3px 6px;text-align:right;white-space:nowrap}"
        " th{background:#eee;white-space:normal;vertical-align:bottom}"
        " td:first-child,th:first-child{text-align:left} p{max-width:70em}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(table.title)}</title>"
        f"<style>{style}</style></head><body>"
        + "".join(section(t) for t in (table, *more))
        + "</body></html>\n"
    )


# --------------------------------------------------------------------------- the tables

VAL_NOTE = (
    "Chosen on validation: highest average accuracy on the validation split, "
    "reported with its test accuracy. Best on test: highest average test accuracy, "
    "the protocol of the paper's tables (an optimistic upper bound)."
)
SE_NOTE = (
    "Avg. ± SE: the standard error of the average over tasks, sqrt(Σ_t p_t(1 − p_t)/n_t)/T "
    "with p_t a task's accuracy on its n_t test images."
)


def _setting(run: Run | None) -> str | None:
    return run.setting if run is not None else None


def _paper_rows(runs: Sequence[Run], paper: PaperSettings) -> list[tuple[str, Run | None, str]]:
    """(method, run, rule) of Tables 2 and 6: θ0, each merge method, fine-tuned."""
    order = [m for m in ("zeroshot",) if reference(runs, m)] + merge_methods(runs)
    order += [m for m in ("finetuned",) if reference(runs, m)]
    return [(m, *paper_choice(runs, m, paper)) for m in order]


def _paper_note(paper: PaperSettings) -> str:
    return (
        f"At the paper's setting: {paper.describe()}; TSV-M and EpiMer at their best α on test (the paper's "
        "per-method optimal α, an upper bound rather than an estimate). Fine-tuned: each task under its own "
        "fine-tuned encoder. Bold: best merge per column. The all-settings tables beside this one choose "
        "over the whole grid. " + SE_NOTE
    )


def table2(tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None) -> Table:
    """The paper's Table 2 at its settings: per method the average and worst-task test top-1
    (rows chosen by `paper_choice`)."""
    paper = (paper or PaperSettings()).resolve(runs)
    t = Table(
        "table2",
        f"Table 2: average and worst-task top-1 at the paper's setting ({paper.describe()})",
        ["Method", "Setting", "Selection", "Avg.", "Worst", "Worst task"],
        note=_paper_note(paper),
    )
    rows = _paper_rows(runs, paper)
    for method, run, rule in rows:
        t.add(
            label(method, paper.heads),
            _setting(run),
            rule,
            acc(run),
            run.worst if run else None,
            run.worst_task if run else None,
        )
    merged = [i for i, (m, _, _) in enumerate(rows) if m not in REFERENCES]
    t.bold_best(["Avg.", "Worst"], lambda i: i in merged)
    return t


def table6(tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None) -> Table:
    """The paper's Table 6 at its settings: Table 2's rows with each task's test top-1."""
    paper = (paper or PaperSettings()).resolve(runs)
    t = Table(
        "table6",
        f"Table 6: per-task top-1 at the paper's setting ({paper.describe()})",
        ["Method", "Setting", "Selection", *tasks, "Avg."],
        note=_paper_note(paper),
    )
    rows = _paper_rows(runs, paper)
    for method, run, rule in rows:
        values = [run.test[x] for x in tasks] if run else [None for _ in tasks]
        t.add(label(method, paper.heads), _setting(run), rule, *values, acc(run))
    merged = [i for i, (m, _, _) in enumerate(rows) if m not in REFERENCES]
    t.bold_best([*tasks, "Avg."], lambda i: i in merged)
    return t


def main_table(
    tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None
) -> Table:
    """Table 2 over all settings: one row per method, average and worst-task test accuracy at
    the setting chosen on validation and at the best-on-test setting of its whole grid."""
    heads = paper.heads if paper else None
    t = Table(
        "main",
        "Table 2, all settings: average and worst-task top-1 over each method's whole grid (k, α, f)",
        [
            "Method",
            "Setting (val.)",
            "Val. avg.",
            "Avg.",
            "Worst",
            "Worst task",
            "Setting (best on test)",
            "Avg. (best on test)",
            "Worst (best on test)",
            "Worst task (best on test)",
        ],
        note=VAL_NOTE
        + " References (θ0 + heads, fine-tuned) have a single setting. Bold: best merge "
        "per column. " + SE_NOTE,
    )
    order = [m for m in ("zeroshot",) if reference(runs, m)] + merge_methods(runs)
    order += [m for m in ("finetuned",) if reference(runs, m)]
    for method in order:
        mine = runs_of(runs, method)
        val, best = choose_on_validation(mine), best_on_test(mine)
        if method in REFERENCES:
            val = best = mine[0]
        t.add(
            label(method, heads),
            _setting(val),
            val.val_average if val else None,
            acc(val),
            val.worst if val else None,
            val.worst_task if val else None,
            _setting(best),
            acc(best),
            best.worst if best else None,
            best.worst_task if best else None,
        )
    merged_rows = [i for i, m in enumerate(order) if m not in REFERENCES]
    t.bold_best(
        ["Avg.", "Worst", "Avg. (best on test)", "Worst (best on test)"], lambda i: i in merged_rows
    )
    return t


def per_task_table(
    tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None
) -> Table:
    """Table 6 over all settings: per-task test accuracy; each merge method twice (setting
    chosen on validation, setting best on test, over its whole grid), the references once."""
    heads = paper.heads if paper else None
    t = Table(
        "per_task",
        "Table 6, all settings: per-task top-1 over each method's whole grid (k, α, f)",
        ["Method", "Selected by", "Setting", *tasks, "Avg."],
        note=VAL_NOTE + " Bold: best merge per task. " + SE_NOTE,
    )
    for method in ("zeroshot",):
        if (ref := reference(runs, method)) is not None:
            t.add(label(method, heads), "—", ref.setting, *[ref.test[x] for x in tasks], acc(ref))
    first_merged = len(t.rows)
    for method in merge_methods(runs):
        mine = runs_of(runs, method)
        for how, run in (
            ("validation", choose_on_validation(mine)),
            ("best on test", best_on_test(mine)),
        ):
            if run is None:
                t.add(LABELS.get(method, method), how, None, *[None for _ in tasks], None)
            else:
                t.add(
                    LABELS.get(method, method),
                    how,
                    run.setting,
                    *[run.test[x] for x in tasks],
                    acc(run),
                )
    last_merged = len(t.rows)
    if (ref := reference(runs, "finetuned")) is not None:
        t.add(LABELS["finetuned"], "—", ref.setting, *[ref.test[x] for x in tasks], acc(ref))
    t.bold_best([*tasks, "Avg."], lambda i: first_merged <= i < last_merged)
    return t


EDGE = " ◂ edge"
EDGE_NOTE = (
    "◂ edge: the α is the smallest or the largest of its sweep's grid, so the sweep's optimum may "
    "lie outside it."
)


def at_edge(group: Sequence[Run], run: Run | None) -> bool:
    """Whether `run`'s α is the smallest or largest α of its sweep (a sweep of ≥ 2 α)."""
    alphas = [r.alpha for r in group if r.alpha is not None]
    if run is None or run.alpha is None or len(alphas) < 2:
        return False
    return _same(run.alpha, min(alphas)) or _same(run.alpha, max(alphas))


def alpha_cell(group: Sequence[Run], run: Run | None) -> Cell:
    """`run`'s α (shortest spelling), marked ◂ edge when it is at the edge of the sweep's grid."""
    if run is None:
        return Cell(None)
    return Cell(run.alpha, digits=None, mark=EDGE if at_edge(group, run) else "")


def alpha_sensitivity_table(
    tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None
) -> Table:
    """Tables 7–9: average test accuracy, one row per (method, k, fraction) sweep (in blocks of
    method and k), one column per α (the paper: TSV-M and EpiMer at k ∈ {4, 16, 32}), then
    each row's best α on test and α chosen on validation. Bold: best per row; †: the α chosen
    on validation."""
    groups = alpha_groups(runs)
    alphas = sorted({r.alpha for g in groups.values() for r in g})  # type: ignore[type-var]
    t = Table(
        "alpha_sensitivity",
        "Tables 7–9: α sensitivity, average test top-1 per global scale α",
        ["Method", "k", "f", *[f"α={a:g}" for a in alphas], "Best α (test)", "α (val.)"],
        note="One row per sweep. Bold: best α of the row on test (the paper's protocol). †: the α "
        "chosen on validation for that row. —: α not in that sweep's grid. " + EDGE_NOTE,
    )
    for (method, k, fraction), group in groups.items():
        chosen = choose_on_validation(group)
        best = best_on_test(group)
        cells: list[Cell | float | str | None] = [
            LABELS.get(method, method),
            str(k) if k is not None else None,
            Cell(fraction, digits=None) if fraction is not None else None,
        ]
        for alpha in alphas:
            run = at_alpha(group, alpha)
            top = run is not None and best is not None and run.average == best.average
            mark = "†" if run is not None and run is chosen else ""
            cells.append(Cell(run.average if run else None, bold=top, mark=mark))
        cells += [alpha_cell(group, best), alpha_cell(group, chosen)]
        t.add(*cells)
    return t


def alpha_selection_table(
    tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None
) -> Table:
    """Per (method, k, fraction): the α chosen on validation and its test accuracy, beside the
    best-on-test α; the gap is what choosing on test would overstate."""
    t = Table(
        "alpha_selection",
        "α chosen on validation vs. best α on test (not in the paper)",
        [
            "Method",
            "k",
            "f",
            "α (val.)",
            "Val. avg. at α (val.)",
            "Test avg. at α (val.)",
            "Test worst at α (val.)",
            "α (best on test)",
            "Test avg. at α (best on test)",
            "Gap (test)",
        ],
        note="α (val.) maximises the validation average and never reads test labels. "
        "α (best on test) is the paper's protocol. Gap = test avg. at α (best on test) − test avg. "
        "at α (val.). " + EDGE_NOTE,
    )
    for (method, k, fraction), group in alpha_groups(runs).items():
        val, best = choose_on_validation(group), best_on_test(group)
        if best is None:  # groups are never empty; keeps the type checker honest
            continue
        t.add(
            LABELS.get(method, method),
            str(k) if k is not None else None,
            Cell(fraction, digits=None) if fraction is not None else None,
            alpha_cell(group, val),
            val.val_average if val else None,
            acc(val),
            val.worst if val else None,
            alpha_cell(group, best),
            acc(best),
            (best.average - val.average) if val else None,
        )
    return t


def at_alpha(group: Sequence[Run], alpha: float) -> Run | None:
    """The run of an α sweep at exactly `alpha` (None when the sweep lacks it)."""
    return next((r for r in group if _same(r.alpha, alpha)), None)


def data_efficiency_table(
    tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None
) -> Table:
    """Figure 3 as a table: average test top-1 per Fisher data fraction f for Fisher averaging
    and, per k, EpiMer at the fixed α = paper.alpha (the paper: k = 32, α = 1.0, Appendix D.4;
    no α is chosen per f). The column of k = paper.k is the paper's curve."""
    paper = (paper or PaperSettings()).resolve(runs)
    fractions = sorted(
        {r.fraction for r in runs if r.method in ("fisher", "epimer") and r.fraction is not None}
    )
    ks = sorted({r.k for r in runs_of(runs, "epimer") if r.k is not None})
    columns = ["f"]
    if runs_of(runs, "fisher"):
        columns.append("Fisher averaging")
    names = {
        k: f"EpiMer k={k}, α={paper.alpha:g}" + (" (Figure 3)" if k == paper.k else "") for k in ks
    }
    columns += list(names.values())
    t = Table(
        "data_efficiency",
        f"Figure 3: Fisher data efficiency, average test top-1 vs. data fraction f (EpiMer at α = {paper.alpha:g})",
        columns,
        note="f: fraction of each task's training split behind its Fisher diagonal. EpiMer at the fixed "
        f"α = {paper.alpha:g} at every f, as the paper's Figure 3 (k = 32, α = 1.0); the column marked (Figure 3) "
        f"is k = {paper.k}, the report's paper_k. —: no EpiMer merge at that α. Fisher averaging at each f.",
    )
    groups = alpha_groups(runs)
    for f in fractions:
        cells: list[Cell | float | str | None] = [Cell(f, digits=None)]
        if "Fisher averaging" in columns:
            fisher = [r for r in runs_of(runs, "fisher") if _same(r.fraction, f)]
            run = best_on_test(fisher) if len(fisher) > 1 else (fisher[0] if fisher else None)
            cells.append(run.average if run else None)
        for k in ks:
            run = at_alpha(groups.get(("epimer", k, f), []), paper.alpha)
            cells.append(run.average if run else None)
        t.add(*cells)
    return t


def normalised_table(
    tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None
) -> Table:
    """Normalised accuracy: test accuracy of each encoder divided by each task's fine-tuned
    accuracy, per task, and their mean (merge methods at their setting chosen on validation)."""
    t = Table(
        "normalised",
        "Normalised accuracy (merged / fine-tuned; not in the paper)",
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
        t.add(
            label(method, paper.heads if paper else None),
            how,
            run.setting,
            *ratios,
            sum(finite) / len(finite) if finite else None,
        )
    return t


def normalised(accuracy: float, finetuned: float) -> float | None:
    """accuracy / finetuned, or None when the fine-tuned accuracy is 0."""
    return accuracy / finetuned if finetuned > 0 else None


def eta_table(
    tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None
) -> Table:
    """η (curvature heterogeneity, Theorem 3) and V_S (Theorem 2, at the Fréchet-mean
    minimiser) per (k, f) with EpiMer's and TSV-M's average test accuracy at their α chosen on
    validation and the margin between them."""
    t = Table(
        "eta",
        "Curvature heterogeneity η, V_S and EpiMer's margin over TSV-M (not a table of the paper)",
        ["k", "f", "η", "V_S", "EpiMer avg.", "TSV-M avg.", "EpiMer − TSV-M"],
        note="η = cᵀ H̄⁻¹ c and V_S = C − bᵀ H̄⁻¹ b (the irreducible conflict at the Fréchet-mean minimiser), "
        "each summed over layers; neither depends on α. Accuracies at the α chosen on validation for "
        "each column (best on test where no validation accuracy exists).",
    )
    groups = alpha_groups(runs)
    for (method, k, f), group in groups.items():
        if method != "epimer":
            continue
        ep = choose_on_validation(group) or best_on_test(group)
        ts_group = groups.get(("tsvm", k, None), [])
        ts = choose_on_validation(ts_group) or best_on_test(ts_group)
        eta = next((r.eta for r in group if r.eta is not None), None)
        v_s = next((r.V_S for r in group if r.V_S is not None), None)
        t.add(
            str(k),
            Cell(f, digits=None) if f is not None else None,
            Cell(eta, fmt=SCI),
            Cell(v_s, fmt=SCI),
            ep.average if ep else None,
            ts.average if ts else None,
            (ep.average - ts.average) if ep and ts else None,
        )
    return t


def read_paired(path: str | Path) -> list[dict[str, str]] | None:
    """The rows of a paired.csv (written beside summary.csv by `pipeline report`), or None when
    the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def paired_table(paired: Sequence[Mapping[str, str]] | None) -> Table:
    """Each merge method's chosen setting vs. TSV-M's on the same test images: the difference
    of their average test top-1 with its paired standard error (rows of paired.csv)."""
    t = Table(
        "paired",
        "Paired differences vs. TSV-M on the same test images (not in the paper)",
        ["Method", "Setting", "vs.", "Setting (vs.)", "Δ avg. ± paired SE", "Images", "Note"],
        note="Each merge method at its setting chosen on validation (best on test without "
        "validation accuracies) against TSV-M at its own, image by image: Δ = mean over tasks of "
        "the mean per-image difference of correctness; paired SE = sqrt(Σ_t var(d_t)/n_t)/T. "
        "Positive: the method is ahead of TSV-M. Needs the evaluation CSVs' `correct` column.",
    )
    if paired is None:
        t.add("—", None, None, None, None, None, "not available: no paired.csv beside summary.csv")
        return t
    if not paired:
        t.add("—", None, None, None, None, None, "not available: the run has no TSV-M merge")
    for row in paired:
        diff = float(row["difference"]) if row.get("difference") else None
        se = float(row["se"]) if row.get("se") else None
        note = row.get("note") or ""
        t.add(
            LABELS.get(row["method"], row["method"]),
            row["setting"],
            LABELS.get(row["versus"], row["versus"]),
            row["versus_setting"],
            Cell(diff, se=se, fmt="+.3f") if diff is not None else None,
            row.get("images") or None,
            f"not available: {note}" if note else "",
        )
    return t


BUILDERS: dict[str, Callable[[Sequence[str], Sequence[Run], PaperSettings | None], Table]] = {
    "table2": table2,
    "table6": table6,
    "main": main_table,
    "per_task": per_task_table,
    "alpha_sensitivity": alpha_sensitivity_table,
    "alpha_selection": alpha_selection_table,
    "data_efficiency": data_efficiency_table,
    "normalised": normalised_table,
    "eta": eta_table,
}


def build_tables(
    tasks: Sequence[str],
    runs: Sequence[Run],
    paper: PaperSettings | None = None,
    paired: Sequence[Mapping[str, str]] | None = None,
) -> list[Table]:
    """Every table, in the order of TABLES (`paper`: the settings of Tables 2 and 6 and Figure 3;
    `paired`: the rows of paired.csv, None when there is none)."""
    return [
        paired_table(paired) if name == "paired" else BUILDERS[name](tasks, runs, paper)
        for name in TABLES
    ]


def summary_tables(path: str | Path) -> tuple[Table, Table]:
    """summary.csv as two tables for the report's HTML view, each narrower than the report's
    pane at paper scale: the accuracies (3 decimals) and the diagnostics (scientific notation),
    both keyed by method and setting."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        body = list(reader)
    diagnostics = ["eta", "V_S", "V_S_merged", "R_S", "amplification_min", "amplification_max"]
    diagnostics = [c for c in diagnostics if c in header]
    key = ["method", "setting"]
    # k, α and f are spelled in `setting` (k32_a1.0_f0.05): the view leaves their columns out.
    accuracy = [c for c in header if c not in diagnostics and c not in ("k", "alpha", "fraction")]
    name = Path(path).name
    tables = (
        Table(
            "summary",
            f"{name}: accuracies of every evaluated encoder",
            accuracy,
            note="Top-1 in [0, 1]; se: the standard error of `average`; val_*: validation split.",
        ),
        Table(
            "summary_diagnostics",
            f"{name}: merge diagnostics",
            key + diagnostics,
            note="η, V_S, V_S_merged, R_S summed over layers; amplification per task, its range.",
        ),
    )
    text_columns = {"method", "setting", "worst_task"}
    for row in body:
        values = dict(zip(header, row))
        for table in tables:
            cells: list[Cell | float | str | None] = []
            for column in table.columns:
                value = values.get(column, "")
                if value == "" or column in text_columns:
                    cells.append(value or None)
                    continue
                try:
                    number = float(value)
                except ValueError:
                    cells.append(value)
                    continue
                sci = column in diagnostics and not column.startswith("amplification")  # ratios ≈ 1
                cells.append(Cell(number, fmt=SCI) if sci else Cell(number))
            table.add(*cells)
    return tables


def write_tables(
    summary: str | Path, out_dir: str | Path, paper: PaperSettings | None = None
) -> list[Path]:
    """Write {name}.md, {name}.csv and {name}.html for every table, plus tables.md with all of
    them (the paper's tables first, then the all-settings ones) and summary.html (summary.csv
    as a page), into `out_dir`; returns the paths written. The paired table reads paired.csv
    beside `summary` where it exists."""
    from pipeline.store import atomic_path

    tasks, runs = read_summary(summary)
    out = Path(out_dir)
    written = []
    tables = build_tables(tasks, runs, paper, read_paired(Path(summary).with_name("paired.csv")))
    page = out / "summary.html"
    with atomic_path(page) as tmp:
        tmp.write_text(to_html(*summary_tables(summary)), encoding="utf-8")
    written.append(page)
    for table in tables:
        for suffix, render in ((".md", to_markdown), (".csv", to_csv), (".html", to_html)):
            path = out / f"{table.name}{suffix}"
            with atomic_path(path) as tmp:
                tmp.write_text(render(table), encoding="utf-8")
            written.append(path)
    index = out / "tables.md"
    with atomic_path(index) as tmp:
        tmp.write_text(
            f"# Results tables\n\nFrom `{Path(summary).name}`; accuracies are top-1 in [0, 1]. Tables 2 and 6 "
            "first at the paper's setting, then over all settings (labelled), then the paper's Tables 7–9 and "
            "Figure 3 and the project's own tables.\n\n"
            + "\n".join(to_markdown(t) for t in tables),
            encoding="utf-8",
        )
    written.append(index)
    return written
