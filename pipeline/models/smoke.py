"""Real-scale inputs that need no download: random θ0 and synthetic fine-tuned checkpoints.

The smoke path (`config/smoke-vit-b-32.yaml`) runs every stage of the workflow at the real
size of a CLIP backbone without any weights: θ0 is the backbone with its random
initialisation, and each "fine-tuned" checkpoint is θ0 plus a task vector built like the
real ones look — a few strong directions per matrix layer plus small dense noise:

    Δ_t^(l) = s · ‖W0^(l)‖_F · (A B^T / ‖A B^T‖_F) + σ · ‖W0^(l)‖_F / √(numel) · N(0, 1)

with A [d_out, r], B [d_in, r] Gaussian (rank r), s = `scale`, σ = `noise`. Vector tensors
(biases, norms, embeddings) get the dense part only. Every draw is seeded by (seed, task,
tensor name), so a checkpoint depends on nothing but its settings.
"""

from __future__ import annotations

import math
import zlib

import torch

from pipeline.models.clip import build_encoder


def _generator(seed: int, *parts: str) -> torch.Generator:
    key = zlib.crc32("/".join(parts).encode())
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + key) % (2**63))


def pretrained_state(backbone: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """θ0: the backbone's random initialisation under a fixed seed (float32, contiguous)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_encoder(backbone)
    return {n: t.detach().float().contiguous() for n, t in encoder.state_dict().items()}


def task_vector(
    theta0: dict[str, torch.Tensor],
    task: str,
    rank: int = 8,
    scale: float = 0.05,
    noise: float = 0.005,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Δ_t for every floating tensor of θ0 (see the module docstring); same shapes as θ0."""
    if rank < 1:
        raise ValueError(f"smoke rank must be ≥ 1, got {rank}")
    if scale < 0 or noise < 0:
        raise ValueError(f"smoke scale and noise must be ≥ 0, got scale={scale}, noise={noise}")
    delta = {}
    for name, w in theta0.items():
        if not w.is_floating_point():
            continue
        g = _generator(seed, task, name)
        norm = float(w.norm()) or 1.0
        d = torch.randn(w.shape, generator=g) * (noise * norm / math.sqrt(w.numel()))
        if w.ndim == 2 and min(w.shape) > 1:
            r = min(rank, *w.shape)
            low = torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w.shape[1], generator=g)
            d += low * (scale * norm / float(low.norm()))
        delta[name] = d
    return delta


def finetuned_state(
    theta0: dict[str, torch.Tensor],
    task: str,
    rank: int = 8,
    scale: float = 0.05,
    noise: float = 0.005,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """θ_t = θ0 + Δ_t (integer tensors copied)."""
    delta = task_vector(theta0, task, rank, scale, noise, seed)
    return {n: (w + delta[n]).contiguous() if n in delta else w.clone() for n, w in theta0.items()}


def random_head(
    task: str, num_classes: int, dim: int, logit_scale: float = 100.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A head shaped like a zero-shot head: unit rows times the logit scale, zero bias."""
    g = _generator(seed, task, "head")
    weight = (
        torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)
        * logit_scale
    )
    return weight, torch.zeros(num_classes)
