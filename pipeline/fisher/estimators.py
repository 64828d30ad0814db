"""The Fisher diagonal estimators (``estimate_fisher``): ``per_sample`` (the empirical Fisher)
and three from one gradient per mini-batch: ``batch``, ``first_moment``, ``first_moment_ema``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.fisher.data import (
    FisherResult,
    LabelledData,
    check_data,
    check_dataset,
    check_labels,
    iter_batches,
    per_fraction,
    sample_order,
)
from pipeline.fisher.empirical import empirical_fisher, empirical_fisher_dataset
from pipeline.fisher.gradients import loss_sum
from pipeline.fisher.model import check_logits, evaluation, functional_tensors, no_tf32, setup

logger = logging.getLogger(__name__)


ESTIMATORS = ("per_sample", "batch", "first_moment", "first_moment_ema")
"""The Fisher diagonal estimators (see :func:`estimate_fisher`)."""
Estimator = Literal["per_sample", "batch", "first_moment", "first_moment_ema"]
ADAM_BETA1 = 0.9
"""β₁ of the running average of ``first_moment_ema`` (Adam's and AdamW's default, the
optimiser the task-vectors release fine-tuned with)."""


def estimate_fisher(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    fractions: Sequence[float],
    *,
    estimator: Estimator = "per_sample",
    param_names: Sequence[str] | None = None,
    batch_size: int = 64,
    chunk_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[float, dict[str, torch.Tensor]]:
    """A diagonal Fisher estimate of one task at θ_t, for several data fractions in one pass.

    Every estimator reads the same samples: fraction f uses the first K_f =
    :func:`fisher_batches` ``(N, f, B)`` batches b_1 … b_K of ``sample_order(N, seed)`` (B
    samples each; one batch of N when N < B). With ℓ_n the cross-entropy of sample n on its
    true label and g_n = ∇_θ ℓ_n:

    * ``per_sample`` (paper eq. 27, the empirical Fisher): ``(1/n) Σ_n g_n²`` over the n used
      samples; exactly :func:`empirical_fisher`.
    * ``batch`` (FusionBench's ``FisherMergingAlgorithmForCLIP.get_fisher_weights``): per
      batch, the gradient G_b of ``Σ_{n∈b} Σ_c √p_nc · log p_nc`` (p_nc the softmax
      probability of class c, √p_nc held constant; the labels are not used), squared; the
      squares summed over the batches and divided by the number of samples,
      ``(1/n) Σ_b G_b²``.
    * ``first_moment`` (appendix C.3's F_t = diag(u²) for Fisher averaging): u the mean over
      the batches of the mini-batch gradients ḡ_b = (1/|b|) Σ_{n∈b} g_n (the gradient of the
      batch's mean cross-entropy, as in fine-tuning), ``u = (1/K) Σ_b ḡ_b``; result u².
    * ``first_moment_ema``: u read as Adam's first moment,
      m_k = β₁ m_{k-1} + (1 − β₁) ḡ_{b_k}, m_0 = 0, β₁ = ``ADAM_BETA1``, bias-corrected:
      ``u = m_K / (1 − β₁^K)``; result u².

    ``per_sample`` takes the vectorised per-sample path (see the `pipeline.fisher` docstring); the
    others need one gradient per batch, formed chunk by chunk (``chunk_size`` samples per
    forward and backward; chunks never straddle a batch), so the result does not depend on
    ``chunk_size`` beyond float32 round-off.

    Args:
        model, images, labels, fractions, param_names, batch_size, chunk_size, seed, device,
            dtype, progress: as for :func:`empirical_fisher` (shapes: images ``[N, ...]``,
            labels ``[N]``).
        estimator: one of :data:`ESTIMATORS`.

    Returns:
        ``{fraction: {name: Fisher diagonal}}``, each tensor float32 on the CPU with the
        parameter's shape; sums and squares are float32.
    """
    _check_estimator(estimator)
    check_data(images, labels)
    if estimator == "per_sample":
        return empirical_fisher(
            model, images, labels, fractions, param_names=param_names, batch_size=batch_size,
            chunk_size=chunk_size, seed=seed, device=device, dtype=dtype, progress=progress,
        )  # fmt: skip
    return _batch_estimate(
        model, (images, labels), fractions, estimator=estimator, param_names=param_names,
        batch_size=batch_size, chunk_size=chunk_size, seed=seed, device=device, dtype=dtype,
        num_workers=0, progress=progress,
    )  # fmt: skip


def estimate_fisher_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    fractions: Sequence[float],
    *,
    estimator: Estimator = "per_sample",
    param_names: Sequence[str] | None = None,
    batch_size: int = 64,
    chunk_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[float, dict[str, torch.Tensor]]:
    """:func:`estimate_fisher` streamed from a map-style Dataset of ``(image, label)`` items
    (item i plays the part of ``images[i]``; only the samples the largest fraction needs are
    read, each once). Arguments as for :func:`estimate_fisher` and
    :func:`empirical_fisher_dataset`.

    Returns:
        ``{fraction: {name: Fisher diagonal}}``, float32 on the CPU.
    """
    _check_estimator(estimator)
    if estimator == "per_sample":
        return empirical_fisher_dataset(
            model, dataset, fractions, param_names=param_names, batch_size=batch_size,
            chunk_size=chunk_size, seed=seed, device=device, dtype=dtype,
            num_workers=num_workers, progress=progress,
        )  # fmt: skip
    check_dataset(dataset, num_workers, "estimate_fisher")
    return _batch_estimate(
        model, dataset, fractions, estimator=estimator, param_names=param_names,
        batch_size=batch_size, chunk_size=chunk_size, seed=seed, device=device, dtype=dtype,
        num_workers=num_workers, progress=progress,
    )  # fmt: skip


def _batch_estimate(
    model: torch.nn.Module,
    data: LabelledData,
    fractions: Sequence[float],
    *,
    estimator: Estimator,
    param_names: Sequence[str] | None,
    batch_size: int,
    chunk_size: int,
    seed: int,
    device: str | torch.device,
    dtype: torch.dtype,
    num_workers: int,
    progress: bool,
) -> FisherResult:
    """Driver of the ``batch``, ``first_moment`` and ``first_moment_ema`` estimators: the
    same ordering and prefixes as :func:`_empirical_fisher`; each batch's gradient is the sum
    of its chunks' gradients (losses summed over samples, so chunking changes nothing but
    round-off), folded into the estimator's state when the batch is complete."""
    fractions, device, names, mixed, tensor_dtype, n_total, n_used = setup(
        model, data, fractions, param_names, batch_size, chunk_size, device, dtype
    )
    ends = set(n_used.values())  # every prefix ends on a batch boundary
    n_max = max(ends)
    order = sample_order(n_total, seed)[:n_max].tolist()
    batches = [order[s : s + batch_size] for s in range(0, n_max, batch_size)]
    chunks = [b[s : s + chunk_size] for b in batches for s in range(0, len(b), chunk_size)]
    logger.info(
        "Fisher estimator %s of %d tensors, %d batches (%d of %d samples; fractions %s; chunks "
        "of %d, %s %s)", estimator, len(names), len(batches), n_max, n_total,
        ", ".join(f"{f:g}" for f in fractions), chunk_size, device,
        str(dtype).removeprefix("torch."),
    )  # fmt: skip

    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    precision = torch.autocast(device.type, dtype=dtype) if mixed else no_tf32()
    loss_of = _expected_log_likelihood if estimator == "batch" else loss_sum
    with evaluation(model), torch.enable_grad():
        params, others = functional_tensors(model, names, device, tensor_dtype)
        # float32 running state and the current batch's gradient of its summed loss
        state = {n: p.new_zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
        batch_grad = {n: torch.zeros_like(s) for n, s in state.items()}
        bar = tqdm(
            total=n_max,
            desc=f"Fisher ({estimator})",
            unit="sample",
            file=sys.stderr,
            disable=not progress,
        )
        done, in_batch, k, n_classes = 0, 0, 0, 0
        with bar, precision:
            for x, y in iter_batches(data, chunks, device, num_workers=num_workers):
                x = x.to(tensor_dtype) if x.is_floating_point() else x
                if done == 0:
                    n_classes = check_logits(model, params, others, x[:1])
                check_labels(y, n_classes)
                loss = loss_of(model, params, others, x, y)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                with torch.no_grad():
                    for (name, acc), g in zip(batch_grad.items(), grads):
                        if g is not None:
                            acc += g.float()
                done += len(y)
                in_batch += len(y)
                bar.update(len(y))
                if in_batch < len(batches[k]):
                    continue
                with torch.no_grad():
                    _fold_batch(estimator, state, batch_grad, in_batch)
                    if done in ends:
                        snapshots[done] = _finish(estimator, state, done, k + 1)
                    for acc in batch_grad.values():
                        acc.zero_()
                k, in_batch = k + 1, 0

    return per_fraction(fractions, n_used, snapshots)


def _fold_batch(
    estimator: Estimator,
    state: dict[str, torch.Tensor],
    batch_grad: dict[str, torch.Tensor],
    size: int,
) -> None:
    """Fold a batch's gradient of its summed loss, ``batch_grad`` [*shape] over ``size``
    samples, into the running ``state``: Σ_b G_b² (batch), Σ_b ḡ_b (first_moment),
    or the uncorrected running average m_k (first_moment_ema)."""
    for name, s in state.items():
        g = batch_grad[name]
        if estimator == "batch":
            s.addcmul_(g, g)
        elif estimator == "first_moment":
            s.add_(g, alpha=1.0 / size)
        else:
            s.mul_(ADAM_BETA1).add_(g, alpha=(1.0 - ADAM_BETA1) / size)


def _finish(
    estimator: Estimator, state: dict[str, torch.Tensor], n_samples: int, n_batches: int
) -> dict[str, torch.Tensor]:
    """The estimate after ``n_batches`` batches (``n_samples`` samples), float32 on the CPU."""
    if estimator == "batch":
        return {n: (s / n_samples).cpu() for n, s in state.items()}
    if estimator == "first_moment":
        return {n: (s / n_batches).square().cpu() for n, s in state.items()}
    # Bias correction as in Adam's update: m_0 = 0 shrinks m_K by 1 − β₁^K, which would scale
    # a task's estimate by its number of batches; the fine-tuned optimiser state after
    # thousands of steps has no such shrinkage.
    correction = 1.0 - ADAM_BETA1**n_batches
    return {n: (s / correction).square().cpu() for n, s in state.items()}


def _expected_log_likelihood(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """FusionBench's Fisher loss of a chunk: Σ_n Σ_c √p_nc · log p_nc with p = softmax(logits)
    held constant (no gradient through √p); ``y`` is not used. x: [c, ...] -> scalar."""
    logits = functional_call(model, {**others, **params}, (x,)).float()  # [c, C]
    log_p = F.log_softmax(logits, dim=-1)
    return (log_p.detach().exp().sqrt() * log_p).sum()


def _check_estimator(estimator: Any) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown Fisher estimator {estimator!r}: expected one of {', '.join(ESTIMATORS)}"
        )
