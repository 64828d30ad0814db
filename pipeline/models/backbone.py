"""The demo benchmark's image encoder and the classifier that puts a frozen head on it.

The demo encoder is open_clip's ``VisionTransformer`` (through the light copy in
``pipeline/models/vit.py``, with the same names, initialisation and outputs), only
small: every merge, Fisher and basis stage then sees exactly the parameter names of
a CLIP ViT-B/32 visual tower (``conv1.weight``, ``class_embedding``, ``positional_embedding``,
``ln_pre.*``, ``transformer.resblocks.{i}.{ln_1,attn,ln_2,mlp}.*``, ``ln_post.*``,
``proj``), and code written against the demo runs unchanged on the real models.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Our copy of open_clip's class (same names, init and outputs; see models/vit.py): the
# demo starts ~180 short jobs, and importing open_clip would add ~2 s to each.
from pipeline.models.vit import VisionTransformer

__all__ = ["DEMO_VISION_CFG", "DEMO_VISION_CFGS", "ImageClassifier", "build_visual"]

DEMO_VISION_CFG: dict[str, Any] = {
    "image_size": 32,
    # 8-pixel patches give a 4×4 grid (17 tokens with the class token): small enough
    # to fine-tune a task in seconds on one CPU thread.
    "patch_size": 8,
    "width": 64,
    "layers": 4,
    "heads": 4,
    "mlp_ratio": 4.0,
    "output_dim": 64,
}
"""Keyword arguments of ``open_clip.transformer.VisionTransformer`` for the demo encoder
(about 218k parameters)."""

DEMO_VISION_CFGS: dict[str, dict[str, Any]] = {
    "demo": DEMO_VISION_CFG,
    # The default demo (config/config.yaml): width 96 leaves room for the task
    # subspaces of six tasks at k ≤ 4 (24 of 96 directions per layer); about 477k parameters.
    "demo-96": {**DEMO_VISION_CFG, "width": 96, "heads": 4, "output_dim": 96},
}
"""Demo backbone name → ``VisionTransformer`` keyword arguments."""


def build_visual(cfg: dict[str, Any] | None = None, seed: int = 0) -> VisionTransformer:
    """Build an open_clip-style ``VisionTransformer`` with a deterministic initialisation.

    Args:
        cfg: ``VisionTransformer`` keyword arguments; :data:`DEMO_VISION_CFG` if None.
        seed: initialisation seed. The global RNG state is saved and restored, so
            building a model does not disturb the caller's random stream.

    Returns:
        The encoder, in train mode: images [N, 3, H, W] → embeddings [N, output_dim].
    """
    kwargs = copy.deepcopy(DEMO_VISION_CFG if cfg is None else cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(**kwargs)


class ImageClassifier(nn.Module):
    """An image encoder with a fixed linear head on its normalised embeddings.

    ``logits = normalize(encoder(x), dim=-1) @ weight.T + bias``, as in the
    task-vectors ``ClassificationHead``. The head is registered as buffers, so it
    moves with ``.to()`` and appears in ``state_dict()`` (under ``weight`` and
    ``bias``), but is never a parameter: optimisers built from ``.parameters()``
    see only the encoder.

    Args:
        encoder: maps images [N, 3, H, W] to embeddings [N, D].
        weight: [C, D] class weights (already scaled by the logit scale).
        bias: [C] class biases.
    """

    weight: Tensor
    bias: Tensor

    def __init__(self, encoder: nn.Module, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"head weight must be [C, D], got shape {tuple(weight.shape)}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"head bias must be [C] = [{weight.shape[0]}] to match weight "
                f"{tuple(weight.shape)}, got shape {tuple(bias.shape)}"
            )
        self.encoder = encoder
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, images: Tensor) -> Tensor:
        """Class logits [N, C] for images [N, 3, H, W]."""
        features = F.normalize(self.encoder(images), dim=-1)  # [N, D]
        return features @ self.weight.T + self.bias
