"""Loss landscape: the streamed PCA against a float64 SVD, projections, the grid losses
against direct evaluation, and the CLI stage end to end on the tiny demo encoder."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import cli
from pipeline.landscape import (
    float_names,
    grid_axes,
    grid_losses,
    merged_markers,
    pca_plane,
    project,
    read_landscape,
)
from pipeline.models.backbone import ImageClassifier, build_visual
from pipeline.store import open_tensors, write_safetensors, write_zarr


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the tiny encoder gains nothing from two, and on a loaded 2-core
    machine a second thread spin-waits (25x slower measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _models(tmp_path, T=4, seed=0):
    """θ0 and T fine-tuned toy checkpoints (two float tensors and an integer one) on disk."""
    g = torch.Generator().manual_seed(seed)
    theta0 = {
        "w": torch.randn(5, 3, generator=g),
        "b": torch.randn(7, generator=g),
        "step": torch.tensor([3]),
    }
    paths = []
    for t in range(T):
        state = dict(theta0)
        state["w"] = theta0["w"] + (t + 1) * 0.3 * torch.randn(5, 3, generator=g)
        state["b"] = theta0["b"] + 0.2 * torch.randn(7, generator=g)
        path = tmp_path / f"t{t}.safetensors"
        write_safetensors(path, state)
        paths.append(path)
    write_safetensors(tmp_path / "theta0.safetensors", theta0)
    return tmp_path / "theta0.safetensors", paths


def _flat(state, names):
    return np.concatenate([state[n].double().numpy().reshape(-1) for n in names])


def test_pca_plane_matches_a_float64_svd(tmp_path):
    theta0_path, paths = _models(tmp_path)
    readers = [open_tensors(p) for p in paths]
    names = float_names(readers[0])
    assert sorted(names) == ["b", "w"]  # the integer tensor is not part of the landscape
    plane = pca_plane(readers, names)

    X = np.stack([_flat({n: r.get(n) for n in names}, names) for r in readers])  # [T, P]
    mean = X.mean(axis=0)
    U, S, Vt = np.linalg.svd(X - mean, full_matrices=False)
    d1, d2 = _flat(plane.d1, names), _flat(plane.d2, names)
    np.testing.assert_allclose(_flat(plane.mean, names), mean, atol=1e-6)
    assert abs(d1 @ Vt[0]) == pytest.approx(1.0, abs=1e-6) and abs(d2 @ Vt[1]) == pytest.approx(
        1.0, abs=1e-6
    )
    assert d1 @ d2 == pytest.approx(0.0, abs=1e-6) and np.linalg.norm(d1) == pytest.approx(
        1.0, abs=1e-6
    )
    # Coordinates of the θ_t are their projections; signs: the largest |coordinate| is positive.
    np.testing.assert_allclose(plane.coords, (X - mean) @ np.stack([d1, d2]).T, atol=1e-5)
    for i in range(2):
        assert plane.coords[np.abs(plane.coords[:, i]).argmax(), i] > 0
    assert plane.eigenvalues == pytest.approx((S[0] ** 2, S[1] ** 2), rel=1e-9)
    assert plane.explained == pytest.approx(
        (S[0] ** 2 / (S**2).sum(), S[1] ** 2 / (S**2).sum()), rel=1e-9
    )
    residual = (X - mean) - plane.coords @ np.stack([d1, d2])
    np.testing.assert_allclose(plane.off_plane, np.linalg.norm(residual, axis=1), atol=1e-5)

    # project() streams the same numbers for any model, e.g. θ0 and the fine-tuned ones.
    for t, r in enumerate(readers):
        a, b, off = project(r, plane.mean, plane.d1, plane.d2, names)
        assert (a, b, off) == pytest.approx((*plane.coords[t], plane.off_plane[t]), abs=1e-5)
    x0 = _flat({n: open_tensors(theta0_path).get(n) for n in names}, names) - mean
    a, b, off = project(open_tensors(theta0_path), plane.mean, plane.d1, plane.d2, names)
    assert (a, b) == pytest.approx((x0 @ d1, x0 @ d2), abs=1e-5)
    assert off == pytest.approx(np.sqrt(max(x0 @ x0 - a * a - b * b, 0)), abs=1e-4)
    # A point on the plane is at distance 0 from it.
    on_plane = {n: plane.mean[n] + 0.7 * plane.d1[n] - 0.2 * plane.d2[n] for n in names}
    a, b, off = project(on_plane, plane.mean, plane.d1, plane.d2, names)
    assert (a, b) == pytest.approx((0.7, -0.2), abs=1e-5) and off < 1e-3 * np.hypot(0.7, 0.2)


def test_pca_plane_rejects_too_few_identical_or_mismatched_models(tmp_path):
    _, paths = _models(tmp_path)
    readers = [open_tensors(p) for p in paths]
    with pytest.raises(ValueError, match="at least 3 fine-tuned models"):
        pca_plane(readers[:2], ["w", "b"])
    same = [readers[0]] * 3
    with pytest.raises(ValueError, match="less than two dimensions"):
        pca_plane(same, ["w", "b"])
    write_safetensors(tmp_path / "odd.safetensors", {"w": torch.zeros(3, 5), "b": torch.zeros(7)})
    with pytest.raises(
        ValueError,
        match=r"odd.safetensors: tensor `w` has shape \[3, 5\], .*t0.safetensors has \[5, 3\]",
    ):
        pca_plane([*readers[:2], open_tensors(tmp_path / "odd.safetensors")], ["w", "b"])


def test_grid_axes_cover_the_points_with_the_margin():
    pts = np.array([[0.0, 0.0], [2.0, 1.0], [1.0, -1.0]])
    a, b = grid_axes(pts, 5, 0.25)
    assert len(a) == len(b) == 5
    assert a[0] == pytest.approx(-0.5) and a[-1] == pytest.approx(2.5)  # pad = 0.25 × max span (2)
    assert b[0] == pytest.approx(-1.5) and b[-1] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="at least 2"):
        grid_axes(pts, 1, 0.25)
    with pytest.raises(ValueError, match="margin"):
        grid_axes(pts, 5, -0.1)


def _encoder_models(tmp_path, T=3):
    """θ0 (the tiny demo encoder) and T fine-tuned copies with seeded perturbations, on disk."""
    encoder = build_visual()
    theta0 = {n: t.detach().clone() for n, t in encoder.state_dict().items()}
    write_safetensors(tmp_path / "pretrained.safetensors", theta0)
    g = torch.Generator().manual_seed(1)
    paths = []
    for t in range(T):
        state = {n: v + 0.05 * torch.randn(v.shape, generator=g) for n, v in theta0.items()}
        paths.append(tmp_path / f"ft{t}.safetensors")
        write_safetensors(paths[-1], state)
    return encoder, tmp_path / "pretrained.safetensors", paths


def test_grid_losses_equal_direct_evaluation(tmp_path):
    encoder, _, paths = _encoder_models(tmp_path)
    readers = [open_tensors(p) for p in paths]
    plane = pca_plane(readers, float_names(readers[0]))
    g = torch.Generator().manual_seed(2)
    tasks = {"x": 4, "y": 3}
    heads = {
        t: (torch.randn(c, 64, generator=g) * 5, torch.randn(c, generator=g))
        for t, c in tasks.items()
    }
    data = {
        t: (torch.randn(10, 3, 32, 32, generator=g), torch.randint(0, c, (10,), generator=g))
        for t, c in tasks.items()
    }
    a_axis, b_axis = np.array([-0.3, 0.0, 0.4]), np.array([-0.2, 0.25])
    loss, acc = grid_losses(
        encoder, plane, a_axis, b_axis, heads, data, batch_size=4, progress=False
    )
    assert loss.shape == acc.shape == (2, 2, 3)
    reference = build_visual()
    for j, b in enumerate(b_axis):
        for i, a in enumerate(a_axis):
            reference.load_state_dict(
                {n: plane.mean[n] + a * plane.d1[n] + b * plane.d2[n] for n in plane.names}
            )
            for t, task in enumerate(tasks):
                model = ImageClassifier(reference, *heads[task]).eval()
                with torch.no_grad():
                    logits = model(data[task][0])
                assert loss[t, j, i] == pytest.approx(
                    float(F.cross_entropy(logits, data[task][1])), rel=1e-4
                )
                assert acc[t, j, i] == pytest.approx(
                    float((logits.argmax(-1) == data[task][1]).float().mean())
                )
    assert len(set(np.round(loss[0].ravel(), 6))) > 1  # the loss does change across the grid


def _head(tmp_path, task, seed):
    from pipeline.data import num_classes

    g = torch.Generator().manual_seed(seed)
    c = num_classes({"source": "synthetic"}, task)
    path = tmp_path / f"head_{task}.safetensors"
    write_safetensors(path, {"weight": torch.randn(c, 64, generator=g) * 5, "bias": torch.zeros(c)})
    return path


def test_landscape_stage_end_to_end(tmp_path):
    """`python -m pipeline landscape` writes the grid and the plane; a merged model is placed by
    projection (linear: the midpoint of two models lands at the midpoint of their coordinates)."""
    _, pretrained, paths = _encoder_models(tmp_path)
    tasks = ["shapes", "colour", "position"]
    heads = [_head(tmp_path, t, i) for i, t in enumerate(tasks)]
    data = '{"source": "synthetic", "train_size": 60, "test_size": 10}'
    out = tmp_path / "landscape.zarr"
    rc = cli.main(
        [
            "landscape",
            "--pretrained",
            str(pretrained),
            "--finetuned",
            *map(str, paths),
            "--tasks",
            *tasks,
            "--heads",
            *map(str, heads),
            "--data",
            data,
            "--grid",
            "3",
            "--max-images",
            "4",
            "--threads",
            "1",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    with open_tensors(out) as reader:
        ls = read_landscape(reader)
        attrs = reader.attrs()
        assert attrs["artifact"] == "landscape" and attrs["parameters"]["grid"] == 3
        assert ls.tasks == tasks and ls.loss.shape == (3, 3, 3) and np.isfinite(ls.loss).all()
        assert ls.split == "val" and ls.num_images == {t: 4 for t in tasks}
        assert ls.points.shape == (4, 2)
        assert ls.a.min() <= ls.points[:, 0].min() and ls.a.max() >= ls.points[:, 0].max()
        # A "merged" model halfway between θ_1 and θ_2 projects to the midpoint of their points.
        half = {
            n: 0.5 * (open_tensors(paths[0]).get(n) + open_tensors(paths[1]).get(n))
            for n in open_tensors(paths[0]).keys()
        }
        merged = tmp_path / "merged" / "ta" / "a0.5.zarr"
        write_zarr(merged, half)
        markers = merged_markers(reader, {"ta": ("a0.5", "TA a0.5")}, [str(merged)])
        # Its label names its distance off the plane: ~0 here, the three θ_t span the plane.
        assert markers[0][0] == "ta" and markers[0][1].startswith("TA a0.5, ")
        off = re.fullmatch(r"TA a0\.5, (\S+) off the plane", markers[0][1])
        assert off is not None and abs(float(off.group(1))) < 1e-4
        assert markers[0][2:] == pytest.approx(tuple(0.5 * (ls.points[1] + ls.points[2])), abs=1e-5)
        with pytest.raises(ValueError, match="no merged model `ties/a0.5`"):
            merged_markers(reader, {"ties": ("a0.5", "TIES")}, [str(merged)])


def test_landscape_stage_rejects_bad_input(tmp_path, capsys):
    _, pretrained, paths = _encoder_models(tmp_path)
    head = _head(tmp_path, "shapes", 0)
    base = [
        "landscape",
        "--pretrained",
        str(pretrained),
        "--data",
        '{"source": "synthetic"}',
        "--out",
        str(tmp_path / "l.zarr"),
    ]
    assert (
        cli.main(
            [*base, "--finetuned", *map(str, paths[:2]), "--tasks", "shapes", "--heads", str(head)]
        )
        == 2
    )
    assert "fine-tuned checkpoints" in capsys.readouterr().err
    assert (
        cli.main(
            [
                *base,
                "--finetuned",
                *map(str, paths),
                "--tasks",
                "shapes",
                "shapes",
                "shapes",
                "--heads",
                str(head),
                str(head),
                str(head),
                "--max-images",
                "0",
            ]
        )
        == 2
    )
    assert "--max-images must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "l.zarr").exists()
