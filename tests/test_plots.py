"""Figures: each draws the numbers it claims to (read back from the matplotlib artists), the
files exist in both formats, and missing data gives a labelled empty figure, not a crash."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline.landscape import Landscape
from pipeline.plots import (
    PLOTS,
    alpha_sweep_figure,
    data_efficiency_figure,
    eta_per_layer_figure,
    eta_vs_k_figure,
    landscape_figure,
    normalised_figure,
    per_task_figure,
    save_figure,
    write_landscape_plots,
    write_plots,
)
from pipeline.tables import Run, choose_on_validation

TASKS = ["shapes", "colour", "position"]


def _run(method, setting, rng, k=None, alpha=None, fraction=None, eta=None):
    test = {t: round(rng.uniform(0.3, 0.9), 3) for t in TASKS}
    val = [rng.uniform(0.3, 0.9) for _ in TASKS]
    avg = sum(test.values()) / len(test)
    return Run(
        method,
        setting,
        k,
        alpha,
        fraction,
        test,
        avg,
        min(test.values()),
        min(test, key=test.get),
        val_average=sum(val) / len(val),
        val_worst=min(val),
        eta=eta,
    )


def make_runs(seed=0):
    rng = random.Random(seed)
    runs = [_run("zeroshot", "theta0", rng), _run("finetuned", "own", rng)]
    runs += [_run("ta", f"a{a}", rng, alpha=a) for a in (0.3, 0.5, 1.0)]
    runs += [_run("ties", f"a{a}", rng, alpha=a) for a in (0.3, 0.5, 1.0)]
    runs += [_run("fisher", f"f{f}", rng, fraction=f) for f in (0.05, 1.0)]
    runs += [_run("tsvm", f"k{k}_a{a}", rng, k=k, alpha=a) for k in (2, 4) for a in (0.3, 0.5, 1.0)]
    runs += [
        _run("epimer", f"k{k}_a{a}_f{f}", rng, k=k, alpha=a, fraction=f, eta=1e-4 * k / f)
        for k in (2, 4)
        for a in (0.3, 0.5, 1.0)
        for f in (0.05, 1.0)
    ]
    return runs


def _line(ax, label):
    found = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(found) == 1, [line.get_label() for line in ax.get_lines()]
    return found[0]


def test_alpha_sweep_draws_each_sweep_and_marks_the_validation_choice():
    runs = make_runs()
    fig = alpha_sweep_figure(TASKS, runs)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["k = 2", "k = 4"]
    for ax, k in zip(panels, (2, 4)):
        tsvm = sorted((r for r in runs if r.method == "tsvm" and r.k == k), key=lambda r: r.alpha)
        line = _line(ax, "TSV-M")
        np.testing.assert_allclose(line.get_xdata(), [r.alpha for r in tsvm])
        np.testing.assert_allclose(line.get_ydata(), [r.average for r in tsvm])
        epimer = sorted(
            (r for r in runs if r.method == "epimer" and r.k == k and r.fraction == 0.05),
            key=lambda r: r.alpha,
        )
        np.testing.assert_allclose(
            _line(ax, "EpiMer f=0.05").get_ydata(), [r.average for r in epimer]
        )
        chosen = choose_on_validation(tsvm)
        circles = [
            (float(ln.get_xdata()[0]), float(ln.get_ydata()[0]))
            for ln in ax.get_lines()
            if ln.get_markersize() == 11
        ]
        assert (chosen.alpha, pytest.approx(chosen.average)) in circles
        ta = sorted((r for r in runs if r.method == "ta"), key=lambda r: r.alpha)
        np.testing.assert_allclose(
            _line(ax, "Task Arithmetic").get_ydata(), [r.average for r in ta]
        )


def _bar_heights(ax):
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}


def test_per_task_and_normalised_bars_are_the_chosen_settings():
    runs = make_runs()
    by = {(r.method, r.setting): r for r in runs}
    ft = by[("finetuned", "own")]
    bars = _bar_heights(per_task_figure(TASKS, runs).axes[0])
    norm = _bar_heights(normalised_figure(TASKS, runs).axes[0])
    for method in ("ta", "ties", "tsvm", "fisher", "epimer"):
        chosen = choose_on_validation([r for r in runs if r.method == method])
        label = next(
            lb
            for lb in bars
            if f"({chosen.setting})" in lb
            and lb.startswith(
                {
                    "ta": "Task",
                    "ties": "TIES",
                    "tsvm": "TSV-M",
                    "fisher": "Fisher",
                    "epimer": "EpiMer",
                }[method]
            )
        )
        assert bars[label] == pytest.approx([*(chosen.test[t] for t in TASKS), chosen.average])
        ratios = [chosen.test[t] / ft.test[t] for t in TASKS]
        assert norm[label] == pytest.approx([*ratios, sum(ratios) / len(ratios)])
    assert bars["Fine-tuned (own task)"] == pytest.approx(
        [*(ft.test[t] for t in TASKS), ft.average]
    )
    assert "Fine-tuned (own task)" not in norm


def test_data_efficiency_and_eta_figures_draw_the_summary_numbers():
    runs = make_runs()
    ax = data_efficiency_figure(TASKS, runs).axes[0]
    assert ax.get_xscale() == "log"
    fisher = sorted((r for r in runs if r.method == "fisher"), key=lambda r: r.fraction)
    np.testing.assert_allclose(
        _line(ax, "Fisher averaging").get_ydata(), [r.average for r in fisher]
    )
    # Figure 3: EpiMer at the fixed α = 1.0 for every f (no α chosen per f); the largest k is the
    # paper's curve when no paper k is given.
    by = {(r.method, r.setting): r for r in runs}
    for k, name in ((4, "EpiMer k=4, α=1 (Figure 3)"), (2, "EpiMer k=2, α=1")):
        expected = [by[("epimer", f"k{k}_a1.0_f{f}")].average for f in (0.05, 1.0)]
        np.testing.assert_allclose(_line(ax, name).get_ydata(), expected)
    assert ax.get_title().startswith("Figure 3")
    from pipeline.tables import PaperSettings

    ax = data_efficiency_figure(TASKS, runs, PaperSettings(k=2, alpha=0.5)).axes[0]
    np.testing.assert_allclose(
        _line(ax, "EpiMer k=2, α=0.5 (Figure 3)").get_ydata(),
        [by[("epimer", f"k2_a0.5_f{f}")].average for f in (0.05, 1.0)],
    )

    left, right = eta_vs_k_figure(TASKS, runs).axes[:2]
    np.testing.assert_allclose(
        _line(left, "f=0.05").get_ydata(), [1e-4 * 2 / 0.05, 1e-4 * 4 / 0.05]
    )
    assert left.get_yscale() == "log"
    ep = choose_on_validation(
        [r for r in runs if r.method == "epimer" and r.k == 2 and r.fraction == 1.0]
    )
    ts = choose_on_validation([r for r in runs if r.method == "tsvm" and r.k == 2])
    assert _line(right, "f=1").get_ydata()[0] == pytest.approx(ep.average - ts.average)

    layers = {
        (2, 1.0): {"proj": 1e-5, "transformer.resblocks.0.mlp.c_fc.weight": 3e-5},
        (4, 1.0): {"proj": 2e-5, "transformer.resblocks.0.mlp.c_fc.weight": 5e-5},
    }
    ax = eta_per_layer_figure(layers).axes[0]
    np.testing.assert_allclose(_line(ax, "k=4").get_ydata(), [2e-5, 5e-5])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["proj", "0.mlp.c_fc"]


def test_write_plots_writes_png_and_svg_even_without_merges(tmp_path):
    runs = make_runs()
    paths = write_plots(TASKS, runs, {}, tmp_path / "full", dpi=50)
    assert sorted(p.name for p in paths) == sorted(
        f"{n}.{e}" for n in PLOTS for e in ("png", "svg")
    )
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000
        assert data[:8] == b"\x89PNG\r\n\x1a\n" if p.suffix == ".png" else b"<svg" in data[:2000]
    # Only the references: every figure still exists, saying what is missing.
    refs = [r for r in runs if r.method in ("zeroshot", "finetuned")]
    paths = write_plots(TASKS, refs, {}, tmp_path / "refs", formats=("svg",))
    assert sorted(p.name for p in paths) == sorted(f"{n}.svg" for n in PLOTS)

    def texts(fig):
        return [t.get_text() for ax in fig.axes for t in ax.texts]

    assert "no method with a global scale α in this run" in texts(alpha_sweep_figure(TASKS, refs))
    assert "no EpiMer runs in this run" in texts(eta_vs_k_figure(TASKS, refs))
    assert "no Fisher-based method (fisher, epimer) in this run" in texts(
        data_efficiency_figure(TASKS, refs)
    )
    with pytest.raises(ValueError, match="unknown figure format `gif`"):
        save_figure(per_task_figure(TASKS, runs), tmp_path, "x", formats=("gif",))


def _landscape():
    a, b = np.linspace(-1, 2, 5), np.linspace(-1, 1, 4)
    A, B = np.meshgrid(a, b)
    loss = np.stack([(A - 1) ** 2 + B**2, A**2 + (B - 0.5) ** 2])  # [T, b, a]
    return Landscape(
        tasks=["shapes", "colour"],
        a=a,
        b=b,
        loss=loss,
        accuracy=1 - loss / loss.max(),
        points=np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.5]]),
        off_plane=np.zeros(3),
        explained=(0.6, 0.3),
        split="val",
        num_images={"shapes": 8, "colour": 8},
    )


def test_landscape_figure_marks_theta0_the_models_and_the_merges(tmp_path):
    ls = _landscape()
    merged = [("epimer", "EpiMer k2_a1.0_f1.0", 0.4, 0.2), ("tsvm", "TSV-M k2_a1.0", 0.6, -0.1)]
    fig = landscape_figure(ls, "colour", merged)
    ax = fig.axes[0]
    assert ax.get_title() == "Loss landscape of colour (8 val images)"
    theta0 = f"θ0 (pretrained), {float(ls.off_plane[0]):.3g} off the plane"
    assert _line(ax, theta0).get_xydata().tolist() == [[0.0, 0.0]]
    # θ0 stays visible under merges that project onto it: its star is larger than any of them.
    merges = [_line(ax, name) for _, name, _, _ in merged]
    assert all(_line(ax, theta0).get_markersize() > m.get_markersize() for m in merges)
    assert _line(ax, "EpiMer k2_a1.0_f1.0").get_xydata().tolist() == [[0.4, 0.2]]
    assert _line(ax, "TSV-M k2_a1.0").get_xydata().tolist() == [[0.6, -0.1]]
    own = [ln for ln in ax.get_lines() if ln.get_color() == "red"]
    assert [ln.get_xydata().tolist() for ln in own] == [[[0.0, 0.5]]]  # colour's own θ_t
    assert "PC1 (60% of variance)" in ax.get_xlabel()
    paths = write_landscape_plots(ls, merged, tmp_path, formats=("png",), dpi=40)
    assert sorted(p.name for p in paths) == [
        "landscape.png",
        "landscape_colour.png",
        "landscape_shapes.png",
    ]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_the_same_figure_gives_the_same_bytes(tmp_path):
    """No timestamps and no random element ids: two saves of one figure are byte-identical, so
    re-runs and digests of the report's figures do not change without a change of data."""
    runs = make_runs()
    for fmt in ("png", "svg"):
        a = save_figure(per_task_figure(TASKS, runs), tmp_path / "a", "f", formats=(fmt,))[0]
        b = save_figure(per_task_figure(TASKS, runs), tmp_path / "b", "f", formats=(fmt,))[0]
        assert a.read_bytes() == b.read_bytes(), fmt
