"""Zero-shot classification heads from CLIP's text tower (the task-vectors construction,
``build_classification_head`` in the release's ``src/heads.py``).

For class c with name n_c and templates t_1 … t_K, the head's row is

    w_c = s · normalize( (1/K) Σ_k normalize(encode_text(t_k(n_c))) ),   s = exp(logit_scale),

and the bias is zero, so that ``logits = normalize(image_features) @ W.T + b`` (the
repository's head convention, ``pipeline.models.backbone.ImageClassifier``) are CLIP's
scaled cosine similarities against the template-averaged class embeddings. Heads are
stored as ``{weight [C, D], bias [C]}`` safetensors. The class names and templates of the
eight tasks are the release's (``pipeline.data.classnames``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["build_zeroshot_head", "zeroshot_weights"]


@torch.no_grad()
def zeroshot_weights(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> Tensor:
    """Zero-shot head weights [C, D] float32 on the CPU, rows of norm exp(logit_scale).

    Args:
        model: an open_clip ``CLIP`` (anything with ``encode_text(tokens [B, L]) -> [B, D]``
            and a scalar ``logit_scale`` parameter holding log s).
        tokenizer: texts -> token ids [B, L] (``open_clip.get_tokenizer(name)``).
        classnames: C class names, index c naming label c.
        templates: K prompt templates; "{}" is replaced by the class name.
        device: where to run the text tower (default: where the model is).
        batch_size: prompts encoded per forward pass; the C·K prompts are batched
            across classes, which gives the same result as one class at a time.

    Raises:
        ValueError: no classes, no templates, or a template without "{}".
    """
    if not classnames:
        raise ValueError("zero-shot head needs at least one class name")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(
            f"zero-shot templates must be non-empty strings containing {{}}, got {list(templates)!r}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size]).to(device)
        embedding = model.encode_text(tokens).float()  # [B, D]
        chunks.append(embedding / embedding.norm(dim=-1, keepdim=True))
    model.train(was_training)
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)  # [C, K, D]
    mean = per_prompt.mean(dim=1)  # [C, D]
    weight = mean / mean.norm(dim=-1, keepdim=True)
    scale = model.logit_scale.detach().float().exp().to(weight.device)
    return (weight * scale).cpu().contiguous()


def build_zeroshot_head(
    backbone_name: str,
    pretrained: str | None,
    task: str,
    spec: dict[str, Any],
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """(weight [C, D], bias [C]) zero-shot head of ``task`` for a CLIP backbone.

    Args:
        backbone_name: a real backbone of ``pipeline.models.clip`` (ViT-B-32, ViT-B-16,
            ViT-L-14), built through open_clip with QuickGELU as OpenAI's weights expect.
        pretrained: open_clip tag ("openai") or a local checkpoint file of the whole CLIP
            model; None gives random weights (tests only).
        task: the task, whose class names (``pipeline.data.class_names``) and templates
            (``pipeline.data.prompt_templates``) come from ``spec``.
        spec: the config's `data` section.
        device: "cuda", "cpu", or None / "auto" for CUDA when available.
        batch_size: prompts per text-tower forward pass.
    """
    import open_clip

    from pipeline.data import class_names, prompt_templates
    from pipeline.devices import resolve_device
    from pipeline.models.clip import build_clip, get_backbone

    names = class_names(spec, task)
    templates = prompt_templates(spec, task)
    dev = resolve_device(None if device is None else str(device))
    model = build_clip(backbone_name, pretrained, device=dev)
    tokenizer = open_clip.get_tokenizer(get_backbone(backbone_name).open_clip)
    log.info(
        "zero-shot head of %s: %d classes x %d templates with %s (%s)",
        task,
        len(names),
        len(templates),
        backbone_name,
        pretrained,
    )
    weight = zeroshot_weights(model, tokenizer, names, templates, device=dev, batch_size=batch_size)
    return weight, torch.zeros(weight.shape[0], dtype=weight.dtype)
