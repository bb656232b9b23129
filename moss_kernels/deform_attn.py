"""The deformable-attention ops: ``ms_deform_attn`` (Deformable-DETR) and ``mmfs_attn`` (MM-Interleaved).

Four ``torch.library`` custom ops in the ``moss`` namespace carry every call to a backend:
``moss::ms_deform_attn`` (autograd registered, backward ``moss::ms_deform_attn_backward``) and
``moss::mmfs_attn`` (returns the output and the log-sum-exp it saves; backward
``moss::mmfs_attn_backward``). The backends compute the functions of ``deform_reference.py`` (the
contract: shapes, dtypes, semantics). This module is the one place that checks user input and
resolves the backend (``backends.resolve_deform``).

Semantics (MMFS.md §a, §c): bilinear sampling with zero padding and ``align_corners=False``,
locations ``(x, y)`` in [0, 1], ``spatial_shapes`` rows ``(H_l, W_l)``. Non-finite locations (NaN,
+-Inf) are out of bounds: they contribute 0 and get gradient 0. Locations, weights, offsets and
logits may have another float dtype than ``value``; they are never down-cast, arithmetic runs in
float32 (float64 when an input is float64), the output has ``value``'s dtype and every gradient
its input's dtype. ``grad_value`` is bitwise reproducible on every backend (no float atomics).
Double backward is not supported (raises).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from . import backends
from .deform_reference import compute_dtype

__all__ = ["mmfs_attn", "ms_deform_attn"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
Shapes = Union[Tensor, Sequence[Sequence[int]]]


# ============================================================================ ops
@torch.library.custom_op("moss::ms_deform_attn", mutates_args=())
def _ms_deform(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
               attention_weights: Tensor, backend: str) -> Tensor:
    return backends.get_backend(backend).deform_forward(value, spatial_shapes, level_start_index,
                                                        sampling_locations, attention_weights)


@_ms_deform.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    N, _, H, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], H * D)


@torch.library.custom_op("moss::ms_deform_attn_backward", mutates_args=())
def _ms_deform_backward(grad: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                        sampling_locations: Tensor, attention_weights: Tensor,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(backends.get_backend(backend).deform_backward(grad, value, spatial_shapes, level_start_index,
                                                               sampling_locations, attention_weights))


@_ms_deform_backward.register_fake
def _(grad, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _ms_setup(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.backend = backend


def _ms_backward(ctx, grad):
    gv, gl, ga = _ms_deform_backward(grad.contiguous(), *ctx.saved_tensors, ctx.backend)
    needs = ctx.needs_input_grad
    return gv if needs[0] else None, None, None, gl if needs[3] else None, ga if needs[4] else None, None


_ms_deform.register_autograd(_ms_backward, setup_context=_ms_setup)


@torch.library.custom_op("moss::mmfs_attn", mutates_args=())
def _mmfs(value: Tensor, spatial_shapes: Tensor, reference_points: Tensor, sampling_offsets: Tensor,
          attention_logits: Tensor, visible: Tensor, offset_scale: Tensor, sink: float,
          backend: str) -> tuple[Tensor, Tensor]:
    out, lse = backends.get_backend(backend).mmfs_forward(value, spatial_shapes, reference_points, sampling_offsets,
                                                          attention_logits, visible, offset_scale, sink)
    return out, lse


@_mmfs.register_fake
def _(value, spatial_shapes, reference_points, sampling_offsets, attention_logits, visible, offset_scale, sink,
      backend):
    N, _, _, H, D = value.shape
    Lq = attention_logits.shape[1]
    cdt = compute_dtype(value, reference_points, sampling_offsets, attention_logits, offset_scale)
    return value.new_empty(N, Lq, H * D), value.new_empty(N, Lq, H, dtype=cdt)


@torch.library.custom_op("moss::mmfs_attn_backward", mutates_args=())
def _mmfs_backward(grad: Tensor, value: Tensor, spatial_shapes: Tensor, reference_points: Tensor,
                   sampling_offsets: Tensor, attention_logits: Tensor, visible: Tensor, offset_scale: Tensor,
                   sink: float, lse: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(backends.get_backend(backend).mmfs_backward(grad, value, spatial_shapes, reference_points,
                                                             sampling_offsets, attention_logits, visible,
                                                             offset_scale, sink, lse))


@_mmfs_backward.register_fake
def _(grad, value, spatial_shapes, reference_points, sampling_offsets, attention_logits, visible, offset_scale,
      sink, lse, backend):
    return (torch.empty_like(value), torch.empty_like(reference_points), torch.empty_like(sampling_offsets),
            torch.empty_like(attention_logits))


def _mmfs_setup(ctx, inputs, output):
    value, spatial_shapes, ref, offsets, logits, visible, offset_scale, sink, backend = inputs
    ctx.save_for_backward(value, spatial_shapes, ref, offsets, logits, visible, offset_scale, output[1])
    ctx.sink, ctx.backend = sink, backend
    ctx.mark_non_differentiable(output[1])


def _mmfs_backward_fn(ctx, grad, _grad_lse):
    value, spatial_shapes, ref, offsets, logits, visible, offset_scale, lse = ctx.saved_tensors
    gv, gr, go, gz = _mmfs_backward(grad.contiguous(), value, spatial_shapes, ref, offsets, logits, visible,
                                    offset_scale, ctx.sink, lse, ctx.backend)
    needs = ctx.needs_input_grad
    return (gv if needs[0] else None, None, gr if needs[2] else None, go if needs[3] else None,
            gz if needs[4] else None, None, None, None, None)


_mmfs.register_autograd(_mmfs_backward_fn, setup_context=_mmfs_setup)


# ============================================================================ checks
def _check_float(name: str, t, dims: int, device: Optional[torch.device] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but value is on {device}")


def _check_shape(name: str, t: Tensor, want: tuple) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{name} must have shape {tuple(want)}, got {tuple(t.shape)}")


def _values_known(t: Tensor) -> bool:
    """Whether a tensor's values can be read here: on the CPU and outside a ``torch.compile`` trace."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _spatial_shapes(spatial_shapes: Shapes, device: torch.device) -> tuple[Tensor, Optional[list]]:
    """``(tensor (L, 2) int64 on device, [(H_l, W_l)] or None where the values are not at hand)``."""
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"spatial_shapes must be an int64 tensor, got {spatial_shapes.dtype}")
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] < 1:
            raise ValueError(f"spatial_shapes must have shape (L, 2) with L >= 1, rows (H_l, W_l), got "
                             f"{tuple(spatial_shapes.shape)}")
        rows = [tuple(r) for r in spatial_shapes.tolist()] if _values_known(spatial_shapes) else None
        tensor = spatial_shapes.to(device=device, dtype=torch.int64)
    else:
        try:
            rows = [tuple(int(v) for v in r) for r in spatial_shapes]
        except (TypeError, ValueError):
            raise TypeError(f"spatial_shapes must be an int64 tensor (L, 2) or a sequence of (H_l, W_l) pairs, "
                            f"got {spatial_shapes!r}") from None
        if not rows or any(len(r) != 2 for r in rows):
            raise ValueError(f"spatial_shapes must hold L >= 1 pairs (H_l, W_l), got {spatial_shapes!r}")
        tensor = torch.tensor(rows, dtype=torch.int64, device=device)
    if rows is not None and any(h < 1 or w < 1 for h, w in rows):
        raise ValueError(f"spatial_shapes rows (H_l, W_l) must be >= 1, got {rows}")
    if rows is None and not torch.compiler.is_compiling():
        torch._assert_async((tensor >= 1).all(), "spatial_shapes: every H_l, W_l must be >= 1")
    return tensor, rows


def _check_sum(shapes: Tensor, rows: Optional[list], size: int, what: str) -> None:
    if rows is not None:
        total = sum(h * w for h, w in rows)
        if total != size:
            raise ValueError(f"spatial_shapes {rows} sum to {total} positions, but {what} is {size}")
    elif not torch.compiler.is_compiling():
        torch._assert_async(shapes.prod(-1).sum() == size, f"spatial_shapes do not sum to {what} = {size}")


def _level_start_index(level_start_index, shapes: Tensor, rows: Optional[list]) -> Tensor:
    """The exclusive cumulative sum of ``H_l * W_l``, checked against the one given (always: it is
    ``L`` numbers; on a GPU without a host synchronisation)."""
    L = shapes.shape[0]
    starts = torch.cumsum(shapes.prod(-1), 0) - shapes.prod(-1)
    if level_start_index is None:
        return starts
    if isinstance(level_start_index, Tensor):
        if level_start_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"level_start_index must be an int64 tensor, got {level_start_index.dtype}")
        given = level_start_index
    else:
        try:
            given = torch.tensor([int(v) for v in level_start_index], dtype=torch.int64)
        except (TypeError, ValueError):
            raise TypeError(f"level_start_index must be an int64 tensor (L,) or a sequence of ints, got "
                            f"{level_start_index!r}") from None
    if tuple(given.shape) != (L,):
        raise ValueError(f"level_start_index must have shape ({L},), got {tuple(given.shape)}")
    if rows is not None and _values_known(given):
        want, got = [0], [int(v) for v in given.tolist()]
        for h, w in rows[:-1]:
            want.append(want[-1] + h * w)
        if got != want:
            raise ValueError(f"level_start_index must be the exclusive cumulative sum of H_l * W_l, {want}; got {got}")
    elif not torch.compiler.is_compiling():
        torch._assert_async((given.to(starts.device, torch.int64) == starts).all(),
                            "level_start_index is not the exclusive cumulative sum of H_l * W_l")
    return starts


def _case_dtype(value: Tensor, *others: Tensor) -> torch.dtype:
    return torch.float64 if compute_dtype(value, *others) == torch.float64 else value.dtype


def _backend(backend: Optional[str], value: Tensor, *others: Tensor) -> str:
    return backends.resolve_deform(backend, value.device, _case_dtype(value, *others))


# ============================================================================ public API
def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Shapes,
    level_start_index: Optional[Union[Tensor, Sequence[int]]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Multi-scale deformable attention (Deformable-DETR semantics; MMFS.md §a.2, §c.1).

    Args:
        value: ``(N, S, H, D)`` float32/float16/bfloat16/float64, levels concatenated row-major.
        spatial_shapes: ``(L, 2)`` int64 tensor (any device) or a sequence of ``(H_l, W_l)`` pairs
            (no device synchronisation); ``sum_l H_l * W_l`` must equal ``S``.
        level_start_index: ``(L,)`` int64, the exclusive cumulative sum of ``H_l * W_l`` (checked:
            on the CPU at once, on a GPU asynchronously), or ``None`` to compute it.
        sampling_locations: ``(N, Lq, H, L, P, 2)`` any float dtype, ``(x, y)`` normalized to
            [0, 1] (0 = left/top edge, 1 = right/bottom edge). NaN/Inf: out of bounds (0, gradient 0).
        attention_weights: ``(N, Lq, H, L, P)`` any float dtype (need not sum to 1).
        backend: ``"native"``, ``"triton"``, ``"reference"`` or ``None`` for the default.

    Returns ``(N, Lq, H * D)`` in ``value``'s dtype. Differentiable in ``value``, the locations and
    the weights (gradients in their own dtypes).
    """
    _check_float("value", value, 4)
    N, S, H, _ = value.shape
    dev = value.device
    shapes, rows = _spatial_shapes(spatial_shapes, dev)
    L = shapes.shape[0]
    _check_sum(shapes, rows, S, "value.shape[1] (S)")
    starts = _level_start_index(level_start_index, shapes, rows)
    _check_float("sampling_locations", sampling_locations, 6, dev)
    Lq, P = sampling_locations.shape[1], sampling_locations.shape[4]
    _check_shape("sampling_locations", sampling_locations, (N, Lq, H, L, P, 2))
    _check_float("attention_weights", attention_weights, 5, dev)
    _check_shape("attention_weights", attention_weights, (N, Lq, H, L, P))
    name = _backend(backend, value, sampling_locations, attention_weights)
    return _ms_deform(value.contiguous(), shapes, starts, sampling_locations.contiguous(),
                      attention_weights.contiguous(), name)


def _visible(visible, N: int, Lq: int, M: int, dev: torch.device) -> Tensor:
    """int64 ranges ``(N, Lq, 2)`` within ``[0, M]``, ``lo <= hi``, or a bool mask ``(N, Lq, M)``
    (``(N, M)`` is broadcast over the queries)."""
    if not isinstance(visible, Tensor):
        raise TypeError(f"visible must be a torch.Tensor (int64 ranges (N, Lq, 2) or bool (N, Lq, M)), "
                        f"got {type(visible).__name__}")
    if visible.device != dev:
        raise ValueError(f"visible is on {visible.device}, but value is on {dev}")
    if visible.dtype == torch.bool:
        if visible.dim() == 2 and tuple(visible.shape) == (N, M):
            visible = visible[:, None, :].expand(N, Lq, M)
        _check_shape("visible (a bool mask)", visible, (N, Lq, M))
        return visible.contiguous()
    if visible.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"visible must be int64 ranges (N, Lq, 2) or a bool mask (N, Lq, M), got {visible.dtype}")
    _check_shape("visible (int64 ranges [lo, hi))", visible, (N, Lq, 2))
    visible = visible.to(torch.int64).contiguous()
    ok = (visible[..., 0] >= 0) & (visible[..., 0] <= visible[..., 1]) & (visible[..., 1] <= M)
    if _values_known(visible):
        if not bool(ok.all()):
            n, q = (~ok).nonzero()[0].tolist()
            raise ValueError(f"visible[{n}, {q}] = {visible[n, q].tolist()}: ranges [lo, hi) must satisfy "
                             f"0 <= lo <= hi <= M = {M}")
    elif not torch.compiler.is_compiling():
        torch._assert_async(ok.all(), "visible: ranges [lo, hi) must satisfy 0 <= lo <= hi <= M")
    return visible


def _offset_scale(offset_scale, L: int, dev: torch.device) -> Tensor:
    if isinstance(offset_scale, Tensor):
        if offset_scale.dtype not in _FLOATS:
            raise TypeError(f"offset_scale must be a float tensor, got {offset_scale.dtype}")
        if offset_scale.requires_grad and torch.is_grad_enabled():
            raise ValueError("offset_scale gets no gradient (a constant of the architecture): pass it detached")
        scale = offset_scale.to(dev)
        if scale.dim() == 0:
            scale = scale.expand(L, 2)
    elif isinstance(offset_scale, (int, float)) and not isinstance(offset_scale, bool):
        scale = torch.full((L, 2), float(offset_scale), dtype=torch.float32, device=dev)
    else:
        try:
            scale = torch.tensor(offset_scale, dtype=torch.float32, device=dev)
        except (TypeError, ValueError):
            raise TypeError(f"offset_scale must be a float, an (L, 2) tensor or nested sequence, got "
                            f"{offset_scale!r}") from None
    _check_shape("offset_scale", scale, (L, 2))
    if _values_known(scale) and not bool(torch.isfinite(scale).all()):
        raise ValueError(f"offset_scale must be finite, got {scale.tolist()}")
    return scale.contiguous()


def mmfs_attn(
    value: Tensor,
    spatial_shapes: Shapes,
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    visible: Tensor,
    offset_scale: Union[Tensor, float, Sequence[Sequence[float]]],
    sink: float = 1.0,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """MMFS: multi-image multi-scale deformable attention with one joint sink softmax (MMFS.md §c.2).

    Args:
        value: ``(N, M, S, H, D)`` per-image pyramids (a flat ``(N, M * S, H, D)`` is accepted),
            float32/float16/bfloat16/float64.
        spatial_shapes: ``(L, 2)`` int64 rows ``(H_l, W_l)`` of one image (the same for all images),
            or a sequence of pairs; ``sum_l H_l * W_l == S``.
        reference_points: ``(N, Lq, 2)`` (or ``(1, Lq, 2)``, broadcast) ``(x, y)``, one per query.
        sampling_offsets: ``(N, Lq, H, M, P, 2)``, shared by the levels of an image.
        attention_logits: ``(N, Lq, H, M, L, P)``; one softmax per ``(n, q, h)`` over the visible
            images x levels x points, with ``sink`` added to its denominator.
        visible: int64 ``(N, Lq, 2)`` ranges ``[lo, hi)`` of image indices (``0 <= lo <= hi <= M``;
            invisible images are skipped, not masked), or a bool mask ``(N, Lq, M)`` / ``(N, M)``.
        offset_scale: ``kappa``: ``(L, 2)`` ``(kx, ky)`` per level, or a float for all; the location
            on level ``l`` is ``reference_points + sampling_offsets * offset_scale[l]``. No gradient.
        sink: constant >= 0 in the softmax denominator (1.0: MM-Interleaved; 0.0: a plain softmax,
            and a query that sees nothing gets 0).
        backend: ``"native"``, ``"triton"``, ``"reference"`` or ``None`` for the default.

    Returns ``(N, Lq, H * D)`` in ``value``'s dtype. Differentiable in ``value``,
    ``reference_points``, ``sampling_offsets`` and ``attention_logits``; only the log-sum-exp per
    ``(n, q, h)`` is saved for backward.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
    _check_float("sampling_offsets", sampling_offsets, 6, value.device)
    N, Lq, H, M, P, _ = sampling_offsets.shape
    if value.dim() == 4:
        if value.shape[1] % max(M, 1):
            raise ValueError(f"value (N, M * S, H, D) = {tuple(value.shape)}: dim 1 is not a multiple of M = {M} "
                             "(sampling_offsets.shape[3])")
        value = value.view(value.shape[0], M, value.shape[1] // max(M, 1), *value.shape[2:])
    _check_float("value", value, 5)
    dev = value.device
    S, D = value.shape[2], value.shape[4]
    _check_shape("value", value, (N, M, S, H, D))
    _check_shape("sampling_offsets", sampling_offsets, (N, Lq, H, M, P, 2))
    shapes, rows = _spatial_shapes(spatial_shapes, dev)
    L = shapes.shape[0]
    _check_sum(shapes, rows, S, "value.shape[2] (S, per image)")
    _check_float("reference_points", reference_points, 3, dev)
    if reference_points.shape[0] == 1 and N != 1:
        _check_shape("reference_points", reference_points, (1, Lq, 2))
        reference_points = reference_points.expand(N, Lq, 2)
    _check_shape("reference_points", reference_points, (N, Lq, 2))
    _check_float("attention_logits", attention_logits, 6, dev)
    _check_shape("attention_logits", attention_logits, (N, Lq, H, M, L, P))
    visible = _visible(visible, N, Lq, M, dev)
    scale = _offset_scale(offset_scale, L, dev)
    if isinstance(sink, bool) or not isinstance(sink, (int, float)):
        raise TypeError(f"sink must be a float, got {type(sink).__name__}")
    if not math.isfinite(sink) or sink < 0:
        raise ValueError(f"sink must be a finite number >= 0, got {sink!r}")
    name = _backend(backend, value, reference_points, sampling_offsets, attention_logits, scale)
    out, _ = _mmfs(value.contiguous(), shapes, reference_points.contiguous(), sampling_offsets.contiguous(),
                   attention_logits.contiguous(), visible, scale, float(sink), name)
    return out
