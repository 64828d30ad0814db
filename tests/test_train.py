"""Tests for the demo training recipe (pipeline/train.py), at a few seconds' scale."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.synthetic import make_split, num_classes
from pipeline.models.backbone import DEMO_VISION_CFG, build_visual
from pipeline.train import (
    DEFAULT_LOGIT_SCALE,
    accuracy,
    finetune,
    fit_head,
    pretrain,
    state_digest,
)

DIM = DEMO_VISION_CFG["output_dim"]


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return build_visual(seed=0)


@pytest.fixture(scope="module")
def colour_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Hue is linearly readable even from a random encoder: an "easy task" for a probe.
    train_x, train_y = make_split("orientation", "train", n=800, seed=0)
    test_x, test_y = make_split("orientation", "test", n=400, seed=0)
    return train_x, train_y, test_x, test_y


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_head_beats_chance_on_an_easy_task(encoder, colour_data) -> None:
    train_x, train_y, test_x, test_y = colour_data
    classes = num_classes("orientation")
    weight, bias = fit_head(encoder, train_x, train_y, classes, steps=200, seed=0)
    assert weight.shape == (classes, DIM) and bias.shape == (classes,)
    # Rows have the logit scale as norm, like CLIP's scaled zero-shot head.
    torch.testing.assert_close(weight.norm(dim=1), torch.full((classes,), DEFAULT_LOGIT_SCALE))
    chance = 1.0 / classes
    assert accuracy(encoder, weight, bias, test_x, test_y) > chance + 0.2


def test_fit_head_is_deterministic(encoder, colour_data) -> None:
    train_x, train_y, *_ = colour_data
    first = fit_head(encoder, train_x[:200], train_y[:200], 8, steps=20, seed=1)
    second = fit_head(encoder, train_x[:200], train_y[:200], 8, steps=20, seed=1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_short_finetune_changes_encoder_not_head_nor_input(encoder, colour_data) -> None:
    train_x, train_y, *_ = colour_data
    theta0 = {k: v.clone() for k, v in encoder.state_dict().items()}
    weight, bias = torch.randn(8, DIM), torch.randn(8)
    weight_before, bias_before = weight.clone(), bias.clone()
    kwargs = dict(epochs=1, lr=1e-3, batch_size=32, weight_decay=0.1, seed=0)
    tuned = finetune(encoder, weight, bias, train_x[:64], train_y[:64], **kwargs)

    assert tuned.keys() == theta0.keys()
    assert not _states_equal(tuned, theta0)
    assert all(v.device.type == "cpu" and not v.requires_grad for v in tuned.values())
    # The head and the caller's encoder are untouched.
    assert torch.equal(weight, weight_before) and torch.equal(bias, bias_before)
    assert _states_equal(encoder.state_dict(), theta0)
    # Same seed, same result.
    again = finetune(encoder, weight, bias, train_x[:64], train_y[:64], **kwargs)
    assert _states_equal(tuned, again)


def test_short_pretrain_is_deterministic_and_changes_weights(encoder) -> None:
    images, labels = make_split("generic", "train", n=64, seed=0)
    kwargs = dict(epochs=1, lr=1e-3, batch_size=32, seed=0)
    first = pretrain(encoder, images, labels, num_classes("generic"), **kwargs)
    second = pretrain(encoder, images, labels, num_classes("generic"), **kwargs)
    assert _states_equal(first, second)
    assert first.keys() == encoder.state_dict().keys()
    assert not _states_equal(first, encoder.state_dict())


def test_pretrain_max_steps_is_the_prefix_of_the_full_run(encoder, monkeypatch) -> None:
    """Stopping after S steps gives the full run's parameters after S steps: the same schedule,
    shuffling and data, only fewer steps (what the shipped θ0's quick check relies on)."""
    images, labels = make_split("generic", "train", n=96, seed=0)
    kwargs = dict(epochs=2, lr=1e-3, batch_size=32, seed=0)
    steps_seen: list[dict[str, torch.Tensor]] = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kw):  # the parameters after every optimiser step
        result = original_step(self, *args, **kw)
        params = self.param_groups[0]["params"]
        steps_seen.append({n: p.detach().clone() for n, p in enumerate(params)})
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    full = pretrain(encoder, images, labels, num_classes("generic"), **kwargs)
    assert len(steps_seen) == 6  # 2 epochs × 3 batches
    after_full_run = steps_seen[3]
    steps_seen.clear()
    partial = pretrain(encoder, images, labels, num_classes("generic"), max_steps=4, **kwargs)
    assert len(steps_seen) == 4
    assert all(torch.equal(after_full_run[n], steps_seen[-1][n]) for n in after_full_run)
    assert state_digest(partial) != state_digest(full)
    with pytest.raises(ValueError, match="max_steps must be > 0"):
        pretrain(encoder, images, labels, num_classes("generic"), max_steps=0, **kwargs)


def test_state_digest_sees_names_shapes_and_bits() -> None:
    state = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    assert state_digest(state) == state_digest({"b": torch.ones(4), "a": torch.zeros(2, 3)})
    assert state_digest(state) != state_digest({"a": torch.zeros(3, 2), "b": torch.ones(4)})
    assert state_digest(state) != state_digest({"c": torch.zeros(2, 3), "b": torch.ones(4)})
    flipped = torch.ones(4)
    flipped.view(torch.int32)[0] ^= 1  # one bit of one value
    assert state_digest(state) != state_digest({"a": torch.zeros(2, 3), "b": flipped})


def test_accuracy_range_and_restores_mode(encoder, colour_data) -> None:
    _, _, test_x, test_y = colour_data
    weight, bias = torch.randn(8, DIM), torch.zeros(8)
    encoder.train()
    value = accuracy(encoder, weight, bias, test_x[:50], test_y[:50], batch_size=16)
    assert 0.0 <= value <= 1.0
    assert encoder.training
    # A head that always predicts the label of every test image scores 1.
    perfect_bias = torch.zeros(8)
    perfect_bias[3] = 1e6
    only_threes = test_y[test_y == 3][:10]
    assert accuracy(encoder, weight, perfect_bias, test_x[test_y == 3][:10], only_threes) == 1.0


def test_bad_inputs_raise(encoder) -> None:
    images = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fit_head(encoder, images, torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="labels must be"):
        accuracy(encoder, torch.zeros(3, DIM), torch.zeros(3), images, torch.zeros(5).long())
    with pytest.raises(ValueError, match="int64"):
        accuracy(encoder, torch.zeros(3, DIM), torch.zeros(3), images, torch.zeros(4))
    with pytest.raises(ValueError, match=r"weight \[C, 64\]"):
        accuracy(encoder, torch.zeros(3, 10), torch.zeros(3), images, torch.zeros(4).long())
    with pytest.raises(ValueError, match="epochs"):
        finetune(
            encoder,
            torch.zeros(3, DIM),
            torch.zeros(3),
            images,
            torch.zeros(4).long(),
            epochs=0,
            lr=1e-3,
            batch_size=2,
            weight_decay=0.0,
            seed=0,
        )


# --------------------------------------------------------------------------- #
# Multi-attribute pretraining, zero-shot rows and gradient clipping.
# --------------------------------------------------------------------------- #
from pipeline.train import (  # noqa: E402
    PRETRAIN_LOGIT_SCALE,
    attribute_prototypes,
    decode_mixed_radix,
    zeroshot_head,
)


def test_decode_mixed_radix_matches_the_lexicographic_product() -> None:
    import itertools

    counts = [3, 1, 4, 2]
    combos = torch.tensor(list(itertools.product(*(range(c) for c in counts))))
    assert torch.equal(decode_mixed_radix(torch.arange(len(combos)), counts), combos)


def test_zeroshot_head_is_scaled_rows_of_the_fixed_prototypes() -> None:
    counts = [5, 3]
    weight, bias = zeroshot_head(counts, 0, [4, 1], DIM, logit_scale=7.0)
    prototypes = attribute_prototypes(counts, DIM)
    torch.testing.assert_close(weight, 7.0 * prototypes[0][[4, 1]])
    torch.testing.assert_close(
        weight.double().norm(dim=1), torch.full((2,), 7.0, dtype=torch.float64)
    )
    assert torch.equal(bias, torch.zeros(2))
    # By default a zero-shot head carries θ0's pretraining temperature, as CLIP's do.
    default, _ = zeroshot_head(counts, 0, [4, 1], DIM)
    torch.testing.assert_close(default, PRETRAIN_LOGIT_SCALE * prototypes[0][[4, 1]])
    # Fixed: the same prototypes in every process, whatever the global random state.
    torch.manual_seed(123)
    assert torch.equal(attribute_prototypes(counts, DIM)[1], prototypes[1])
    with pytest.raises(ValueError, match=r"\[0, 3\).*out of range: \[3\]"):
        zeroshot_head(counts, 1, [0, 3], DIM)
    with pytest.raises(ValueError, match="attribute index 2"):
        zeroshot_head(counts, 2, [0], DIM)


@pytest.mark.slow  # about 15 s on an idle core
def test_attribute_pretraining_learns_every_attribute_against_fixed_prototypes(encoder) -> None:
    # Two attributes; images whose mean colour channel encodes attribute 0 and whose
    # left/right brightness encodes attribute 1: the loss must fall on both.
    counts = [3, 2]
    gen = torch.Generator().manual_seed(0)
    n = 256
    a0 = torch.randint(0, 3, (n,), generator=gen)
    a1 = torch.randint(0, 2, (n,), generator=gen)
    images = 0.1 * torch.randn(n, 3, 32, 32, generator=gen)
    images[torch.arange(n), a0] += 1.0
    images[a1 == 1, :, :, :16] += 1.0
    labels = a0 * 2 + a1
    state = pretrain(
        encoder,
        images,
        labels,
        6,
        epochs=8,
        lr=3e-3,
        batch_size=64,
        seed=0,
        attribute_classes=counts,
        max_grad_norm=1.0,
    )
    trained = build_visual(seed=0)
    trained.load_state_dict(state)
    # Chance is 1/3 and 1/2; the untrained encoder with the same heads stays near it.
    for attribute, target, floor in ((0, a0, 0.8), (1, a1, 0.75)):
        weight, bias = zeroshot_head(counts, attribute, list(range(counts[attribute])), DIM)
        assert accuracy(trained, weight, bias, images, target) > floor
        assert accuracy(encoder, weight, bias, images, target) < floor - 0.15
    with pytest.raises(ValueError, match=r"multiply to 6.*7 mixed-radix"):
        pretrain(
            encoder,
            images,
            labels,
            7,
            epochs=1,
            lr=1e-3,
            batch_size=64,
            seed=0,
            attribute_classes=counts,
        )


def test_finetune_clips_every_step_to_max_grad_norm(encoder, colour_data, monkeypatch) -> None:
    train_x, train_y, _, _ = colour_data
    weight, bias = fit_head(
        encoder, train_x[:128], train_y[:128], num_classes("orientation"), steps=5
    )
    real_clip = torch.nn.utils.clip_grad_norm_
    after: list[float] = []

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        result = real_clip(params, max_norm, *args, **kwargs)
        after.append(
            float(torch.stack([p.grad.norm() for p in params if p.grad is not None]).norm())
        )
        return result

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    data = (encoder, weight, bias, train_x[:128], train_y[:128])
    settings = dict(epochs=1, lr=1e-3, batch_size=32, weight_decay=0.0, seed=0)
    finetune(*data, **settings, max_grad_norm=0.05)
    assert len(after) == 4  # one call per step
    assert max(after) <= 0.05 * (1 + 1e-4)
    after.clear()
    finetune(*data, **settings)
    assert after == []  # no clipping unless asked
