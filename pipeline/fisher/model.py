"""The model side of a Fisher computation: which parameters are differentiated, functional
copies of the model's tensors on the compute device, eval mode, full float32 precision, and
the settings every estimator's driver starts from."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.func import functional_call

from pipeline.devices import resolve_device
from pipeline.fisher.data import check_fractions, check_positive_int, fisher_batches


def setup(
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
    fractions = check_fractions(fractions)
    check_positive_int("batch_size", batch_size)
    check_positive_int("chunk_size", chunk_size)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    names = _resolve_param_names(model, param_names)
    # Half precisions run as autocast over float32 tensors; others are a plain cast.
    mixed = dtype in (torch.bfloat16, torch.float16)
    n_total = len(data[0]) if isinstance(data, tuple) else len(data)
    n_used = {
        f: min(n_total, batch_size * fisher_batches(n_total, f, batch_size)) for f in fractions
    }
    return (
        fractions,
        resolve_device(device),
        names,
        mixed,
        torch.float32 if mixed else dtype,
        n_total,
        n_used,
    )


def check_logits(
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


def functional_tensors(
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
def no_tf32() -> Iterator[None]:
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
def evaluation(model: torch.nn.Module) -> Iterator[None]:
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
