"""Numerical safety: the ε jitter is honoured end to end, a singular H̄ falls back to a warned
symmetric eigensolve, and p×p algebra is float64 even when large products run in float32."""

from __future__ import annotations

import logging

import torch

from pipeline.cli import main
from pipeline.store import load_tensors, open_tensors, write_safetensors

LAYERS = [
    "positional_embedding",
    "proj",
    "transformer.resblocks.0.attn.in_proj_weight",
    "transformer.resblocks.0.mlp.c_fc.weight",
    "transformer.resblocks.0.mlp.c_proj.weight",
]


def _argv(paths, method, out, *extra):
    return [
        "merge",
        method,
        "--pretrained",
        str(paths["pretrained"]),
        "--finetuned",
        *map(str, paths["finetuned"]),
        "--fisher",
        *map(str, paths["fisher"]),
        "--k",
        "2",
        "--alpha",
        "0.8",
        "--out",
        str(out),
        "-q",
        *extra,
    ]


def test_a_dominant_eps_turns_epimer_into_tsvm(toy, tmp_path):
    """H̃_t → εI for every task when ε ≫ F, so α T H̄⁻¹ b → α Σ_t δ̃_t: TSV-M."""
    paths = toy(3, rank=2)
    assert main(_argv(paths, "tsvm", tmp_path / "tsvm.safetensors")) == 0
    assert main(_argv(paths, "epimer", tmp_path / "big.safetensors", "--eps", "1e8")) == 0
    assert main(_argv(paths, "epimer", tmp_path / "small.safetensors", "--eps", "1e-8")) == 0
    tsvm, big, small = (
        load_tensors(tmp_path / f"{n}.safetensors") for n in ("tsvm", "big", "small")
    )
    theta0 = load_tensors(paths["pretrained"])
    for name in LAYERS:
        torch.testing.assert_close(big[name], tsvm[name], rtol=1e-5, atol=1e-6, msg=name)
    # and ε really is an input: with a negligible ε the curvature moves the merge away from TSV-M
    name = "transformer.resblocks.0.mlp.c_fc.weight"
    gap = (small[name] - tsvm[name]).norm() / (tsvm[name] - theta0[name]).norm()
    assert gap > 1e-2


def test_singular_hbar_falls_back_to_a_warned_eigensolve(toy, tmp_path, caplog):
    """ε = 0 with a Fisher diagonal that has one non-zero entry: H̄ has rank ≤ 1, Cholesky fails."""
    paths = toy(3)
    for path in paths["fisher"]:
        sparse = {}
        for name, f in load_tensors(path).items():
            s = torch.zeros_like(f)
            s.view(-1)[0] = 1.0
            sparse[name] = s
        write_safetensors(path, sparse)
    out = tmp_path / "m.safetensors"
    with caplog.at_level(logging.WARNING):
        assert main(_argv(paths, "epimer", out, "--eps", "0")) == 0
    assert "not positive definite (Cholesky failed); using a symmetric eigensolve" in caplog.text
    merged = load_tensors(out)
    assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point())


def test_pxp_algebra_is_float64_with_float32_products(toy, tmp_path):
    paths = toy(3)
    models = [
        "--pretrained",
        str(paths["pretrained"]),
        "--finetuned",
        *map(str, paths["finetuned"]),
    ]
    basis, hessian = tmp_path / "b.zarr", tmp_path / "h.zarr"
    assert (
        main(["basis", *models, "--k", "2", "--dtype", "float32", "--out", str(basis), "-q"]) == 0
    )
    assert (
        main(
            [
                "hessian",
                *models,
                "--fisher",
                *map(str, paths["fisher"]),
                "--basis",
                str(basis),
                "--dtype",
                "float32",
                "--eps",
                "1e-6",
                "--solver",
                "dense",
                "--out",
                str(hessian),
                "-q",
            ]
        )
        == 0
    )
    b, h = open_tensors(basis), open_tensors(hessian)
    for name in LAYERS:
        assert (
            b.group(name).dtype("U") == torch.float32
        )  # the large factors stay in the compute dtype
        g = h.group(name)
        H = g.get("H")
        assert H.dtype == torch.float64 and g.dtype("Hx_tagged") == torch.float64
        torch.testing.assert_close(H, H.T, rtol=0, atol=0)
        assert float(torch.linalg.eigvalsh(H).min()) >= 1e-6 * (1 - 1e-6)  # ε I keeps H̄ ≻ 0
    assert h.attrs()["parameters"]["eps"] == 1e-6
