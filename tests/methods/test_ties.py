import pytest
import torch

from pipeline.methods import ties


def test_magnitude_threshold_keeps_the_top_percent():
    mags = torch.tensor([0.1, 5.0, 0.3, 2.0, 0.2, 1.0, 0.05, 0.4, 3.0, 0.6])
    assert ties.magnitude_threshold(mags, 20) == 3.0  # the 2 largest of 10: {5, 3}
    assert ties.magnitude_threshold(mags, 50) == pytest.approx(0.6)  # {5, 3, 2, 1, 0.6}
    assert ties.magnitude_threshold(mags, 100) == 0.0
    assert ties.magnitude_threshold(mags, 5) == float("inf")  # ⌊0.5⌋ = 0 kept


def test_hand_computed_example():
    # Three tasks, four coordinates, thresholds chosen per task.
    deltas = torch.tensor(
        [
            [0.9, -0.1, 0.5, -0.4],
            [-0.8, 0.6, 0.5, 0.3],
            [0.7, 0.7, -0.2, 0.3],
        ]
    )
    thresholds = torch.tensor([0.4, 0.3, 0.25])
    # Trimmed:           [ 0.9, 0,   0.5, -0.4]
    #                    [-0.8, 0.6, 0.5,  0.3]
    #                    [ 0.7, 0.7, 0,    0.3]
    # Mass:              [ 0.8, 1.3, 1.0,  0.2] -> signs + + + +
    # Agreeing mean:     [(0.9+0.7)/2, (0.6+0.7)/2, (0.5+0.5)/2, (0.3+0.3)/2]
    expected = torch.tensor([0.8, 0.65, 0.5, 0.3])
    torch.testing.assert_close(ties.merge_layer(deltas, thresholds, alpha=1.0), expected)
    torch.testing.assert_close(ties.merge_layer(deltas, thresholds, alpha=0.5), 0.5 * expected)
    torch.testing.assert_close(
        ties.merge_layer(deltas, thresholds, alpha=1.0, disjoint="sum"), torch.tensor([1.6, 1.3, 1.0, 0.6])
    )


def test_zero_mass_takes_the_majority_sign():
    deltas = torch.tensor([[1.0], [1.0], [-2.0]])
    out = ties.merge_layer(deltas, torch.zeros(3), alpha=1.0)
    torch.testing.assert_close(out, torch.tensor([1.0]))  # two positives outvote one negative


def test_unknown_disjoint_mode():
    with pytest.raises(ValueError, match="disjoint"):
        ties.merge_layer(torch.ones(2, 3), torch.zeros(2), alpha=1.0, disjoint="median")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.5, 20.0, 73.0])
@pytest.mark.parametrize("path", ["bracket", "radix"])
def test_large_thresholds_equal_kthvalue(dtype, density, path, monkeypatch):
    # Above 2^20 values the threshold comes from a sampled bracket, or a radix select where the
    # bracket misses; either must equal the plain one, ties and zeros included.
    g = torch.Generator().manual_seed(3)
    mags = torch.randn(1 << 21, generator=g, dtype=dtype).abs()
    mags[::7] = 0.0
    mags[1::5] = mags[2]  # many equal values
    n = mags.numel()
    n_keep = int(n * density / 100.0)
    expected = float(torch.kthvalue(mags, n - n_keep + 1).values)
    used = []
    bracketed, radix = ties._bracketed_select, ties._radix_select
    monkeypatch.setattr(ties, "_bracketed_select", lambda *a: used.append("bracket") or (bracketed(*a) if path == "bracket" else None))
    monkeypatch.setattr(ties, "_radix_select", lambda *a: used.append("radix") or radix(*a))
    assert ties.magnitude_threshold(mags, density) == expected
    assert used == (["bracket"] if path == "bracket" else ["bracket", "radix"])


def test_a_bracket_that_misses_says_so_and_the_radix_select_answers():
    # Eight non-zeros among 2^21 values: a sample of 1024 (seed 0) holds none of them, so its
    # bracket is [0, 0] and cannot hold the 3rd largest value (6). The count shows the miss.
    x = torch.cat([torch.zeros((1 << 21) - 8), torch.arange(1.0, 9.0)])
    k = (1 << 21) - 2
    assert ties._bracketed_select(x, k, 1 << 22, sample=1 << 10) is None
    assert float(ties._kth_smallest(x, k)) == 6.0


def _reference(deltas: torch.Tensor, thresholds: torch.Tensor, alpha: float, disjoint: str) -> torch.Tensor:
    """TIES from its definition, one coordinate at a time, in float64."""
    T = deltas.shape[0]
    flat = deltas.reshape(T, -1).double()
    out = torch.zeros(flat.shape[1], dtype=torch.float64)
    for j in range(flat.shape[1]):
        kept = [float(x) if abs(float(x)) >= float(thresholds[t]) else 0.0 for t, x in enumerate(flat[:, j])]
        mass = sum(kept)
        if mass != 0:
            sign = 1.0 if mass > 0 else -1.0
        else:
            votes = sum(1 for x in kept if x > 0) - sum(1 for x in kept if x < 0)
            sign = float((votes > 0) - (votes < 0))
        agreeing = [x for x in kept if x != 0 and (x > 0) == (sign > 0) and sign != 0]
        total = sum(agreeing)
        out[j] = alpha * (total / max(1, len(agreeing)) if disjoint == "mean" else total)
    return out.view(deltas.shape[1:])


@pytest.mark.parametrize("disjoint", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_merge_equals_the_definition(disjoint, chunk):
    g = torch.Generator().manual_seed(5)
    deltas = torch.randn(4, 9, 13, generator=g).round(decimals=1)  # rounding makes exact ties and zero masses
    deltas[:, 0, :4] = torch.tensor([1.0, -1.0, 0.5, -0.5]).view(4, 1)  # mass exactly zero, majority tie
    thresholds = torch.tensor([0.0, 0.3, 0.5, 0.2])
    out = ties.merge_layer(deltas, thresholds, alpha=0.7, disjoint=disjoint, chunk=chunk)
    assert out.shape == (9, 13)
    torch.testing.assert_close(out.double(), _reference(deltas, thresholds, 0.7, disjoint), rtol=1e-6, atol=1e-7)
    # The chunking never changes a bit.
    whole = ties.merge_layer(deltas, thresholds, alpha=0.7, disjoint=disjoint, chunk=deltas[0].numel())
    assert torch.equal(out, whole)
