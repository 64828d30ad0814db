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

Modules, by concern:

- `data`: the sample ordering, batches per fraction, chunked delivery, input checks.
- `model`: parameters to differentiate, functional copies, eval mode and precision.
- `empirical`: the empirical Fisher's entry points and driver, with the self-check.
- `estimators`: ``estimate_fisher`` and the mini-batch estimators.
- `gradients`: per-sample gradients of one chunk by loop, vmap or tracing, squared and summed.
- `tracer`: the generic per-sample-gradient tracer (a torch-function mode).
"""

from __future__ import annotations

from pipeline.fisher.data import LabelledData, fisher_batches, iter_batches, sample_order
from pipeline.fisher.empirical import (
    empirical_fisher,
    empirical_fisher_dataset,
    empirical_fisher_loop,
)
from pipeline.fisher.estimators import (
    ADAM_BETA1,
    ESTIMATORS,
    estimate_fisher,
    estimate_fisher_dataset,
)

__all__ = [
    "ADAM_BETA1",
    "ESTIMATORS",
    "LabelledData",
    "empirical_fisher",
    "empirical_fisher_dataset",
    "empirical_fisher_loop",
    "estimate_fisher",
    "estimate_fisher_dataset",
    "fisher_batches",
    "iter_batches",
    "sample_order",
]
