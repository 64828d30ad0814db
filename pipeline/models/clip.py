"""The image encoders a run can use, by name: the demo ViT and open_clip's CLIP ViTs.

A checkpoint (θ0, θ_t, a merged model) is the encoder's `state_dict()` in open_clip's
*visual* naming (`conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`, …, `proj`),
whatever the backbone. Real backbones are built through open_clip so that a merged
checkpoint loads into `open_clip.create_model(name).visual` unchanged.

OpenAI's CLIP weights — and everything fine-tuned from them (the task-vectors release, the
Hugging Face `openai/clip-vit-*` models) — use QuickGELU. open_clip's plain `ViT-B-32`
config uses nn.GELU, and open_clip ≥ 2.2x only warns about the mismatch when asked for
`pretrained="openai"`; we build every real backbone with QuickGELU (`quick_gelu=True` in
`BACKBONES`), which is what those weights were trained with.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    """How to build one encoder. `open_clip` is the open_clip model name, None for the demo."""

    name: str
    open_clip: str | None
    quick_gelu: bool
    summary: str


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "demo",
            None,
            False,
            "tiny ViT (32 px, patch 8, width 64, 4 layers) for the built-in benchmark",
        ),
        Backbone(
            "demo-96",
            None,
            False,
            "tiny ViT (32 px, patch 8, width 96, 4 layers) for the CLIP-like demo",
        ),
        Backbone("ViT-B-32", "ViT-B-32", True, "CLIP ViT-B/32, 224 px, 88 M visual parameters"),
        Backbone("ViT-B-16", "ViT-B-16", True, "CLIP ViT-B/16, 224 px, 86 M visual parameters"),
        Backbone("ViT-L-14", "ViT-L-14", True, "CLIP ViT-L/14, 224 px, 304 M visual parameters"),
    )
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone `{name}`; known backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _open_clip():
    import open_clip  # ~2 s to import: only for real backbones

    return open_clip


def build_encoder(name: str) -> nn.Module:
    """A freshly initialised visual encoder (random weights; deterministic for the demo)."""
    backbone = get_backbone(name)
    if backbone.open_clip is None:
        from pipeline.models.backbone import DEMO_VISION_CFGS, build_visual

        return build_visual(DEMO_VISION_CFGS[name])
    open_clip = _open_clip()
    cfg = open_clip.get_model_config(backbone.open_clip)
    if cfg is None:
        raise ValueError(
            f"open_clip has no model config `{backbone.open_clip}` (backbone `{name}`)"
        )
    try:  # the vision tower alone: no text tower to initialise and throw away
        from open_clip.model import _build_vision_tower

        return _build_vision_tower(
            cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=backbone.quick_gelu
        )
    except (ImportError, TypeError):  # pragma: no cover - older/newer open_clip layouts
        model = open_clip.create_model(
            backbone.open_clip, pretrained=None, force_quick_gelu=backbone.quick_gelu
        )
        return model.visual


def build_clip(
    name: str, pretrained: str | None = None, device: str | torch.device | None = None
) -> nn.Module:
    """The whole open_clip CLIP model (text tower included) of a real backbone.

    `pretrained`: an open_clip pretrained tag ("openai") or a local checkpoint file; None
    gives random weights (tests, smoke runs). Nothing is downloaded for a local file.
    """
    backbone = get_backbone(name)
    if backbone.open_clip is None:
        raise ValueError(
            f"backbone `{name}` has no text tower (zero-shot heads need a CLIP backbone)"
        )
    open_clip = _open_clip()
    if pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(backbone.open_clip):
        if not Path(pretrained).is_file():
            raise ValueError(
                f"pretrained weights `{pretrained}` for backbone `{name}`: neither an open_clip tag "
                f"({', '.join(open_clip.list_pretrained_tags_by_model(backbone.open_clip))}) nor an existing file"
            )
        from pipeline.models.importers import foreign_checkpoint

        # open_clip torch.loads the file: check it with the bounded restricted unpickler first,
        # and report its failures as one error naming the file.
        with foreign_checkpoint(pretrained):
            return open_clip.create_model(
                backbone.open_clip,
                pretrained=pretrained,
                force_quick_gelu=backbone.quick_gelu,
                device=device or "cpu",
            )
    return open_clip.create_model(
        backbone.open_clip,
        pretrained=pretrained,
        force_quick_gelu=backbone.quick_gelu,
        device=device or "cpu",
    )


def eval_transform(name: str) -> Callable[[Any], torch.Tensor] | None:
    """The backbone's evaluation preprocessing (PIL image → [3, H, W] float tensor).

    None for the demo backbone, whose generated data are tensors already.
    """
    backbone = get_backbone(name)
    if backbone.open_clip is None:
        return None
    open_clip = _open_clip()
    cfg = open_clip.get_model_config(backbone.open_clip)
    size = cfg["vision_cfg"].get("image_size", 224)
    return open_clip.image_transform(size, is_train=False)


def image_size(name: str) -> int:
    """Input resolution of the backbone in pixels."""
    backbone = get_backbone(name)
    if backbone.open_clip is None:
        from pipeline.models.backbone import DEMO_VISION_CFGS

        return int(DEMO_VISION_CFGS[name]["image_size"])
    size = _open_clip().get_model_config(backbone.open_clip)["vision_cfg"].get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])


@functools.cache
def expected_shapes(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """tensor name → (shape, dtype) of the backbone's state dict (built once per process)."""
    return {n: (tuple(t.shape), t.dtype) for n, t in build_encoder(name).state_dict().items()}


def check_state(state: dict[str, torch.Tensor], name: str, source: str | Path) -> None:
    """Raise a one-line error naming `source` and the tensor when `state` is not a `name` encoder."""
    from pipeline.store import ArtifactError

    expected = expected_shapes(name)
    for tensor, (shape, _) in expected.items():
        if tensor not in state:
            raise ArtifactError(f"{source}: tensor `{tensor}` is missing for backbone `{name}`")
        if tuple(state[tensor].shape) != shape:
            raise ArtifactError(
                f"{source}: tensor `{tensor}` has shape {list(state[tensor].shape)}, "
                f"backbone `{name}` expects {list(shape)}"
            )
    for tensor in state:
        if tensor not in expected:
            raise ArtifactError(f"{source}: unexpected tensor `{tensor}` for backbone `{name}`")


def load_encoder(
    name: str, checkpoint: str | Path, device: str | torch.device | None = None
) -> nn.Module:
    """The backbone with the tensors of `checkpoint` (safetensors or Zarr) loaded, strictly."""
    from pipeline.store import load_tensors

    state = load_tensors(checkpoint)
    check_state(state, name, checkpoint)
    encoder = build_encoder(name)
    expected = encoder.state_dict()
    encoder.load_state_dict({n: t.to(expected[n].dtype) for n, t in state.items()})
    return encoder.to(device) if device is not None else encoder


def load_head(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [C, D], bias [C]) of a head file: logits = normalize(features) @ weight.T + bias."""
    from pipeline.store import ArtifactError, load_tensors

    head = load_tensors(path)
    for tensor in ("weight", "bias"):
        if tensor not in head:
            raise ArtifactError(
                f"{path}: head tensor `{tensor}` is missing (a head holds `weight` [C, D] and `bias` [C])"
            )
    weight, bias = head["weight"].float(), head["bias"].float()
    if weight.ndim != 2 or bias.shape != weight.shape[:1]:
        raise ArtifactError(
            f"{path}: head tensors have shapes weight {list(weight.shape)}, bias {list(bias.shape)}; "
            "expected weight [C, D] and bias [C]"
        )
    return weight, bias
