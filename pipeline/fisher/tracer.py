"""A generic per-sample-gradient tracer: a torch-function mode that records, during one
batched forward, every use of a tracked parameter it understands, so that after one backward
the per-sample gradient of each parameter is formed from the layer inputs and the output
gradients. Nothing here is specific to the Fisher: it knows operations, not losses."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class Unsupported(Exception):
    """The traced method met a parameter use it cannot turn into per-sample gradients."""


class Workspace:
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
        return (
            flat is not None and t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        )


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


class PerSampleTracer(TorchFunctionMode):
    """Records every use of a tracked parameter during a batched forward (batch dim 0, size
    ``batch``) so that per-sample gradients can be formed from layer inputs and output
    gradients. Any use it does not understand raises ``Unsupported``.

    Torch-function modes are switched off while their handler runs, so composite functions it
    handles (``multi_head_attention_forward``, ``layer_norm``) are evaluated here and their
    internals are not seen; composite functions it does not handle are rejected when they take
    a tracked tensor.
    """

    def __init__(
        self, params: dict[str, torch.Tensor], batch: int, workspace: Workspace | None = None
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
            raise Unsupported(f"{what}: input {shape} is not batch-first with batch {self.batch}")
        if self._use(x) is not None:
            raise Unsupported(f"{what}: two parameters combined directly")
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
            raise Unsupported(f"conv2d with groups={groups}, padding={padding!r}")
        padding = 0 if padding == "valid" else padding
        x = self._batched(input, "conv2d")
        if x.dim() != 4:
            raise Unsupported(f"conv2d on an input of shape {tuple(x.shape)}")
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
            raise Unsupported("matmul with a parameter on the left or not a matrix")
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
            raise Unsupported(f"{func.__name__} of shapes {shapes}")
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
            raise Unsupported(f"multi_head_attention_forward with {', '.join(reasons)}")
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
            raise Unsupported(f"`{uses[0].name}` used in {name}")
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
            raise Unsupported(f"layer input {b.dtype} and output gradient {a.dtype} differ")
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
                raise Unsupported("a recorded layer input or output was modified in place")
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
