"""Diagonal Fisher estimates of a task's encoder at θ_t: the empirical Fisher (paper eq. 27,
from per-sample gradients) and three mini-batch estimators (``estimate_fisher``).

    v_t = (1/N) Σ_n (∇_θ ℓ(x_n, y_n; θ_t))²

ℓ is the cross-entropy of task t's frozen classifier on the true label, θ_t the fine-tuned
encoder; the gradient is taken per sample and then squared (the square of a batch gradient is
a different quantity). Data fraction f: the N training samples are shuffled with a fixed seed
and the first ``max(1, ⌊f·N/B⌋)`` batches of B = 64 are used, so every fraction is a prefix of
one ordering and all fractions of a task are accumulated in one pass over the largest.

Per-sample gradients are computed chunk by chunk (``chunk_size`` samples at a time) by one of
two exact methods:

* ``traced`` (default): one batched forward and one backward per chunk, i.e. about the cost
  of ordinary batched training. A torch-function mode records, for every parameter use it
  understands (``linear``, ``conv2d``, ``layer_norm``, ``x @ P``, broadcast ``+ - *``,
  expansion to the batch, view-like functions of a parameter), the layer input; the backward
  returns the gradient of each recorded output, and the per-sample weight gradient is
  Σ_tokens grad_out ⊗ input (one ``bmm`` per layer), squared and summed over the chunk at
  once. nn.MultiheadAttention is evaluated by an equivalent decomposition (in-projection,
  SDPA, out-projection), so its projections are covered too. The backward requests
  activation gradients only, so the batch weight-gradient GEMMs are pruned.
* ``vmap``: ``torch.func.vmap(torch.func.grad(loss))`` over the chunk, used automatically when
  the model uses a parameter in an operation the tracer does not know, modifies a recorded
  tensor in place, or fails the one-time self-check (the first chunk's first and last samples
  against a plain single-sample backward), each with a logged warning.

nn.MultiheadAttention's fused eval-mode fast path (``torch._native_multi_head_attention``) is
switched off during the computation (and restored): it is taken when no attention input
requires grad (e.g. only later layers differentiated), has no vmap batching rule (functorch
then runs it sample by sample, with a warning), and the tracer relies on the unfused
``multi_head_attention_forward`` call. The vmap method runs SDPA on its math backend, as the
fused SDPA kernels have no batching rule either.

Inputs come from memory (``empirical_fisher(model, images, labels, ...)``, the demo path) or
are streamed from a map-style Dataset of ``(image, label)`` items
(``empirical_fisher_dataset``, the real tasks: only the samples the largest fraction needs are
read, through a DataLoader with worker processes and pinned memory on CUDA); both feed the same
driver with the same chunks, so the results are equal. Device: ``cpu``, ``cuda``, ``cuda:N`` or
``auto``. Precision: float32 (default) or float64 tensors, or bfloat16 / float16 mixed
precision (``torch.autocast``: float32 weights, matrix products including the per-sample
gradients in the half type); squares and sums are float32 in every case.

``estimate_fisher`` / ``estimate_fisher_dataset`` choose the estimator: ``per_sample`` (the
above), ``batch`` (FusionBench's squared mini-batch gradient), ``first_moment`` (appendix C.3's
diag(u²), u the mean mini-batch gradient) or ``first_moment_ema`` (u as Adam's running
average); the last three take one gradient per mini-batch over the same samples and
fractions (definitions in ``estimate_fisher``).

``empirical_fisher_loop`` is the plain reference (one backward per sample), for tests and
benchmarks only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import logging
import math
import numbers
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.models.clip import resolve_device

__all__ = [
    "ADAM_BETA1",
    "ESTIMATORS",
    "empirical_fisher",
    "empirical_fisher_dataset",
    "empirical_fisher_loop",
    "estimate_fisher",
    "estimate_fisher_dataset",
    "fisher_batches",
    "iter_batches",
    "sample_order",
]

logger = logging.getLogger(__name__)

Strategy = Literal["auto", "traced", "vmap", "loop"]
FisherResult = dict[float, dict[str, torch.Tensor]]
LabelledData = tuple[torch.Tensor, torch.Tensor] | Dataset
"""Samples with labels: ``(images [N, ...], labels [N])`` in memory, or a map-style Dataset of
``(image, label)`` items."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def fisher_batches(n_samples: int, fraction: float, batch_size: int = 64) -> int:
    """Number of batches used for data fraction ``fraction``: ``max(1, ⌊fraction·N / B⌋)``.

    Args:
        n_samples: N, the size of the task's training split (≥ 1).
        fraction: f in (0, 1].
        batch_size: B (≥ 1).

    Returns:
        The number of batches; ``min(N, batches·B)`` samples are used (a single batch is
        shorter than B only when N < B).
    """
    _check_positive_int("n_samples", n_samples)
    _check_positive_int("batch_size", batch_size)
    _check_fraction(fraction)
    # Rounded to 9 decimals before the floor so that e.g. 0.29·6400/64, which is
    # 28.999999999999996 in binary floating point, counts as the 29 batches it means.
    return max(1, math.floor(round(float(fraction) * n_samples / batch_size, 9)))


def sample_order(n_samples: int, seed: int) -> torch.Tensor:
    """The seeded permutation of the training samples shared by all data fractions.

    Args:
        n_samples: N (≥ 1).
        seed: seed of a fresh CPU ``torch.Generator``; the global RNG is not touched.

    Returns:
        ``[N]`` int64 permutation of ``0..N-1``; a fraction uses a prefix of it.
    """
    _check_positive_int("n_samples", n_samples)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return torch.randperm(int(n_samples), generator=generator)


def iter_batches(
    data: LabelledData,
    index_chunks: Sequence[Sequence[int]],
    device: torch.device,
    *,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images [c, ...], labels [c] int64)`` on ``device`` for each chunk of indices.

    Args:
        data: ``(images [N, ...], labels [N])`` tensors (gathered by indexing, no workers), or a
            map-style ``torch.utils.data.Dataset`` of ``(image, label)`` items (read through a
            ``DataLoader`` with ``num_workers`` worker processes, pinned memory on CUDA).
        index_chunks: the sample indices of each chunk, in order.
        device: where the chunks go.
        num_workers: DataLoader workers (Datasets only; 0 reads in this process).

    Images keep their dtype (the caller casts); labels become int64.
    """
    non_blocking = device.type == "cuda"
    if isinstance(data, tuple):
        images, labels = data
        for idx in index_chunks:
            idx = torch.as_tensor(idx, dtype=torch.int64)
            x, y = images[idx], labels[idx]
            if non_blocking:
                x, y = x.pin_memory(), y.pin_memory()
            yield x.to(device, non_blocking=non_blocking), y.to(device, torch.int64, non_blocking)
        return
    loader = DataLoader(
        data, batch_sampler=[list(map(int, idx)) for idx in index_chunks],
        num_workers=num_workers, pin_memory=non_blocking,
    )  # fmt: skip
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                "dataset items must be (image, label) pairs; the collated batch is a "
                f"{type(batch).__name__}"
            )
        x, y = batch
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"dataset labels must be integer class indices, got dtype {y.dtype}")
        yield x.to(device, non_blocking=non_blocking), y.to(device, torch.int64, non_blocking)


def empirical_fisher(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    fractions: Sequence[float],
    *,
    param_names: Sequence[str] | None = None,
    batch_size: int = 64,
    chunk_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[float, dict[str, torch.Tensor]]:
    """Empirical Fisher diagonal ``(1/N) Σ_n g_n²`` for several data fractions in one pass.

    g_n is the gradient of sample n's cross-entropy (true label) w.r.t. the parameters in
    ``param_names``, computed chunk by chunk by the traced method, or by vmap where the model
    needs it (see the module docstring). Deterministic on CPU for a fixed thread count.

    Args:
        model: maps images ``[B, ...]`` to logits ``[B, C]`` (encoder + frozen head; keep the
            head in buffers or leave it out of ``param_names``). Put in eval mode for the
            computation (its previous train/eval flags are restored); its tensors are not
            modified: copies on ``device`` are passed through ``torch.func.functional_call``.
        images: ``[N, ...]`` the task's preprocessed training inputs.
        labels: ``[N]`` integer class indices (the true labels).
        fractions: data fractions, each in (0, 1]; fraction f uses the first
            ``min(N, fisher_batches(N, f, batch_size)·batch_size)`` samples of
            ``sample_order(N, seed)``.
        param_names: parameters to differentiate; default every parameter with
            ``requires_grad``.
        batch_size: B of the fraction rule.
        chunk_size: samples per vectorised per-sample-gradient chunk. Memory: the traced
            method holds the activations of one chunk and one layer's per-sample gradients
            (chunk × the largest tensor) at a time, plus O(2·|θ|) for the first chunk's
            self-check; the vmap fallback O(chunk·|θ|).
        seed: seed of the sample ordering.
        device: where the computation runs: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"``
            (CUDA when available).
        dtype: float32 or float64: the model's tensors and inputs are cast to it; bfloat16 or
            float16: mixed precision (``torch.autocast``: float32 tensors, matrix products
            and the per-sample gradients in the low precision; a vmap fallback runs in
            float32). Squares and sums are float32.
        progress: show a tqdm bar (samples/s) on stderr.

    Returns:
        ``{fraction: {name: Fisher diagonal}}`` in the order given (repeats dropped), each
        tensor float32 on the CPU with the parameter's shape.
    """
    _check_data(images, labels)
    return _empirical_fisher(
        model, (images, labels), fractions, param_names=param_names, batch_size=batch_size,
        chunk_size=chunk_size, seed=seed, device=device, dtype=dtype, num_workers=0,
        progress=progress, strategy="auto",
    )  # fmt: skip


def empirical_fisher_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    fractions: Sequence[float],
    *,
    param_names: Sequence[str] | None = None,
    batch_size: int = 64,
    chunk_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[float, dict[str, torch.Tensor]]:
    """:func:`empirical_fisher` streamed from a Dataset of ``(image [3, H, W], label)`` items.

    The same ordering and fractions: item ``i`` of the dataset plays the part of
    ``images[i]``, so for a dataset holding the same samples the result is the same. Only
    the ``n_max`` items the largest fraction needs are read, each once, chunk by chunk
    through a ``DataLoader`` (``num_workers`` worker processes; pinned memory on CUDA).

    Args:
        model, fractions, param_names, batch_size, chunk_size, seed, device, dtype, progress:
            as for :func:`empirical_fisher`.
        dataset: a map-style Dataset with ``len()``; items ``(image tensor, int label)``, e.g.
            from ``pipeline.data.open_dataset`` or a ``TensorDataset``.
        num_workers: DataLoader workers decoding images in parallel (0: in this process).

    Returns:
        ``{fraction: {name: Fisher diagonal}}``, float32 on the CPU.
    """
    _check_dataset(dataset, num_workers, "empirical_fisher")
    return _empirical_fisher(
        model, dataset, fractions, param_names=param_names, batch_size=batch_size,
        chunk_size=chunk_size, seed=seed, device=device, dtype=dtype, num_workers=num_workers,
        progress=progress, strategy="auto",
    )  # fmt: skip


def empirical_fisher_loop(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    fractions: Sequence[float],
    *,
    param_names: Sequence[str] | None = None,
    batch_size: int = 64,
    chunk_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[float, dict[str, torch.Tensor]]:
    """Reference for :func:`empirical_fisher`: one backward pass per sample in a Python loop.

    Same arguments and result (``chunk_size`` only groups samples between progress updates).
    Slow; for tests and benchmarks only.
    """
    _check_data(images, labels)
    return _empirical_fisher(
        model, (images, labels), fractions, param_names=param_names, batch_size=batch_size,
        chunk_size=chunk_size, seed=seed, device=device, dtype=dtype, num_workers=0,
        progress=progress, strategy="loop",
    )  # fmt: skip


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

    ``per_sample`` takes the vectorised per-sample path (see the module docstring); the
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
    _check_data(images, labels)
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
    _check_dataset(dataset, num_workers, "estimate_fisher")
    return _batch_estimate(
        model, dataset, fractions, estimator=estimator, param_names=param_names,
        batch_size=batch_size, chunk_size=chunk_size, seed=seed, device=device, dtype=dtype,
        num_workers=num_workers, progress=progress,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Driver: ordering, prefixes, accumulation
# --------------------------------------------------------------------------------------------


class _Unsupported(Exception):
    """The traced method met a parameter use it cannot turn into per-sample gradients."""




def _check_dataset(dataset: Any, num_workers: Any, in_memory: str) -> None:
    """The Dataset entry points' checks: a sized map-style Dataset and a worker count ≥ 0;
    ``in_memory`` names the function to call with tensors instead."""
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"dataset must be a torch.utils.data.Dataset, got {type(dataset).__name__}; "
            f"for in-memory tensors use {in_memory}(model, images, labels, ...)"
        )
    _check_length(dataset)
    if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer ≥ 0, got {num_workers!r}")

def _setup(
    model: torch.nn.Module,
    data: Any,
    fractions: Sequence[float],
    param_names: Sequence[str] | None,
    batch_size: int,
    chunk_size: int,
    device: str | torch.device,
    dtype: torch.dtype,
) -> tuple[list[float], torch.device, list[str], bool, torch.dtype, int, dict[float, int]]:
    """The checks and derived settings every estimator's driver starts from: (fractions,
    device, tensor names, mixed precision?, tensor dtype, samples N, samples used per
    fraction: prefixes of one ordering, whole batches)."""
    fractions = _check_fractions(fractions)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("chunk_size", chunk_size)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    names = _resolve_param_names(model, param_names)
    # Half precisions run as autocast over float32 tensors; others are a plain cast.
    mixed = dtype in (torch.bfloat16, torch.float16)
    n_total = len(data[0]) if isinstance(data, tuple) else len(data)
    n_used = {
        f: min(n_total, batch_size * fisher_batches(n_total, f, batch_size)) for f in fractions
    }
    return fractions, resolve_device(device), names, mixed, torch.float32 if mixed else dtype, n_total, n_used

def _empirical_fisher(
    model: torch.nn.Module,
    data: LabelledData,
    fractions: Sequence[float],
    *,
    param_names: Sequence[str] | None,
    batch_size: int,
    chunk_size: int,
    seed: int,
    device: str | torch.device,
    dtype: torch.dtype,
    num_workers: int,
    progress: bool,
    strategy: Strategy,
) -> FisherResult:
    """Shared driver of the public functions. ``data``: ``(images, labels)`` (checked) or a
    Dataset. ``strategy``: "auto" (traced, falling back to vmap), or one method forced:
    "traced" (raises ``_Unsupported`` instead), "vmap", "loop"."""
    fractions, device, names, mixed, tensor_dtype, n_total, n_used = _setup(
        model, data, fractions, param_names, batch_size, chunk_size, device, dtype
    )
    ends = sorted(set(n_used.values()))  # prefix boundaries
    order = sample_order(n_total, seed)[: ends[-1]].tolist()
    # Chunks never straddle a prefix boundary, so every fraction ends on a chunk boundary.
    chunks, start = [], 0
    for end in ends:
        chunks += [order[s : min(s + chunk_size, end)] for s in range(start, end, chunk_size)]
        start = end
    logger.info(
        "Empirical Fisher of %d tensors, %d of %d samples (fractions %s; %s, chunks of %d, %s %s)",
        len(names), ends[-1], n_total, ", ".join(f"{f:g}" for f in fractions), strategy,
        chunk_size, device, str(dtype).removeprefix("torch."),
    )  # fmt: skip

    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    precision = torch.autocast(device.type, dtype=dtype) if mixed else _no_tf32()
    with _evaluation(model), torch.enable_grad():
        params, others = _functional_tensors(model, names, device, tensor_dtype)
        accumulator = _Accumulator(model, params, others, strategy)
        bar = tqdm(total=ends[-1], desc="Fisher", unit="sample", file=sys.stderr, disable=not progress)  # fmt: skip
        done, n_classes = 0, 0
        batches = iter_batches(data, chunks, device, num_workers=num_workers)
        with bar, precision:
            for x, y in batches:
                x = x.to(tensor_dtype) if x.is_floating_point() else x
                if done == 0:
                    n_classes = _check_logits(model, params, others, x[:1])
                _check_labels(y, n_classes)
                accumulator.add(x, y, start=done)
                done += len(y)
                bar.update(len(y))
                if done in ends:
                    snapshots[done] = {n: (s / done).cpu() for n, s in accumulator.sums.items()}

    result: FisherResult = {}
    for f in fractions:
        snapshot = snapshots[n_used[f]]
        # Fractions that round to the same prefix must not share tensor objects.
        shared = any(n_used[g] == n_used[f] for g in result)
        result[f] = {n: v.clone() for n, v in snapshot.items()} if shared else snapshot
    return result


class _Accumulator:
    """Running Σ_n g_n² (float32, on the compute device) over the chunks fed to ``add``."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: dict[str, torch.Tensor],
        others: dict[str, torch.Tensor],
        strategy: Strategy,
    ) -> None:
        self.model, self.params, self.others = model, params, others
        self.strategy = strategy
        self.method = "traced" if strategy == "auto" else strategy
        self.sums = {
            n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()
        }
        # Reused per-sample weight-gradient buffer (squared in place once consumed).
        self.workspace = _Workspace()

    def add(self, x: torch.Tensor, y: torch.Tensor, start: int) -> None:
        """Add the chunk x [c, ...], y [c] (samples start .. start + c of the ordering)."""
        args = (self.model, self.params, self.others, x, y)
        if self.method == "loop":
            _loop_chunk(*args, self.sums)
        elif self.method == "vmap":
            _vmap_chunk(*args, self.sums)
        elif start == 0:
            self._first_traced(x, y)
        else:
            try:
                _traced_chunk(*args, self.sums, self.workspace)
            except _Unsupported as err:  # raised before anything was accumulated
                if self.strategy == "traced":
                    raise
                logger.warning("Tracing failed at sample %d (%s); using vmap", start, err)
                self.method = "vmap"
                _vmap_chunk(*args, self.sums)

    def _first_traced(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Traced first chunk, checked against plain single-sample backwards of its first and
        last samples before it is added; on failure vmap (or raise for strategy "traced")."""
        args = (self.model, self.params, self.others, x, y)
        keep = sorted({0, x.shape[0] - 1})
        chunk_sums = {n: torch.zeros_like(s) for n, s in self.sums.items()}
        try:
            kept = _traced_chunk(*args, chunk_sums, self.workspace, keep=keep)
            _self_check(*args, keep, kept)
        except _Unsupported as err:
            if self.strategy == "traced":
                raise
            logger.warning("Per-sample gradients by tracing not possible (%s); using vmap", err)
            self.method = "vmap"
            _vmap_chunk(*args, self.sums)
            return
        for name, s in chunk_sums.items():
            self.sums[name] += s


def _self_check(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    keep: list[int],
    kept: dict[str, torch.Tensor],
) -> None:
    """Compare traced per-sample gradients ``kept[name][j]`` of samples ``keep[j]`` with a plain
    single-sample backward; raise ``_Unsupported`` on a mismatch.

    Guards against a parameter use the tracer saw but misread (e.g. a layer whose input is not
    batch-first) or did not see at all.
    """
    low_precision = (torch.float16, torch.bfloat16)
    half = x.dtype in low_precision or any(p.dtype in low_precision for p in params.values())
    half = half or torch.is_autocast_enabled(x.device.type)
    tol = 5e-2 if half else 1e-3
    for j, i in enumerate(keep):
        reference = _single_sample_grads(model, params, others, x[i : i + 1], y[i : i + 1])
        for name, ref in reference.items():
            got = kept[name][j]
            scale = max(ref.abs().max().item(), got.abs().max().item())
            err = (got.float() - ref.float()).abs().max().item()
            if err > tol * scale:
                raise _Unsupported(
                    f"self-check failed for `{name}` on sample {i} of the first chunk: max error "
                    f"{err:.3g} vs gradient scale {scale:.3g}"
                )


# --------------------------------------------------------------------------------------------
# Mini-batch estimators: one gradient per batch
# --------------------------------------------------------------------------------------------


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
    fractions, device, names, mixed, tensor_dtype, n_total, n_used = _setup(
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
    precision = torch.autocast(device.type, dtype=dtype) if mixed else _no_tf32()
    loss_of = _expected_log_likelihood if estimator == "batch" else _loss_sum
    with _evaluation(model), torch.enable_grad():
        params, others = _functional_tensors(model, names, device, tensor_dtype)
        # float32 running state and the current batch's gradient of its summed loss
        state = {n: p.new_zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
        batch_grad = {n: torch.zeros_like(s) for n, s in state.items()}
        bar = tqdm(total=n_max, desc=f"Fisher ({estimator})", unit="sample", file=sys.stderr, disable=not progress)  # fmt: skip
        done, in_batch, k, n_classes = 0, 0, 0, 0
        with bar, precision:
            for x, y in iter_batches(data, chunks, device, num_workers=num_workers):
                x = x.to(tensor_dtype) if x.is_floating_point() else x
                if done == 0:
                    n_classes = _check_logits(model, params, others, x[:1])
                _check_labels(y, n_classes)
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

    result: FisherResult = {}
    for f in fractions:
        snapshot = snapshots[n_used[f]]
        shared = any(n_used[g] == n_used[f] for g in result)
        result[f] = {n: v.clone() for n, v in snapshot.items()} if shared else snapshot
    return result


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


# --------------------------------------------------------------------------------------------
# Per-chunk methods: each adds Σ_samples g² (float32) to ``sums``
# --------------------------------------------------------------------------------------------


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


def _loss_sum(
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


def _single_sample_grads(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Gradient of one sample's loss (x: [1, ...], y: [1]) by ordinary autograd."""
    loss = _loss_sum(model, params, others, x, y)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def _loop_chunk(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    sums: dict[str, torch.Tensor],
) -> None:
    """Reference: one forward and backward per sample."""
    for i in range(x.shape[0]):
        grads = _single_sample_grads(model, params, others, x[i : i + 1], y[i : i + 1])
        for name, g in grads.items():
            _add_squares(sums[name], g.unsqueeze(0))


def _vmap_chunk(
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


def _traced_chunk(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    sums: dict[str, torch.Tensor],
    workspace: _Workspace | None = None,
    keep: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """Traced per-sample gradients, squared and added to ``sums`` as they are produced.

    Returns the per-sample gradients of the samples ``keep`` (for the self-check):
    ``{name: [len(keep), *shape]}``, zeros for parameters the loss does not reach.
    """
    tracer = _PerSampleTracer(params, batch=x.shape[0], workspace=workspace)
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


# --------------------------------------------------------------------------------------------
# The tracer
# --------------------------------------------------------------------------------------------


class _Workspace:
    """One reusable buffer for the per-sample weight gradients of a layer ([B, out, in]), which
    are consumed before the next layer's are formed. On CPU a fresh allocation of that size
    per layer and chunk costs (page faults) about as much as the bmm that fills it."""

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialised [*shape] view of the buffer (valid until the next call)."""
        numel = math.prod(shape)
        flat = self._flat
        if flat is None or flat.dtype != dtype or flat.device != device or flat.numel() < numel:
            flat = self._flat = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)

    def owns(self, t: torch.Tensor) -> bool:
        """Whether t is a view of the buffer (then nobody else reads it)."""
        flat = self._flat
        return flat is not None and t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


@dataclasses.dataclass
class _Use:
    """A parameter as it enters an operation: the parameter's name, the tensor the operation
    saw (the parameter or a view-like alias of it) and the chain alias = chain(parameter)."""

    name: str
    tensor: torch.Tensor
    chain: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()
    root: torch.Tensor | None = None  # the parameter itself, for aliases


@dataclasses.dataclass
class _Record:
    """One recorded operation ``out = op(activation, parameter uses)``.

    ``contributions(grad_out)`` yields ``(use, per-sample gradient w.r.t. use.tensor [B, ...])``.
    ``saved`` are the tensors whose values the contributions read, with their versions then.
    """

    out: torch.Tensor
    contributions: Callable[[torch.Tensor], Iterator[tuple[_Use, torch.Tensor]]]
    saved: tuple[torch.Tensor, ...]
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.versions = tuple(t._version for t in (self.out, *self.saved))


_LINEAR = {F.linear, torch._C._nn.linear}
_CONV2D = {F.conv2d, torch.conv2d}
_LAYER_NORM = {F.layer_norm, torch.layer_norm}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_SUB = {torch.sub, torch.Tensor.sub, torch.Tensor.__sub__}
_MUL = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_EXPAND = {torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to}
_MHA = {F.multi_head_attention_forward}
# Operations that may take a tensor besides the parameter only for its dtype/device.
_CAST = {torch.Tensor.to, torch.Tensor.type_as}

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class _PerSampleTracer(TorchFunctionMode):
    """Records every use of a tracked parameter during a batched forward (batch dim 0, size
    ``batch``) so that per-sample gradients can be formed from layer inputs and output
    gradients. Any use it does not understand raises ``_Unsupported``.

    Torch-function modes are switched off while their handler runs, so composite functions it
    handles (``multi_head_attention_forward``, ``layer_norm``) are evaluated here and their
    internals are not seen; composite functions it does not handle are rejected when they take
    a tracked tensor.
    """

    def __init__(
        self, params: dict[str, torch.Tensor], batch: int, workspace: _Workspace | None = None
    ) -> None:
        super().__init__()
        self.batch = batch
        self.workspace = workspace
        self.records: list[_Record] = []
        self.uses: dict[str, int] = dict.fromkeys(params, 0)
        # id -> _Use; the _Use keeps the tensor alive so that ids are not reused.
        self.tracked: dict[int, _Use] = {id(p): _Use(n, p) for n, p in params.items()}

    # ---- dispatch ------------------------------------------------------------------------

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        uses = self._uses_in(args, kwargs)
        if not uses:
            return func(*args, **kwargs)
        if func in _LINEAR:
            return self._linear(*args, **kwargs)
        if func in _CONV2D:
            return self._conv2d(*args, **kwargs)
        if func in _LAYER_NORM:
            return self._layer_norm(*args, **kwargs)
        if func in _MHA:
            return self._multi_head_attention(*args, **kwargs)
        if func in _MATMUL and len(args) == 2 and not kwargs:
            return self._matmul(*args)
        if func in _ADD or func in _SUB or func in _MUL:
            handled = self._elementwise(func, args, kwargs)
            if handled is not None:
                return handled
        if func in _EXPAND:
            handled = self._expand_to_batch(func, args, kwargs)
            if handled is not None:
                return handled
        return self._alias_or_reject(func, args, kwargs, uses)

    def _use(self, t: Any) -> _Use | None:
        return self.tracked.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _uses_in(self, args: tuple, kwargs: dict) -> list[_Use]:
        found = []
        for a in (*args, *kwargs.values()):
            if isinstance(a, (list, tuple)):
                found += [u for b in a if (u := self._use(b)) is not None]
            elif (u := self._use(a)) is not None:
                found.append(u)
        return found

    def _record(self, rec: _Record, *uses: _Use | None) -> None:
        self.records.append(rec)
        for u in uses:
            if u is not None:
                self.uses[u.name] += 1

    def _batched(self, x: Any, what: str) -> torch.Tensor:
        """x must be an activation with the batch in dim 0 (and at least one more dim)."""
        if not (isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == self.batch):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise _Unsupported(f"{what}: input {shape} is not batch-first with batch {self.batch}")
        if self._use(x) is not None:
            raise _Unsupported(f"{what}: two parameters combined directly")
        return x

    # ---- handled operations --------------------------------------------------------------

    def _linear(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``F.linear``, x [B, ..., in] -> [B, ..., out].

        Per sample: weight Σ_tokens g ⊗ x, bias Σ_tokens g (g the output gradient)."""
        out = F.linear(input, weight, bias)
        w_use, b_use = self._use(weight), self._use(bias)
        if w_use is None and b_use is None:
            return out
        x = self._batched(input, "linear")
        B = self.batch

        def contributions(g: torch.Tensor) -> Iterator[tuple[_Use, torch.Tensor]]:
            g3 = g.reshape(B, -1, g.shape[-1])  # [B, T, out]
            if w_use is not None:
                x3 = x.reshape(B, -1, x.shape[-1])  # [B, T, in]
                yield w_use, self._bmm(g3.transpose(1, 2), x3)  # [B, out, in]
            if b_use is not None:
                yield b_use, g3.sum(1)  # [B, out]

        self._record(_Record(out, contributions, (x,)), w_use, b_use)
        return out

    def _conv2d(
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
    ) -> torch.Tensor:
        out = torch.conv2d(input, weight, bias, stride, padding, dilation, groups)
        w_use, b_use = self._use(weight), self._use(bias)
        if w_use is None and b_use is None:
            return out
        if groups != 1 or isinstance(padding, str) and padding != "valid":
            raise _Unsupported(f"conv2d with groups={groups}, padding={padding!r}")
        padding = 0 if padding == "valid" else padding
        x = self._batched(input, "conv2d")
        if x.dim() != 4:
            raise _Unsupported(f"conv2d on an input of shape {tuple(x.shape)}")
        B, kernel = self.batch, weight.shape[2:]

        def contributions(g: torch.Tensor) -> Iterator[tuple[_Use, torch.Tensor]]:
            g3 = g.reshape(B, g.shape[1], -1)  # [B, C_out, L]
            if w_use is not None:
                # [B, L, C_in·kh·kw]: the patches each output position saw
                patches = _patches(x, kernel, stride, padding, dilation)
                yield w_use, self._bmm(g3, patches).view(B, *weight.shape)
            if b_use is not None:
                yield b_use, g3.sum(2)  # [B, C_out]

        self._record(_Record(out, contributions, (x,)), w_use, b_use)
        return out

    def _layer_norm(
        self,
        input: torch.Tensor,
        normalized_shape: Sequence[int],
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        eps: float = 1e-5,
        *rest: Any,
    ) -> torch.Tensor:
        w_use, b_use = self._use(weight), self._use(bias)
        if w_use is None and b_use is None:
            return F.layer_norm(input, normalized_shape, weight, bias, eps)
        x = self._batched(input, "layer_norm")
        B, shape = self.batch, tuple(normalized_shape)
        # native_layer_norm also returns the per-row mean and 1/std, so the normalised input
        # x̂ = (x - mean)·rstd costs one fused pass instead of a second variance computation.
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)

        def contributions(g: torch.Tensor) -> Iterator[tuple[_Use, torch.Tensor]]:
            g3 = g.reshape(B, -1, *shape)  # [B, T, *shape]
            if w_use is not None:
                x_hat = ((x.float() - mean.float()) * rstd.float()).reshape(B, -1, *shape)
                yield w_use, (g3.float() * x_hat).sum(1)  # [B, *shape]
            if b_use is not None:
                yield b_use, g3.sum(1)

        self._record(_Record(out, contributions, (x,)), w_use, b_use)
        return out

    def _matmul(self, input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``x @ P`` with P a tracked [in, out] matrix and x [B, ..., in]."""
        out = torch.matmul(input, other)
        w_use = self._use(other)
        if w_use is None or other.dim() != 2:
            raise _Unsupported("matmul with a parameter on the left or not a matrix")
        x = self._batched(input, "matmul")
        B = self.batch

        def contributions(g: torch.Tensor) -> Iterator[tuple[_Use, torch.Tensor]]:
            g3 = g.reshape(B, -1, g.shape[-1])  # [B, T, out]
            x3 = x.reshape(B, -1, x.shape[-1])  # [B, T, in]
            yield w_use, self._bmm(x3.transpose(1, 2), g3)  # [B, in, out]

        self._record(_Record(out, contributions, (x,)), w_use)
        return out

    def _elementwise(self, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """``x ± P`` or ``x * P`` with P (tracked) broadcast over the batch of activation x."""
        if len(args) != 2 or kwargs:
            return None
        first, second = args
        u1, u2 = self._use(first), self._use(second)
        if (u1 is None) == (u2 is None):
            return None
        use, param, act = (u1, first, second) if u1 is not None else (u2, second, first)
        if not isinstance(act, torch.Tensor):
            return None  # P + scalar: a view-like alias
        out = func(*args)
        x = self._batched(act, "elementwise")
        target = _broadcast_target(param, out, self.batch)
        if x.dim() != out.dim() or target is None:
            shapes = f"{tuple(x.shape)} and {tuple(param.shape)}"
            raise _Unsupported(f"{func.__name__} of shapes {shapes}")
        sign = -1.0 if func in _SUB and use is u2 else 1.0
        is_mul = func in _MUL

        def contributions(g: torch.Tensor) -> Iterator[tuple[_Use, torch.Tensor]]:
            g = g * x if is_mul else g
            yield use, sign * _reduce_to(g, target, param.shape)

        self._record(_Record(out, contributions, (x,) if is_mul else ()), use)
        return out

    def _expand_to_batch(self, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """P.expand(B, ...): the same values broadcast to every sample (e.g. a class token)."""
        use = self._use(args[0]) if args else None
        if use is None or len(self._uses_in(args, kwargs)) != 1:
            return None
        param = args[0]
        out = func(*args, **kwargs)
        target = _broadcast_target(param, out, self.batch)
        if target is None or out.dim() < 2:
            return None  # an expansion that does not create the batch dim: a view-like alias

        def contributions(g: torch.Tensor) -> Iterator[tuple[_Use, torch.Tensor]]:
            yield use, _reduce_to(g, target, param.shape)

        self._record(_Record(out, contributions, ()), use)
        return out

    def _multi_head_attention(
        self, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.multi_head_attention_forward`` for packed self-attention, recomputed as
        in-projection -> SDPA -> out-projection with batch-first tensors, so that both
        projections go through ``_linear``. Inputs and output are (L, N, E) as in torch."""
        a = _MHA_SIGNATURE.bind(*args, **kwargs)
        a.apply_defaults()
        p = a.arguments
        query, key, value = p["query"], p["key"], p["value"]
        unsupported = {
            "cross-attention": not (query is key and key is value),
            "unbatched input": query.dim() != 3,
            "separate q/k/v weights": p["use_separate_proj_weight"],
            "bias_k/bias_v": p["bias_k"] is not None or p["bias_v"] is not None,
            "add_zero_attn": p["add_zero_attn"],
            "attention dropout": p["training"] and p["dropout_p"] > 0,
            "key_padding_mask": p["key_padding_mask"] is not None,
            "static_k/static_v": p["static_k"] is not None or p["static_v"] is not None,
            "is_causal": p["is_causal"],
        }
        if reasons := [k for k, v in unsupported.items() if v]:
            raise _Unsupported(f"multi_head_attention_forward with {', '.join(reasons)}")
        L, N, E = query.shape
        H = p["num_heads"]
        hd = E // H
        x = query.transpose(0, 1)  # (N, L, E)
        qkv = self._linear(x, p["in_proj_weight"], p["in_proj_bias"])  # (N, L, 3E)
        q, k, v = qkv.view(N, L, 3, H, hd).permute(2, 0, 3, 1, 4)  # each (N, H, L, hd)
        mask = p["attn_mask"]
        if mask is not None:
            if mask.dtype == torch.bool:  # True = not allowed, as in nn.MultiheadAttention
                mask = q.new_zeros(mask.shape).masked_fill(mask, float("-inf"))
            if mask.dim() == 3:  # (N·H, L, L)
                mask = mask.view(N, H, L, L)
            mask = mask.to(q.dtype)
        weights = None
        if p["need_weights"]:
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (N, H, L, L)
            attn = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            o = attn @ v  # (N, H, L, hd)
            weights = attn.mean(1) if p["average_attn_weights"] else attn
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, H, L, hd)
        o = o.transpose(1, 2).reshape(N, L, E)
        out = self._linear(o, p["out_proj_weight"], p["out_proj_bias"])  # (N, L, E)
        return out.transpose(0, 1), weights

    def _alias_or_reject(self, func: Callable, args: tuple, kwargs: dict, uses: list[_Use]) -> Any:
        """A view-like or elementwise function of one parameter alone (``P.view(1, 1, -1)``,
        ``P.to(dtype)``, ``P.T``, ``2 * P``): its result is tracked as an alias with the chain
        extended. Everything else that yields a gradient-carrying tensor is rejected."""
        out = func(*args, **kwargs)
        results = out if isinstance(out, (tuple, list)) else (out,)
        if not any(isinstance(r, torch.Tensor) and r.requires_grad for r in results):
            return out  # shape/dtype queries, detach(), comparisons: no gradient flows
        others = [
            t for t in (*args, *kwargs.values())
            if isinstance(t, torch.Tensor) and self._use(t) is None
        ]  # fmt: skip
        position = _top_level_position(args, kwargs, uses[0].tensor)
        if len(uses) != 1 or position is None or (others and func not in _CAST):
            name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
            raise _Unsupported(f"`{uses[0].name}` used in {name}")
        use = uses[0]
        for index, r in enumerate(results):
            if isinstance(r, torch.Tensor) and r.requires_grad and id(r) not in self.tracked:
                step = _alias_step(func, args, kwargs, position, index if r is not out else None)
                root = use.root if use.chain else use.tensor
                self.tracked[id(r)] = _Use(use.name, r, (*use.chain, step), root)
        return out

    # ---- backward side -------------------------------------------------------------------

    def _bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a [B, n, k] @ b [B, k, m] -> [B, n, m], into the workspace when there is one.
        (Saved layer inputs are graph activations: detached, as no gradient flows from here.)"""
        a, b = a.detach(), b.detach()
        device_type = a.device.type
        if torch.is_autocast_enabled(device_type):  # mixed precision: the product in low precision
            low = torch.get_autocast_dtype(device_type)
            a, b = a.to(low), b.to(low)
        elif a.dtype != b.dtype:
            raise _Unsupported(f"layer input {b.dtype} and output gradient {a.dtype} differ")
        if self.workspace is None:
            return torch.bmm(a, b)
        out = self.workspace.empty((a.shape[0], a.shape[1], b.shape[2]), a.dtype, a.device)
        return torch.bmm(a, b, out=out)

    def per_sample_grads(
        self, grads_out: list[torch.Tensor | None]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Iterate ``(name, per-sample gradient [B, *param shape])`` over every recorded use,
        given the gradients of the recorded outputs (in ``self.records`` order).

        A yielded tensor may be a view of the workspace: use it (or copy it) before advancing.
        """
        # All checks before the first yield, so that a caller never accumulates part of a chunk.
        for rec in self.records:
            if tuple(t._version for t in (rec.out, *rec.saved)) != rec.versions:
                raise _Unsupported("a recorded layer input or output was modified in place")
        return self._per_sample_grads(grads_out)

    def _per_sample_grads(
        self, grads_out: list[torch.Tensor | None]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for rec, g in zip(self.records, grads_out):
            if g is None:
                continue  # the output does not reach the loss
            for use, grad in rec.contributions(g):
                yield use.name, _through_chain(use, grad)


def _patches(
    x: torch.Tensor, kernel: Sequence[int], stride: Any, padding: Any, dilation: Any
) -> torch.Tensor:
    """The input patches of a conv2d, x [B, C, H, W] -> [B, L, C·kh·kw] (L output positions,
    row-major; each patch ordered like the weight's [C, kh, kw]).

    Non-overlapping patches (a ViT's patch embedding: stride = kernel, no padding or dilation)
    are a reshape of x; anything else goes through ``unfold`` (im2col), which is slow for such
    large kernels on CUDA."""
    kh, kw = kernel
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    B, C, H, W = x.shape
    if pair(stride) == (kh, kw) and pair(padding) == (0, 0) and pair(dilation) == (1, 1):
        x = x[:, :, : H - H % kh, : W - W % kw]  # conv2d drops the incomplete last row/column
        x = x.reshape(B, C, H // kh, kh, W // kw, kw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // kh) * (W // kw), C * kh * kw)
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)


def _broadcast_target(param: torch.Tensor, out: torch.Tensor, batch: int) -> tuple[int, ...] | None:
    """``param``'s shape left-padded with ones to ``out.dim()``, if it broadcasts to ``out``
    without a batch dim of its own (out: [batch, ...]); else None."""
    if out.dim() < param.dim() or out.shape[0] != batch:
        return None
    target = (1,) * (out.dim() - param.dim()) + tuple(param.shape)
    if target[0] != 1 or any(t not in (1, o) for t, o in zip(target, out.shape)):
        return None
    return target


def _reduce_to(g: torch.Tensor, target: tuple[int, ...], shape: torch.Size) -> torch.Tensor:
    """Per-sample sum of g [B, ...] over the dims that ``target`` broadcasts -> [B, *shape]."""
    dims = [i for i in range(1, g.dim()) if target[i] == 1 and g.shape[i] != 1]
    g = g.sum(dims, keepdim=True) if dims else g
    return g.reshape(g.shape[0], *shape)


def _top_level_position(args: tuple, kwargs: dict, t: torch.Tensor) -> int | str | None:
    for i, a in enumerate(args):
        if a is t:
            return i
    for k, a in kwargs.items():
        if a is t:
            return k
    return None


def _alias_step(
    func: Callable, args: tuple, kwargs: dict, position: int | str, index: int | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t -> func(args with t at position)[index]``: one link of an alias chain."""

    def step(t: torch.Tensor) -> torch.Tensor:
        if isinstance(position, int):
            out = func(*args[:position], t, *args[position + 1 :], **kwargs)
        else:
            out = func(*args, **{**kwargs, position: t})
        return out if index is None else out[index]

    return step


def _through_chain(use: _Use, grad: torch.Tensor) -> torch.Tensor:
    """Map per-sample gradients w.r.t. an alias [B, *alias shape] to the parameter [B, *shape]
    by the vector-Jacobian product of the alias chain (vmapped over samples)."""
    if not use.chain:
        return grad

    def chain(p: torch.Tensor) -> torch.Tensor:
        for step in use.chain:
            p = step(p)
        return p

    _, vjp = torch.func.vjp(chain, use.root.detach())
    return torch.func.vmap(vjp)(grad)[0]


# --------------------------------------------------------------------------------------------
# Inputs, validation, model state
# --------------------------------------------------------------------------------------------


def _check_positive_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _check_fraction(fraction: Any) -> None:
    is_number = isinstance(fraction, numbers.Real) and not isinstance(fraction, bool)
    if not is_number or not 0 < fraction <= 1:
        raise ValueError(f"data fraction must be a number in (0, 1], got {fraction!r}")


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    if isinstance(fractions, numbers.Real):
        raise ValueError(
            f"fractions must be a sequence of numbers in (0, 1], got the number {fractions!r}"
        )
    fractions = list(fractions)
    if not fractions:
        raise ValueError("fractions is empty: give at least one data fraction in (0, 1]")
    for f in fractions:
        _check_fraction(f)
    return [float(f) for f in dict.fromkeys(fractions)]


def _check_data(images: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() < 1 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"images is empty (shape {shape}): the task needs at least one training sample"
        )
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D tensor [N], got shape {shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but images has {images.shape[0]} samples; "
            "they must be the same split in the same order"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices (int64), got dtype {labels.dtype}")
    if labels.min().item() < 0:
        raise ValueError(f"labels must be class indices ≥ 0, got {labels.min().item()}")


def _check_length(dataset: Dataset) -> int:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(
            f"dataset {type(dataset).__name__} has no len(): a map-style Dataset is needed"
        ) from err
    if n == 0:
        raise ValueError("dataset is empty: the task needs at least one training sample")
    return n


def _check_logits(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
) -> int:
    """One sample x [1, ...] through the model: logits must be [1, C]; returns C."""
    with torch.no_grad():
        logits = functional_call(model, {**others, **params}, (x,))
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"model must map images [B, ...] to logits [B, C]; for B = 1 it returned {shape}"
        )
    return int(logits.shape[1])


def _check_labels(labels: torch.Tensor, n_classes: int) -> None:
    """A chunk's labels [c] must be class indices in [0, C)."""
    low, high = labels.min().item(), labels.max().item()
    if low < 0:
        raise ValueError(f"labels must be class indices ≥ 0, got {low}")
    if high >= n_classes:
        raise ValueError(f"label {high} is out of range for the head's {n_classes} classes")


def _resolve_param_names(model: torch.nn.Module, param_names: Sequence[str] | None) -> list[str]:
    available = dict(model.named_parameters())
    if param_names is None:
        names = [n for n, p in available.items() if p.requires_grad]
        if not names:
            raise ValueError(
                "the model has no parameter with requires_grad; pass param_names explicitly"
            )
        return names
    if isinstance(param_names, str):
        raise ValueError(f"param_names must be a sequence of names, got the string {param_names!r}")
    names = list(param_names)
    if not names:
        raise ValueError("param_names is empty: name at least one encoder parameter")
    buffers = dict(model.named_buffers())
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"parameter `{name}` is listed twice in param_names")
        seen.add(name)
        if name in available:
            continue
        if name in buffers:
            raise ValueError(
                f"`{name}` is a buffer, not a parameter: buffers (e.g. the frozen head) are not "
                "differentiated; leave it out of param_names"
            )
        close = difflib.get_close_matches(name, list(available), n=3)
        hint = f"; did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
        raise ValueError(
            f"unknown parameter `{name}` in param_names: the model has no such parameter{hint}"
        )
    return names


def _functional_tensors(
    model: torch.nn.Module, names: list[str], device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Copies of the model's tensors for ``functional_call``, cast to device/dtype (floating
    ones only): the differentiated parameters as fresh leaves requiring grad, and every other
    parameter and buffer detached."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(device=device)
        return t.to(dtype) if t.is_floating_point() else t

    wanted = set(names)
    found = {n: p for n, p in model.named_parameters() if n in wanted}
    params = {n: cast(found[n]).clone().requires_grad_(True) for n in names}
    others = {n: cast(p) for n, p in model.named_parameters() if n not in wanted}
    others.update({n: cast(b) for n, b in model.named_buffers()})
    return params, others


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """float32 means float32 on CUDA too: cuDNN convolutions (TF32 by default) and matrix
    products (TF32 if the caller allowed it) in full precision, both settings restored."""
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
            deterministic=torch.backends.cudnn.deterministic, allow_tf32=False,
        ):  # fmt: skip
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)


@contextlib.contextmanager
def _evaluation(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and nn.MultiheadAttention's fused fast path off, both restored.

    The fast path (``torch._native_multi_head_attention``, taken in eval mode when no attention
    input requires grad, e.g. when only later layers are differentiated) has no vmap batching
    rule, so functorch would run it sample by sample; the traced method also needs the
    unfused ``multi_head_attention_forward`` call to see the projections.
    """
    flags = {m: m.training for m in model.modules()}
    fast_path = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for m, training in flags.items():
            m.training = training
