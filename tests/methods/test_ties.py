import pytest
import torch

from pipeline.merge import MergeInputs, merge
from pipeline.methods import MergeSettings, ties
from pipeline.store import ArtifactError
from tests.test_cli import _InMemory


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
        ties.merge_layer(deltas, thresholds, alpha=1.0, disjoint="sum"),
        torch.tensor([1.6, 1.3, 1.0, 0.6]),
    )


def test_zero_mass_takes_the_majority_sign():
    deltas = torch.tensor([[1.0], [1.0], [-2.0]])
    out = ties.merge_layer(deltas, torch.zeros(3), alpha=1.0)
    torch.testing.assert_close(out, torch.tensor([1.0]))  # two positives outvote one negative


def test_unknown_disjoint_mode():
    with pytest.raises(ValueError, match="disjoint"):
        ties.merge_layer(torch.ones(2, 3), torch.zeros(2), alpha=1.0, disjoint="median")


def test_unknown_sign_election_names_the_choices():
    with pytest.raises(ValueError, match="sign election `count`.*mass, frequency"):
        ties.merge_layer(torch.ones(2, 3), torch.zeros(2), alpha=1.0, sign="count")
    sums = ties.TrimmedSums(3, torch.float32, 1)
    with pytest.raises(ValueError, match="sign election"):
        sums.finish("majority")


def test_frequency_election_hand_computed():
    # Four tasks, five coordinates, nothing trimmed (thresholds 0; zeros count for no sign).
    deltas = torch.tensor(
        [
            [0.1, 0.1, 1.0, 0.0, 0.5],
            [0.1, -5.0, -1.0, 0.0, 0.0],
            [0.2, -5.0, 0.0, 0.0, -0.25],
            [-9.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    # c⁺/c⁻:      3/1       1/2        1/1 (tie)  0/0      1/1 (tie)
    # frequency:  +         −          +          +        +
    # mass:       −         −          0 → vote tie: none  0    +
    freq = ties.merge_layer(deltas, torch.zeros(4), alpha=1.0, sign="frequency")
    torch.testing.assert_close(freq, torch.tensor([0.4 / 3, -5.0, 1.0, 0.0, 0.5]))
    mass = ties.merge_layer(deltas, torch.zeros(4), alpha=1.0, sign="mass")
    torch.testing.assert_close(mass, torch.tensor([-9.0, -5.0, 0.0, 0.0, 0.5]))
    freq_sum = ties.merge_layer(deltas, torch.zeros(4), alpha=0.5, sign="frequency", disjoint="sum")
    torch.testing.assert_close(freq_sum, 0.5 * torch.tensor([0.4, -10.0, 1.0, 0.0, 0.5]))


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
    monkeypatch.setattr(
        ties,
        "_bracketed_select",
        lambda *a: used.append("bracket") or (bracketed(*a) if path == "bracket" else None),
    )
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


def _reference(
    deltas: torch.Tensor, thresholds: torch.Tensor, alpha: float, disjoint: str
) -> torch.Tensor:
    """TIES from its definition, one coordinate at a time, in float64."""
    T = deltas.shape[0]
    flat = deltas.reshape(T, -1).double()
    out = torch.zeros(flat.shape[1], dtype=torch.float64)
    for j in range(flat.shape[1]):
        kept = [
            float(x) if abs(float(x)) >= float(thresholds[t]) else 0.0
            for t, x in enumerate(flat[:, j])
        ]
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


def _frequency_reference(
    deltas: torch.Tensor, thresholds: torch.Tensor, alpha: float, disjoint: str
) -> torch.Tensor:
    """The frequency election as mergekit's `get_mask(method="count")` writes it, in float64 over
    the trimmed task vectors: majority = +1 where Σ_t sign(κ_t) ≥ 0, else −1; a value is merged
    where sign(κ_t) equals it; disjoint mean divides by the number merged (1 where none)."""
    d = deltas.reshape(deltas.shape[0], -1).double()
    kept = torch.where(d.abs() >= thresholds.double().unsqueeze(1), d, torch.zeros_like(d))
    sign = kept.sign()
    majority = (sign.sum(0) >= 0).double() * 2 - 1
    mask = (sign == majority).double()
    total = (kept * mask).sum(0)
    if disjoint == "mean":
        divisor = mask.sum(0)
        divisor[divisor == 0] = 1
        total = total / divisor
    return (alpha * total).view(deltas.shape[1:])


def _reference_of(sign: str):
    return _reference if sign == "mass" else _frequency_reference


@pytest.mark.parametrize("sign", ["mass", "frequency"])
@pytest.mark.parametrize("disjoint", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_merge_equals_the_definition(disjoint, chunk, sign):
    g = torch.Generator().manual_seed(5)
    deltas = torch.randn(4, 9, 13, generator=g).round(
        decimals=1
    )  # rounding makes exact ties and zero masses
    deltas[:, 0, :4] = torch.tensor([1.0, -1.0, 0.5, -0.5]).view(
        4, 1
    )  # mass exactly zero, majority tie
    thresholds = torch.tensor([0.0, 0.3, 0.5, 0.2])
    out = ties.merge_layer(deltas, thresholds, alpha=0.7, disjoint=disjoint, sign=sign, chunk=chunk)
    assert out.shape == (9, 13)
    want = _reference_of(sign)(deltas, thresholds, 0.7, disjoint)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-7)
    # The chunking never changes a bit.
    whole = ties.merge_layer(
        deltas, thresholds, alpha=0.7, disjoint=disjoint, sign=sign, chunk=deltas[0].numel()
    )
    assert torch.equal(out, whole)


def test_frequency_and_mass_elect_differently_where_a_large_value_is_outvoted():
    """The two rules differ exactly where the mass and the vote disagree: the test data has such
    coordinates, so the frequency tests above are not the mass tests again."""
    g = torch.Generator().manual_seed(8)
    deltas = torch.randn(5, 4000, generator=g) * torch.logspace(-2, 0, 5).unsqueeze(1)
    thresholds = torch.zeros(5)
    freq = ties.merge_layer(deltas, thresholds, alpha=1.0, sign="frequency")
    mass = ties.merge_layer(deltas, thresholds, alpha=1.0, sign="mass")
    votes = (deltas > 0).sum(0) - (deltas < 0).sum(0)
    differ = (votes >= 0) != (deltas.sum(0) > 0)
    assert 100 < int(differ.sum()) < 4000
    assert (freq.sign() != mass.sign())[differ].all() and torch.equal(freq[~differ], mass[~differ])


# --------------------------------------------------------------------------- streamed sums


def _definition64(
    deltas: torch.Tensor, thresholds: torch.Tensor, alpha: float, disjoint: str
) -> torch.Tensor:
    """The same definition as `_reference`, vectorised over coordinates (float64)."""
    d = deltas.reshape(deltas.shape[0], -1).double()
    kept = torch.where(d.abs() >= thresholds.double().unsqueeze(1), d, torch.zeros_like(d))
    mass = kept.sum(0)
    votes = (kept > 0).sum(0) - (kept < 0).sum(0)
    sign = torch.where(mass != 0, mass.sign(), votes.sign().double())
    agree = (kept * sign > 0).double()
    total = (kept * agree).sum(0)
    if disjoint == "mean":
        total = total / agree.sum(0).clamp_min(1)
    return (alpha * total).view(deltas.shape[1:])


def _task_vectors(T: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, -1, T).unsqueeze(1)  # tasks of different magnitudes
    d = torch.randn(T, n, generator=g) * scales
    d[:, ::11] = d[:, ::11].round(decimals=2)  # exact ties across tasks
    return d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [20.0, 3.0])
def test_streamed_thresholds_and_merge_equal_the_definition(dtype, density):
    _streamed_merge_equals_the_definition(dtype, density, "mass")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_frequency_merge_equals_the_definition(dtype):
    _streamed_merge_equals_the_definition(dtype, 20.0, "frequency")


def _streamed_merge_equals_the_definition(dtype, density, sign):
    # Above BRACKET_SAMPLE coordinates `add_top` brackets each threshold from a sample and adds
    # the task in one pass; thresholds and merge must be the exact ones, in several thread ranges.
    T, n = 4, 3 * ties.BRACKET_SAMPLE + 123
    base = torch.randn(n, generator=torch.Generator().manual_seed(9), dtype=dtype)
    deltas = _task_vectors(T, n, seed=1).to(dtype)
    sums = ties.TrimmedSums(n, dtype, T, chunk=1 << 16)
    thresholds = []
    for t in range(T):
        thr = sums.add_top(base + deltas[t], base, density)
        assert thr is not None
        # δ = (θ0 + δ_t) − θ0 as the pass computes it, in `dtype`:
        assert thr == ties.magnitude_threshold(((base + deltas[t]) - base).abs(), density)
        thresholds.append(thr)
    assert sums.finish(sign)
    exact = (base + deltas) - base
    definition = _definition64 if sign == "mass" else _frequency_reference
    for disjoint in ("mean", "sum"):
        got = sums.merged(0.7, disjoint)
        assert got.dtype == dtype
        want = ties.merge_layer(
            exact,
            torch.tensor(thresholds, dtype=torch.float64),
            alpha=0.7,
            disjoint=disjoint,
            sign=sign,
        )
        assert torch.equal(got, want)
        want64 = definition(exact, torch.tensor(thresholds), 0.7, disjoint)
        torch.testing.assert_close(got.double(), want64, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(
        sums.merged(0.7, "mean", 5, 105), sums.merged(0.7, "mean")[5:105], rtol=0, atol=0
    )
    # θ0 added in the same pass: the bits of adding the delta to it afterwards.
    for disjoint in ("mean", "sum"):
        fused = sums.merged(0.7, disjoint, 5, 70_005, base=base[5:70_005])
        assert torch.equal(fused, base[5:70_005] + sums.merged(0.7, disjoint, 5, 70_005))
    with pytest.raises(ValueError, match="θ0"):
        sums.merged(0.7, "mean", 5, 105, base=base[:99])


def test_streamed_zero_threshold_keeps_zeros_that_count_for_no_sign():
    """Mostly-zero task vectors at a density above their share of non-zeros: the threshold is 0,
    so the band holds the zeros, which are kept but count for neither sign (c⁻ = c − c⁺), and
    an exact cancellation P = −N takes the majority vote of the non-zeros."""
    T, n = 3, ties.BRACKET_SAMPLE + 4097
    g = torch.Generator().manual_seed(5)
    deltas = torch.randn(T, n, generator=g)
    deltas[torch.rand(T, n, generator=g) < 0.7] = 0.0
    deltas[:, :3] = torch.tensor(
        [[1.0, 2.0, 0.5], [-0.5, -1.0, -1.0], [-0.5, -1.0, 0.5]]
    )  # [task, coordinate]
    sums = ties.TrimmedSums(n, torch.float32, T, chunk=1 << 15)
    thresholds = [sums.add_top(d, None, 50.0) for d in deltas]
    assert thresholds == [0.0, 0.0, 0.0]
    assert sums.finish()
    got = sums.merged(1.0)
    assert torch.equal(got, ties.merge_layer(deltas, torch.tensor(thresholds), alpha=1.0))
    torch.testing.assert_close(
        got.double(), _definition64(deltas, torch.zeros(T), 1.0, "mean"), rtol=1e-6, atol=1e-12
    )
    # Masses of 0 at coordinates 0-2: (1, −0.5, −0.5) and (2, −1, −1) elect − by two votes
    # to one, (0.5, −1, 0.5) elects +; each then averages its two agreeing values.
    assert got[:3].tolist() == [-0.5, -1.0, 0.5]
    assert sums.n_pos[:3].tolist() == [2, 2, 2]  # the agreeing counts


def _sums_of(tasks, base, density, dtype, pieces):
    """TrimmedSums after add_top of every task (as pieces of 3 unequal parts when `pieces`)."""
    n = tasks.shape[1]
    sums = ties.TrimmedSums(n, dtype, len(tasks), chunk=1 << 14)
    cuts = [0, 1000, n // 2 + 7, n]
    thresholds = []
    for task in tasks:
        source = [(a, task[a:b].numpy()) for a, b in zip(cuts, cuts[1:])] if pieces else task
        thresholds.append(sums.add_top(source, base, density))
    return sums, thresholds


@pytest.mark.skipif(
    ties.KERNEL is None, reason="the compiled TIES pass is not built (no C compiler at install)"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_base,pieces", [(True, True), (False, False)])
def test_compiled_pass_gives_the_numpy_pass_bits(monkeypatch, dtype, with_base, pieces):
    """The C pass against the NumPy steps it replaces: thresholds, the four sums (before the
    election), the merge, all bit for bit; with zeros, exact ties, ±inf, several steps and
    thread ranges, mapped-style pieces, and the first task's fresh write."""
    T, n = 4, 2 * ties.BRACKET_SAMPLE + 999
    g = torch.Generator().manual_seed(11)
    base = torch.randn(n, generator=g, dtype=dtype) if with_base else None
    tasks = _task_vectors(T, n, seed=3).to(dtype)
    tasks[:, ::7] = 0.0
    tasks[1, 5], tasks[2, 9] = float("inf"), float("-inf")  # |δ| = inf is kept
    if base is not None:
        tasks = tasks + base
    results = {}
    for path in ("compiled", "numpy"):
        if path == "numpy":
            monkeypatch.setattr(ties, "KERNEL", None)
        sums, thresholds = _sums_of(tasks, base, 20.0, dtype, pieces)
        state = [t.clone() for t in (sums.pos, sums.neg, sums.n_pos, sums.n_kept)]
        assert sums.finish() is False  # the ±inf sums: `finish` reports them
        results[path] = thresholds, state
    (t_c, s_c), (t_n, s_n) = results["compiled"], results["numpy"]
    assert t_c == t_n and None not in t_c
    for a, b in zip(s_c, s_n):
        assert torch.equal(
            a.view(torch.uint8), b.view(torch.uint8)
        )  # bits, NaN payloads and −0 too
    finite = tasks.clone()
    for t, i in ((1, 5), (2, 9)):  # δ = 0 there instead of ±inf
        finite[t, i] = 0.0 if base is None else base[i]
    for sign in ties.SIGN_RULES:
        merged = {}
        for path in ("compiled", "numpy"):
            if path == "numpy":
                monkeypatch.setattr(ties, "KERNEL", None)
            else:
                monkeypatch.undo()
            sums, thresholds = _sums_of(finite, base, 20.0, dtype, pieces)
            assert sums.finish(sign)
            merged[path] = [
                sums.merged(0.4, disjoint, base=base) for disjoint in ties.DISJOINT_MODES
            ]
        for a, b in zip(merged["compiled"], merged["numpy"]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        if sign == "frequency":  # and both equal the float64 definition
            deltas = finite - base if base is not None else finite
            for got, disjoint in zip(merged["numpy"], ties.DISJOINT_MODES):
                want = _frequency_reference(deltas, torch.tensor(thresholds), 0.4, disjoint)
                if base is not None:
                    got = got - base
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_compiled_pass_is_built_where_a_compiler_is():
    """setup.py builds the C pass at install; a machine with a C compiler must have it (a
    silently missing extension would only show as a slower TIES)."""
    import shutil
    import sysconfig
    from pathlib import Path

    headers = Path(sysconfig.get_paths().get("include") or "") / "Python.h"
    if not (shutil.which("cc") or shutil.which("gcc")) or not headers.is_file():
        pytest.skip("no C compiler or Python headers here: the NumPy pass runs")
    assert ties.KERNEL is not None, (
        "pipeline.methods._passes is not built: reinstall with `pip install -e .`"
    )


def test_a_nan_task_is_reported_by_both_passes(monkeypatch):
    n = ties.BRACKET_SAMPLE + 10
    g = torch.Generator().manual_seed(2)
    tasks = torch.randn(2, n, generator=g)
    tasks[1, 77] = float("nan")
    for kernel in (ties.KERNEL, None):
        monkeypatch.setattr(ties, "KERNEL", kernel)
        sums = ties.TrimmedSums(n, torch.float32, 2)
        for task in tasks:
            assert sums.add_top(task, None, 20.0) is not None
        assert sums.finish() is False


def test_a_missed_bracket_returns_none_and_known_thresholds_recover():
    # Eight non-zeros among 2^20 coordinates and a density keeping three: the sample sees only
    # zeros, its bracket [0, 0] cannot hold the threshold (the 3rd largest, 6), and the count says so.
    n = 1 << 20
    x = torch.zeros(n)
    x[-8:] = torch.arange(1.0, 9.0)
    density = 100.0 * 3 / n
    sums = ties.TrimmedSums(n, torch.float32, 2)
    other = _task_vectors(1, n, seed=4)[0]
    assert sums.add_top(other, None, 20.0) is not None
    assert (
        sums.add_top(x, None, density) is None
    )  # the sums now hold a wrong share of x: start over
    sums.reset()
    thresholds = [
        ties.magnitude_threshold(other.abs(), 20.0),
        ties.magnitude_threshold(x.abs(), density),
    ]
    assert thresholds[1] == 6.0
    sums.add(other, None, thresholds[0])
    sums.add(x, None, thresholds[1])
    assert sums.finish()
    want = ties.merge_layer(torch.stack([other, x]), torch.tensor(thresholds), alpha=1.0)
    assert torch.equal(sums.merged(1.0), want)


def test_the_first_task_writes_the_sums_and_no_task_merges_to_zero():
    """The sums start unzeroed: the first task's pass writes 0 + its values, so a −0 becomes +0
    (the sign election needs a mass that is never −0), and finishing with no task gives zeros."""
    sums = ties.TrimmedSums(5, torch.float32, 2)
    sums.add(
        torch.tensor([-0.0, -0.0, 1.0, -2.0, 0.0]), None, 0.0
    )  # threshold 0 keeps the zeros too
    assert sums.finish()
    out = sums.merged(1.0)
    assert (
        torch.equal(out, torch.tensor([0.0, 0.0, 1.0, -2.0, 0.0])) and not out.signbit()[:2].any()
    )
    assert sums.n_pos.tolist() == [0, 0, 1, 1, 0]
    empty = ties.TrimmedSums(3, torch.float32, 1)
    assert empty.finish() and empty.merged(0.5).tolist() == [0.0, 0.0, 0.0]


def test_many_tasks_count_past_a_byte():
    T, n = 300, 40  # counts of agreeing values above 255 need the wider count type
    d = _task_vectors(T, n, seed=2).abs() + 1e-3  # all positive: every coordinate agrees everywhere
    thresholds = torch.zeros(T)
    out = ties.merge_layer(d, thresholds, alpha=1.0)
    torch.testing.assert_close(
        out.double(), _definition64(d, thresholds, 1.0, "mean"), rtol=1e-6, atol=0
    )
    out_sum = ties.merge_layer(d, thresholds, alpha=1.0, disjoint="sum")
    torch.testing.assert_close(out_sum.double(), d.double().sum(0), rtol=1e-5, atol=0)


def test_non_finite_task_vectors_are_refused():
    d = torch.ones(2, 10)
    d[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ties.merge_layer(d, torch.zeros(2), alpha=1.0)
    d[1, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ties.merge_layer(d, torch.zeros(2), alpha=1.0)


def _merge_ties(base: dict, tasks: list[dict], density: float) -> dict[str, torch.Tensor]:
    inputs = MergeInputs(
        _InMemory(base, "theta0"), [_InMemory(t, f"task{i}") for i, t in enumerate(tasks)]
    )
    out: dict[str, torch.Tensor] = {}
    merge(
        "ties",
        inputs,
        MergeSettings(alpha=1.0, ties_density=density),
        out.__setitem__,
        progress=False,
    )
    return out


def test_the_driver_streams_every_tensor_and_rebuilds_after_a_missed_bracket(monkeypatch):
    # Two tensors (plus an integer buffer, copied) concatenated per task, a density keeping 200
    # coordinates and a sample of 1024. Task 0 holds 5000 entries of 1.0 (the threshold), which
    # the sample sees; task 1 holds 300 non-zeros (1 … 300) the sample misses, so its bracket
    # misses the threshold (101) and the driver re-adds tasks 0 and 1 with exact thresholds.
    monkeypatch.setattr(ties, "BRACKET_SAMPLE", 1024)
    g = torch.Generator().manual_seed(0)
    base = {
        "a": torch.randn(256, 1024, generator=g),
        "b": torch.randn(1024, generator=g),
        "steps": torch.tensor([7]),
    }
    n = 256 * 1024 + 1024
    dense = 1e-3 * torch.randn(n, generator=g)
    dense[torch.randperm(n, generator=g)[:5000]] = 1.0
    sparse = torch.zeros(n)
    sparse[torch.randperm(n, generator=g)[:300]] = torch.arange(1.0, 301.0)
    tasks = []
    for d in (dense, sparse):
        tasks.append(
            {
                "a": base["a"] + d[: 256 * 1024].view(256, 1024),
                "b": base["b"] + d[256 * 1024 :],
                "steps": base["steps"],
            }
        )
    density = 100.0 * 200 / n
    returned = []
    add_top = ties.TrimmedSums.add_top
    monkeypatch.setattr(
        ties.TrimmedSums,
        "add_top",
        lambda self, *a: returned.append(add_top(self, *a)) or returned[-1],
    )
    out = _merge_ties(base, tasks, density)
    assert returned[0] is not None and returned[1] is None
    flat0 = torch.cat([base["a"].flatten(), base["b"]])
    deltas = torch.stack([torch.cat([t["a"].flatten(), t["b"]]) - flat0 for t in tasks])
    thresholds = torch.tensor([ties.magnitude_threshold(d.abs(), density) for d in deltas])
    want = flat0 + ties.merge_layer(deltas, thresholds, alpha=1.0)
    assert torch.equal(torch.cat([out["a"].flatten(), out["b"]]), want)
    assert torch.equal(out["steps"], base["steps"])


@pytest.mark.parametrize("where", ["task", "overflow"])
def test_the_driver_names_a_non_finite_tensor_or_an_overflow(where):
    base = {"a": torch.zeros(4, 8), "b": torch.zeros(8)}
    tasks = [{"a": torch.ones(4, 8), "b": torch.ones(8)} for _ in range(2)]
    if where == "task":
        tasks[1]["b"][3] = float("nan")
        message = "task1: tensor `b` contains NaN or Inf"
    else:  # finite inputs whose difference is not a float32
        base["a"][0, 0] = -3e38
        tasks[0]["a"][0, 0] = 3e38
        message = "overflow float32"
    with pytest.raises(ArtifactError, match=message):
        _merge_ties(base, tasks, 100.0)


def test_mapped_files_and_buffered_reads_merge_alike(tmp_path):
    # Safetensors inputs stream from read-only maps of the files; other readers (and dtypes
    # other than the merge dtype) through a buffer. Same inputs, same bits.
    from pipeline.store import open_tensors, write_safetensors

    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(512, 640, generator=g), "v": torch.randn(640, generator=g)}
    tasks = [
        {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)
    ]
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for p, t in zip(paths, [base, *tasks]):
        write_safetensors(p, t)
    assert open_tensors(paths[1]).mapped("w") is not None
    from_files: dict[str, torch.Tensor] = {}
    inputs = MergeInputs(open_tensors(paths[0]), [open_tensors(p) for p in paths[1:]])
    merge("ties", inputs, MergeSettings(alpha=1.0), from_files.__setitem__, progress=False)
    in_memory = _merge_ties(base, tasks, 20.0)
    assert from_files.keys() == in_memory.keys() == base.keys()
    for name in base:
        assert torch.equal(from_files[name], in_memory[name]), name


def test_half_precision_checkpoints_merge_in_float32_and_come_back_half():
    # float16 files are not mapped (the merge dtype is float32): read into the buffer, merged in
    # float32, written in float16 from the θ0 kept in memory.
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(600, 500, generator=g).half()}
    tasks = [
        {"w": (base["w"].float() + 0.05 * torch.randn(600, 500, generator=g)).half()}
        for _ in range(3)
    ]
    out = _merge_ties(base, tasks, 20.0)
    flat0 = base["w"].float().flatten()
    deltas = torch.stack([t["w"].float().flatten() - flat0 for t in tasks])
    thresholds = torch.tensor([ties.magnitude_threshold(d.abs(), 20.0) for d in deltas])
    want = (flat0 + ties.merge_layer(deltas, thresholds, alpha=1.0)).half().view(600, 500)
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], want)


def test_frequency_counts_past_a_byte():
    # 300 tasks: vote counts above 255 (the wider count type), majorities near the tie.
    T, n = 300, 64
    d = _task_vectors(T, n, seed=6)
    d[:150, :8] = (
        d[:150, :8].abs() + 1e-3
    )  # 150 positive votes against 150 negative: + wins the tie
    d[150:, :8] = -(d[150:, :8].abs() + 1e-3)
    thresholds = torch.zeros(T)
    for disjoint in ties.DISJOINT_MODES:
        out = ties.merge_layer(d, thresholds, alpha=1.0, sign="frequency", disjoint=disjoint)
        torch.testing.assert_close(
            out.double(), _frequency_reference(d, thresholds, 1.0, disjoint), rtol=1e-5, atol=1e-9
        )
        assert (out[:8] > 0).all()


@pytest.mark.parametrize(
    "sign,disjoint", [("frequency", "mean"), ("frequency", "sum"), ("mass", "sum")]
)
def test_the_driver_merges_and_reports_the_ties_settings(sign, disjoint):
    """`merge` with ties_sign/ties_disjoint: the model equals `merge_layer` over the flattened
    tensors, and the report records the settings it ran with."""
    g = torch.Generator().manual_seed(4)
    base = {
        "a": torch.randn(32, 16, generator=g),
        "b": torch.randn(16, generator=g),
        "steps": torch.tensor([3]),
    }
    tasks = [
        {
            "a": base["a"] + torch.randn(32, 16, generator=g),
            "b": base["b"] + torch.randn(16, generator=g),
            "steps": base["steps"],
        }
        for _ in range(5)
    ]
    inputs = MergeInputs(
        _InMemory(base, "theta0"), [_InMemory(t, f"task{i}") for i, t in enumerate(tasks)]
    )
    out: dict[str, torch.Tensor] = {}
    settings = MergeSettings(alpha=0.125, ties_density=30.0, ties_sign=sign, ties_disjoint=disjoint)
    report = merge("ties", inputs, settings, out.__setitem__, progress=False)
    assert (
        report.settings["sign"] == sign
        and report.settings["disjoint"] == disjoint
        and report.settings["density"] == 30.0
    )
    flat0 = torch.cat([base["a"].flatten(), base["b"]])
    deltas = torch.stack([torch.cat([t["a"].flatten(), t["b"]]) - flat0 for t in tasks])
    thresholds = torch.tensor([ties.magnitude_threshold(d.abs(), 30.0) for d in deltas])
    want = flat0 + ties.merge_layer(deltas, thresholds, alpha=0.125, sign=sign, disjoint=disjoint)
    assert torch.equal(torch.cat([out["a"].flatten(), out["b"]]), want)
    if sign == "frequency":
        torch.testing.assert_close(
            (want - flat0).double(),
            _frequency_reference(deltas, thresholds, 0.125, disjoint),
            rtol=1e-5,
            atol=1e-7,
        )


def test_the_driver_refuses_an_unknown_sign_election():
    base = {"a": torch.zeros(4, 4)}
    inputs = MergeInputs(_InMemory(base, "theta0"), [_InMemory({"a": torch.ones(4, 4)}, "task0")])
    with pytest.raises(ValueError, match="sign election `count`"):
        merge("ties", inputs, MergeSettings(ties_sign="count"), lambda *_: None, progress=False)


def test_the_cli_passes_the_ties_settings_to_the_merge(toy, tmp_path):
    """`pipeline merge ties --ties-sign/--ties-disjoint`: the report records them, and the
    merged model differs from the defaults' (the toy's task vectors disagree in sign)."""
    import json

    from pipeline.cli import main
    from pipeline.store import load_tensors

    paths = toy(3, rank=2)
    common = [
        "merge",
        "ties",
        "--pretrained",
        str(paths["pretrained"]),
        "--finetuned",
        *map(str, paths["finetuned"]),
        "-q",
    ]
    outs = {}
    for name, extra in {
        "default": [],
        "frequency": ["--ties-sign", "frequency", "--ties-disjoint", "sum"],
    }.items():
        out, report = tmp_path / f"{name}.safetensors", tmp_path / f"{name}.json"
        assert main([*common, "--out", str(out), "--report", str(report), *extra]) == 0
        settings = json.loads(report.read_text())["settings"]
        outs[name] = load_tensors(out)
        assert (settings["sign"], settings["disjoint"]) == (
            ("mass", "mean") if name == "default" else ("frequency", "sum")
        )
    assert any(not torch.equal(outs["default"][k], outs["frequency"][k]) for k in outs["default"])
    # One `error:` line naming the choices, exit 2, nothing written.
    assert main([*common, "--out", str(tmp_path / "x.safetensors"), "--ties-sign", "count"]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def _mapping_rss_kb(address: int) -> int | None:
    """Resident kB of the mapping of this process that holds `address` (/proc/self/smaps)."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "Rss:":
            return int(line.split()[1])
    return None


def test_a_pass_drops_the_pages_of_a_mapped_task_and_nothing_else(tmp_path):
    """`_release` unmaps the whole pages of a read-only file map's range from the process (the
    values read back the same from the page cache), and leaves alone arrays whose pages hold
    their only copy: a tensor's memory and a writable map (their values stay)."""
    import mmap

    import numpy as np

    from pipeline.store import open_tensors, write_safetensors

    n = 1 << 20  # 4 MB of float32
    values = torch.arange(n, dtype=torch.float32)
    write_safetensors(tmp_path / "t.safetensors", {"w": values})
    reader = open_tensors(tmp_path / "t.safetensors")
    view = reader.mapped("w")
    assert float(view.sum(dtype=np.float64)) == float(values.double().sum())  # every page read
    before = _mapping_rss_kb(view.ctypes.data)
    if before is None:
        pytest.skip("no /proc/self/smaps")
    assert before >= 4000
    ties._release(view, 0, n // 2)
    half = _mapping_rss_kb(view.ctypes.data + 4 * (n - 1))
    assert half <= before // 2 + 8  # the first 2 MB dropped (two partial pages may stay)
    ties._release(view, 0, n)
    assert _mapping_rss_kb(view.ctypes.data + 4 * (n - 1)) <= 8
    assert np.array_equal(view, values.numpy())  # mapped back from the page cache
    del view
    reader.unmap()

    ones = torch.ones(n)
    ties._release(ones.numpy(), 0, n)
    assert bool((ones == 1).all())
    writable = mmap.mmap(-1, 4 * n)
    arr = np.frombuffer(writable, dtype=np.float32)
    arr[:] = 1.0
    ties._release(arr, 0, n)
    assert bool((arr == 1.0).all())
    del arr
    writable.close()
