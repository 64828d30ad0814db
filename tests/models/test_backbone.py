"""Tests for the demo encoder and the frozen-head classifier (pipeline/models/backbone.py)."""

from __future__ import annotations

import re

import open_clip
import pytest
import torch

from pipeline.models.backbone import DEMO_VISION_CFG, ImageClassifier, build_visual


def _modulo_block_index(keys: list[str]) -> set[str]:
    """Key names with the resblock index replaced by '*'."""
    return {re.sub(r"resblocks\.\d+\.", "resblocks.*.", key) for key in keys}


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return build_visual(seed=0)


def test_state_dict_names_follow_open_clip_vit_b_32(encoder: torch.nn.Module) -> None:
    # pretrained=None builds the architecture only; nothing is downloaded.
    reference = open_clip.create_model("ViT-B-32", pretrained=None).visual.state_dict()
    demo = encoder.state_dict()
    assert _modulo_block_index(list(demo)) == _modulo_block_index(list(reference))
    blocks = {int(m.group(1)) for k in demo if (m := re.search(r"resblocks\.(\d+)\.", k))}
    assert blocks == set(range(DEMO_VISION_CFG["layers"]))
    # Same kind of tensor under each name (e.g. proj is [width, output_dim]).
    for name, tensor in demo.items():
        ref_name = re.sub(r"resblocks\.\d+\.", "resblocks.0.", name)
        assert tensor.ndim == reference[ref_name].ndim, name


def test_size_and_output(encoder: torch.nn.Module) -> None:
    n_params = sum(p.numel() for p in encoder.parameters())
    assert 100_000 <= n_params <= 1_000_000
    out = encoder(torch.rand(5, 3, 32, 32))
    assert out.shape == (5, DEMO_VISION_CFG["output_dim"])


def test_build_visual_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_visual(seed=7).state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    second = build_visual(seed=7).state_dict()
    other = build_visual(seed=8).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_build_visual_takes_a_custom_config() -> None:
    cfg = {**DEMO_VISION_CFG, "layers": 2, "width": 32, "heads": 2}
    model = build_visual(cfg, seed=0)
    assert model.proj.shape == (32, DEMO_VISION_CFG["output_dim"])
    assert not any("resblocks.2." in k for k in model.state_dict())


def test_classifier_logits_and_frozen_head(encoder: torch.nn.Module) -> None:
    weight, bias = torch.randn(7, DEMO_VISION_CFG["output_dim"]), torch.randn(7)
    classifier = ImageClassifier(encoder, weight, bias)
    images = torch.rand(4, 3, 32, 32)
    logits = classifier(images)
    assert logits.shape == (4, 7)
    features = torch.nn.functional.normalize(encoder(images), dim=-1)
    torch.testing.assert_close(logits, features @ weight.T + bias)

    # The head is buffers: not parameters, no gradient, but saved in the state dict.
    parameter_names = {name for name, _ in classifier.named_parameters()}
    assert "weight" not in parameter_names and "bias" not in parameter_names
    assert all(name.startswith("encoder.") for name in parameter_names)
    assert not classifier.weight.requires_grad and not classifier.bias.requires_grad
    logits.sum().backward()
    assert classifier.weight.grad is None and classifier.bias.grad is None
    assert {"weight", "bias"} <= set(classifier.state_dict())
    # Cloned: editing the caller's tensors does not change the head.
    weight.zero_()
    assert classifier.weight.abs().sum() > 0


def test_classifier_rejects_mismatched_head(encoder: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="bias"):
        ImageClassifier(encoder, torch.zeros(3, 64), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[C, D\]"):
        ImageClassifier(encoder, torch.zeros(64), torch.zeros(64))
