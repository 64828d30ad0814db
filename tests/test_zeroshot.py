"""Tests for zero-shot heads (pipeline/models/zeroshot.py) with a tiny open_clip CLIP and the real tokenizer."""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn

from pipeline.data.classnames import CLASSNAMES, GENERIC_TEMPLATES, TEMPLATES
from pipeline.models.backbone import ImageClassifier
from pipeline.models.zeroshot import build_zeroshot_head, zeroshot_weights

CLASSES = ["cat", "dog", "airplane", "sea ice"]
PROMPTS = ["a photo of a {}.", "a drawing of the {}.", 'a "{}" sign.']


def tiny_clip(seed: int = 0) -> CLIP:
    """A CLIP with the real vocabulary and context length but one narrow layer per tower."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(
            embed_dim=16,
            vision_cfg=CLIPVisionCfg(
                layers=1, width=32, head_width=16, patch_size=8, image_size=16
            ),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
        )
    with torch.no_grad():
        model.logit_scale.fill_(2.5)  # not the default, so a missing exp() or scale shows
    return model.eval()


@pytest.fixture(scope="module")
def model() -> CLIP:
    return tiny_clip()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer(
        "ViT-B-32"
    )  # the BPE vocabulary ships with open_clip: no download


def reference_weights(
    model: CLIP, tokenizer, classnames: list[str], templates: list[str]
) -> torch.Tensor:
    """The task-vectors loop, one class at a time, in float64."""
    m64 = copy.deepcopy(model).double()
    rows = []
    with torch.no_grad():
        for name in classnames:
            emb = m64.encode_text(tokenizer([t.replace("{}", name) for t in templates]))  # [K, D]
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows) * m64.logit_scale.exp()


def test_weights_equal_float64_reference(model: CLIP, tokenizer) -> None:
    weight = zeroshot_weights(
        model, tokenizer, CLASSES, PROMPTS, batch_size=5
    )  # batches straddle classes
    assert weight.shape == (4, 16) and weight.dtype == torch.float32 and weight.device.type == "cpu"
    expected = reference_weights(model, tokenizer, CLASSES, PROMPTS)
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.norm(dim=1), torch.full((4,), float(torch.tensor(2.5).exp())))
    # Rows differ per class, and batching does not change the result.
    assert torch.cdist(weight, weight).add(torch.eye(4) * 1e3).min() > 1e-3
    torch.testing.assert_close(
        zeroshot_weights(model, tokenizer, CLASSES, PROMPTS, batch_size=1), weight
    )


def test_head_classifies_text_aligned_features(model: CLIP, tokenizer) -> None:
    """Features along class c's template-averaged text embedding are classified as c."""
    weight = zeroshot_weights(model, tokenizer, CLASSES, PROMPTS)

    class TextAligned(nn.Module):  # "image" i -> a random positive multiple of class i's embedding
        def forward(self, index: torch.Tensor) -> torch.Tensor:
            return weight[index] * torch.linspace(0.5, 3.0, len(index)).unsqueeze(1)

    classifier = ImageClassifier(TextAligned(), weight, torch.zeros(4))
    logits = classifier(torch.tensor([2, 0, 3, 1]))
    assert logits.argmax(dim=1).tolist() == [2, 0, 3, 1]
    # The winning logit is the full scale: cosine 1 times exp(logit_scale).
    torch.testing.assert_close(
        logits.max(dim=1).values, torch.full((4,), float(torch.tensor(2.5).exp()))
    )


def test_bad_arguments(model: CLIP, tokenizer) -> None:
    with pytest.raises(ValueError, match="class"):
        zeroshot_weights(model, tokenizer, [], PROMPTS)
    with pytest.raises(ValueError, match="templates"):
        zeroshot_weights(model, tokenizer, CLASSES, [])
    with pytest.raises(ValueError, match="templates"):
        zeroshot_weights(model, tokenizer, CLASSES, ["no placeholder"])


def test_build_head_uses_task_names_and_templates(
    model: CLIP, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.models.clip

    calls = []

    def fake_build_clip(name, pretrained=None, device=None):
        calls.append((name, pretrained, str(device)))
        return model

    monkeypatch.setattr(pipeline.models.clip, "build_clip", fake_build_clip)
    weight, bias = build_zeroshot_head(
        "ViT-B-32", "weights.pt", "mnist", {"source": "torchvision"}, device="cpu"
    )
    assert calls == [("ViT-B-32", "weights.pt", "cpu")]
    expected = zeroshot_weights(
        model, tokenizer, list(CLASSNAMES["mnist"]), list(TEMPLATES["mnist"])
    )
    torch.testing.assert_close(weight, expected)
    assert torch.equal(bias, torch.zeros(10))
    custom = {"tasks": {"mnist": {"source": "torchvision", "templates": ["the digit {}"]}}}
    weight, _ = build_zeroshot_head("ViT-B-32", None, "mnist", custom, device="cpu")
    torch.testing.assert_close(
        weight, zeroshot_weights(model, tokenizer, list(CLASSNAMES["mnist"]), ["the digit {}"])
    )


def test_cli_writes_head(model: CLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.models.clip
    from pipeline.cli import main
    from pipeline.store import load_tensors

    monkeypatch.setattr(
        pipeline.models.clip, "build_clip", lambda name, pretrained=None, device=None: model
    )
    out = tmp_path / "heads" / "custom.safetensors"
    data = '{"source": "synthetic", "tasks": {"custom": {"source": "parquet", "classes": ["cold", "hot"]}}}'
    code = main(
        [
            "zeroshot-head",
            "--backbone",
            "ViT-B-32",
            "--pretrained",
            "openai",
            "--task",
            "custom",
            "--data",
            data,
            "--device",
            "cpu",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    head = load_tensors(out)
    assert head["weight"].shape == (2, 16) and torch.equal(head["bias"], torch.zeros(2))
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    torch.testing.assert_close(
        head["weight"], zeroshot_weights(model, tokenizer, ["cold", "hot"], list(GENERIC_TEMPLATES))
    )


def test_cli_error_for_demo_backbone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    code = main(
        [
            "zeroshot-head",
            "--backbone",
            "demo",
            "--pretrained",
            "openai",
            "--task",
            "mnist",
            "--data",
            '{"source": "torchvision"}',
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "h.safetensors"),
        ]
    )
    assert code == 2
    assert "text tower" in capsys.readouterr().err
    assert not (tmp_path / "h.safetensors").exists()


@pytest.mark.slow
def test_real_vit_b_32_text_tower_shapes() -> None:
    """ViT-B-32 at full size (random weights, no download): [C, 512] rows of norm exp(logit_scale)."""
    weight, bias = build_zeroshot_head(
        "ViT-B-32", None, "svhn", {"source": "torchvision"}, device="cpu"
    )
    assert weight.shape == (10, 512) and bias.shape == (10,)
    torch.testing.assert_close(
        weight.norm(dim=1), torch.full((10,), 1 / 0.07), rtol=1e-4, atol=1e-4
    )


# --------------------------------------------------------------------------- the release's prompts

FIXTURE = Path(__file__).parent / "data" / "fixtures" / "task_vectors_templates.json"


class FakeTextTower(nn.Module):
    """A text tower whose embedding of a prompt is a fixed random vector of that prompt.

    The tokenizer gives each distinct text an id and records every text it is asked for,
    so a test sees exactly which prompts a head was built from.
    """

    def __init__(self, dim: int = 12, logit_scale: float = 2.3) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(logit_scale))
        self.ids: dict[str, int] = {}
        self.seen: list[str] = []
        self.table = torch.randn(
            4096, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        )

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        self.seen.extend(texts)
        return torch.tensor([[self.ids.setdefault(t, len(self.ids))] for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0]].float() * 3.0  # not unit norm: the head must normalise

    def embed64(self, text: str) -> torch.Tensor:
        return self.table[self.ids[text]] * 3.0


@pytest.mark.parametrize(
    "task", ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"]
)
def test_task_vectors_head_is_the_mean_of_the_release_prompts(
    task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head of each task under data.layout task_vectors: per class, the release's prompts
    (fixture strings, in order) embedded, each normalised, averaged, normalised, times exp(logit_scale)."""
    import json

    import pipeline.models.clip

    release = json.loads(FIXTURE.read_text())[task]
    tower = FakeTextTower()
    monkeypatch.setattr(
        pipeline.models.clip, "build_clip", lambda name, pretrained=None, device=None: tower
    )
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name: tower.tokenize)
    spec = {"layout": "task_vectors", "root": "/nonexistent"}  # names and prompts need no data
    weight, bias = build_zeroshot_head("ViT-B-32", None, task, spec, device="cpu", batch_size=7)

    prompts = [t.format(c) for c in release["classnames"] for t in release["templates"]]
    assert tower.seen == prompts  # exactly the release's prompts, class by class, in order
    rows = []
    for c in release["classnames"]:
        emb = torch.stack([tower.embed64(t.format(c)) for t in release["templates"]])
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        rows.append(mean / mean.norm())
    expected = torch.stack(rows) * torch.tensor(2.3, dtype=torch.float64).exp()
    assert weight.shape == (len(release["classnames"]), 12) and weight.dtype == torch.float32
    torch.testing.assert_close(weight.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(bias, torch.zeros(len(release["classnames"])))
