"""Tests for pipeline/fisher/: the per-sample empirical Fisher diagonal (paper eq. 27)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import open_clip
import pytest
import torch
import torch.nn.functional as F

from pipeline import fisher
from pipeline.fisher import (
    empirical,
    empirical_fisher,
    empirical_fisher_loop,
    fisher_batches,
    sample_order,
    tracer,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second intra-op thread only adds contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Small models: an encoder whose parameters are differentiated, a frozen head kept in buffers
# --------------------------------------------------------------------------------------------


class Classifier(torch.nn.Module):
    """logits = normalize(enc(x)) @ W.T + b, with the head (W, b) frozen in buffers."""

    def __init__(self, encoder: torch.nn.Module, dim: int, n_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.enc = encoder
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(n_classes, dim, generator=g))
        self.register_buffer("b", torch.randn(n_classes, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.enc(x), dim=-1) @ self.W.T + self.b


class ToyEncoder(torch.nn.Module):
    """Every parameter use the traced method knows: linear, layer norm, a layer applied twice,
    broadcast add / sub / mul, a token expanded to the batch, x @ P, functions of a parameter
    (exp, transpose) feeding those; and dropout, which must be off (eval mode). Input [B, T, 6]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 12)
        self.norm = torch.nn.LayerNorm(12)
        self.log_gamma = torch.nn.Parameter(0.1 * torch.randn(12))  # LayerScale-like
        self.shift = torch.nn.Parameter(0.1 * torch.randn(12))
        self.token = torch.nn.Parameter(torch.randn(12))
        self.twice = torch.nn.Linear(12, 12)  # per-sample grads of both uses add before squaring
        self.back = torch.nn.Parameter(torch.randn(12, 12) / 12**0.5)  # used transposed
        self.proj = torch.nn.Parameter(torch.randn(12, 5) / 12**0.5)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.gelu(self.fc1(x)))  # [B, T, 12]
        h = torch.cat([self.token.view(1, 1, -1).expand(h.shape[0], -1, -1), h], dim=1)
        h = self.norm(h) * self.log_gamma.exp() - self.shift
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        h = h + torch.tanh(F.linear(h, self.back.T))
        return h.mean(1) @ self.proj  # [B, 5]


class ToyCNN(torch.nn.Module):
    """Strided, padded conv2d with bias, then a linear layer. Input [B, 3, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class AttentionEncoder(torch.nn.Module):
    """nn.MultiheadAttention self-attention with the options the traced decomposition handles:
    sequence-first layout, float or bool attention mask, returned attention weights; ``direct``
    calls F.multi_head_attention_forward itself (the module turns a bool mask into a float one
    before that call, a direct caller need not)."""

    def __init__(
        self, batch_first: bool, mask: str | None, need_weights: bool, direct: bool = False
    ) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.batch_first, self.need_weights, self.direct = batch_first, need_weights, direct
        causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)  # True = masked
        masks = {None: None, "bool": causal, "float": torch.randn(5, 5)}
        self.register_buffer("mask", masks[mask])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 5, 8]
        h = x if self.batch_first else x.transpose(0, 1)
        if self.direct:
            a = self.attn
            out, weights = F.multi_head_attention_forward(
                h, h, h, 8, 2, a.in_proj_weight, a.in_proj_bias, None, None, False, 0.0,
                a.out_proj.weight, a.out_proj.bias, training=False, need_weights=self.need_weights,
                attn_mask=self.mask,
            )  # fmt: skip
        else:
            out, weights = self.attn(h, h, h, need_weights=self.need_weights, attn_mask=self.mask)
        out = out if self.batch_first else out.transpose(0, 1)
        pooled = out.mean(1)  # [B, 8]
        return pooled if weights is None else pooled + weights.sum((1, 2)).unsqueeze(1)


class EinsumEncoder(torch.nn.Module):
    """A parameter used in an operation the tracer does not know (einsum): needs vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bti,oi->bo", x, self.weight)


class SequenceFirstEncoder(torch.nn.Module):
    """Runs its linear layer on [T, B, D]: with T == chunk size the batch-first shape check
    passes but the per-sample gradients would be wrong, so the self-check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x.transpose(0, 1))).sum(0)  # [B, 5]


class InPlaceEncoder(torch.nn.Module):
    """A layer output modified in place (ReLU(inplace=True)) after the tracer recorded it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 5)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc(x)).mean(1)  # [B, 5]


class BatchDependentEncoder(torch.nn.Module):
    """Traceable except for a batch of one sample (the last chunk of 9 in chunks of 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return torch.einsum("bti,oi->bo", x, self.weight)
        return F.linear(x, self.weight).sum(1)


def toy_task(n: int = 24, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = Classifier(ToyEncoder(), 5, 4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(n, 3, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    encoder = open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=4, width=64, layers=2, heads=4, mlp_ratio=4.0, output_dim=32
    )
    return Classifier(encoder, 32, 10, seed=seed)


def run(model, images, labels, fractions, strategy, **kwargs):
    """The shared driver with a fixed per-chunk method (auto/traced/vmap/loop)."""
    options = dict(param_names=None, batch_size=8, chunk_size=4, seed=0, device="cpu")
    options.update(dtype=torch.float32, num_workers=0, progress=False, strategy=strategy)
    options.update(kwargs)
    return empirical._empirical_fisher(model, (images, labels), fractions, **options)


def per_sample_reference(model, images, labels, indices) -> dict[str, torch.Tensor]:
    """(1/n) Σ_i g_i² over images[indices], by ordinary .backward() on the model itself."""
    model.eval()
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in indices.tolist():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images[i : i + 1]), labels[i : i + 1]).backward()
        for n, p in params.items():
            total[n] += p.grad**2
    return {n: t / len(indices) for n, t in total.items()}


def assert_same_fisher(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-4
) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        # Relative to the tensor's largest entry: tiny entries carry float32 round-off only.
        atol = rtol * expected[name].abs().max().item() + 1e-30
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


# --------------------------------------------------------------------------------------------
# Fraction rule and ordering
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "batch", "expected"),
    [
        (6400, 0.05, 64, 5),
        (6400, 1.0, 64, 100),
        (640, 0.25, 64, 2),  # ⌊2.5⌋
        (640, 0.05, 64, 1),  # ⌊0.5⌋ = 0 -> max(1, ·)
        (6400, 0.29, 64, 29),  # 0.29·6400/64 is 28.999999999999996 in binary floating point
        (130, 1.0, 64, 2),  # the partial third batch is dropped
        (30, 0.5, 64, 1),  # N < B: one short batch
        (30, 1.0, 64, 1),
        (1, 1.0, 64, 1),
    ],
)
def test_fisher_batches_formula(n: int, fraction: float, batch: int, expected: int) -> None:
    assert fisher_batches(n, fraction, batch) == expected


@pytest.mark.parametrize(
    ("n", "fraction", "batch"), [(0, 0.5, 64), (10, 0.0, 64), (10, 1.5, 64), (10, 0.5, 0)]
)
def test_fisher_batches_rejects_bad_input(n: int, fraction: float, batch: int) -> None:
    with pytest.raises(ValueError):
        fisher_batches(n, fraction, batch)


def test_sample_order_is_a_seeded_permutation() -> None:
    order = sample_order(50, seed=3)
    assert order.dtype == torch.int64
    assert sorted(order.tolist()) == list(range(50))
    assert torch.equal(order, sample_order(50, seed=3))
    assert not torch.equal(order, sample_order(50, seed=4))
    assert not torch.equal(order, torch.arange(50))


def test_fraction_uses_the_seeded_prefix() -> None:
    """Fraction f is the mean over the first fisher_batches·B samples of sample_order."""
    model, x, y = toy_task(n=20)
    result = run(model, x, y, (0.5, 1.0), "auto", batch_size=4, seed=7)
    for f in (0.5, 1.0):
        n_used = fisher_batches(20, f, 4) * 4
        expected = per_sample_reference(model, x, y, sample_order(20, 7)[:n_used])
        assert_same_fisher(result[f], expected)
    # A different seed picks different samples for the half fraction.
    other = run(model, x, y, (0.5,), "auto", batch_size=4, seed=8)[0.5]
    assert not torch.allclose(other["enc.fc1.weight"], result[0.5]["enc.fc1.weight"])


def test_fewer_samples_than_a_batch_uses_them_all() -> None:
    model, x, y = toy_task(n=10)
    result = run(model, x, y, (0.05, 1.0), "auto", batch_size=64)
    expected = per_sample_reference(model, x, y, torch.arange(10))
    assert_same_fisher(result[0.05], expected)
    assert_same_fisher(result[1.0], expected)


# --------------------------------------------------------------------------------------------
# Vectorised methods against the per-sample loop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["traced", "vmap", "auto"])
def test_toy_encoder_matches_loop(strategy: str) -> None:
    model, x, y = toy_task(n=24)
    fractions = (0.25, 1.0)
    expected = empirical_fisher_loop(model, x, y, fractions, batch_size=8, progress=False)
    got = run(model, x, y, fractions, strategy)
    for f in fractions:
        assert_same_fisher(got[f], expected[f])


def test_loop_matches_plain_backward() -> None:
    """The loop reference itself against .backward() on the model's own parameters."""
    model, x, y = toy_task(n=8)
    got = empirical_fisher_loop(model, x, y, (1.0,), batch_size=8, progress=False)[1.0]
    assert_same_fisher(got, per_sample_reference(model, x, y, sample_order(8, 0)))


@pytest.mark.parametrize("strategy", ["traced", "vmap"])
def test_conv_matches_loop(strategy: str) -> None:
    torch.manual_seed(1)
    model = Classifier(ToyCNN(), 5, 3)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    expected = empirical_fisher_loop(model, x, y, (1.0,), batch_size=8, progress=False)
    assert_same_fisher(run(model, x, y, (1.0,), strategy)[1.0], expected[1.0])


@pytest.mark.parametrize("strategy", ["traced", "vmap"])
def test_open_clip_vit_matches_loop(strategy: str) -> None:
    """open_clip's VisionTransformer: conv patches, class token, positional embedding, layer
    norms, nn.MultiheadAttention in/out projections, MLP, final projection."""
    model = tiny_vit()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g)
    expected = empirical_fisher_loop(model, x, y, (1.0,), batch_size=12, progress=False)[1.0]
    got = run(model, x, y, (1.0,), strategy, batch_size=12, chunk_size=6)[1.0]
    assert len(got) == len(list(model.parameters())) == 2 + 2 + 1 + 1 + 2 + 2 * 12
    assert_same_fisher(got, expected)
    # Every encoder tensor gets a non-trivial Fisher (nothing silently left at zero).
    assert all(v.abs().max() > 0 for v in got.values())


@pytest.mark.parametrize(
    ("batch_first", "mask", "need_weights", "direct"),
    [
        (True, None, False, False),
        (False, "bool", False, False),
        (True, "float", True, False),
        (False, None, True, False),
        (False, "bool", False, True),
        (False, "bool", True, True),
    ],
)
def test_multihead_attention_matches_loop(
    batch_first: bool, mask: str | None, need_weights: bool, direct: bool
) -> None:
    torch.manual_seed(4)
    model = Classifier(AttentionEncoder(batch_first, mask, need_weights, direct), 8, 3)
    x, y = torch.randn(6, 5, 8), torch.randint(0, 3, (6,))
    expected = empirical_fisher_loop(model, x, y, (1.0,), batch_size=6, progress=False)[1.0]
    got = run(model, x, y, (1.0,), "traced", batch_size=6, chunk_size=3)[1.0]
    assert_same_fisher(got, expected)


def test_open_clip_vit_with_a_subset_of_parameters() -> None:
    """Only late tensors differentiated: earlier layers carry no gradient (and in eval mode
    nn.MultiheadAttention would take its fused fast path, which vmap cannot batch)."""
    model = tiny_vit()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    names = ["enc.proj", "enc.ln_post.weight", "enc.transformer.resblocks.1.attn.out_proj.weight"]
    expected = empirical_fisher_loop(
        model, x, y, (1.0,), param_names=names, batch_size=6, progress=False
    )
    for strategy in ("traced", "vmap"):
        got = run(model, x, y, (1.0,), strategy, param_names=names, batch_size=6, chunk_size=3)
        assert list(got[1.0]) == names
        assert_same_fisher(got[1.0], expected[1.0])


def test_vmap_runs_attention_without_per_sample_fallback() -> None:
    """Only the final projection differentiated: in eval mode nn.MultiheadAttention would take
    its fused fast path, and SDPA its fused kernel; neither has a vmap batching rule, so
    functorch would loop over samples (with a warning) unless both are switched off."""
    model = tiny_vit()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(model, x, y, (1.0,), "vmap", param_names=["enc.proj"], batch_size=4)[1.0]
    assert not [w for w in caught if "batching rule" in str(w.message)]
    expected = empirical_fisher_loop(
        model, x, y, (1.0,), param_names=["enc.proj"], batch_size=4, progress=False
    )
    assert_same_fisher(got, expected[1.0])


def test_result_does_not_depend_on_chunk_size() -> None:
    """Squaring the gradient of a chunk instead of each sample's would depend on the chunk."""
    model, x, y = toy_task(n=16)
    one = run(model, x, y, (1.0,), "auto", batch_size=16, chunk_size=1)[1.0]
    for chunk in (3, 16):
        got = run(model, x, y, (1.0,), "auto", batch_size=16, chunk_size=chunk)[1.0]
        assert_same_fisher(got, one)


def test_per_sample_squares_are_not_the_squared_batch_gradient() -> None:
    model, x, y = toy_task(n=16)
    got = empirical_fisher(model, x, y, (1.0,), batch_size=16, progress=False)[1.0]
    model.eval()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()  # the mean loss's gradient: mean per-sample gradient
    for name, p in model.named_parameters():
        squared_mean = p.grad**2
        # Jensen: mean of squares ≥ square of the mean, entry by entry ...
        assert torch.all(got[name] >= squared_mean * (1 - 1e-4) - 1e-12), name
        # ... and here far from equal (samples disagree), for every tensor.
        assert got[name].sum() > 1.5 * squared_mean.sum(), name


# --------------------------------------------------------------------------------------------
# Prefix property, output contract
# --------------------------------------------------------------------------------------------


def test_fractions_in_one_call_equal_separate_calls() -> None:
    model, x, y = toy_task(n=32)
    fractions = (0.25, 0.5, 1.0)
    together = empirical_fisher(model, x, y, fractions, batch_size=8, chunk_size=4, progress=False)
    assert list(together) == [0.25, 0.5, 1.0]
    for f in (0.25, 0.5, 1.0):
        alone = empirical_fisher(model, x, y, (f,), batch_size=8, chunk_size=4, progress=False)
        assert list(alone) == [f]
        for name in alone[f]:
            assert torch.equal(alone[f][name], together[f][name]), (f, name)
    # The prefixes really differ (otherwise the test above proves nothing).
    assert not torch.allclose(together[0.25]["enc.fc1.weight"], together[1.0]["enc.fc1.weight"])


def test_fractions_with_the_same_prefix_do_not_share_tensors() -> None:
    model, x, y = toy_task(n=8)
    # Both fractions use the one batch of 8.
    result = empirical_fisher(model, x, y, (0.5, 1.0), batch_size=8, progress=False)
    assert torch.equal(result[0.5]["enc.proj"], result[1.0]["enc.proj"])
    result[0.5]["enc.proj"].zero_()
    assert result[1.0]["enc.proj"].abs().max() > 0


def test_output_contract_and_head_buffers_excluded() -> None:
    model, x, y = toy_task(n=8)
    result = empirical_fisher(model, x, y, (1.0,), batch_size=8, chunk_size=3, progress=False)[1.0]
    params = dict(model.named_parameters())
    assert list(result) == list(params)  # the head's W and b are buffers: not differentiated
    assert "W" not in result and "b" not in result
    for name, value in result.items():
        assert value.shape == params[name].shape
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        assert not value.requires_grad and value.grad_fn is None, name
        assert torch.all(value >= 0), name
        assert torch.isfinite(value).all(), name


def test_default_names_skip_frozen_parameters() -> None:
    model, x, y = toy_task(n=8)
    model.enc.fc1.weight.requires_grad_(False)
    result = empirical_fisher(model, x, y, (1.0,), batch_size=8, progress=False)[1.0]
    assert "enc.fc1.weight" not in result and "enc.fc1.bias" in result
    assert not model.enc.fc1.weight.requires_grad  # the model is not modified


def test_deterministic_and_leaves_the_model_as_it_was() -> None:
    model, x, y = toy_task(n=16)
    model.train()
    model.enc.norm.eval()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(True)  # switched off during the call only
    try:
        first = empirical_fisher(model, x, y, (1.0,), batch_size=16, progress=False)[1.0]
        second = empirical_fisher(model, x, y, (1.0,), batch_size=16, progress=False)[1.0]
        assert torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert model.training and model.enc.training and not model.enc.norm.training
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_float64_compute_matches_float32() -> None:
    model, x, y = toy_task(n=8)
    single = run(model, x, y, (1.0,), "auto")[1.0]
    double = run(model, x, y, (1.0,), "auto", dtype=torch.float64)[1.0]
    assert all(v.dtype == torch.float32 for v in double.values())
    assert_same_fisher(double, single, rtol=1e-4)


def test_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    model, x, y = toy_task(n=8)
    empirical_fisher(model, x, y, (1.0,), batch_size=8, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "sample" in captured.err


# --------------------------------------------------------------------------------------------
# Fallback to vmap
# --------------------------------------------------------------------------------------------


def test_unknown_parameter_use_falls_back_to_vmap(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(2)
    model = Classifier(EinsumEncoder(), 5, 3)
    x, y = torch.randn(8, 4, 6), torch.randint(0, 3, (8,))
    expected = empirical_fisher_loop(model, x, y, (1.0,), batch_size=8, progress=False)[1.0]
    with pytest.raises(tracer.Unsupported, match="einsum"):
        run(model, x, y, (1.0,), "traced")
    with caplog.at_level(logging.WARNING, logger="pipeline.fisher"):
        got = empirical_fisher(model, x, y, (1.0,), batch_size=8, chunk_size=4, progress=False)[1.0]
    assert "vmap" in caplog.text
    assert_same_fisher(got, expected)


def test_self_check_catches_a_misread_batch_dimension(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(3)
    model = Classifier(SequenceFirstEncoder(), 5, 3)
    x, y = torch.randn(8, 4, 6), torch.randint(0, 3, (8,))  # T = 4 = chunk size
    expected = empirical_fisher_loop(model, x, y, (1.0,), batch_size=8, progress=False)[1.0]
    with pytest.raises(tracer.Unsupported, match="self-check"):
        run(model, x, y, (1.0,), "traced", chunk_size=4)
    with caplog.at_level(logging.WARNING, logger="pipeline.fisher"):
        got = empirical_fisher(model, x, y, (1.0,), batch_size=8, chunk_size=4, progress=False)[1.0]
    assert "self-check" in caplog.text
    assert_same_fisher(got, expected)


def test_in_place_modification_falls_back_to_vmap(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(5)
    model = Classifier(InPlaceEncoder(), 5, 3)
    x, y = torch.randn(8, 4, 6), torch.randint(0, 3, (8,))
    expected = empirical_fisher_loop(model, x, y, (1.0,), batch_size=8, progress=False)[1.0]
    with pytest.raises(tracer.Unsupported, match="in place"):
        run(model, x, y, (1.0,), "traced")
    with caplog.at_level(logging.WARNING, logger="pipeline.fisher"):
        got = empirical_fisher(model, x, y, (1.0,), batch_size=8, chunk_size=4, progress=False)[1.0]
    assert "in place" in caplog.text
    assert_same_fisher(got, expected)


def test_fallback_in_a_later_chunk(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(6)
    model = Classifier(BatchDependentEncoder(), 5, 3)
    x, y = torch.randn(9, 4, 6), torch.randint(0, 3, (9,))
    expected = empirical_fisher_loop(model, x, y, (1.0,), batch_size=9, progress=False)[1.0]
    with pytest.raises(tracer.Unsupported, match="einsum"):
        run(model, x, y, (1.0,), "traced", batch_size=9, chunk_size=4)
    with caplog.at_level(logging.WARNING, logger="pipeline.fisher"):
        got = empirical_fisher(model, x, y, (1.0,), batch_size=9, chunk_size=4, progress=False)[1.0]
    assert "at sample 8" in caplog.text
    assert_same_fisher(got, expected)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fractions": (0.5, 0.0)}, r"\(0, 1\], got 0\.0"),
        ({"fractions": (1.5,)}, r"got 1\.5"),
        ({"fractions": (-0.1,)}, r"got -0\.1"),
        ({"fractions": (math.nan,)}, r"got nan"),
        ({"fractions": ()}, "fractions is empty"),
        ({"fractions": 0.5}, "sequence"),
        ({"images": torch.zeros(0, 3, 6), "labels": torch.zeros(0, dtype=torch.int64)}, "empty"),
        ({"labels": torch.zeros(7, dtype=torch.int64)}, "7 entries but images has 8"),
        ({"labels": torch.zeros(8)}, "integer"),
        ({"labels": torch.full((8,), -1)}, "≥ 0"),
        ({"labels": torch.full((8,), 4)}, "label 4 is out of range for the head's 4 classes"),
        (
            {"param_names": ["enc.fc1.weight", "enc.fc9.weight"]},
            "unknown parameter `enc.fc9.weight`.*did you mean.*enc.fc1.weight",
        ),
        ({"param_names": ["W"]}, "`W` is a buffer"),
        ({"param_names": []}, "param_names is empty"),
        ({"param_names": ["enc.proj", "enc.proj"]}, "listed twice"),
        ({"param_names": "enc.proj"}, "string"),
        ({"batch_size": 0}, "batch_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"dtype": torch.int32}, "floating-point"),
    ],
)
def test_input_validation(kwargs: dict, message: str) -> None:
    model, x, y = toy_task(n=8)
    arguments = {"images": x, "labels": y, "fractions": (1.0,), **kwargs}
    with pytest.raises(ValueError, match=message):
        empirical_fisher(model, progress=False, **arguments)


def test_model_without_trainable_parameters_is_rejected() -> None:
    model, x, y = toy_task(n=8)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        empirical_fisher(model, x, y, (1.0,), progress=False)


def test_model_must_return_logits() -> None:
    model = torch.nn.Flatten(0)  # [B, ...] -> 1-D
    with pytest.raises(ValueError, match=r"logits \[B, C\]"):
        empirical_fisher(torch.nn.Sequential(torch.nn.Linear(3, 2), model), torch.randn(4, 3),
                         torch.zeros(4, dtype=torch.int64), (1.0,), progress=False)  # fmt: skip


@pytest.mark.slow
def test_open_clip_vit_b32_matches_loop() -> None:
    """The real architecture (random weights, nothing downloaded): traced and vmap both match
    the loop on a few 224-px samples."""
    torch.manual_seed(0)
    encoder = open_clip.create_model("ViT-B-32", pretrained=None).visual
    model = Classifier(encoder, 512, 10)
    x, y = torch.randn(2, 3, 224, 224), torch.randint(0, 10, (2,))
    expected = empirical_fisher_loop(model, x, y, (1.0,), batch_size=2, progress=False)[1.0]
    assert len(expected) == len(list(encoder.parameters()))
    for strategy in ("traced", "vmap"):
        got = run(model, x, y, (1.0,), strategy, batch_size=2, chunk_size=2)[1.0]
        assert_same_fisher(got, expected)


# --------------------------------------------------------------------------------------------
# Streaming from a Dataset, devices, mixed precision
# --------------------------------------------------------------------------------------------


class CountingDataset(torch.utils.data.Dataset):
    """(image, int label) items of two tensors, counting the reads of each index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.reads = [0] * len(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads[i] += 1
        return self.images[i].clone(), int(self.labels[i])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataset_path_equals_tensor_path(num_workers: int) -> None:
    """Same ordering, same chunks, same fractions: bit-for-bit the in-memory result."""
    model = tiny_vit()
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(20, 3, 32, 32, generator=g), torch.randint(0, 10, (20,), generator=g)
    fractions = (0.25, 0.5, 1.0)
    options = dict(batch_size=4, chunk_size=3, seed=2, progress=False)
    expected = empirical_fisher(model, x, y, fractions, **options)
    dataset = torch.utils.data.TensorDataset(x, y)
    got = fisher.empirical_fisher_dataset(
        model, dataset, fractions, num_workers=num_workers, **options
    )
    assert list(got) == list(fractions)
    for f in fractions:
        assert got[f].keys() == expected[f].keys()
        for name in expected[f]:
            assert torch.equal(got[f][name], expected[f][name]), (f, name)
    # The fractions really are different prefixes.
    assert not torch.equal(got[0.25]["enc.proj"], got[1.0]["enc.proj"])


def test_dataset_reads_only_the_largest_prefix_once() -> None:
    model, x, y = toy_task(n=40)
    dataset = CountingDataset(x, y)
    got = fisher.empirical_fisher_dataset(
        model, dataset, (0.25, 0.5), batch_size=8, chunk_size=3, seed=5, progress=False
    )
    used = sample_order(40, 5)[:16].tolist()  # ⌊0.5·40/8⌋ = 2 batches of 8
    assert [i for i, r in enumerate(dataset.reads) if r] == sorted(used)
    assert all(r in (0, 1) for r in dataset.reads)
    for f, n_used in ((0.25, 8), (0.5, 16)):
        expected = per_sample_reference(model, x, y, sample_order(40, 5)[:n_used])
        assert_same_fisher(got[f], expected)


def test_dataset_fractions_in_one_call_equal_separate_calls() -> None:
    model, x, y = toy_task(n=32)
    dataset = CountingDataset(x, y)
    options = dict(batch_size=8, chunk_size=4, progress=False)  # chunks align with batches
    together = fisher.empirical_fisher_dataset(model, dataset, (1.0, 0.25), **options)
    assert list(together) == [1.0, 0.25]
    for f in (0.25, 1.0):
        alone = fisher.empirical_fisher_dataset(model, dataset, (f,), **options)[f]
        assert all(torch.equal(alone[n], together[f][n]) for n in alone), f


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.full((8,), 4), "label 4 is out of range for the head's 4 classes"),
        (torch.full((8,), -1), "≥ 0"),
        (torch.zeros(8), "integer class indices"),
    ],
)
def test_dataset_bad_labels(labels: torch.Tensor, message: str) -> None:
    model, x, _ = toy_task(n=8)
    dataset = torch.utils.data.TensorDataset(x, labels)
    with pytest.raises(ValueError, match=message):
        fisher.empirical_fisher_dataset(model, dataset, (1.0,), batch_size=8, progress=False)


def test_dataset_input_validation() -> None:
    model, x, y = toy_task(n=8)
    empty = torch.utils.data.TensorDataset(x[:0], y[:0])
    with pytest.raises(ValueError, match="dataset is empty"):
        fisher.empirical_fisher_dataset(model, empty, (1.0,), progress=False)
    with pytest.raises(ValueError, match="must be a torch.utils.data.Dataset"):
        fisher.empirical_fisher_dataset(model, (x, y), (1.0,), progress=False)
    with pytest.raises(ValueError, match="num_workers"):
        fisher.empirical_fisher_dataset(
            model, torch.utils.data.TensorDataset(x, y), (1.0,), num_workers=-1, progress=False
        )


def test_auto_device_and_unavailable_cuda() -> None:
    model, x, y = toy_task(n=8)
    tf32, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    auto = empirical_fisher(model, x, y, (1.0,), batch_size=8, device="auto", progress=False)
    # float32 runs without TF32 inside the call; the caller's settings are restored.
    assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == (tf32, matmul)
    cpu = empirical_fisher(model, x, y, (1.0,), batch_size=8, device="cpu", progress=False)
    if not torch.cuda.is_available():
        assert all(torch.equal(auto[1.0][n], cpu[1.0][n]) for n in cpu[1.0])
        with pytest.raises(ValueError, match="CUDA is not available"):
            empirical_fisher(model, x, y, (1.0,), device="cuda", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model = tiny_vit()
    x, y = torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))
    cpu = empirical_fisher(model, x, y, (1.0,), batch_size=12, chunk_size=6, progress=False)
    dataset = torch.utils.data.TensorDataset(x, y)
    gpu = fisher.empirical_fisher_dataset(
        model, dataset, (1.0,), batch_size=12, chunk_size=6, device="cuda", progress=False
    )
    assert all(v.device.type == "cpu" for v in gpu[1.0].values())
    assert_same_fisher(gpu[1.0], cpu[1.0], rtol=1e-3)


def relative_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Largest ‖got − expected‖ / ‖expected‖ over the tensors."""
    return max(
        ((got[n].double() - e.double()).norm() / e.double().norm()).item()
        for n, e in expected.items()
    )


def test_bfloat16_autocast_is_close_to_float32(caplog: pytest.LogCaptureFixture) -> None:
    """Mixed precision: close to float32 (bf16 has 8 mantissa bits), but not identical; the
    traced path passes its self-check (no vmap fallback); results are float32."""
    model = tiny_vit()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g)
    single = run(model, x, y, (1.0,), "auto", batch_size=12, chunk_size=6)[1.0]
    with caplog.at_level(logging.WARNING, logger="pipeline.fisher"):
        half = run(model, x, y, (1.0,), "auto", batch_size=12, chunk_size=6, dtype=torch.bfloat16)
    assert "vmap" not in caplog.text
    half = half[1.0]
    assert all(v.dtype == torch.float32 and torch.all(v >= 0) for v in half.values())
    error = relative_error(half, single)
    assert 1e-5 < error < 0.1, error
    # The bf16 loop reference agrees with the bf16 traced path to bf16 accuracy too.
    loop = run(model, x, y, (1.0,), "loop", batch_size=12, dtype=torch.bfloat16)[1.0]
    assert relative_error(half, loop) < 0.1


def test_bfloat16_vmap_fallback_runs_in_float32(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(2)
    model = Classifier(EinsumEncoder(), 5, 3)
    x, y = torch.randn(8, 4, 6), torch.randint(0, 3, (8,))
    expected = empirical_fisher_loop(model, x, y, (1.0,), batch_size=8, progress=False)[1.0]
    with caplog.at_level(logging.WARNING, logger="pipeline.fisher"):
        got = empirical_fisher(
            model, x, y, (1.0,), batch_size=8, chunk_size=4, dtype=torch.bfloat16, progress=False
        )[1.0]
    assert "vmap" in caplog.text
    assert relative_error(got, expected) < 0.05


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size"),
    [(4, 4, 0, 10), (4, 4, 0, 8), ((2, 3), (2, 3), 0, 9), (3, 2, 1, 8), (4, 4, 1, 10)],
)
def test_conv_patches_equal_unfold(kernel, stride, padding, size) -> None:
    """Non-overlapping patches by reshape (incomplete edges dropped, as conv2d does) equal
    im2col; other convolutions use im2col itself."""
    x = torch.randn(2, 3, size, size + 1)
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    got = tracer._patches(x, k, stride, padding, 1)
    expected = F.unfold(x, k, padding=padding, stride=stride).transpose(1, 2)
    assert torch.equal(got, expected)


def test_patch_embedding_with_a_ragged_edge_matches_loop() -> None:
    torch.manual_seed(7)
    conv = torch.nn.Conv2d(3, 4, 4, stride=4)  # 10 px: the last 2 rows and columns are unused
    model = Classifier(torch.nn.Sequential(conv, torch.nn.Flatten(1)), 4 * 2 * 2, 3)
    x, y = torch.randn(6, 3, 10, 10), torch.randint(0, 3, (6,))
    expected = empirical_fisher_loop(model, x, y, (1.0,), batch_size=6, progress=False)[1.0]
    assert_same_fisher(
        run(model, x, y, (1.0,), "traced", batch_size=6, chunk_size=3)[1.0], expected
    )


# --------------------------------------------------------------------------------------------
# Estimators: per_sample, batch (FusionBench), first_moment (C.3's diag(u²)), first_moment_ema
# --------------------------------------------------------------------------------------------


def _grads64(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def estimator_reference(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    fraction: float,
    estimator: str,
    batch_size: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Each estimator's definition, in float64, one sample and one .backward() at a time."""
    refs = estimator_references(model, images, labels, fraction, (estimator,), batch_size, seed)
    return refs[estimator]


def estimator_references(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    fraction: float,
    estimators: Sequence[str],
    batch_size: int,
    seed: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """`estimator_reference` of several estimators on the same inputs: the per-batch gradients
    of the mean cross-entropy, which first_moment and first_moment_ema both average, are
    computed once."""
    import copy

    model = copy.deepcopy(model).double().eval()
    x64 = images.double()
    n = len(labels)
    k = max(1, math.floor(round(fraction * n / batch_size, 9)))
    order = sample_order(n, seed)[: min(n, k * batch_size)].tolist()
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    zero = {name: torch.zeros_like(p) for name, p in model.named_parameters()}

    def per_batch(kind: str) -> list[dict[str, torch.Tensor]]:
        """The gradient of each batch's loss, as the definition sums or averages it."""
        out = []
        for b in batches:
            g_b = {name: torch.zeros_like(t) for name, t in zero.items()}
            for i in b:
                logits = model(x64[i : i + 1])
                if kind == "batch":  # FusionBench: Σ_c √p_c log p_c, √p held constant
                    log_p = torch.log_softmax(logits, dim=-1)
                    loss = (torch.sqrt(torch.softmax(logits, -1).detach()) * log_p).sum()
                else:  # the batch's mean cross-entropy on the true labels
                    loss = F.cross_entropy(logits, labels[i : i + 1]) / len(b)
                for name, g in _grads64(model, loss).items():
                    g_b[name] += g  # in place: a float64 ViT-B/32 gradient is 0.7 GB
            out.append(g_b)
        return out

    refs: dict[str, dict[str, torch.Tensor]] = {}
    mean_ce = None
    for estimator in estimators:
        if estimator == "per_sample":
            total = dict(zero)
            for i in order:
                g = _grads64(model, F.cross_entropy(model(x64[i : i + 1]), labels[i : i + 1]))
                total = {name: total[name] + g[name] ** 2 for name in total}
            refs[estimator] = {name: t / len(order) for name, t in total.items()}
        elif estimator == "batch":
            grads = per_batch("batch")
            refs[estimator] = {name: sum(g[name] ** 2 for g in grads) / len(order) for name in zero}
            del grads
        elif estimator == "first_moment":
            mean_ce = mean_ce if mean_ce is not None else per_batch("mean_ce")
            refs[estimator] = {
                name: (sum(g[name] for g in mean_ce) / len(mean_ce)) ** 2 for name in zero
            }
        else:
            assert estimator == "first_moment_ema", estimator
            mean_ce = mean_ce if mean_ce is not None else per_batch("mean_ce")
            m = dict(zero)
            for g in mean_ce:
                m = {name: 0.9 * m[name] + 0.1 * g[name] for name in m}
            refs[estimator] = {name: (m[name] / (1 - 0.9 ** len(mean_ce))) ** 2 for name in m}
    return refs


def as_float(result: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.float() for n, t in result.items()}


@pytest.mark.parametrize("estimator", fisher.ESTIMATORS)
@pytest.mark.parametrize("model_kind", ["toy", "vit"])
def test_each_estimator_equals_its_float64_definition(estimator: str, model_kind: str) -> None:
    """Two fractions (2 and 5 batches of 4) in one call, chunks of 3 straddling nothing."""
    if model_kind == "toy":
        model, x, y = toy_task(n=21)
    else:
        model = tiny_vit()
        g = torch.Generator().manual_seed(4)
        x, y = torch.randn(21, 3, 32, 32, generator=g), torch.randint(0, 10, (21,), generator=g)
    got = fisher.estimate_fisher(
        model, x, y, (0.4, 1.0), estimator=estimator, batch_size=4, chunk_size=3, seed=3,
        progress=False,
    )  # fmt: skip
    for f in (0.4, 1.0):
        expected = estimator_reference(model, x, y, f, estimator, batch_size=4, seed=3)
        assert_same_fisher(got[f], as_float(expected))


@pytest.mark.parametrize("estimator", ["batch", "first_moment", "first_moment_ema"])
def test_float64_estimate_matches_the_reference_closely(estimator: str) -> None:
    model, x, y = toy_task(n=24)
    got = fisher.estimate_fisher(
        model, x, y, (1.0,), estimator=estimator, batch_size=8, chunk_size=5, seed=1,
        dtype=torch.float64, progress=False,
    )[1.0]  # fmt: skip
    expected = estimator_reference(model, x, y, 1.0, estimator, batch_size=8, seed=1)
    # Only the float32 accumulators separate the two.
    assert_same_fisher(got, as_float(expected), rtol=1e-6)


def test_estimators_are_different_quantities() -> None:
    """On the same samples the four estimates differ: none is another under a new name."""
    model, x, y = toy_task(n=32)
    results = {
        e: fisher.estimate_fisher(model, x, y, (1.0,), estimator=e, batch_size=8, progress=False)[
            1.0
        ]
        for e in fisher.ESTIMATORS
    }
    for a in fisher.ESTIMATORS:
        for b in fisher.ESTIMATORS:
            if a < b:
                rel = relative_error(results[a], results[b])
                assert rel > 1e-2, (a, b, rel)


def test_per_sample_estimator_is_the_empirical_fisher() -> None:
    model, x, y = toy_task(n=24)
    options = dict(batch_size=8, chunk_size=4, seed=2, progress=False)
    got = fisher.estimate_fisher(model, x, y, (0.5, 1.0), estimator="per_sample", **options)
    expected = empirical_fisher(model, x, y, (0.5, 1.0), **options)
    for f in (0.5, 1.0):
        assert all(torch.equal(got[f][n], expected[f][n]) for n in expected[f])


@pytest.mark.parametrize("estimator", ["batch", "first_moment", "first_moment_ema"])
def test_batch_estimators_do_not_depend_on_chunk_size(estimator: str) -> None:
    model, x, y = toy_task(n=24)
    runs = [
        fisher.estimate_fisher(
            model, x, y, (1.0,), estimator=estimator, batch_size=8, chunk_size=c, progress=False
        )[1.0]  # fmt: skip
        for c in (1, 3, 8, 64)
    ]
    for other in runs[1:]:
        assert_same_fisher(other, runs[0], rtol=1e-5)


@pytest.mark.parametrize("estimator", ["batch", "first_moment", "first_moment_ema"])
def test_batch_estimator_fractions_in_one_call_equal_separate_calls(estimator: str) -> None:
    model, x, y = toy_task(n=40)
    options = dict(estimator=estimator, batch_size=8, chunk_size=4, seed=6, progress=False)
    together = fisher.estimate_fisher(model, x, y, (1.0, 0.25, 0.5), **options)
    assert list(together) == [1.0, 0.25, 0.5]
    for f in (0.25, 0.5, 1.0):
        alone = fisher.estimate_fisher(model, x, y, (f,), **options)[f]
        assert all(torch.equal(alone[n], together[f][n]) for n in alone), f


def test_first_moment_ema_is_bias_corrected_for_one_batch() -> None:
    """With a single batch the corrected running average is that batch's mean gradient, so
    first_moment and first_moment_ema agree (uncorrected, the EMA would be 0.1 of it)."""
    model, x, y = toy_task(n=8)
    options = dict(batch_size=8, chunk_size=3, progress=False)
    ema = fisher.estimate_fisher(model, x, y, (1.0,), estimator="first_moment_ema", **options)[1.0]
    mean = fisher.estimate_fisher(model, x, y, (1.0,), estimator="first_moment", **options)[1.0]
    assert_same_fisher(ema, mean, rtol=1e-6)


def test_fewer_samples_than_a_batch_for_batch_estimators() -> None:
    model, x, y = toy_task(n=5)
    got = fisher.estimate_fisher(model, x, y, (0.1,), estimator="first_moment", batch_size=8,
                                 progress=False)[0.1]  # fmt: skip
    expected = estimator_reference(model, x, y, 0.1, "first_moment", batch_size=8, seed=0)
    assert_same_fisher(got, as_float(expected))


@pytest.mark.parametrize("estimator", ["batch", "first_moment_ema"])
def test_batch_estimator_dataset_path_equals_tensor_path(estimator: str) -> None:
    model, x, y = toy_task(n=30)
    options = dict(estimator=estimator, batch_size=8, chunk_size=3, seed=2, progress=False)
    expected = fisher.estimate_fisher(model, x, y, (0.5, 1.0), **options)
    dataset = CountingDataset(x, y)
    got = fisher.estimate_fisher_dataset(model, dataset, (0.5, 1.0), **options)
    assert all(r in (0, 1) for r in dataset.reads) and sum(dataset.reads) == 24
    for f in (0.5, 1.0):
        assert all(torch.equal(got[f][n], expected[f][n]) for n in expected[f]), f


def test_unknown_estimator_is_rejected() -> None:
    model, x, y = toy_task(n=8)
    with pytest.raises(ValueError, match="unknown Fisher estimator 'adam'.*per_sample, batch"):
        fisher.estimate_fisher(model, x, y, (1.0,), estimator="adam", progress=False)
    with pytest.raises(ValueError, match="unknown Fisher estimator"):
        fisher.estimate_fisher_dataset(
            model, torch.utils.data.TensorDataset(x, y), (1.0,), estimator="", progress=False
        )


@pytest.mark.parametrize("estimator", ["batch", "first_moment"])
def test_bfloat16_mini_batch_estimators_are_close_to_float32(estimator: str) -> None:
    """Autocast runs the forward and backward in bfloat16. Matrix weights stay within a few
    percent of float32; vector tensors whose batch gradients cancel (layer-norm biases) can be
    off by tens of percent, which docs/fisher.md notes."""
    model = tiny_vit()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    options = dict(estimator=estimator, batch_size=8, progress=False)
    full = fisher.estimate_fisher(model, x, y, (1.0,), **options)[1.0]
    half = fisher.estimate_fisher(model, x, y, (1.0,), dtype=torch.bfloat16, **options)[1.0]
    matrices = {n: t for n, t in full.items() if t.dim() >= 2}
    assert all(t.dtype == torch.float32 for t in half.values())
    assert 0 < relative_error(half, matrices) < 5e-2
    assert not all(torch.equal(half[n], full[n]) for n in full)  # autocast really ran


@pytest.mark.slow
def test_mini_batch_estimators_on_open_clip_vit_b32() -> None:
    """The real architecture (random weights, nothing downloaded), 3 batches of 2 samples at
    224 px: each mini-batch estimator against its float64 definition."""
    torch.manual_seed(0)
    encoder = open_clip.create_model("ViT-B-32", pretrained=None).visual
    model = Classifier(encoder, 512, 10)
    x, y = torch.randn(6, 3, 224, 224), torch.randint(0, 10, (6,))
    estimators = ("batch", "first_moment", "first_moment_ema")
    references = estimator_references(model, x, y, 1.0, estimators, batch_size=2, seed=0)
    for estimator in estimators:
        got = fisher.estimate_fisher(model, x, y, (1.0,), estimator=estimator, batch_size=2,
                                     chunk_size=2, progress=False)[1.0]  # fmt: skip
        assert len(got) == len(list(encoder.parameters()))
        assert_same_fisher(got, as_float(references[estimator]), rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("estimator", ["batch", "first_moment", "first_moment_ema"])
def test_batch_estimators_on_cuda_match_the_float64_reference(estimator: str) -> None:
    model = tiny_vit()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    dataset = torch.utils.data.TensorDataset(x, y)
    got = fisher.estimate_fisher_dataset(
        model, dataset, (1.0,), estimator=estimator, batch_size=4, chunk_size=3, device="cuda",
        progress=False,
    )[1.0]  # fmt: skip
    assert all(v.device.type == "cpu" for v in got.values())
    expected = estimator_reference(model, x, y, 1.0, estimator, batch_size=4, seed=0)
    assert_same_fisher(got, as_float(expected), rtol=1e-3)


CLI_TASK = "shapes"
CLI_DATA = {"source": "synthetic", "train_size": 40, "test_size": 24}


@pytest.fixture
def cli_files(tmp_path):
    """A demo θ_t checkpoint and a head for CLI_TASK, in the formats the workflow writes."""
    from pipeline.data import num_classes
    from pipeline.models.clip import build_encoder
    from pipeline.store import write_safetensors

    encoder = build_encoder("demo")
    checkpoint = tmp_path / "theta.safetensors"
    write_safetensors(checkpoint, encoder.state_dict())
    g = torch.Generator().manual_seed(0)
    C = num_classes({"source": "synthetic"}, CLI_TASK)
    head = tmp_path / "head.safetensors"
    write_safetensors(
        head, {"weight": 10 * torch.randn(C, 64, generator=g), "bias": torch.zeros(C)}
    )
    return encoder, checkpoint, head


@pytest.mark.parametrize("estimator", ["first_moment", "first_moment_ema", "batch"])
def test_cli_fisher_estimator_matches_the_library_and_is_recorded(
    cli_files, tmp_path, estimator
) -> None:
    import json

    import zarr

    from pipeline.cli import main
    from pipeline.data import load_split
    from pipeline.models.backbone import ImageClassifier
    from pipeline.store import load_tensors

    encoder, checkpoint, head = cli_files
    out = tmp_path / estimator / "f.zarr"
    argv = ["fisher", "--task", CLI_TASK, "--checkpoint", str(checkpoint), "--head", str(head),
            "--data", json.dumps(CLI_DATA), "--fraction", "0.5", "--batch-size", "8", "--chunk-size", "3",
            "--estimator", estimator, "--device", "cpu", "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    got = load_tensors(out)
    w = load_tensors(head)
    model = ImageClassifier(encoder, w["weight"], w["bias"])
    x, y = load_split(CLI_DATA, CLI_TASK, "train")
    names = [f"encoder.{n}" for n, _ in encoder.named_parameters()]
    expected = fisher.estimate_fisher(
        model, x, y, (0.5,), estimator=estimator, param_names=names, batch_size=8, chunk_size=3,
        progress=False,
    )[0.5]  # fmt: skip
    assert sorted(got) == sorted(n.removeprefix("encoder.") for n in names)
    for name, value in expected.items():
        torch.testing.assert_close(got[name.removeprefix("encoder.")], value, rtol=1e-5, atol=1e-12)
    parameters = zarr.open_group(str(out), mode="r").attrs["parameters"]
    assert parameters["estimator"] == estimator and parameters["fraction"] == 0.5
    assert parameters.get("beta1") == (0.9 if estimator == "first_moment_ema" else None)


def test_cli_fisher_default_estimator_is_per_sample_and_unknown_is_rejected(
    cli_files, tmp_path, capsys
) -> None:
    import json

    import zarr

    from pipeline.cli import main

    _, checkpoint, head = cli_files
    argv = ["fisher", "--task", CLI_TASK, "--checkpoint", str(checkpoint), "--head", str(head),
            "--data", json.dumps(CLI_DATA), "--fraction", "0.25", "--batch-size", "8", "--device", "cpu", "-q"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "d.zarr")]) == 0
    assert (
        zarr.open_group(str(tmp_path / "d.zarr"), mode="r").attrs["parameters"]["estimator"]
        == "per_sample"
    )
    capsys.readouterr()
    assert main([*argv, "--estimator", "adam", "--out", str(tmp_path / "x.zarr")]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'adam'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.zarr").exists()


def test_cli_estimator_choices_are_the_library_estimators() -> None:
    import argparse

    from pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    option = next(a for a in sub.choices["fisher"]._actions if a.dest == "estimator")
    assert tuple(option.choices) == fisher.ESTIMATORS and option.default == "per_sample"
