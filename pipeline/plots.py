"""Figures of a run, drawn from summary.csv (and the merge reports, the landscape artifact).

Every figure function takes plain data (the rows of `pipeline.tables`, per-layer η, a
`Landscape`) and returns a matplotlib Figure; `save_figure` writes it as PNG and SVG.
matplotlib is imported inside the functions (it takes about a second to import, and most
stages never draw), always with the Agg backend, through `Figure` objects rather than
pyplot's global state.

Figures of the paper: `data_efficiency` is Figure 3 (accuracy vs Fisher data fraction, EpiMer
at the fixed α of the paper's setting, k = paper_k its curve) and `alpha_sweep` draws Tables
7–9 as curves. The others are the project's own: where they show one setting per merge
method it is the one chosen on validation (see pipeline.tables); where a run has no
validation accuracies the best setting on test is used and the legend says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.methods.registry import METHODS
from pipeline.tables import (
    LABELS,
    PaperSettings,
    Run,
    alpha_groups,
    at_alpha,
    at_edge,
    best_on_test,
    choose_on_validation,
    chosen_settings,
    label,
    normalised,
    reference,
    runs_of,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pipeline.landscape import Landscape

#: The two references' colours; every merge method's comes from its registry row.
REFERENCE_COLOURS = {"zeroshot": "#444444", "finetuned": "#7b3294"}


class _Colours(Mapping[str, str]):
    """method → its colour in every figure: the references, then the method registry (read at
    each lookup, so a row registered at run time draws in its colour)."""

    def _all(self) -> dict[str, str]:
        return {**REFERENCE_COLOURS, **{m: meth.colour for m, meth in METHODS.items()}}

    def __getitem__(self, key: str) -> str:
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


COLOURS: Mapping[str, str] = _Colours()
#: The widest figure in inches: at the report's default 120 dpi 1,100 px, the width of the
#: report's content pane in a 1,400 px window, so the report shows it at full size instead of
#: shrinking its tick labels.
MAX_WIDTH = 9.2
PLOTS = ("alpha_sweep", "data_efficiency", "per_task", "normalised", "eta_per_layer", "eta_vs_k")
FORMATS = ("png", "svg")


def _new_figure(
    ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 4.0
) -> tuple[Figure, Any]:
    """A Figure with an nrows × ncols array of axes (always 2-D), on the Agg canvas."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(
    fig: Figure, out_dir: str | Path, name: str, formats: Sequence[str] = FORMATS, dpi: int = 120
) -> list[Path]:
    """Write `{out_dir}/{name}.{fmt}` for each format atomically; returns the paths."""
    from pipeline.store import atomic_path

    paths = []
    for fmt in formats:
        if fmt not in ("png", "svg", "pdf"):
            raise ValueError(f"unknown figure format `{fmt}` for {name}; use png, svg or pdf")
        path = Path(out_dir) / f"{name}.{fmt}"
        # No timestamps and no random SVG ids in the files: the same data gives the same bytes.
        meta = {"Date": None} if fmt in ("svg", "pdf") else {"Software": None}
        import matplotlib

        with matplotlib.rc_context({"svg.hashsalt": name}), atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)
        paths.append(path)
    return paths


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()


def _reference_lines(ax: Any, runs: Sequence[Run], heads: str | None = None) -> None:
    """Dashed horizontal lines at the θ0 and fine-tuned average test accuracy."""
    for method in ("finetuned", "zeroshot"):
        if (ref := reference(runs, method)) is not None:
            ax.axhline(
                ref.average,
                color=COLOURS[method],
                ls="--",
                lw=1,
                label=f"{label(method, heads)} ({ref.average:.3f})",
            )


def _labelled_references(
    ax: Any, runs: Sequence[Run], lo: float, hi: float, heads: str | None
) -> None:
    """θ0 and fine-tuned as labelled dashed lines where they fall in [lo, hi]; outside it a
    label at the panel's top or bottom edge says where they are (↑ above, ↓ below)."""
    for method in ("finetuned", "zeroshot"):
        ref = reference(runs, method)
        if ref is None:
            continue
        text = f"{label(method, heads)} {ref.average:.3f}"
        colour = COLOURS[method]
        if lo <= ref.average <= hi:
            ax.axhline(ref.average, color=colour, ls="--", lw=1)
            upper = ref.average > (lo + hi) / 2  # the label on the side facing the panel's middle
            ax.text(
                0.01,
                ref.average,
                f" {text}",
                transform=ax.get_yaxis_transform(),
                fontsize=7,
                color=colour,
                va="top" if upper else "bottom",
                ha="left",
                in_layout=False,
            )
        else:
            above = ref.average > hi
            ax.text(
                0.99,
                0.98 if above else 0.02,
                f"{text} {'↑ above' if above else '↓ below'} range",
                transform=ax.transAxes,
                fontsize=7,
                color=colour,
                ha="right",
                va="top" if above else "bottom",
                in_layout=False,
            )


def _zoom(bests: Sequence[float]) -> tuple[float, float]:
    """The y-range of an α-sweep panel: every line's best value, with a margin of half their
    spread (at least 0.02) on each side; values far below (a collapse at large α) leave it."""
    top, bottom = max(bests), min(bests)
    pad = max(0.02, 0.5 * (top - bottom))
    return max(0.0, bottom - pad), min(1.0, top + pad)


def _selection_note(runs: Sequence[Run]) -> str:
    have_val = any(
        r.val_average is not None for r in runs if r.method not in ("zeroshot", "finetuned")
    )
    return (
        "○ = α chosen on validation" if have_val else "no validation accuracies: ○ = best α on test"
    )


# --------------------------------------------------------------------------- from summary.csv


def _sweep_style(
    method: str, f: float | None, fractions: Sequence[float]
) -> tuple[dict[str, Any], str]:
    """A sweep line's style and legend name: EpiMer's shaded by its data fraction among
    `fractions`, every other method in its colour."""
    if method == "epimer" and f in fractions:
        shade = 0.35 + 0.65 * (fractions.index(f) + 1) / len(fractions)
        style = dict(color=COLOURS["epimer"], alpha=shade, marker="s")
        return style, f"{LABELS['epimer']} f={f:g}"
    style = dict(color=COLOURS.get(method, "k"), marker="o" if method == "tsvm" else ".")
    return style, LABELS.get(method, method) + (f" f={f:g}" if f is not None else "")


def _sweep_marks(ax: Any, group: Sequence[Run], lo: float, style: Mapping[str, Any]) -> None:
    """A sweep line's marks: ▾ at the bottom edge for points below the panel's range `lo`, a
    hollow circle at the α chosen on validation, ◂ or ▸ where the best α on test is at the
    grid's edge."""

    xs, ys = [r.alpha for r in group], [r.average for r in group]
    below = [x for x, y in zip(xs, ys) if y < lo]
    ax.plot(
        below,
        [lo] * len(below),
        ls="none",
        marker="v",
        ms=5,
        color=style["color"],
        alpha=style.get("alpha", 1.0),
        clip_on=False,
        in_layout=False,
    )
    pick = choose_on_validation(group) or best_on_test(group)
    if pick is not None:
        ax.plot(
            [pick.alpha],
            [pick.average],
            marker="o",
            ms=11,
            mfc="none",
            mec=style["color"],
            mew=1.5,
            ls="none",
        )
    best = best_on_test(group)
    if best is not None and at_edge(group, best):
        lowest = best.alpha == min(xs)
        ax.plot(
            [best.alpha],
            [best.average],
            ls="none",
            marker="<" if lowest else ">",
            ms=8,
            color=style["color"],
            clip_on=False,
            in_layout=False,
        )


def alpha_sweep_figure(
    tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None
) -> Figure:
    """Tables 7–9 as curves. Average test top-1 vs α: one panel per k (TSV-M and EpiMer at that
    k, one EpiMer line per data fraction), the sweeps without k in every panel; a hollow
    circle marks each line's α chosen on validation. Each panel's y-range spans the lines'
    best values (`_zoom`): points below it are marked ▾ at the bottom edge, θ0 and fine-tuned
    are labelled lines or, off the range, labels at the edge. Two panels per row, the legend
    outside them."""
    groups = alpha_groups(runs)
    ks = sorted({k for (_, k, _) in groups if k is not None})
    panels = ks or [None]
    ncols = min(2, len(panels))
    fig, axes = _new_figure(
        ncols=ncols, nrows=math.ceil(len(panels) / ncols), width=MAX_WIDTH / ncols, height=3.4
    )
    if not groups:
        _empty(axes[0, 0], "no method with a global scale α in this run")
        return fig
    heads = paper.heads if paper else None
    legend: dict[str, Any] = {}
    for ax, k in zip(axes.flat, panels):
        fractions = sorted(
            {f for (m, kk, f) in groups if m == "epimer" and kk == k and f is not None}
        )
        mine = {g: group for g, group in groups.items() if g[1] in (None, k)}
        lo, hi = _zoom([max(r.average for r in group) for group in mine.values()])
        for (method, _, f), group in mine.items():
            style, name = _sweep_style(method, f, fractions)
            xs, ys = [r.alpha for r in group], [r.average for r in group]
            (line,) = ax.plot(xs, ys, lw=1.5, ms=4, label=name, **style)
            _sweep_marks(ax, group, lo, style)
            legend.setdefault(name, line)
        ax.set_ylim(lo, hi)
        _labelled_references(ax, runs, lo, hi, heads)
        ax.set_title(f"k = {k}" if k is not None else "global scale α", fontsize=10)
        ax.set_xlabel("α")
        ax.set_ylabel("average test top-1")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    note = _selection_note(runs) + "\n◂ ▸ = best α at the grid's edge\n▾ = below the panel's range"
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="outside right upper",
        fontsize=8,
        title=note,
        title_fontsize=8,
    )
    fig.suptitle(
        "Tables 7–9: average test accuracy of each merge vs. its global scale α", fontsize=11
    )
    return fig


def data_efficiency_figure(
    tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None
) -> Figure:
    """Figure 3: average test top-1 vs the Fisher data fraction f (log axis) for Fisher
    averaging and EpiMer per k at the fixed α = paper.alpha (the paper: k = 32, α = 1.0; the
    line of k = paper.k is drawn bold); TSV-M (no Fisher) as a flat line at its setting chosen
    on validation."""
    paper = (paper or PaperSettings()).resolve(runs)
    fig, axes = _new_figure(width=MAX_WIDTH, height=4.2)
    ax = axes[0, 0]
    fisher = sorted(
        (r for r in runs_of(runs, "fisher") if r.fraction is not None), key=lambda r: r.fraction
    )  # type: ignore[arg-type, return-value]
    groups = alpha_groups(runs)
    epimer = {(k, f): g for (m, k, f), g in groups.items() if m == "epimer"}
    if not fisher and not epimer:
        _empty(ax, "no Fisher-based method (fisher, epimer) in this run")
        return fig
    if fisher:
        ax.plot(
            [r.fraction for r in fisher],
            [r.average for r in fisher],
            marker="o",
            color=COLOURS["fisher"],
            label="Fisher averaging",
        )
    ks = sorted({k for k, _ in epimer})
    for i, k in enumerate(ks):
        pts = []
        for (kk, f), group in sorted(epimer.items(), key=lambda kv: kv[0][1]):
            if kk == k and (run := at_alpha(group, paper.alpha)) is not None:
                pts.append((f, run.average))
        if not pts:
            continue
        shade = 0.35 + 0.65 * (i + 1) / len(ks)
        main = k == paper.k
        name = f"EpiMer k={k}, α={paper.alpha:g}" + (" (Figure 3)" if main else "")
        ax.plot(
            *zip(*pts),
            marker="s",
            color=COLOURS["epimer"],
            alpha=1.0 if main else shade,
            lw=2.5 if main else 1.2,
            label=name,
        )
    tsvm = runs_of(runs, "tsvm")
    if tsvm and (pick := choose_on_validation(tsvm) or best_on_test(tsvm)) is not None:
        ax.axhline(
            pick.average,
            color=COLOURS["tsvm"],
            ls=":",
            lw=1.5,
            label=f"TSV-M {pick.setting} (no Fisher)",
        )
    if (
        zs := reference(runs, "zeroshot")
    ) is not None:  # fine-tuned is left out: it would squash the curves
        ax.axhline(
            zs.average,
            color=COLOURS["zeroshot"],
            ls="--",
            lw=1,
            label=f"{label('zeroshot', paper.heads)} ({zs.average:.3f})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("Fisher data fraction f (log scale)")
    ax.set_ylabel("average test top-1")
    ax.grid(alpha=0.3, which="both")
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside right upper")
    ax.set_title(
        f"Figure 3: accuracy vs. data fraction f of the Fisher diagonal (EpiMer at α = {paper.alpha:g})",
        fontsize=10,
    )
    return fig


def _chosen_rows(runs: Sequence[Run], heads: str | None = None) -> list[tuple[str, str, Run]]:
    """(method, label, run): θ0, each merge at its chosen setting, fine-tuned."""
    rows = []
    if (zs := reference(runs, "zeroshot")) is not None:
        rows.append(("zeroshot", label("zeroshot", heads), zs))
    for method, (run, how) in chosen_settings(runs).items():
        suffix = "" if how == "validation" else ", best on test"
        rows.append((method, f"{LABELS.get(method, method)} ({run.setting}{suffix})", run))
    if (ft := reference(runs, "finetuned")) is not None:
        rows.append(("finetuned", LABELS["finetuned"], ft))
    return rows


def _grouped_bars(
    ax: Any, groups: Sequence[str], series: Sequence[tuple[str, str, Sequence[float | None]]]
) -> None:
    """Bars: one group per entry of `groups`, one bar per series (method, label, values)."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (method, name, values) in enumerate(series):
        heights = [v if v is not None else np.nan for v in values]
        ax.bar(
            x - 0.4 + (i + 0.5) * width,
            heights,
            width,
            label=name,
            color=COLOURS.get(method, None),
        )
    ax.set_xticks(x, groups, rotation=30, ha="right")


def _bars_figure(tasks: Sequence[str]) -> tuple[Figure, Any]:
    """A figure and its axes for bars per task and one summary group, wide enough for them."""
    fig, axes = _new_figure(width=min(MAX_WIDTH, max(7.0, 1.1 * (len(tasks) + 1))), height=4.5)
    return fig, axes[0, 0]


def _finish_bars(fig: Figure, ax: Any, ylabel: str, title: str) -> None:
    """A bar figure's y label, grid, legend below the axes and title."""
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, ncols=3, loc="outside lower center")
    ax.set_title(title, fontsize=10)


def per_task_figure(
    tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None
) -> Figure:
    """Test top-1 per task: θ0 + heads, each merge at its setting chosen on validation, and
    the fine-tuned models (each task under its own fine-tuned encoder)."""
    fig, ax = _bars_figure(tasks)
    rows = _chosen_rows(runs, paper.heads if paper else None)
    _grouped_bars(
        ax,
        [*tasks, "average"],
        [(m, name, [*(r.test[t] for t in tasks), r.average]) for m, name, r in rows],
    )
    ax.set_ylim(0, 1.0)
    _finish_bars(
        fig,
        ax,
        "test top-1",
        "Per-task test accuracy, merges at the setting chosen on validation (not a figure of the paper)",
    )
    return fig


def normalised_figure(
    tasks: Sequence[str], runs: Sequence[Run], paper: PaperSettings | None = None
) -> Figure:
    """Normalised accuracy (test top-1 / the task's fine-tuned top-1) per task and its mean,
    for θ0 + heads and each merge at its setting chosen on validation; 1.0 = fine-tuned."""
    fig, ax = _bars_figure(tasks)
    ft = reference(runs, "finetuned")
    if ft is None:
        _empty(ax, "no fine-tuned reference in this run")
        return fig
    series = []
    for method, name, run in _chosen_rows(runs, paper.heads if paper else None):
        if method == "finetuned":
            continue
        ratios = [normalised(run.test[t], ft.test[t]) for t in tasks]
        finite = [r for r in ratios if r is not None]
        series.append((method, name, [*ratios, sum(finite) / len(finite) if finite else None]))
    _grouped_bars(ax, [*tasks, "mean"], series)
    ax.axhline(1.0, color=COLOURS["finetuned"], ls="--", lw=1, label="fine-tuned = 1")
    _finish_bars(
        fig,
        ax,
        "test top-1 / fine-tuned top-1",
        "Normalised accuracy: merged / fine-tuned, per task (not a figure of the paper)",
    )
    return fig


def eta_vs_k_figure(tasks: Sequence[str], runs: Sequence[Run]) -> Figure:
    """Left: total η (log scale) vs k, one line per Fisher fraction. Right: EpiMer's margin over
    TSV-M in average test top-1 vs k (both at their α chosen on validation)."""
    fig, axes = _new_figure(ncols=2, width=MAX_WIDTH / 2, height=4.0)
    groups = alpha_groups(runs)
    epimer = {(k, f): g for (m, k, f), g in groups.items() if m == "epimer"}
    if not epimer:
        _empty(axes[0, 0], "no EpiMer runs in this run")
        _empty(axes[0, 1], "")
        return fig
    fractions = sorted({f for _, f in epimer if f is not None})
    for i, f in enumerate(fractions):
        ks = sorted(k for k, ff in epimer if ff == f)
        eta = [next((r.eta for r in epimer[(k, f)] if r.eta is not None), math.nan) for k in ks]
        shade = 0.35 + 0.65 * (i + 1) / len(fractions)
        axes[0, 0].plot(ks, eta, marker="s", color=COLOURS["epimer"], alpha=shade, label=f"f={f:g}")
        margins = []
        for k in ks:
            ep = choose_on_validation(epimer[(k, f)]) or best_on_test(epimer[(k, f)])
            ts_group = groups.get(("tsvm", k, None), [])
            ts = choose_on_validation(ts_group) or best_on_test(ts_group)
            margins.append(ep.average - ts.average if ep and ts else math.nan)
        axes[0, 1].plot(
            ks, margins, marker="s", color=COLOURS["epimer"], alpha=shade, label=f"f={f:g}"
        )
    ax = axes[0, 0]
    if all(r.eta and r.eta > 0 for g in epimer.values() for r in g):
        ax.set_yscale("log")
    ax.set_xlabel("k (per-task rank)")
    ax.set_ylabel("η (summed over layers)")
    ax.set_title("Curvature heterogeneity η vs. k")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="Fisher fraction", title_fontsize=8)
    ax = axes[0, 1]
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("k (per-task rank)")
    ax.set_ylabel("EpiMer − TSV-M (average test top-1)")
    ax.set_title("EpiMer's margin over TSV-M vs. k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="Fisher fraction", title_fontsize=8)
    for ax in axes[0]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


# --------------------------------------------------------------------------- from the merge reports


def short_layer(name: str) -> str:
    """`transformer.resblocks.3.mlp.c_fc.weight` → `3.mlp.c_fc`; other names unchanged but for `.weight`."""
    s = name.replace("transformer.resblocks.", "").removesuffix(".weight")
    return s


def layer_eta_from_reports(
    paths: Sequence[str | Path],
) -> dict[tuple[int, float], dict[str, float]]:
    """(k, f) → layer → η from the merge reports of EpiMer artifacts `.../epimer/k{k}_a{α}_f{f}.zarr`
    (η does not depend on α: the first artifact of each (k, f) is read); other paths are skipped."""
    from pipeline.report import parse_setting
    from pipeline.store import open_tensors

    out: dict[tuple[int, float], dict[str, float]] = {}
    for path in map(Path, paths):
        if path.parent.name != "epimer":
            continue
        setting = parse_setting(path.name.removesuffix(".zarr"))
        key = (setting.get("k"), setting.get("fraction"))
        if None in key or key in out:
            continue
        with open_tensors(path) as reader:
            layers = reader.attrs().get("report", {}).get("layers", {})
        out[key] = {name: float(v["eta"]) for name, v in layers.items() if "eta" in v}  # type: ignore[index]
    return out


def eta_per_layer_figure(layer_eta: Mapping[tuple[int, float], Mapping[str, float]]) -> Figure:
    """η per matrix layer (log scale): one panel per Fisher fraction f, one line per k.
    layer_eta: (k, f) → layer name → η of that layer (from an EpiMer merge report)."""
    fractions = sorted({f for _, f in layer_eta})
    # One panel per row: a panel's width is the report's, so 50 layer names stay legible.
    fig, axes = _new_figure(nrows=max(1, len(fractions)), width=MAX_WIDTH, height=3.4)
    if not layer_eta:
        _empty(axes[0, 0], "no EpiMer merge reports with per-layer η in this run")
        return fig
    layers = list(dict.fromkeys(name for d in layer_eta.values() for name in d))
    ks = sorted({k for k, _ in layer_eta})
    positive = all(v > 0 for d in layer_eta.values() for v in d.values())
    for ax, f in zip(axes[:, 0], fractions):
        for i, k in enumerate(ks):
            if (k, f) not in layer_eta:
                continue
            d = layer_eta[(k, f)]
            shade = 0.35 + 0.65 * (i + 1) / len(ks)
            ax.plot(
                range(len(layers)),
                [d.get(n, math.nan) for n in layers],
                marker=".",
                color=COLOURS["epimer"],
                alpha=shade,
                label=f"k={k}",
            )
        ax.set_xticks(range(len(layers)), [short_layer(n) for n in layers], rotation=90, fontsize=6)
        if positive:
            ax.set_yscale("log")
        ax.set_title(f"Fisher fraction f={f:g}")
        ax.set_ylabel("η of the layer")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Curvature heterogeneity η per matrix layer")
    return fig


# --------------------------------------------------------------------------- loss landscape


def _landscape_contours(ax: Any, ls: Landscape, task: str, own_figure: bool) -> None:
    """Filled contours of `task`'s loss on the grid, white contour lines and a colour bar."""
    loss = ls.loss[ls.tasks.index(task)]
    # Levels from the minimum to the 90th percentile: the basin stays readable when far
    # corners of the grid have a much higher loss (those are clipped to the top colour).
    lo, hi = float(np.nanmin(loss)), float(np.nanpercentile(loss, 90))
    levels = np.linspace(lo, hi if hi > lo else lo + 1e-6, 15)
    A, B = np.meshgrid(ls.a, ls.b)
    cs = ax.contourf(A, B, np.clip(loss, None, levels[-1]), levels=levels, cmap="viridis")
    ax.contour(A, B, loss, levels=levels[::2], colors="white", linewidths=0.4, alpha=0.6)
    cbar = ax.figure.colorbar(cs, ax=ax, shrink=0.9, format="%.3g", ticks=levels[::3])
    cbar.ax.tick_params(labelsize=7)
    cbar.set_label(f"{task} loss (cross-entropy)" if own_figure else "loss", fontsize=8)


def _name_direction(ls: Landscape, i: int) -> tuple[float, float]:
    """The unit direction in which θ_i's name is printed: away from the centre of the
    fine-tuned models, so that names spread outwards, or, next to another model, away from
    that neighbour, so that the two names go to opposite sides instead of printing over each
    other."""
    centre = ls.points[1:].mean(axis=0)
    span = float(np.ptp(ls.points, axis=0).max()) or 1.0
    here = ls.points[1 + i]
    others = np.delete(ls.points[1:], i, axis=0)
    gaps = np.hypot(*(others - here).T) if len(others) else np.array([np.inf])
    near = gaps.min() < 0.08 * span
    direction = here - (others[gaps.argmin()] if near else centre)
    norm = float(np.hypot(*direction))
    dx, dy = (direction / norm) if norm > 1e-9 * span else (0.0, 1.0)
    return dx, dy


def _mark_finetuned(ax: Any, ls: Landscape, task: str) -> None:
    """Every θ_t, named; `task`'s own larger and in red."""
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    for i, other in enumerate(ls.tasks):
        a, b = ls.points[1 + i]
        own = other == task
        ax.plot(
            a,
            b,
            marker="o",
            ms=10 if own else 6,
            color="red" if own else "white",
            mec="black",
            ls="none",
            zorder=3,
            label=f"θ_t fine-tuned (red: {task}'s own)" if i == 0 else None,
        )
        dx, dy = _name_direction(ls, i)
        ax.annotate(
            other,
            (a, b),
            textcoords="offset points",
            xytext=(9 * dx, 9 * dy),
            fontsize=7,
            color="red" if own else "white",
            path_effects=outline,
            zorder=5,
            ha="left" if dx >= 0 else "right",
            va="bottom" if dy >= 0 else "top",
        )


def _mark_theta0_and_merges(
    ax: Any, ls: Landscape, merged: Sequence[tuple[str, str, float, float]]
) -> None:
    """θ0 as a star, labelled with its distance off the plane, and each merge in its method's
    colour. θ0 is larger than every merge marker and under them: merges often project next to
    it, and each stays visible, the merges inside the star's outline."""
    off0 = float(ls.off_plane[0]) if len(ls.off_plane) else math.nan
    ax.plot(
        *ls.points[0],
        marker="*",
        ms=20,
        color="black",
        mec="white",
        mew=1.2,
        ls="none",
        zorder=4,
        label=f"θ0 (pretrained), {off0:.3g} off the plane",
    )
    markers = "DP^vX<>h"
    for j, (method, name, a, b) in enumerate(merged):
        ax.plot(
            a,
            b,
            marker=markers[j % len(markers)],
            ms=7,
            color=COLOURS.get(method, "orange"),
            mec="black",
            mew=0.8,
            ls="none",
            zorder=6,
            label=name,
        )


def landscape_figure(
    ls: Landscape, task: str, merged: Sequence[tuple[str, str, float, float]] = (), ax: Any = None
) -> Figure | None:
    """Filled contours of `task`'s loss on the PCA grid, with θ0 (black star), every θ_t (its
    own task's θ_t larger, in red) and the merged models (method, label, a, b) marked.

    Draws into `ax` when given (returns None; no legend), else into a new Figure with the
    legend below the axes (returned).
    """
    fig = None
    own_figure = ax is None
    if own_figure:
        fig, axes = _new_figure(width=6.2, height=6.2)
        ax = axes[0, 0]
    _landscape_contours(ax, ls, task, own_figure)
    _mark_finetuned(ax, ls, task)
    _mark_theta0_and_merges(ax, ls, merged)
    if not own_figure:  # a panel of the overview, which names the axes once
        ax.set_title(task, fontsize=9)
        ax.tick_params(labelsize=7)
        return fig
    ax.set_xlabel(f"a: PC1 ({100 * ls.explained[0]:.0f}% of variance), ℓ2 units")
    ax.set_ylabel(f"b: PC2 ({100 * ls.explained[1]:.0f}% of variance), ℓ2 units")
    ax.set_title(
        f"Loss landscape of {task} ({ls.num_images.get(task, '?')} {ls.split} images)",
        fontsize=10,
    )
    ax.legend(
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        ncols=2,
        title="θ0 and merges are projected onto the plane; their ℓ2 distance off it is named",
        title_fontsize=7,
    )
    return fig


def landscape_overview_figure(
    ls: Landscape, merged: Sequence[tuple[str, str, float, float]] = ()
) -> Figure:
    """All tasks' landscapes side by side (three per row)."""
    ncols = min(3, len(ls.tasks))
    nrows = math.ceil(len(ls.tasks) / ncols)
    fig, axes = _new_figure(ncols=ncols, nrows=nrows, width=MAX_WIDTH / ncols, height=2.9)
    for ax, task in zip(axes.flat, ls.tasks):
        landscape_figure(ls, task, merged, ax=ax)
    for ax in list(axes.flat)[len(ls.tasks) :]:
        ax.set_axis_off()

    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        [lb.split(" (red:")[0] for lb in labels],
        loc="outside lower center",
        ncols=min(3, len(labels)),
        fontsize=8,
        title="θ0 and merges are projected onto the plane; their ℓ2 distance off it is named",
        title_fontsize=8,
    )
    fig.suptitle(
        "Per-task loss on the plane of the top two principal directions of the fine-tuned models\n"
        f"(a: PC1, {100 * ls.explained[0]:.0f}% of variance; "
        f"b: PC2, {100 * ls.explained[1]:.0f}%; ℓ2 units)",
        fontsize=10,
    )
    return fig


def write_plots(
    tasks: Sequence[str],
    runs: Sequence[Run],
    layer_eta: Mapping[tuple[int, float], Mapping[str, float]],
    out_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    dpi: int = 120,
    paper: PaperSettings | None = None,
) -> list[Path]:
    """Draw every summary figure (PLOTS) into `out_dir` (PNG at `dpi`); returns the paths written.
    paper: the settings of Figure 3 and the θ0 label (the config's `report` block)."""
    makers = {
        "alpha_sweep": lambda: alpha_sweep_figure(tasks, runs, paper),
        "data_efficiency": lambda: data_efficiency_figure(tasks, runs, paper),
        "per_task": lambda: per_task_figure(tasks, runs, paper),
        "normalised": lambda: normalised_figure(tasks, runs, paper),
        "eta_per_layer": lambda: eta_per_layer_figure(layer_eta),
        "eta_vs_k": lambda: eta_vs_k_figure(tasks, runs),
    }
    paths = []
    for name in PLOTS:
        paths += save_figure(makers[name](), out_dir, name, formats, dpi)
    return paths


def write_landscape_plots(
    ls: Landscape,
    merged: Sequence[tuple[str, str, float, float]],
    out_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    dpi: int = 120,
) -> list[Path]:
    """landscape_{task}.{fmt} for every task and landscape.{fmt} with all of them."""
    paths = []
    for task in ls.tasks:
        fig = landscape_figure(ls, task, merged)
        paths += save_figure(fig, out_dir, f"landscape_{task}", formats, dpi)  # type: ignore[arg-type]
    paths += save_figure(landscape_overview_figure(ls, merged), out_dir, "landscape", formats, dpi)
    return paths
