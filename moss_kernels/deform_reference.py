"""Reference math of multi-scale deformable attention and MMFS, in PyTorch ops (MMFS.md §a, §c).

This file is the **backend contract** of the two deformable ops: every backend (``reference``,
``native``, ``triton``) provides four functions with exactly these signatures and semantics,
as ``Backend.deform_forward``, ``deform_backward``, ``mmfs_forward`` and ``mmfs_backward``. The op
layer (``deform_attn.py``) has already checked every argument, so a backend receives:

* every tensor **contiguous** and on ``value``'s device;
* ``spatial_shapes``: ``(L, 2)`` int64, rows ``(H_l, W_l)``; ``level_start_index``: ``(L,)`` int64,
  its exclusive cumulative sum of ``H_l * W_l`` (both on ``value``'s device, values verified);
* ``value`` in float32/float16/bfloat16/float64; locations, weights, offsets, logits, reference
  points and ``offset_scale`` in any float dtype (never down-cast by the op layer);
* ``sink``: a Python float >= 0.

Arithmetic: coordinates, bilinear weights, the softmax and every sum in the compute dtype,
``compute_dtype(...)``: float64 when any input is float64, else float32. Outputs in ``value``'s
dtype; each gradient in its input's dtype; ``lse`` in the compute dtype.

Bilinear convention (§a.1): location ``(x, y)``, ``u = x * W_l - 0.5``, ``v = y * H_l - 0.5``, four
corners, zero padding, i.e. ``F.grid_sample(bilinear, zeros, align_corners=False)`` at
``(2x - 1, 2y - 1)``. **Non-finite locations** (NaN, +-Inf) are out of bounds: they contribute 0
and get gradient 0 (``grid_sample`` leaves them undefined). Gradients are one-sided at integer
``u``, ``v`` like ``grid_sample``'s.

MMFS visibility (§c.2): ``visible`` is either int64 ``(N, Lq, 2)`` ranges ``[lo, hi)`` of image
indices (values already clamped to ``[0, M]`` by the op layer) or a bool mask ``(N, Lq, M)``.
Invisible images are **skipped**: they contribute nothing even if their values or offsets hold NaN.

The reference works level by level (and image by image), never stacking all levels: its peak
memory is that of one level's corners, ``O(N * H * Lq * P * D)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "mmfs_backward",
    "mmfs_forward",
    "ms_deform_backward",
    "ms_deform_forward",
    "visible_mask",
]


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 when any given tensor is float64, else float32: the dtype of all arithmetic."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# ============================================================================ one level
def _corners(x: Tensor, y: Tensor, height: int, width: int):
    """The four bilinear corners of locations ``x``, ``y`` (any shape, compute dtype) on an
    ``height x width`` map: list of ``(flat index, weight, d weight/d alpha, d weight/d beta)``,
    flat indices clamped into range where the corner is out of bounds (its weights are then 0)."""
    # Non-finite or far-away locations: move them to -2 (every corner out of bounds) before the
    # floor, so that no huge or NaN value is cast to an integer.
    u = x * width - 0.5
    v = y * height - 0.5
    inside = torch.isfinite(u) & torch.isfinite(v) & (u > -1) & (u < width) & (v > -1) & (v < height)
    u = torch.where(inside, u, torch.full_like(u, -2.0))
    v = torch.where(inside, v, torch.full_like(v, -2.0))
    j0f, i0f = torch.floor(u), torch.floor(v)
    alpha, beta = u - j0f, v - i0f
    j0, i0 = j0f.long(), i0f.long()
    out = []
    for a in (0, 1):
        for b in (0, 1):
            i, j = i0 + a, j0 + b
            ok = (i >= 0) & (i < height) & (j >= 0) & (j < width)
            wa = alpha if b else 1 - alpha  # the alpha factor of this corner
            wb = beta if a else 1 - beta
            da = (1.0 if b else -1.0) * wb  # d(wa * wb)/d alpha
            db = (1.0 if a else -1.0) * wa
            zero = torch.zeros_like(wa)
            flat = torch.where(ok, i * width + j, torch.zeros_like(i))
            out.append((flat, torch.where(ok, wa * wb, zero), torch.where(ok, da, zero), torch.where(ok, db, zero)))
    return out


def _gather(v_level: Tensor, flat: Tensor) -> Tensor:
    """``v_level (B, S_l, D)`` at ``flat (B, K)`` -> ``(B, K, D)``."""
    return torch.gather(v_level, 1, flat.unsqueeze(-1).expand(-1, -1, v_level.shape[-1]))


def _level_forward(v_level: Tensor, x: Tensor, y: Tensor, a: Tensor, height: int, width: int) -> Tensor:
    """``sum_p a * Samp(v_level, x, y)``. ``v_level (B, S_l, D)``; ``x, y, a (B, Lq, P)``, all in the
    compute dtype (``B = N * H``). Returns ``(B, Lq, D)``."""
    B, Lq, P = x.shape
    acc = v_level.new_zeros(B, Lq, v_level.shape[-1])
    for flat, w, _, _ in _corners(x, y, height, width):
        vals = _gather(v_level, flat.reshape(B, Lq * P)).view(B, Lq, P, -1)
        acc += torch.einsum("bqp,bqpd->bqd", a * w, vals)
    return acc


def _level_backward(v_level: Tensor, x: Tensor, y: Tensor, a: Tensor, g: Tensor, height: int, width: int):
    """Gradients of ``<g, _level_forward(...)>``: ``(grad_v_level (B, S_l, D), grad_x, grad_y,
    grad_a)`` with ``grad_a = <g, Samp>`` and ``grad_x``, ``grad_y``, ``grad_a`` ``(B, Lq, P)``.
    ``g (B, Lq, D)``; other shapes as ``_level_forward``."""
    B, Lq, P = x.shape
    D = v_level.shape[-1]
    grad_v = torch.zeros_like(v_level)
    grad_a = torch.zeros_like(x)
    d_alpha = torch.zeros_like(x)
    d_beta = torch.zeros_like(x)
    for flat, w, da, db in _corners(x, y, height, width):
        idx = flat.reshape(B, Lq * P)
        vals = _gather(v_level, idx).view(B, Lq, P, D)
        gv = torch.einsum("bqd,bqpd->bqp", g, vals)  # <g, V[corner]>
        grad_a += w * gv
        d_alpha += da * gv
        d_beta += db * gv
        contrib = (a * w).unsqueeze(-1) * g.unsqueeze(2)  # (B, Lq, P, D)
        grad_v.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, D), contrib.reshape(B, Lq * P, D))
    return grad_v, a * d_alpha * width, a * d_beta * height, grad_a


def _levels(spatial_shapes: Tensor, level_start_index: Tensor) -> list[tuple[int, int, int]]:
    """``[(start_l, H_l, W_l)]`` as Python ints."""
    return [(int(s), int(h), int(w)) for s, (h, w) in zip(level_start_index.tolist(), spatial_shapes.tolist())]


def _heads_first(t: Tensor) -> Tensor:
    """``(N, Lq, H, ...)`` -> ``(N * H, Lq, ...)``."""
    t = t.transpose(1, 2)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _heads_last(t: Tensor, N: int, H: int) -> Tensor:
    """``(N * H, Lq, ...)`` -> ``(N, Lq, H, ...)`` contiguous (the inverse of ``_heads_first``)."""
    return t.view(N, H, *t.shape[1:]).transpose(1, 2).contiguous()


def _value_level(value: Tensor, start: int, size: int, cdt: torch.dtype) -> Tensor:
    """``value (N, S, H, D)`` rows ``[start, start + size)`` -> ``(N * H, size, D)`` in ``cdt``."""
    N, _, H, D = value.shape
    return value[:, start:start + size].to(cdt).permute(0, 2, 1, 3).reshape(N * H, size, D)


def _grad_rows(g: Tensor, N: int, H: int) -> Tensor:
    """``(N * H, size, D)`` -> ``(N, size, H, D)``."""
    return g.view(N, H, *g.shape[1:]).transpose(1, 2)


# ============================================================================ ms_deform_attn
def ms_deform_forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                      sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention (MMFS.md §a.2).

    Args:
        value: ``(N, S, H, D)``, ``S = sum_l H_l * W_l``, levels concatenated row-major.
        spatial_shapes: ``(L, 2)`` int64 rows ``(H_l, W_l)``.
        level_start_index: ``(L,)`` int64, exclusive cumulative sum of ``H_l * W_l``.
        sampling_locations: ``(N, Lq, H, L, P, 2)`` any float dtype, last dim ``(x, y)`` in [0, 1].
        attention_weights: ``(N, Lq, H, L, P)`` any float dtype (need not sum to 1).

    Returns ``out (N, Lq, H * D)`` in ``value``'s dtype:
    ``out[n, q, h*D:(h+1)*D] = sum_{l,p} A[n,q,h,l,p] * Samp_l(value[n, :, h], X[n,q,h,l,p])``.
    """
    N, _, H, D = value.shape
    Lq = sampling_locations.shape[1]
    cdt = compute_dtype(value, sampling_locations, attention_weights)
    loc = _heads_first(sampling_locations.to(cdt))  # (N*H, Lq, L, P, 2)
    att = _heads_first(attention_weights.to(cdt))  # (N*H, Lq, L, P)
    acc = value.new_zeros(N * H, Lq, D, dtype=cdt)
    for lvl, (start, h, w) in enumerate(_levels(spatial_shapes, level_start_index)):
        acc += _level_forward(_value_level(value, start, h * w, cdt), loc[:, :, lvl, :, 0], loc[:, :, lvl, :, 1],
                              att[:, :, lvl], h, w)
    return acc.view(N, H, Lq, D).transpose(1, 2).reshape(N, Lq, H * D).to(value.dtype)


def ms_deform_backward(grad_out: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                       sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``ms_deform_forward``.

    Args:
        grad_out: ``(N, Lq, H * D)`` any float dtype; the other arguments as ``ms_deform_forward``.

    Returns ``(grad_value (N, S, H, D), grad_locations (N, Lq, H, L, P, 2), grad_weights
    (N, Lq, H, L, P))``, each in its input's dtype. ``grad_value`` is a sum over contributions in a
    fixed order per (n, h): bitwise reproducible for any thread count (MMFS.md §d.1).
    """
    N, S, H, D = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    cdt = compute_dtype(value, sampling_locations, attention_weights)
    loc = _heads_first(sampling_locations.to(cdt))
    att = _heads_first(attention_weights.to(cdt))
    g = grad_out.to(cdt).view(N, Lq, H, D).transpose(1, 2).reshape(N * H, Lq, D)
    grad_value = value.new_empty(N, S, H, D, dtype=value.dtype)
    grad_loc = loc.new_empty(N * H, Lq, L, P, 2)
    grad_att = att.new_empty(N * H, Lq, L, P)
    for lvl, (start, h, w) in enumerate(_levels(spatial_shapes, level_start_index)):
        gv, gx, gy, ga = _level_backward(_value_level(value, start, h * w, cdt), loc[:, :, lvl, :, 0],
                                         loc[:, :, lvl, :, 1], att[:, :, lvl], g, h, w)
        grad_value[:, start:start + h * w] = _grad_rows(gv, N, H)
        grad_loc[:, :, lvl, :, 0], grad_loc[:, :, lvl, :, 1], grad_att[:, :, lvl] = gx, gy, ga
    return (grad_value, _heads_last(grad_loc, N, H).to(sampling_locations.dtype),
            _heads_last(grad_att, N, H).to(attention_weights.dtype))


# ============================================================================ mmfs_attn
def visible_mask(visible: Tensor, num_images: int) -> Tensor:
    """``visible`` (int64 ranges ``(N, Lq, 2)`` or bool ``(N, Lq, M)``) -> bool ``(N, Lq, M)``."""
    if visible.dtype == torch.bool:
        return visible
    m = torch.arange(num_images, device=visible.device)
    return (m >= visible[..., :1]) & (m < visible[..., 1:])


def _softmax_lse(logits: Tensor, mask: Tensor, sink: float) -> Tensor:
    """``log(sink + sum_{visible} exp z)`` per ``(n, q, h)`` (``-inf`` when that sum is 0).
    ``logits (N, Lq, H, M, L, P)`` compute dtype; ``mask (N, Lq, M)`` bool."""
    vis = mask[:, :, None, :, None, None]
    z = torch.where(vis, logits, torch.full_like(logits, -math.inf)).flatten(3)
    mx = z.amax(dim=-1)
    if sink > 0:
        mx = torch.clamp(mx, min=math.log(sink))
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # nothing visible and no sink
    total = torch.exp(z - mx.unsqueeze(-1)).sum(-1) + sink * torch.exp(-mx)
    return mx + torch.log(total)


def _mmfs_weights(logits: Tensor, mask: Tensor, lse: Tensor) -> Tensor:
    """``A = exp(z - lse)`` on visible entries, exactly 0 elsewhere; ``(N, Lq, H, M, L, P)``."""
    vis = mask[:, :, None, :, None, None].expand_as(logits)
    return torch.where(vis, torch.exp(logits - lse[..., None, None, None]), torch.zeros_like(logits))


def _mmfs_setup(value, reference_points, sampling_offsets, attention_logits, offset_scale):
    cdt = compute_dtype(value, reference_points, sampling_offsets, attention_logits, offset_scale)
    return (cdt, reference_points.to(cdt), sampling_offsets.to(cdt), attention_logits.to(cdt),
            offset_scale.to(cdt).tolist())


def _mmfs_level_inputs(ref, off, att, mask, m, lvl, kappa):
    """Locations ``r + offsets * kappa_l`` of image ``m``, level ``lvl``, and its weights, heads
    first ``(N * H, Lq, P)``; invisible queries get an out-of-bounds location (skipped)."""
    vis = mask[:, :, m, None, None]  # (N, Lq, 1, 1)
    far = torch.full_like(off[:, :, :, m, :, 0], -2.0)
    x = torch.where(vis, ref[:, :, None, None, 0] + off[:, :, :, m, :, 0] * kappa[0], far)
    y = torch.where(vis, ref[:, :, None, None, 1] + off[:, :, :, m, :, 1] * kappa[1], far)
    return _heads_first(x), _heads_first(y), _heads_first(att[:, :, :, m, lvl])


def mmfs_forward(value: Tensor, spatial_shapes: Tensor, reference_points: Tensor, sampling_offsets: Tensor,
                 attention_logits: Tensor, visible: Tensor, offset_scale: Tensor, sink: float) -> tuple[Tensor, Tensor]:
    """MMFS multi-image deformable attention with the sink softmax (MMFS.md §c.2).

    Args:
        value: ``(N, M, S, H, D)`` per-image pyramids (the same ``spatial_shapes`` for every image).
        spatial_shapes: ``(L, 2)`` int64 rows ``(H_l, W_l)`` of one image.
        reference_points: ``(N, Lq, 2)`` ``(x, y)``, one per query.
        sampling_offsets: ``(N, Lq, H, M, P, 2)``, shared by the levels.
        attention_logits: ``(N, Lq, H, M, L, P)``.
        visible: int64 ``(N, Lq, 2)`` ranges ``[lo, hi)`` within ``[0, M]``, or bool ``(N, Lq, M)``.
        offset_scale: ``(L, 2)`` ``kappa_l = (kx, ky)``: location on level ``l`` =
            ``reference_points + sampling_offsets * kappa_l``.
        sink: constant >= 0 added to the softmax denominator.

    Returns ``(out (N, Lq, H * D) in value's dtype, lse (N, Lq, H) in the compute dtype)`` with
    ``A = exp(z - lse)`` on visible entries, ``lse = log(sink + sum_visible exp z)`` (``-inf`` when
    nothing is visible and ``sink == 0``; the output is then 0) and
    ``out = sum_{m visible, l, p} A * Samp_l(value[n, m, :, h], r + offsets * kappa_l)``.
    """
    N, M, _, H, D = value.shape
    Lq = attention_logits.shape[1]
    cdt, ref, off, att, kappa = _mmfs_setup(value, reference_points, sampling_offsets, attention_logits,
                                            offset_scale)
    mask = visible_mask(visible, M)
    lse = _softmax_lse(att, mask, sink)
    weights = _mmfs_weights(att, mask, lse)
    starts = torch.cumsum(spatial_shapes.prod(-1), 0) - spatial_shapes.prod(-1)
    acc = value.new_zeros(N * H, Lq, D, dtype=cdt)
    for m in range(M):
        if not bool(mask[:, :, m].any()):
            continue  # no query sees this image
        for lvl, (start, h, w) in enumerate(_levels(spatial_shapes, starts)):
            x, y, a = _mmfs_level_inputs(ref, off, weights, mask, m, lvl, kappa[lvl])
            acc += _level_forward(_value_level(value[:, m], start, h * w, cdt), x, y, a, h, w)
    out = acc.view(N, H, Lq, D).transpose(1, 2).reshape(N, Lq, H * D).to(value.dtype)
    return out, lse


def mmfs_backward(grad_out: Tensor, value: Tensor, spatial_shapes: Tensor, reference_points: Tensor,
                  sampling_offsets: Tensor, attention_logits: Tensor, visible: Tensor, offset_scale: Tensor,
                  sink: float, lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``mmfs_forward``, from the saved ``lse`` (the output is not needed).

    Args:
        grad_out: ``(N, Lq, H * D)`` any float dtype; ``lse``: ``(N, Lq, H)`` from ``mmfs_forward``;
            the other arguments as ``mmfs_forward``.

    Returns ``(grad_value (N, M, S, H, D), grad_reference_points (N, Lq, 2), grad_offsets
    (N, Lq, H, M, P, 2), grad_logits (N, Lq, H, M, L, P))``, each in its input's dtype:
    ``dL/dz = A * (<g, Samp> - delta)`` with ``delta = sum_visible A * <g, Samp>`` (visible
    entries; 0 elsewhere), ``dL/d offsets = sum_l kappa_l * dL/dX``, ``dL/dr = sum_{h,m,l,p} dL/dX``.
    """
    N, M, S, H, D = value.shape
    Lq, L, P = attention_logits.shape[1], attention_logits.shape[4], attention_logits.shape[5]
    cdt, ref, off, att, kappa = _mmfs_setup(value, reference_points, sampling_offsets, attention_logits,
                                            offset_scale)
    mask = visible_mask(visible, M)
    weights = _mmfs_weights(att, mask, lse.to(cdt))
    g = grad_out.to(cdt).view(N, Lq, H, D).transpose(1, 2).reshape(N * H, Lq, D)
    starts = torch.cumsum(spatial_shapes.prod(-1), 0) - spatial_shapes.prod(-1)
    grad_value = value.new_zeros(N, M, S, H, D)
    grad_off = off.new_zeros(N * H, Lq, M, P, 2)
    g_samp = att.new_zeros(N * H, Lq, M, L, P)  # <g, Samp> per entry
    grad_r = ref.new_zeros(N * H, Lq, 2)
    for m in range(M):
        if not bool(mask[:, :, m].any()):
            continue
        for lvl, (start, h, w) in enumerate(_levels(spatial_shapes, starts)):
            x, y, a = _mmfs_level_inputs(ref, off, weights, mask, m, lvl, kappa[lvl])
            gv, gx, gy, ga = _level_backward(_value_level(value[:, m], start, h * w, cdt), x, y, a, g, h, w)
            grad_value[:, m, start:start + h * w] = _grad_rows(gv, N, H)
            grad_off[:, :, m, :, 0] += gx * kappa[lvl][0]
            grad_off[:, :, m, :, 1] += gy * kappa[lvl][1]
            # dL/dr = sum over (h, m, l, p) of dL/dX; the sum over heads comes last
            grad_r += torch.stack((gx, gy), -1).sum(2)
            g_samp[:, :, m, lvl] = ga
    a_heads = _heads_first(weights)  # (N*H, Lq, M, L, P)
    delta = (a_heads * g_samp).flatten(2).sum(-1)  # (N*H, Lq)
    grad_z = a_heads * (g_samp - delta[..., None, None, None])
    return (grad_value,
            _heads_last(grad_r, N, H).sum(2).to(reference_points.dtype),
            _heads_last(grad_off, N, H).to(sampling_offsets.dtype),
            _heads_last(grad_z, N, H).to(attention_logits.dtype))
