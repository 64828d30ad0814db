"""`--device cuda` against the CPU: the merge, basis and hessian commands give the same result
to float32 round-off. Skipped on machines without CUDA (CI has none; run it on a GPU box)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.cli import main
from pipeline.store import load_tensors

from .conftest import TOY_SHAPES, write_toy_checkpoints
from .test_cli import _args, _basis, _hessian

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Large enough for the batched subspace iteration (block of 2k + 8 = 32 vectors, so
# min(d_out, d_in) > 64) and for the projected Hessian's conjugate gradients.
SHAPES = {
    **TOY_SHAPES,
    "transformer.resblocks.1.mlp.c_fc.weight": (200, 160),
    "transformer.resblocks.1.mlp.c_proj.weight": (160, 200),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_toy_checkpoints(tmp_path_factory.mktemp("cuda"), 4, rank=8, shapes=SHAPES)


def _merge(paths, method, out, *extra):
    fisher = method in ("fisher", "epimer")
    assert main(_args(paths, method, out, "--k", "4", *extra, fisher=fisher)) == 0


def _close(a, b, theta0, what, rtol=1e-4):
    """Merged updates δ = θ − θ0 within `rtol` of each other (float32 round-off), tensor by tensor."""
    A, B, P = load_tensors(a), load_tensors(b), load_tensors(theta0)
    assert A.keys() == B.keys()
    for name in A:
        if not A[name].is_floating_point():
            assert torch.equal(A[name], B[name])
            continue
        da, db = A[name].double() - P[name].double(), B[name].double() - P[name].double()
        assert torch.linalg.norm(da - db) <= rtol * torch.linalg.norm(db) + 1e-7, f"{what}: {name}"


@pytest.mark.parametrize("method,extra", [
    ("tsvm", []),
    ("epimer", []),  # auto: conjugate gradients where they converge, H̄ formed elsewhere
    ("epimer", ["--solver", "dense"]),
    ("epimer", ["--solver", "cg"]),
    ("epimer", ["--fisher-rank", "2"]),
    ("ta", []), ("ties", []), ("fisher", []),
])  # fmt: skip
def test_cuda_merge_equals_cpu(inputs, tmp_path, method, extra):
    cpu, gpu = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    _merge(inputs, method, cpu, *extra, "--report", str(tmp_path / "cpu.json"))
    _merge(inputs, method, gpu, *extra, "--device", "cuda", "--report", str(tmp_path / "gpu.json"))
    # The rank-R factorisation of F̄ stops when a sweep improves its error by under 1e-4
    # relatively; round-off can move that stop by one sweep, and the approximate H̄ with it.
    rtol = 2e-3 if "--fisher-rank" in extra else 1e-4
    _close(gpu, cpu, inputs["pretrained"], f"{method} {extra}", rtol)
    r_cpu, r_gpu = (
        json.loads((tmp_path / f"{d}.json").read_text())["totals"] for d in ("cpu", "gpu")
    )
    for key in ("eta", "V_S", "R_S"):
        if key in r_cpu:
            assert r_gpu[key] == pytest.approx(r_cpu[key], rel=10 * rtol, abs=1e-9), key


def test_cuda_stages_and_sweep_equal_cpu(inputs, tmp_path):
    """basis and hessian on the GPU, then a two-α sweep from them, equal the CPU's merges."""
    cuda = ("--device", "cuda")
    basis = _basis(inputs, tmp_path / "basis.zarr", *cuda, k=4)
    hessian = tmp_path / "hessian.zarr"
    assert _hessian(inputs, basis, hessian, *cuda) == 0
    _merge(
        inputs,
        "epimer",
        tmp_path / "sweep_a{alpha}.safetensors",
        "--device",
        "cuda",
        "--basis",
        str(basis),
        "--hessian",
        str(hessian),
        "--alpha",
        "0.3",
        "1.0",
    )
    for alpha in ("0.3", "1.0"):
        _merge(inputs, "epimer", tmp_path / f"cpu_{alpha}.safetensors", "--alpha", alpha)
        _close(
            tmp_path / f"sweep_a{alpha}.safetensors",
            tmp_path / f"cpu_{alpha}.safetensors",
            inputs["pretrained"],
            f"α = {alpha}",
        )
