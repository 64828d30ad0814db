"""Loss landscape around the fine-tuned models (the paper's Appendix D.3, after Li et al. 2018).

PCA of the stacked fine-tuned parameter vectors Θ = [θ_1 … θ_T] (T × P): θ̄ is their mean,
d1 and d2 the top two principal directions (unit vectors in R^P), and each task's loss is
evaluated on the grid θ(a, b) = θ̄ + a·d1 + b·d2. Coordinates a, b are in parameter-space
ℓ2 units, so distances on the plot are distances between models.

The PCA never holds T models: one pass over the tensors accumulates the T × T Gram matrix of
the centred models, G = (Θ − θ̄)(Θ − θ̄)ᵀ; its top eigenvectors v_i give the directions
d_i = (Θ − θ̄)ᵀ v_i / √λ_i, formed tensor by tensor in a second pass. Task t sits at
(√λ_1 v_1[t], √λ_2 v_2[t]); any other model (θ0, merged) is projected, which drops the
part of it off the plane (reported as `off_plane`, the ℓ2 distance to the plane).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.store import TensorReader

log = logging.getLogger(__name__)

Writer = Callable[[str, torch.Tensor, "str | None"], None]  # (array name, tensor, group or None)


@dataclass
class Plane:
    """The PCA plane: θ̄, d1, d2 per tensor name ([*shape] float32 each), the eigenvalues λ1, λ2
    of G (squared ℓ2 units), the explained-variance ratios and the coordinates [T, 2] of the
    fine-tuned models with their off-plane distances [T]."""

    names: list[str]
    mean: dict[str, torch.Tensor]
    d1: dict[str, torch.Tensor]
    d2: dict[str, torch.Tensor]
    eigenvalues: tuple[float, float]
    explained: tuple[float, float]
    coords: np.ndarray
    off_plane: np.ndarray


def float_names(reader: TensorReader) -> list[str]:
    """The floating-point tensors of a checkpoint (the ones a merge changes), in reader order."""
    return [n for n in reader.keys() if reader.dtype(n).is_floating_point]


def _where(reader: TensorReader, fallback: str) -> str:
    return str(getattr(reader, "path", fallback))


def _check_same(
    names: Sequence[str], reference: TensorReader, others: Sequence[TensorReader]
) -> None:
    """Every reader in `others` holds each of `names` with `reference`'s shape."""
    for i, other in enumerate(others):
        for name in names:
            where = _where(other, f"model {i + 1}")
            if name not in other:
                raise ValueError(
                    f"{where}: tensor `{name}` is missing (every model needs the same tensor names)"
                )
            if other.shape(name) != reference.shape(name):
                raise ValueError(
                    f"{where}: tensor `{name}` has shape {list(other.shape(name))}, "
                    f"{_where(reference, 'the first model')} has {list(reference.shape(name))}"
                )


def pca_plane(finetuned: Sequence[TensorReader], names: Sequence[str]) -> Plane:
    """Top-two PCA plane of the fine-tuned models, streamed over `names` (two reads of each tensor).

    Raises ValueError for fewer than three models (two models span a line: no second
    direction), or models that coincide.
    """
    T = len(finetuned)
    if T < 3:
        raise ValueError(
            f"the loss landscape needs at least 3 fine-tuned models to span a plane, got {T}"
        )
    _check_same(names, finetuned[0], finetuned[1:])
    G = torch.zeros(T, T, dtype=torch.float64)
    for name in names:
        X = torch.stack([m.get(name).reshape(-1).double() for m in finetuned])  # [T, n]
        X -= X.mean(dim=0)
        G += X @ X.T
    evals, evecs = torch.linalg.eigh(G)  # ascending
    lam = evals.flip(0).clamp_min(0.0)
    V = evecs.flip(1)  # [T, T], columns by descending eigenvalue
    if lam[1] <= 1e-12 * max(float(lam[0]), 1e-300):
        raise ValueError(
            "the fine-tuned models span less than two dimensions (they are identical or collinear): "
            "no PCA plane to draw"
        )
    # Fix each direction's sign so the model with the largest |coordinate| is positive:
    # the same checkpoints give the same picture.
    for i in range(2):
        j = int(V[:, i].abs().argmax())
        if V[j, i] < 0:
            V[:, i] = -V[:, i]
    scale = 1.0 / lam[:2].sqrt()  # d_i = (Θ − θ̄)ᵀ v_i / √λ_i is a unit vector
    mean, d1, d2 = {}, {}, {}
    for name in names:
        X = torch.stack([m.get(name).double() for m in finetuned])  # [T, *shape]
        mu = X.mean(dim=0)
        Xc = (X - mu).reshape(T, -1)
        mean[name] = mu.float()
        d1[name] = ((V[:, 0] @ Xc) * scale[0]).reshape(mu.shape).float()
        d2[name] = ((V[:, 1] @ Xc) * scale[1]).reshape(mu.shape).float()
    coords_t = V[:, :2] * lam[:2].sqrt()  # [T, 2]
    off = (G.diagonal() - (coords_t**2).sum(dim=1)).clamp_min(0.0).sqrt()
    coords = coords_t.numpy()
    total = float(lam.sum())
    return Plane(
        names=list(names),
        mean=mean,
        d1=d1,
        d2=d2,
        eigenvalues=(float(lam[0]), float(lam[1])),
        explained=(float(lam[0]) / total, float(lam[1]) / total),
        coords=np.asarray(coords, dtype=np.float64),
        off_plane=np.asarray(off, dtype=np.float64),
    )


Tensors = TensorReader | Mapping[str, torch.Tensor]


def _get(source: Tensors, name: str) -> torch.Tensor:
    return source.get(name) if isinstance(source, TensorReader) else source[name]


def project(
    model: Tensors, mean: Tensors, d1: Tensors, d2: Tensors, names: Sequence[str]
) -> tuple[float, float, float]:
    """(a, b, off_plane): coordinates of `model` on the plane θ̄ + a·d1 + b·d2 (d1 ⟂ d2 unit
    vectors) and its ℓ2 distance to the plane, streamed over the tensors `names` in one pass
    (off_plane = √(‖θ − θ̄‖² − a² − b²): near the plane it is only good to about
    √(float32 eps)·‖θ − θ̄‖, plenty for a plot annotation)."""
    a = b = sq = 0.0
    for name in names:
        theta, mu = _get(model, name), _get(mean, name)
        if tuple(theta.shape) != tuple(mu.shape):
            raise ValueError(
                f"tensor `{name}` has shape {list(theta.shape)}, the plane's is {list(mu.shape)}"
            )
        x = (theta.double() - mu.double()).reshape(-1)
        a += float(x @ _get(d1, name).double().reshape(-1))
        b += float(x @ _get(d2, name).double().reshape(-1))
        sq += float(x @ x)
    return a, b, math.sqrt(max(sq - a * a - b * b, 0.0))


def grid_axes(points: np.ndarray, size: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Axes a [size], b [size] of a grid that covers `points` [N, 2] with `margin` × the larger
    span added on every side (so that both axes get the same absolute padding)."""
    if size < 2:
        raise ValueError(f"landscape grid size must be at least 2, got {size}")
    if margin < 0:
        raise ValueError(f"landscape margin must be >= 0, got {margin}")
    lo, hi = points.min(axis=0), points.max(axis=0)
    pad = margin * float(max(hi - lo)) or 1.0
    return (
        np.linspace(lo[0] - pad, hi[0] + pad, size),
        np.linspace(lo[1] - pad, hi[1] + pad, size),
    )


@torch.no_grad()
def grid_losses(
    encoder: nn.Module,
    plane: Plane,
    a_axis: np.ndarray,
    b_axis: np.ndarray,
    heads: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 256,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy of every task on every grid point, computed on `device`.

    `encoder`'s floating tensors named in `plane.names` are overwritten with θ̄ + a·d1 + b·d2
    (the others keep their values). heads: task → (weight [C, D], bias [C]) on normalised
    features; datasets: task → (images [N, 3, H, W], labels [N]).

    Returns (loss [T, len(b), len(a)], accuracy [T, len(b), len(a)]), float64, tasks in the
    order of `datasets`: mean cross-entropy and top-1 of each task's own head.
    """
    from tqdm import tqdm

    tasks = list(datasets)
    encoder = encoder.to(device)
    state = dict(encoder.named_parameters()) | dict(encoder.named_buffers())
    missing = [n for n in plane.names if n not in state]
    if missing:
        raise ValueError(f"the encoder has no tensor `{missing[0]}` of the landscape plane")
    # One copy of θ̄, d1, d2 and the data on the device (3 models' worth of memory, not more).
    mean, d1, d2 = (
        {n: src[n].to(device, state[n].dtype) for n in plane.names}
        for src in (plane.mean, plane.d1, plane.d2)
    )
    data = {t: (x.to(device), y.to(device)) for t, (x, y) in datasets.items()}
    head = {t: (w.to(device), b.to(device)) for t, (w, b) in heads.items()}
    loss = np.zeros((len(tasks), len(b_axis), len(a_axis)))
    acc = np.zeros_like(loss)
    encoder.eval()
    points = [(j, i) for j in range(len(b_axis)) for i in range(len(a_axis))]
    # mininterval: the bar goes to a job log, one line per update; keep it to a few lines.
    bar = tqdm(points, desc="landscape grid", unit="point", disable=not progress, mininterval=5.0)
    for j, i in bar:
        a, b = float(a_axis[i]), float(b_axis[j])
        for name in plane.names:
            torch.add(mean[name], d1[name], alpha=a, out=state[name].data)
            state[name].data.add_(d2[name], alpha=b)
        for t, task in enumerate(tasks):
            images, labels = data[task]
            weight, bias = head[task]
            total, correct = 0.0, 0
            for start in range(0, len(labels), batch_size):
                feats = F.normalize(encoder(images[start : start + batch_size]), dim=-1)
                logits = feats @ weight.T + bias
                y = labels[start : start + batch_size]
                total += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
            loss[t, j, i] = total / max(1, len(labels))
            acc[t, j, i] = correct / max(1, len(labels))
    return loss, acc


@dataclass
class Landscape:
    """A computed landscape: per-task loss and accuracy [T, len(b), len(a)] on the grid axes
    a, b; `points` [1 + T, 2] are the coordinates of θ0 then θ_1 … θ_T, `off_plane` [1 + T]
    their ℓ2 distances to the plane; `explained` the variance ratios of d1, d2."""

    tasks: list[str]
    a: np.ndarray
    b: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    points: np.ndarray
    off_plane: np.ndarray
    explained: tuple[float, float]
    split: str
    num_images: dict[str, int]


def compute_landscape(
    pretrained: TensorReader,
    finetuned: Sequence[TensorReader],
    tasks: Sequence[str],
    encoder: nn.Module,
    heads: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    grid: int,
    margin: float,
    split: str = "val",
    batch_size: int = 256,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[Landscape, Plane]:
    """PCA plane of `finetuned` (one per task, in the order of `tasks`), grid around θ0 and the
    θ_t, and each task's loss on it (`datasets` [task] = its first images of `split`)."""
    if len(finetuned) != len(tasks):
        raise ValueError(
            f"got {len(finetuned)} fine-tuned checkpoints for {len(tasks)} tasks; give one per task, in order"
        )
    names = float_names(pretrained)
    _check_same(names, pretrained, finetuned)
    plane = pca_plane(finetuned, names)
    a0, b0, off0 = project(pretrained, plane.mean, plane.d1, plane.d2, names)
    points = np.vstack([[a0, b0], plane.coords])
    a_axis, b_axis = grid_axes(points, grid, margin)
    log.info(
        "PCA plane: d1, d2 explain %.1f%% and %.1f%% of the fine-tuned models' variance; grid %d x %d",
        100 * plane.explained[0],
        100 * plane.explained[1],
        grid,
        grid,
    )
    ordered = {t: datasets[t] for t in tasks}
    loss, acc = grid_losses(
        encoder, plane, a_axis, b_axis, heads, ordered, batch_size, progress, device
    )
    result = Landscape(
        tasks=list(tasks),
        a=a_axis,
        b=b_axis,
        loss=loss,
        accuracy=acc,
        points=points,
        off_plane=np.concatenate([[off0], plane.off_plane]),
        explained=plane.explained,
        split=split,
        num_images={t: int(len(datasets[t][1])) for t in tasks},
    )
    return result, plane


def write_landscape(result: Landscape, plane: Plane, write: Writer) -> dict[str, object]:
    """Store the grid arrays at the root and θ̄, d1, d2 in groups `mean`, `d1`, `d2` (one array
    per tensor name) through `write(name, tensor, group)`; returns the attributes to set."""
    for name, value in (
        ("a", result.a),
        ("b", result.b),
        ("loss", result.loss),
        ("accuracy", result.accuracy),
        ("points", result.points),
        ("off_plane", result.off_plane),
    ):
        write(name, torch.from_numpy(np.ascontiguousarray(value)), None)  # type: ignore[arg-type]
    for name in plane.names:
        write(name, plane.mean[name], "mean")
        write(name, plane.d1[name], "d1")
        write(name, plane.d2[name], "d2")
    return {
        "tasks": result.tasks,
        "point_labels": ["θ0", *result.tasks],
        "explained_variance": list(result.explained),
        "eigenvalues": list(plane.eigenvalues),
        "split": result.split,
        "num_images": result.num_images,
        "grid": len(result.a),
        "layout": "loss and accuracy are [task, b, a]; points [1 + T, 2] = θ0 then θ_t; "
        "groups mean, d1, d2 hold θ̄ and the unit directions per tensor",
    }


def read_landscape(reader: TensorReader) -> Landscape:
    """The grid arrays and attributes of a landscape Zarr group (opened with store.open_tensors)."""
    attrs = reader.attrs()
    for key in ("a", "b", "loss", "accuracy", "points", "off_plane"):
        if key not in reader:
            raise ValueError(
                f"{getattr(reader, 'path', 'landscape')}: array `{key}` is missing (not a landscape artifact?)"
            )
    arr = {k: reader.get(k).numpy() for k in ("a", "b", "loss", "accuracy", "points", "off_plane")}
    tasks = list(attrs.get("tasks", []))
    if arr["loss"].shape != (len(tasks), len(arr["b"]), len(arr["a"])):
        raise ValueError(
            f"{getattr(reader, 'path', 'landscape')}: array `loss` has shape {list(arr['loss'].shape)}, "
            f"expected [{len(tasks)}, {len(arr['b'])}, {len(arr['a'])}]"
        )
    return Landscape(
        tasks=tasks,
        a=arr["a"],
        b=arr["b"],
        loss=arr["loss"],
        accuracy=arr["accuracy"],
        points=arr["points"],
        off_plane=arr["off_plane"],
        explained=tuple(attrs.get("explained_variance", (math.nan, math.nan))),  # type: ignore[arg-type]
        split=str(attrs.get("split", "")),
        num_images=dict(attrs.get("num_images", {})),
    )


def merged_markers(
    landscape: TensorReader, chosen: Mapping[str, tuple[str, str]], merged: Sequence[str]
) -> list[tuple[str, str, float, float]]:
    """(method, label, a, b) of each chosen merged model on the landscape's plane; the label
    ends with the model's ℓ2 distance off the plane ("…, 3.27 off the plane").

    chosen: method → (setting, label); merged: paths ending in `{method}/{setting}.zarr`
    (or `.safetensors`), searched for each chosen setting. The plane (θ̄, d1, d2) is read
    from the landscape artifact's groups `mean`, `d1`, `d2`.
    """
    from pathlib import Path

    from pipeline.store import ZarrReader, open_tensors

    if not isinstance(landscape, ZarrReader):
        raise ValueError("the landscape must be a Zarr group with `mean`, `d1` and `d2` subgroups")
    mean, d1, d2 = (landscape.group(g) for g in ("mean", "d1", "d2"))
    by_run = {f"{Path(p).parent.name}/{Path(p).name.rsplit('.', 1)[0]}": p for p in merged}
    out = []
    for method, (setting, label) in chosen.items():
        path = by_run.get(f"{method}/{setting}")
        if path is None:
            raise ValueError(f"no merged model `{method}/{setting}` among the --merged paths")
        with open_tensors(path) as model:
            a, b, off = project(model, mean, d1, d2, mean.keys())
        log.info(
            "%s/%s on the plane: a=%.4g b=%.4g, %.4g off the plane", method, setting, a, b, off
        )
        # The projection drops the part off the plane; the label says how far it is.
        out.append((method, f"{label}, {off:.3g} off the plane", a, b))
    return out
