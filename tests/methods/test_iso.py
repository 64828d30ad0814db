"""Iso-C and Iso-CTS against float64 references of the paper's definitions, their reductions,
the authors' subspace sizes, and `pipeline merge isoc|isocts` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.methods import iso
from pipeline.store import load_tensors

SHAPES = [(64, 48), (48, 64), (40, 40)]


def _inverse_sqrt(G: np.ndarray) -> np.ndarray:
    """G^{-1/2} of a symmetric positive definite G, by its eigendecomposition."""
    w, Q = np.linalg.eigh(G)
    return (Q / np.sqrt(w)) @ Q.T


def _polar(A: np.ndarray) -> np.ndarray:
    """The polar factor of a full-rank A: A (AᵀA)^{-1/2} if tall, else (AAᵀ)^{-1/2} A."""
    if A.shape[0] >= A.shape[1]:
        return A @ _inverse_sqrt(A.T @ A)
    return _inverse_sqrt(A @ A.T) @ A


def _nuclear_mean(A: np.ndarray) -> float:
    """The mean singular value: trace((AᵀA)^{1/2}) / min(A.shape), from eigenvalues."""
    G = A.T @ A if A.shape[0] >= A.shape[1] else A @ A.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(G), 0, None)).sum() / min(A.shape))


def _iso_c_reference(deltas: np.ndarray) -> np.ndarray:
    """Iso-C: the sum's singular values replaced by their mean, i.e. σ̄ · polar(Σ_t δ_t)."""
    total = deltas.sum(axis=0)
    return _nuclear_mean(total) * _polar(total)


def _authors_sizes(m: int, T: int, fraction: float) -> tuple[int, int]:
    """The authors' rule: c₀ = int(m f), s = round((m − c₀)/T), c = m − T s."""
    c0 = int(m * fraction)
    s = round((m - c0) / T)
    return m - s * T, s


def _iso_cts_reference(deltas: np.ndarray, fraction: float) -> np.ndarray:
    T, d_out, d_in = deltas.shape
    m = min(d_out, d_in)
    c, s = _authors_sizes(m, T, fraction)
    U, S, Vh = np.linalg.svd(deltas.sum(axis=0), full_matrices=False)
    cols, values, rows = [U[:, :c]], [S[:c]], [Vh[:c]]
    P = U[:, :c] @ U[:, :c].T  # projector on the common subspace
    for t in range(T):
        Ut, St, Vt = np.linalg.svd(deltas[t] - P @ deltas[t], full_matrices=False)
        cols.append(Ut[:, :s])
        values.append(St[:s])
        rows.append(Vt[:s])
    mean = np.concatenate(values).mean()
    return mean * _polar(np.concatenate(cols, axis=1)) @ _polar(np.concatenate(rows, axis=0))


def _deltas(T: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A shared part plus task-specific parts, so the common subspace is meaningful.
    shared = torch.randn(1, *shape, generator=g, dtype=torch.float64)
    return shared + 0.5 * torch.randn(T, *shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("T", [2, 3, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_iso_c_equals_a_float64_reference(T, shape):
    deltas = _deltas(T, shape, seed=T)
    expected = _iso_c_reference(deltas.numpy())
    np.testing.assert_allclose(iso.iso_c(deltas).numpy(), expected, rtol=1e-9, atol=1e-11)
    got32 = iso.iso_c(deltas.float()).double().numpy()
    np.testing.assert_allclose(got32, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("fraction", [0.8, 0.5])
@pytest.mark.parametrize("T", [2, 3, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_iso_cts_equals_a_float64_reference(T, shape, fraction):
    deltas = _deltas(T, shape, seed=10 + T)
    c, s = iso.subspace_sizes(min(shape), T, fraction)
    assert (c, s) == _authors_sizes(min(shape), T, fraction) and s >= 1
    expected = _iso_cts_reference(deltas.numpy(), fraction)
    got = iso.iso_cts(deltas, fraction=fraction).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)


def test_iso_c_of_one_task_is_its_task_vector_with_a_flat_spectrum():
    delta = _deltas(1, (30, 20), seed=5)
    out = iso.iso_c(delta)
    sv, sv_out = torch.linalg.svdvals(delta[0]), torch.linalg.svdvals(out)
    torch.testing.assert_close(sv_out, torch.full_like(sv, float(sv.mean())))
    U, _, Vh = torch.linalg.svd(delta[0], full_matrices=False)
    torch.testing.assert_close(out, sv.mean() * U @ Vh)


def test_iso_cts_with_everything_common_is_iso_c():
    deltas = _deltas(3, (40, 24), seed=6)
    assert iso.subspace_sizes(24, 3, 1.0) == (24, 0)
    torch.testing.assert_close(iso.iso_cts(deltas, fraction=1.0), iso.iso_c(deltas))


def test_iso_cts_spectrum_is_flat_and_holds_every_task_specific_direction():
    deltas = _deltas(4, (48, 40), seed=7)
    out = iso.iso_cts(deltas)
    sv = torch.linalg.svdvals(out)
    torch.testing.assert_close(sv, torch.full_like(sv, float(sv[0])))  # full rank, isotropic
    assert sv.shape == (40,)


def test_subspace_sizes_follow_the_authors_rounding_and_fit_the_rank():
    assert iso.subspace_sizes(768, 8, 0.8) == (616, 19)  # ViT-B/32 width, 8 tasks
    assert iso.subspace_sizes(768, 14, 0.8) == (768 - 14 * 11, 11)
    assert iso.subspace_sizes(10, 8, 0.8) == (10, 0)  # too small for task directions: Iso-C
    # f = 0: the authors' rounding would ask for 8·round(5/8) = 8 > 5 directions
    assert iso.subspace_sizes(5, 8, 0.0) == (5, 0)
    assert iso.subspace_sizes(12, 8, 0.0) == (4, 1)
    for m in range(1, 80):
        for T in (2, 3, 8, 20):
            c, s = iso.subspace_sizes(m, T, 0.8)
            assert c >= 0 and s >= 0 and c + T * s == m


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_a_fraction_outside_the_unit_interval_is_rejected(fraction):
    with pytest.raises(ValueError, match=r"common-space fraction must be in \[0, 1\]"):
        iso.subspace_sizes(10, 2, fraction)


@pytest.mark.parametrize("variant", ["c", "cts"])
def test_vector_tensors_are_the_task_mean_and_the_sweep_memo_is_reused(variant):
    g = torch.Generator().manual_seed(8)
    bias = torch.randn(3, 7, generator=g)
    torch.testing.assert_close(iso.merge_layer(bias, variant=variant), bias.mean(0))
    conv = torch.randn(3, 4, 3, 2, 2, generator=g)
    torch.testing.assert_close(iso.merge_layer(conv, variant=variant), conv.mean(0))
    memo: dict = {}
    matrix = torch.randn(3, 12, 9, generator=g)
    first = iso.merge_layer(matrix, variant=variant, memo=memo)
    assert iso.merge_layer(matrix, variant=variant, memo=memo) is first


def _merge_args(paths, method, out, *extra):
    return ["merge", method, "--pretrained", str(paths["pretrained"]),
            "--finetuned", *map(str, paths["finetuned"]),
            "--out", str(out), "-q", *extra]  # fmt: skip


@pytest.mark.parametrize("method", ["isoc", "isocts"])
def test_cli_merge_equals_the_layer_function_and_a_sweep_equals_single_runs(toy, tmp_path, method):
    paths = toy(3, rank=4)
    base = load_tensors(paths["pretrained"])
    tasks = [load_tensors(p) for p in paths["finetuned"]]
    extra = ["--iso-common-fraction", "0.5"] if method == "isocts" else []
    assert (
        main(
            _merge_args(
                paths,
                method,
                tmp_path / "sweep_a{alpha}.safetensors",
                "--alpha",
                "0.4",
                "1.3",
                *extra,
            )
        )
        == 0
    )
    for alpha in (0.4, 1.3):
        single = tmp_path / f"single_a{alpha}.safetensors"
        assert main(_merge_args(paths, method, single, "--alpha", str(alpha), *extra)) == 0
        a, b = load_tensors(tmp_path / f"sweep_a{alpha}.safetensors"), load_tensors(single)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        assert torch.equal(a["num_batches_tracked"], base["num_batches_tracked"])  # integers copied
        for name in ("proj", "transformer.resblocks.0.mlp.c_fc.weight", "ln_post.weight"):
            deltas = torch.stack([t[name] - base[name] for t in tasks]).double()
            if deltas.dim() == 3:
                ref = (
                    _iso_c_reference(deltas.numpy())
                    if method == "isoc"
                    else _iso_cts_reference(deltas.numpy(), 0.5)
                )
            else:
                ref = deltas.mean(0).numpy()
            got = (a[name] - base[name]).double().numpy()
            np.testing.assert_allclose(
                got, alpha * ref, rtol=1e-4, atol=1e-5, err_msg=f"{method} {name}"
            )


@pytest.mark.parametrize(
    "value,words",
    [
        ("1.5", "must be in [0, 1], got 1.5"),
        ("-0.1", "must be in [0, 1]"),
        ("nan", "must be finite"),
    ],
)
def test_cli_rejects_a_bad_common_fraction(toy, tmp_path, capsys, value, words):
    paths = toy(2)
    out = tmp_path / "m.safetensors"
    assert main(_merge_args(paths, "isocts", out, "--iso-common-fraction", value)) != 0
    err = capsys.readouterr().err
    assert "--iso-common-fraction" in err and "common-space fraction" in err and words in err
    assert not out.exists()


def test_the_workflow_plans_one_flat_merge_per_method_and_alpha(tmp_path):
    """A dry run with merge.methods [isoc, isocts]: one merge job per method over every α of the
    grid, each Iso-CTS command carrying the configured common fraction and no Iso-C command
    carrying it."""
    import yaml

    from tests.workflow.test_workflow import TINY, snakemake

    config = yaml.safe_load(TINY.read_text())
    config["merge"].update(methods=["isoc", "isocts"], iso_common_fraction=0.5)
    res = snakemake(tmp_path, "-n", "-p", "--cores", "2", config=config)
    out = res.stdout + res.stderr
    commands = [line for line in out.splitlines() if "python -m pipeline merge" in line]

    def alphas(line):
        words = line.split("--alpha ")[1].split()
        return " ".join(
            w for w in words[: next(i for i, w in enumerate(words) if w.startswith("--"))]
        )

    planned = sorted(f"{line.split(' merge ')[1].split()[0]} {alphas(line)}" for line in commands)
    assert planned == ["isoc 0.5 1.0", "isocts 0.5 1.0"]
    for line in commands:
        assert ("--iso-common-fraction 0.5" in line) == (" merge isocts " in line)
