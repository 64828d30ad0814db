import pytest
import torch

from pipeline.methods import fisher


def test_hand_computed_example():
    deltas = torch.tensor([[1.0, 4.0], [3.0, 0.0]])
    fishers = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    # coordinate 0: (1·1 + 3·3) / 4 = 2.5; coordinate 1: all-zero Fisher → floor only → mean 2.0
    out = fisher.merge_layer(deltas, fishers, eps=1e-6)
    torch.testing.assert_close(out, torch.tensor([2.5, 2.0]), rtol=1e-5, atol=1e-5)


def test_normalisation_divides_each_task_by_its_norm():
    deltas = torch.tensor([[1.0], [3.0]])
    fishers = torch.tensor([[2.0], [2.0]])
    norms = torch.tensor([1.0, 4.0])  # weights become 2 and 0.5
    out = fisher.merge_layer(deltas, fishers, eps=0.0, norms=norms)
    torch.testing.assert_close(out, torch.tensor([(2 * 1 + 0.5 * 3) / 2.5]))


@pytest.mark.parametrize("chunk", [1, 5, None])
@pytest.mark.parametrize("normalise", [False, True])
def test_chunked_merge_equals_a_float64_reference(chunk, normalise):
    g = torch.Generator().manual_seed(2)
    deltas = torch.randn(3, 6, 7, generator=g)
    fishers = torch.rand(3, 6, 7, generator=g) ** 3 * torch.tensor([1e-3, 1.0, 1e2]).view(3, 1, 1)
    norms = torch.tensor([0.5, 2.0, 8.0]) if normalise else None
    out = fisher.merge_layer(deltas, fishers, eps=1e-8, norms=norms, chunk=chunk)
    w = fishers.double() / (norms.double().view(3, 1, 1) if normalise else 1.0) + 1e-8
    expected = (w * deltas.double()).sum(0) / w.sum(0)
    assert out.shape == (6, 7)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(out, fisher.merge_layer(deltas, fishers, eps=1e-8, norms=norms, chunk=42))


def test_steps_do_not_change_a_bit_with_many_tasks():
    # Eight tasks: a step of one coordinate must add them in the same order as a long step.
    g = torch.Generator().manual_seed(4)
    scales = torch.logspace(-3, 3, 8).unsqueeze(1)
    deltas = torch.randn(8, 1000, generator=g) * scales
    fishers = torch.rand(8, 1000, generator=g) * scales
    whole = fisher.merge_layer(deltas, fishers, eps=1e-8, chunk=1000)
    for chunk in (1, 7):
        assert torch.equal(fisher.merge_layer(deltas, fishers, eps=1e-8, chunk=chunk), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalise", [False, True])
def test_cpu_pass_and_torch_path_agree(dtype, normalise):
    """The NumPy pass (CPU, one range of steps per thread) and the torch loop (other devices)
    compute the same arithmetic: equal to round-off, both within float64 reference tolerance."""
    g = torch.Generator().manual_seed(3)
    deltas = torch.randn(4, 300, 70, generator=g, dtype=dtype)
    fishers = torch.rand(4, 300, 70, generator=g, dtype=dtype) ** 4
    norms = torch.tensor([0.5, 2.0, 8.0, 1.0]) if normalise else None
    out = fisher.merge_layer(
        deltas, fishers, eps=1e-8, norms=norms, chunk=1000
    )  # 21 steps, split over threads
    ref = fisher._merge_torch(
        deltas.reshape(4, -1), fishers.reshape(4, -1), 1e-8, norms, 1000
    ).view(300, 70)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.skipif(
    fisher.KERNEL is None, reason="the compiled passes are not built (no C compiler at install)"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy on the NaN and inf entries
def test_compiled_pass_gives_the_numpy_pass_bits(monkeypatch, dtype, normalise):
    """The C pass against the NumPy steps it replaces, bit for bit: eight tasks of very
    different scales (sums in task order matter), zeros, an all-zero Fisher column (ε alone),
    NaN and ±inf propagated alike, a length that is no multiple of the block or the step."""
    g = torch.Generator().manual_seed(8)
    scales = torch.logspace(-3, 3, 8, dtype=dtype).unsqueeze(1)
    n = 3 * 2048 + 4099
    deltas = torch.randn(8, n, generator=g, dtype=dtype) * scales
    fishers = torch.rand(8, n, generator=g, dtype=dtype) * scales
    deltas[:, ::13] = 0.0
    fishers[:, 5] = 0.0
    deltas[2, 40], deltas[3, 41], fishers[4, 42] = float("nan"), float("inf"), float("inf")
    norms = torch.logspace(-1, 1, 8) if normalise else None
    compiled = fisher.merge_layer(deltas, fishers, eps=1e-8, norms=norms, chunk=1 << 12)
    monkeypatch.setattr(fisher, "KERNEL", None)
    numpy = fisher.merge_layer(deltas, fishers, eps=1e-8, norms=norms, chunk=1 << 12)
    assert torch.equal(compiled.view(torch.uint8), numpy.view(torch.uint8))
    assert compiled[40].isnan() and compiled[42].isnan()  # inf·δ / inf
