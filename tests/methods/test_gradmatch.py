"""Uncertainty-based gradient matching against a float64 reference of Daheim et al.'s merge,
its reductions (Fisher averaging, the task mean, Task Arithmetic), and `pipeline merge
gradmatch` end to end."""

from __future__ import annotations

import pytest
import torch

from pipeline.cli import main
from pipeline.methods import fisher, gradmatch
from pipeline.store import load_tensors


def _reference(
    deltas: torch.Tensor, fishers: torch.Tensor, prior: float, eps: float
) -> torch.Tensor:
    """Σ_t α_t H̄⁻¹ (H_0 + H_t) δ_t with H̄ = H_0 + Σ_t α_t H_t, α_t = 1, H_t = diag(F_t + ε),
    H_0 = prior·I, every diagonal matrix written out as a matrix (float64)."""
    T = deltas.shape[0]
    d = deltas.reshape(T, -1).double()
    H = [torch.diag(f + eps) for f in fishers.reshape(T, -1).double()]
    H0 = prior * torch.eye(d.shape[1], dtype=torch.float64)
    H_bar = H0 + sum(H)
    out = sum(torch.linalg.solve(H_bar, (H0 + H[t]) @ d[t]) for t in range(T))
    return out.view(deltas.shape[1:])


def _problem(T: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(T, *shape, generator=g, dtype=torch.float64)
    scales = torch.logspace(-2, 1, T, dtype=torch.float64).view(T, *([1] * len(shape)))
    fishers = torch.rand(T, *shape, generator=g, dtype=torch.float64) ** 2 * scales
    return deltas, fishers


@pytest.mark.parametrize("prior", [0.0, 0.05, 3.0])
@pytest.mark.parametrize("T", [2, 3, 8])
@pytest.mark.parametrize("shape", [(17,), (6, 5), (3, 2, 2, 2)])
def test_equals_a_float64_reference(shape, T, prior):
    deltas, fishers = _problem(T, shape, seed=T)
    expected = _reference(deltas, fishers, prior, 1e-8)
    got = gradmatch.merge_layer(deltas, fishers, prior=prior, eps=1e-8)
    assert got.shape == shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    got32 = gradmatch.merge_layer(deltas.float(), fishers.float(), prior=prior, eps=1e-8)
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_steps_of_the_prior_pass_do_not_change_the_result(monkeypatch):
    deltas, fishers = _problem(3, (50, 7), seed=4)
    whole = gradmatch.merge_layer(deltas, fishers, prior=0.5, eps=1e-8)
    monkeypatch.setattr(gradmatch, "STEP", 13)
    assert torch.equal(gradmatch.merge_layer(deltas, fishers, prior=0.5, eps=1e-8), whole)


@pytest.mark.parametrize("T", [2, 3, 8])
def test_no_prior_is_fisher_averaging_of_the_task_vectors(T):
    deltas, fishers = _problem(T, (9, 4), seed=20 + T)
    got = gradmatch.merge_layer(deltas.float(), fishers.float(), prior=0.0, eps=1e-8)
    assert torch.equal(got, fisher.merge_layer(deltas.float(), fishers.float(), eps=1e-8))
    ratio = (fishers * deltas).sum(0) / fishers.sum(0)  # Σ F_t δ_t / Σ F_t, no floor
    torch.testing.assert_close(gradmatch.merge_layer(deltas, fishers, prior=0.0, eps=0.0), ratio)


@pytest.mark.parametrize("T", [2, 3, 8])
def test_identical_fisher_and_no_prior_is_the_task_mean(T):
    deltas, fishers = _problem(T, (11,), seed=30 + T)
    same = fishers[:1].expand_as(fishers).contiguous()
    torch.testing.assert_close(
        gradmatch.merge_layer(deltas, same, prior=0.0, eps=0.0), deltas.mean(0)
    )


def test_a_dominant_prior_is_task_arithmetics_sum():
    deltas, fishers = _problem(3, (11,), seed=40)
    got = gradmatch.merge_layer(deltas, fishers, prior=1e12, eps=1e-8)
    torch.testing.assert_close(got, deltas.sum(0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prior", [-1.0, float("nan"), float("inf")])
def test_a_bad_prior_is_rejected(prior):
    deltas, fishers = _problem(2, (3,), seed=1)
    with pytest.raises(ValueError, match="prior precision must be finite and >= 0"):
        gradmatch.merge_layer(deltas, fishers, prior=prior, eps=1e-8)


def test_the_sweep_memo_is_reused():
    deltas, fishers = _problem(2, (5,), seed=2)
    memo: dict = {}
    first = gradmatch.merge_layer(deltas, fishers, prior=0.1, eps=1e-8, memo=memo)
    assert gradmatch.merge_layer(deltas, fishers, prior=0.1, eps=1e-8, memo=memo) is first


def _merge_args(paths, out, *extra):
    return ["merge", "gradmatch", "--pretrained", str(paths["pretrained"]),
            "--finetuned", *map(str, paths["finetuned"]), "--fisher", *map(str, paths["fisher"]),
            "--out", str(out), "-q", *extra]  # fmt: skip


@pytest.mark.parametrize("prior", ["0", "0.2"])
def test_cli_merge_equals_the_reference_and_a_sweep_equals_single_runs(toy, tmp_path, prior):
    paths = toy(3, rank=2)
    base = load_tensors(paths["pretrained"])
    tasks = [load_tensors(p) for p in paths["finetuned"]]
    fishers = [load_tensors(p) for p in paths["fisher"]]
    template = tmp_path / "sweep_a{alpha}.safetensors"
    assert (
        main(_merge_args(paths, template, "--alpha", "0.5", "1.0", "--gradmatch-prior", prior)) == 0
    )
    for alpha in (0.5, 1.0):
        single = tmp_path / f"single_a{alpha}.safetensors"
        assert (
            main(_merge_args(paths, single, "--alpha", str(alpha), "--gradmatch-prior", prior)) == 0
        )
        a, b = load_tensors(tmp_path / f"sweep_a{alpha}.safetensors"), load_tensors(single)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        for name in base:
            if not base[name].dtype.is_floating_point:
                assert torch.equal(a[name], base[name])
                continue
            deltas = torch.stack([t[name] - base[name] for t in tasks])
            ref = _reference(deltas, torch.stack([f[name] for f in fishers]), float(prior), 1e-8)
            got = (a[name] - base[name]).double()
            torch.testing.assert_close(got, alpha * ref, rtol=1e-4, atol=1e-6, msg=name)


def test_cli_with_no_prior_and_unit_alpha_is_the_fisher_merge(toy, tmp_path):
    paths = toy(3)
    fisher_out, gm_out = tmp_path / "fisher.safetensors", tmp_path / "gm.safetensors"
    common = ["--pretrained", str(paths["pretrained"]),
              "--finetuned", *map(str, paths["finetuned"]),
              "--fisher", *map(str, paths["fisher"]), "-q"]  # fmt: skip
    assert main(["merge", "fisher", *common, "--out", str(fisher_out)]) == 0
    assert main(["merge", "gradmatch", *common, "--alpha", "1.0", "--out", str(gm_out)]) == 0
    a, b = load_tensors(fisher_out), load_tensors(gm_out)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_cli_needs_the_fisher_files(toy, tmp_path, capsys):
    paths = toy(2)
    args = ["merge", "gradmatch", "--pretrained", str(paths["pretrained"]),
            "--finetuned", *map(str, paths["finetuned"]),
            "--out", str(tmp_path / "m.safetensors"), "-q"]  # fmt: skip
    assert main(args) != 0
    assert "needs one Fisher file per fine-tuned checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("value,words", [("-1", "must be >= 0"), ("nan", "must be finite")])
def test_cli_rejects_a_bad_prior(toy, tmp_path, capsys, value, words):
    paths = toy(2)
    out = tmp_path / "m.safetensors"
    assert main(_merge_args(paths, out, f"--gradmatch-prior={value}")) != 0
    err = capsys.readouterr().err
    assert "--gradmatch-prior" in err and "prior precision" in err and words in err
    assert not out.exists()
