"""Per-sample gradients of one chunk by one of three methods, each squared and added to
running float32 sums: ``loop`` (one backward per sample, the reference), ``vmap``
(``torch.func``) and ``traced`` (one batched backward, through ``pipeline.fisher.tracer``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.fisher.tracer import PerSampleTracer, Workspace


def _add_squares(acc: torch.Tensor, g: torch.Tensor, scratch: bool = False) -> None:
    """acc [*shape] (float32) += Σ_b g[b]² for per-sample gradients g [B, *shape].

    ``scratch``: g is a buffer nobody reads again, so it may be squared in place. Low-precision
    g is converted to float32 first (a fresh buffer), so squares and sums are always float32.

    On CUDA: one pass over g, ``‖g[:, j]‖₂`` over the samples (accumulated in float32 even for
    half-precision g) then squared; one reading of g instead of the three of square-then-sum,
    which matters as g is B × the tensor. On the CPU (where that reduction is slow): when g
    may be overwritten, or for small tensors, one vectorised square-and-sum; large tensors that
    must be kept, one fused multiply-add per sample, no [B, *shape] temporary (allocating one
    there costs, in page faults, about as much as the per-sample gradient itself)."""
    if g.device.type != "cpu":
        norm = torch.linalg.vector_norm(g, 2, dim=0, dtype=torch.float32)
        acc.addcmul_(norm, norm)
        return
    if g.dtype != torch.float32:
        g, scratch = g.float(), True
    per_sample_bytes = 4 * math.prod(g.shape[1:])
    if scratch and per_sample_bytes <= _CPU_SUM_BYTES:
        acc += g.square_().sum(0)
    elif g.numel() < 65536:  # 256 KB in float32
        acc += g.square().sum(0)
    else:
        for g_b in g:
            acc.addcmul_(g_b, g_b)


# On the CPU the [*shape] result of ``sum(0)`` is a fresh allocation; above ~1 MB glibc maps
# fresh pages for it, whose faults cost more than the per-sample multiply-adds they replace.
_CPU_SUM_BYTES = 1 << 20


def loss_sum(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """Σ over the chunk of per-sample cross-entropies (a sum, so each sample's gradient is its
    own loss's gradient). x: [c, ...], y: [c] -> scalar float32."""
    logits = functional_call(model, {**others, **params}, (x,))  # [c, C]
    return F.cross_entropy(logits.float(), y, reduction="sum")


def single_sample_grads(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Gradient of one sample's loss (x: [1, ...], y: [1]) by ordinary autograd."""
    loss = loss_sum(model, params, others, x, y)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def loop_chunk(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    sums: dict[str, torch.Tensor],
) -> None:
    """Reference: one forward and backward per sample."""
    for i in range(x.shape[0]):
        grads = single_sample_grads(model, params, others, x[i : i + 1], y[i : i + 1])
        for name, g in grads.items():
            _add_squares(sums[name], g.unsqueeze(0))


def vmap_chunk(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    sums: dict[str, torch.Tensor],
) -> None:
    """``vmap(grad(loss))`` over the chunk: per-sample gradients [c, *shape], squared, summed."""
    frozen = {n: p.detach() for n, p in params.items()}

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**others, **p}, (xi.unsqueeze(0),))  # [1, C]
        return F.cross_entropy(logits.float(), yi.unsqueeze(0))

    # SDPA's fused CPU/GPU kernels have no vmap batching rule (functorch would fall back to a
    # slow per-sample loop, with a warning); the math backend decomposes into batchable ops.
    # grad under autocast mixes dtypes in the backward (torch 2.14): the fallback runs in the
    # tensors' own dtype (float32 for mixed precision).
    no_autocast = torch.autocast(x.device.type, enabled=False)
    with sdpa_kernel([SDPBackend.MATH]), no_autocast:
        grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(frozen, x, y)
    for name, g in grads.items():
        _add_squares(sums[name], g)


def traced_chunk(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    sums: dict[str, torch.Tensor],
    workspace: Workspace | None = None,
    keep: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """Traced per-sample gradients, squared and added to ``sums`` as they are produced.

    Returns the per-sample gradients of the samples ``keep`` (for the self-check):
    ``{name: [len(keep), *shape]}``, zeros for parameters the loss does not reach.
    """
    tracer = PerSampleTracer(params, batch=x.shape[0], workspace=workspace)
    owned = workspace.owns if workspace is not None else (lambda t: False)
    with tracer:
        logits = functional_call(model, {**others, **params}, (x,))  # [c, C]
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    # Gradients w.r.t. the recorded layer outputs only: the parameters' own (batch) gradients,
    # never needed, are pruned from the backward.
    outputs = [r.out for r in tracer.records]
    grads_out = list(torch.autograd.grad(loss, outputs, allow_unused=True)) if outputs else []

    keep = list(keep)
    kept = {n: p.new_zeros((len(keep), *p.shape)) for n, p in params.items()}
    pending: dict[str, torch.Tensor] = {}  # per-sample sums of parameters used more than once
    with torch.no_grad():  # the saved layer inputs are activations that require grad
        for name, g in tracer.per_sample_grads(grads_out):  # g: [c, *shape]
            if keep:
                kept[name] += g[keep].to(kept[name].dtype)
            if tracer.uses[name] == 1:
                _add_squares(sums[name], g, scratch=owned(g))
            else:
                pending[name] = g.clone() if name not in pending else pending[name] + g
        for name, g in pending.items():
            _add_squares(sums[name], g, scratch=True)
    return kept
