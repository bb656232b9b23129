"""Triton kernels of the two deformable-attention ops (``ms_deform_attn``, ``mmfs_attn``; MMFS.md §a, §c).

Schedule. One program owns one ``(n, q, h)`` and all ``D`` channels of it: it loops over levels (and,
for MMFS, over the *visible* images only) and handles a ``(BLOCK_P, BLOCK_D)`` tile of points x
channels per level, so the sums over points, channels and the softmax never leave the program and
``grad_locations`` / ``grad_offsets`` / ``grad_logits`` / ``grad_reference`` need no atomics
(MMFS.md §d.1). Coordinates, bilinear weights, softmax and every sum are float32 (float64 when an
input is float64); ``value`` and the output are loaded/stored in their own dtype; locations, offsets, weights
and logits are read in whatever float dtype they come in and never rounded to ``value``'s.

``grad_value`` is a scatter (many ``(q, l, p)`` read one pixel) and the only cross-program reduction.
Default (deterministic): **integer fixed point**. Each contribution ``c = A * w_bilinear * g[d]`` is
computed in float32, scaled by ``2^F`` and rounded to an int64, then added with an *integer*
``atomic_add`` into an int64 buffer shaped like ``value``; integer addition is associative, so the
result is bitwise the same for any program order, block size or ``num_warps``. ``F = 61 - ceil(log2 B)``
where ``B = max|g| * max_{n,h} sum_{q,l,p} |A|`` bounds every partial sum (so nothing overflows 2^62)
and is computed on the device (no host sync). The quantum ``2^-F ~ B * 4e-19`` is far below float32
rounding of the result (measured under the interpreter: ``grad_value`` relative error against the
float64 truth 1.520e-7 in fixed point, 1.525e-7 with float32 atomics).

Why not owner-computes: the pixel -> (q, l, p) map depends on the data (locations), so gathering
instead of scattering needs a sort by destination every call (a stable ``argsort`` of ``4 N Lq H L P``
keys plus a CSR pass): more launches and ~20 bytes of index per corner. The fixed-point atomics cost
one int64 buffer (8 bytes per value element) and as many atomic instructions as the float-atomic
kernels. ``deterministic=False`` (backend functions only) keeps float atomics, order-dependent in the
last bits: the baseline the deterministic path is to be timed against on a GPU (target: no slower
than 1.3x; not yet measured).

Offsets are 64-bit: the program's ``(n, q, h)`` and every gathered row index are int64, so
``N*S*H*D`` and ``N*Lq*H*L*P*2`` may pass 2^31. Every load and atomic is masked: points past ``P``,
channels past ``D``, corners outside the map and samples with non-finite or out-of-box coordinates
(NaN/Inf locations contribute 0 and get gradient 0, MMFS.md §c.1).

Grid: ``N*Lq*H`` programs on axis 0 (up to 2^31 - 1; axes 1, 2 unused, MMFS.md §d.7). ``head_major``
orders them ``(n, h, q)`` so consecutive programs read the same ``(n, h)`` value slice (L2 locality);
``False`` orders them ``(n, q, h)``. Both are valid launch configurations; the tests check that
``grad_value`` is bitwise identical under both.

``cost_model`` gives the bytes floor the GPU target is measured against; ``python -m
moss_kernels.triton_kernels.deform_attn`` compiles the kernels for sm_90/sm_80 without a GPU and
prints registers, spills and shared memory. sm_90, bf16 value, P=8, D=64, 4 warps (the default for
that tile): forwards 72 (MSDA) / 92 (MMFS) registers, backwards 127 / 197, no spills; at 2 warps the
MMFS backward needs 255 (the cap), hence 4.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED

__all__ = [
    "cost_model",
    "mmfs_backward",
    "mmfs_forward",
    "ms_deform_backward",
    "ms_deform_forward",
]

# Fixed-point headroom: every partial sum stays below 2^(FIXED_BITS+1) < 2^63.
FIXED_BITS = 61


# --------------------------------------------------------------------------------------------- helpers
@triton.jit
def _program_nqh(Lq, H, HEAD_MAJOR: tl.constexpr):
    """This program's ``(n, q, h)`` as int64 (products with strides must not wrap at 2^31)."""
    pid = tl.program_id(0).to(tl.int64)
    if HEAD_MAJOR:
        q = pid % Lq
        h = (pid // Lq) % H
        n = pid // (Lq * H)
    else:
        h = pid % H
        q = (pid // H) % Lq
        n = pid // (H * Lq)
    return n, q, h


@triton.jit
def _level(shapes_ptr, starts_ptr, lvl):
    """``(H_l, W_l, start_l)`` of level ``lvl`` as int64 scalars."""
    return tl.load(shapes_ptr + 2 * lvl), tl.load(shapes_ptr + 2 * lvl + 1), tl.load(starts_ptr + lvl)


@triton.jit
def _geometry(x, y, Hl, Wl, pmask):
    """Bilinear footprint of normalized ``(x, y)`` on an ``Hl x Wl`` map (MMFS.md §a.1).

    Returns ``valid`` (inside the open box ``-1 < u < W, -1 < v < H``; false for NaN/Inf, which fail
    every comparison), the top-left corner ``(i0, j0)`` int64 and the fractions ``(alpha, beta)``.
    """
    wf = Wl.to(x.dtype)
    hf = Hl.to(x.dtype)
    u = x * wf - 0.5
    v = y * hf - 0.5
    valid = pmask & (u > -1.0) & (u < wf) & (v > -1.0) & (v < hf)
    u = tl.where(valid, u, 0.0)  # keeps NaN out of the float -> int conversion
    v = tl.where(valid, v, 0.0)
    j0f = tl.floor(u)
    i0f = tl.floor(v)
    return valid, i0f.to(tl.int64), j0f.to(tl.int64), u - j0f, v - i0f


@triton.jit
def _corner(base, stride_s, stride_d, start, ii, jj, Hl, Wl, valid, dd):
    """Pointers ``(BLOCK_P, BLOCK_D)`` to the corner ``(ii, jj)`` rows and whether each is on the map."""
    inb = valid & (ii >= 0) & (ii < Hl) & (jj >= 0) & (jj < Wl)
    rows = tl.where(inb, start + ii * Wl + jj, 0)  # off-map lanes point at row 0 and are masked
    return base + rows[:, None] * stride_s + dd[None, :] * stride_d, inb


@triton.jit
def _gather4(v_base, stride_vs, stride_vd, start, Hl, Wl, i0, j0, valid, dd, dmask, ACC: tl.constexpr):
    """The four corner tiles ``(BLOCK_P, BLOCK_D)`` in ``ACC``; off-map corners read as 0 (zero padding)."""
    p00, m00 = _corner(v_base, stride_vs, stride_vd, start, i0, j0, Hl, Wl, valid, dd)
    p01, m01 = _corner(v_base, stride_vs, stride_vd, start, i0, j0 + 1, Hl, Wl, valid, dd)
    p10, m10 = _corner(v_base, stride_vs, stride_vd, start, i0 + 1, j0, Hl, Wl, valid, dd)
    p11, m11 = _corner(v_base, stride_vs, stride_vd, start, i0 + 1, j0 + 1, Hl, Wl, valid, dd)
    dm = dmask[None, :]
    v00 = tl.load(p00, mask=m00[:, None] & dm, other=0.0).to(ACC)
    v01 = tl.load(p01, mask=m01[:, None] & dm, other=0.0).to(ACC)
    v10 = tl.load(p10, mask=m10[:, None] & dm, other=0.0).to(ACC)
    v11 = tl.load(p11, mask=m11[:, None] & dm, other=0.0).to(ACC)
    return v00, v01, v10, v11


@triton.jit
def _sample(v_base, stride_vs, stride_vd, start, Hl, Wl, x, y, pmask, dd, dmask, ACC: tl.constexpr):
    """``Samp_l(V, x, y)`` for ``BLOCK_P`` points: ``(BLOCK_P, BLOCK_D)`` in ``ACC``."""
    valid, i0, j0, a, b = _geometry(x, y, Hl, Wl, pmask)
    v00, v01, v10, v11 = _gather4(v_base, stride_vs, stride_vd, start, Hl, Wl, i0, j0, valid, dd, dmask, ACC)
    return (((1.0 - b) * (1.0 - a))[:, None] * v00 + ((1.0 - b) * a)[:, None] * v01
            + (b * (1.0 - a))[:, None] * v10 + (b * a)[:, None] * v11)


@triton.jit
def _scatter(gv_base, stride_gs, start, ii, jj, Hl, Wl, valid, dd, dmask, wa, g, fix_scale, FIXED: tl.constexpr):
    """``grad_value[corner, :] += wa * g`` for one corner: int64 fixed point or float atomics."""
    ptrs, inb = _corner(gv_base, stride_gs, 1, start, ii, jj, Hl, Wl, valid, dd)
    c = wa[:, None] * g[None, :]
    m = inb[:, None] & dmask[None, :]
    if FIXED:
        tl.atomic_add(ptrs, tl.floor(c * fix_scale + 0.5).to(tl.int64), mask=m, sem="relaxed")
    else:
        tl.atomic_add(ptrs, c, mask=m, sem="relaxed")


@triton.jit
def _sample_grad(v_base, stride_vs, stride_vd, gv_base, stride_gs, start, Hl, Wl, x, y, A, g, pmask, dd, dmask,
                 fix_scale, FIXED: tl.constexpr, ACC: tl.constexpr):
    """Backward of ``A * Samp_l`` against ``g`` (BLOCK_D,) for ``BLOCK_P`` points.

    Scatters ``A * w * g`` into ``grad_value``; returns ``<g, Samp>``, ``<g, dSamp/du>`` and
    ``<g, dSamp/dv>`` (each ``(BLOCK_P,)``; the caller applies ``A`` and the ``W_l``/``H_l`` factors).
    """
    valid, i0, j0, a, b = _geometry(x, y, Hl, Wl, pmask)
    v00, v01, v10, v11 = _gather4(v_base, stride_vs, stride_vd, start, Hl, Wl, i0, j0, valid, dd, dmask, ACC)
    w00 = (1.0 - b) * (1.0 - a)
    w01 = (1.0 - b) * a
    w10 = b * (1.0 - a)
    w11 = b * a
    gg = g[None, :]
    gs = tl.sum((w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11) * gg, 1)
    gu = tl.sum(((1.0 - b)[:, None] * (v01 - v00) + b[:, None] * (v11 - v10)) * gg, 1)
    gv = tl.sum(((1.0 - a)[:, None] * (v10 - v00) + a[:, None] * (v11 - v01)) * gg, 1)
    _scatter(gv_base, stride_gs, start, i0, j0, Hl, Wl, valid, dd, dmask, A * w00, g, fix_scale, FIXED)
    _scatter(gv_base, stride_gs, start, i0, j0 + 1, Hl, Wl, valid, dd, dmask, A * w01, g, fix_scale, FIXED)
    _scatter(gv_base, stride_gs, start, i0 + 1, j0, Hl, Wl, valid, dd, dmask, A * w10, g, fix_scale, FIXED)
    _scatter(gv_base, stride_gs, start, i0 + 1, j0 + 1, Hl, Wl, valid, dd, dmask, A * w11, g, fix_scale, FIXED)
    return gs, gu, gv


@triton.jit
def _visible_range(vis_ptr, n, q, stride_in, stride_iq, stride_im, M, RANGES: tl.constexpr):
    """Images this query loops over: its ``[lo, hi)`` range (clamped to ``[0, M]``), or all ``M`` for a mask."""
    if RANGES:
        base = vis_ptr + n * stride_in + q * stride_iq
        lo = tl.maximum(tl.load(base), 0)
        hi = tl.minimum(tl.load(base + stride_im), M)
    else:
        lo = n * 0
        hi = lo + M
    return lo, hi


@triton.jit
def _image_points(vis_ptr, n, q, m, stride_in, stride_iq, stride_im, pp, P, RANGES: tl.constexpr):
    """The point mask of image ``m``: ``pp < P`` where it is visible, all false where not (a bound, not
    an ``&`` with a loaded flag: the interpreter does not keep that boolean)."""
    if RANGES:
        return pp < P  # the loop bounds already are the range
    flag = tl.load(vis_ptr + n * stride_in + q * stride_iq + m * stride_im)
    return pp < tl.where(flag != 0, P, 0)


# --------------------------------------------------------------------------------------------- ms_deform_attn
@triton.jit
def msda_fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                    Lq, H, L, P, D,
                    stride_vn, stride_vs, stride_vh, stride_vd,
                    stride_ln, stride_lq, stride_lh, stride_ll, stride_lp, stride_lc,
                    stride_an, stride_aq, stride_ah, stride_al, stride_ap,
                    stride_on, stride_oq, stride_od,
                    HEAD_MAJOR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    n, q, h = _program_nqh(Lq, H, HEAD_MAJOR)
    pp = tl.arange(0, BLOCK_P)
    dd = tl.arange(0, BLOCK_D)
    pmask = pp < P
    dmask = dd < D
    v_base = value_ptr + n * stride_vn + h * stride_vh
    l_base = loc_ptr + n * stride_ln + q * stride_lq + h * stride_lh + pp * stride_lp
    a_base = attn_ptr + n * stride_an + q * stride_aq + h * stride_ah + pp * stride_ap
    acc = tl.zeros((BLOCK_P, BLOCK_D), ACC)
    for lvl in range(L):
        Hl, Wl, start = _level(shapes_ptr, starts_ptr, lvl)
        x = tl.load(l_base + lvl * stride_ll, mask=pmask, other=0.0).to(ACC)
        y = tl.load(l_base + lvl * stride_ll + stride_lc, mask=pmask, other=0.0).to(ACC)
        A = tl.load(a_base + lvl * stride_al, mask=pmask, other=0.0).to(ACC)
        acc += A[:, None] * _sample(v_base, stride_vs, stride_vd, start, Hl, Wl, x, y, pmask, dd, dmask, ACC)
    out = tl.sum(acc, 0)
    tl.store(out_ptr + n * stride_on + q * stride_oq + (h * D + dd) * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def msda_bwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, gout_ptr, gv_ptr, fix_ptr,
                    gloc_ptr, gattn_ptr,
                    Lq, H, L, P, D,
                    stride_vn, stride_vs, stride_vh, stride_vd,
                    stride_ln, stride_lq, stride_lh, stride_ll, stride_lp, stride_lc,
                    stride_an, stride_aq, stride_ah, stride_al, stride_ap,
                    stride_gn, stride_gq, stride_gd,
                    stride_gvn, stride_gvs, stride_gvh,
                    HEAD_MAJOR: tl.constexpr, FIXED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACC: tl.constexpr):
    n, q, h = _program_nqh(Lq, H, HEAD_MAJOR)
    pp = tl.arange(0, BLOCK_P)
    dd = tl.arange(0, BLOCK_D)
    pmask = pp < P
    dmask = dd < D
    g = tl.load(gout_ptr + n * stride_gn + q * stride_gq + (h * D + dd) * stride_gd, mask=dmask, other=0.0).to(ACC)
    fix_scale = tl.load(fix_ptr).to(ACC)
    v_base = value_ptr + n * stride_vn + h * stride_vh
    gv_base = gv_ptr + n * stride_gvn + h * stride_gvh
    l_base = loc_ptr + n * stride_ln + q * stride_lq + h * stride_lh + pp * stride_lp
    a_base = attn_ptr + n * stride_an + q * stride_aq + h * stride_ah + pp * stride_ap
    # grad_locations (N, Lq, H, L, P, 2) and grad_weights (N, Lq, H, L, P) are fresh contiguous tensors.
    row = (n * Lq + q) * H + h
    gl_base = gloc_ptr + row * (L * P * 2) + pp * 2
    ga_base = gattn_ptr + row * (L * P) + pp
    for lvl in range(L):
        Hl, Wl, start = _level(shapes_ptr, starts_ptr, lvl)
        x = tl.load(l_base + lvl * stride_ll, mask=pmask, other=0.0).to(ACC)
        y = tl.load(l_base + lvl * stride_ll + stride_lc, mask=pmask, other=0.0).to(ACC)
        A = tl.load(a_base + lvl * stride_al, mask=pmask, other=0.0).to(ACC)
        gs, gu, gw = _sample_grad(v_base, stride_vs, stride_vd, gv_base, stride_gvs, start, Hl, Wl, x, y, A, g,
                                  pmask, dd, dmask, fix_scale, FIXED, ACC)
        tl.store(ga_base + lvl * P, gs.to(gattn_ptr.dtype.element_ty), mask=pmask)
        tl.store(gl_base + lvl * (P * 2), (A * Wl.to(ACC) * gu).to(gloc_ptr.dtype.element_ty), mask=pmask)
        tl.store(gl_base + lvl * (P * 2) + 1, (A * Hl.to(ACC) * gw).to(gloc_ptr.dtype.element_ty), mask=pmask)


# --------------------------------------------------------------------------------------------- mmfs_attn
@triton.jit
def _mmfs_lse(z_base, stride_zm, stride_zl, stride_zp, vis_ptr, n, q, stride_in, stride_iq, stride_im,
              lo, hi, L, pp, P, sink, RANGES: tl.constexpr, ACC: tl.constexpr):
    """``log(sink + sum_{visible m, l, p} exp z)`` by an online max (the sink is the logit ``log sink``).

    Returns ``(lse, lse_safe)``: ``lse`` is ``-inf`` when the denominator is 0 (``sink = 0``, nothing
    visible); ``lse_safe`` replaces that by 0 so ``exp(z - lse_safe)`` never forms ``inf - inf``.
    """
    has_sink = sink > 0
    run_max = tl.where(has_sink, tl.log(tl.maximum(sink, 1e-30)), -1e30).to(ACC)
    run_sum = tl.where(has_sink, 1.0, 0.0).to(ACC)
    for m in range(lo, hi):
        pm = _image_points(vis_ptr, n, q, m, stride_in, stride_iq, stride_im, pp, P, RANGES)
        for lvl in range(L):
            z = tl.load(z_base + m * stride_zm + lvl * stride_zl + pp * stride_zp, mask=pm,
                        other=-float("inf")).to(ACC)
            new_max = tl.maximum(run_max, tl.max(z, 0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
            run_max = new_max
    lse = run_max + tl.log(tl.maximum(run_sum, 1e-30))
    return tl.where(run_sum > 0, lse, -float("inf")), tl.where(run_sum > 0, lse, 0.0)


@triton.jit
def mmfs_fwd_kernel(value_ptr, shapes_ptr, starts_ptr, kappa_ptr, ref_ptr, off_ptr, z_ptr, vis_ptr, out_ptr, lse_ptr,
                    Lq, H, M, L, P, D, sink,
                    stride_vn, stride_vm, stride_vs, stride_vh, stride_vd,
                    stride_rn, stride_rq, stride_rc,
                    stride_fn, stride_fq, stride_fh, stride_fm, stride_fp, stride_fc,
                    stride_zn, stride_zq, stride_zh, stride_zm, stride_zl, stride_zp,
                    stride_in, stride_iq, stride_im,
                    stride_on, stride_oq, stride_od,
                    RANGES: tl.constexpr, HEAD_MAJOR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACC: tl.constexpr):
    n, q, h = _program_nqh(Lq, H, HEAD_MAJOR)
    pp = tl.arange(0, BLOCK_P)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    lo, hi = _visible_range(vis_ptr, n, q, stride_in, stride_iq, stride_im, M, RANGES)
    z_base = z_ptr + n * stride_zn + q * stride_zq + h * stride_zh
    lse, lse_safe = _mmfs_lse(z_base, stride_zm, stride_zl, stride_zp, vis_ptr, n, q, stride_in, stride_iq,
                              stride_im, lo, hi, L, pp, P, sink, RANGES, ACC)
    rx = tl.load(ref_ptr + n * stride_rn + q * stride_rq).to(ACC)
    ry = tl.load(ref_ptr + n * stride_rn + q * stride_rq + stride_rc).to(ACC)
    f_base = off_ptr + n * stride_fn + q * stride_fq + h * stride_fh + pp * stride_fp
    acc = tl.zeros((BLOCK_P, BLOCK_D), ACC)
    for m in range(lo, hi):
        pm = _image_points(vis_ptr, n, q, m, stride_in, stride_iq, stride_im, pp, P, RANGES)
        ox = tl.load(f_base + m * stride_fm, mask=pm, other=0.0).to(ACC)
        oy = tl.load(f_base + m * stride_fm + stride_fc, mask=pm, other=0.0).to(ACC)
        v_base = value_ptr + n * stride_vn + m * stride_vm + h * stride_vh
        for lvl in range(L):
            Hl, Wl, start = _level(shapes_ptr, starts_ptr, lvl)
            x = rx + ox * tl.load(kappa_ptr + 2 * lvl).to(ACC)
            y = ry + oy * tl.load(kappa_ptr + 2 * lvl + 1).to(ACC)
            z = tl.load(z_base + m * stride_zm + lvl * stride_zl + pp * stride_zp, mask=pm, other=0.0).to(ACC)
            A = tl.where(pm, tl.exp(z - lse_safe), 0.0)
            acc += A[:, None] * _sample(v_base, stride_vs, stride_vd, start, Hl, Wl, x, y, pm, dd, dmask, ACC)
    out = tl.sum(acc, 0)
    tl.store(out_ptr + n * stride_on + q * stride_oq + (h * D + dd) * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=dmask)
    tl.store(lse_ptr + (n * Lq + q) * H + h, lse.to(lse_ptr.dtype.element_ty))


@triton.jit
def mmfs_bwd_kernel(value_ptr, shapes_ptr, starts_ptr, kappa_ptr, ref_ptr, off_ptr, z_ptr, vis_ptr, lse_ptr,
                    gout_ptr, gv_ptr, fix_ptr, goff_ptr, gz_ptr, gref_ptr,
                    Lq, H, M, L, P, D,
                    stride_vn, stride_vm, stride_vs, stride_vh, stride_vd,
                    stride_rn, stride_rq, stride_rc,
                    stride_fn, stride_fq, stride_fh, stride_fm, stride_fp, stride_fc,
                    stride_zn, stride_zq, stride_zh, stride_zm, stride_zl, stride_zp,
                    stride_in, stride_iq, stride_im,
                    stride_gn, stride_gq, stride_gd,
                    stride_gvn, stride_gvm, stride_gvs, stride_gvh,
                    RANGES: tl.constexpr, HEAD_MAJOR: tl.constexpr, FIXED: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    n, q, h = _program_nqh(Lq, H, HEAD_MAJOR)
    pp = tl.arange(0, BLOCK_P)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    lo, hi = _visible_range(vis_ptr, n, q, stride_in, stride_iq, stride_im, M, RANGES)
    row = (n * Lq + q) * H + h
    lse = tl.load(lse_ptr + row).to(ACC)
    lse_safe = tl.where(lse == -float("inf"), 0.0, lse)
    g = tl.load(gout_ptr + n * stride_gn + q * stride_gq + (h * D + dd) * stride_gd, mask=dmask, other=0.0).to(ACC)
    fix_scale = tl.load(fix_ptr).to(ACC)
    rx = tl.load(ref_ptr + n * stride_rn + q * stride_rq).to(ACC)
    ry = tl.load(ref_ptr + n * stride_rn + q * stride_rq + stride_rc).to(ACC)
    z_base = z_ptr + n * stride_zn + q * stride_zq + h * stride_zh
    f_base = off_ptr + n * stride_fn + q * stride_fq + h * stride_fh + pp * stride_fp
    # goff (N, Lq, H, M, P, 2) and gz (N, Lq, H, M, L, P) are fresh zeroed contiguous buffers (entries of
    # invisible images stay 0); gz is in ACC so the delta correction below never rounds twice.
    goff_base = goff_ptr + row * (M * P * 2) + pp * 2
    gz_base = gz_ptr + row * (M * L * P) + pp
    delta = tl.zeros((BLOCK_P,), ACC)  # per-point partials of <g, out> = sum A <g, Samp>
    grx = tl.zeros((BLOCK_P,), ACC)
    gry = tl.zeros((BLOCK_P,), ACC)
    for m in range(lo, hi):
        pm = _image_points(vis_ptr, n, q, m, stride_in, stride_iq, stride_im, pp, P, RANGES)
        ox = tl.load(f_base + m * stride_fm, mask=pm, other=0.0).to(ACC)
        oy = tl.load(f_base + m * stride_fm + stride_fc, mask=pm, other=0.0).to(ACC)
        v_base = value_ptr + n * stride_vn + m * stride_vm + h * stride_vh
        gv_base = gv_ptr + n * stride_gvn + m * stride_gvm + h * stride_gvh
        gox = tl.zeros((BLOCK_P,), ACC)
        goy = tl.zeros((BLOCK_P,), ACC)
        for lvl in range(L):
            Hl, Wl, start = _level(shapes_ptr, starts_ptr, lvl)
            kx = tl.load(kappa_ptr + 2 * lvl).to(ACC)
            ky = tl.load(kappa_ptr + 2 * lvl + 1).to(ACC)
            z = tl.load(z_base + m * stride_zm + lvl * stride_zl + pp * stride_zp, mask=pm, other=0.0).to(ACC)
            A = tl.where(pm, tl.exp(z - lse_safe), 0.0)
            gs, gu, gw = _sample_grad(v_base, stride_vs, stride_vd, gv_base, stride_gvs, start, Hl, Wl,
                                      rx + ox * kx, ry + oy * ky, A, g, pm, dd, dmask, fix_scale, FIXED, ACC)
            gx = A * Wl.to(ACC) * gu  # dL/dX, never stored: folded into the offsets' and reference's grads
            gy = A * Hl.to(ACC) * gw
            gox += kx * gx
            goy += ky * gy
            grx += gx
            gry += gy
            delta += A * gs
            tl.store(gz_base + (m * L + lvl) * P, A * gs, mask=pm)
        tl.store(goff_base + m * (P * 2), gox.to(goff_ptr.dtype.element_ty), mask=pm)
        tl.store(goff_base + m * (P * 2) + 1, goy.to(goff_ptr.dtype.element_ty), mask=pm)
    # dL/dz = A (<g, Samp> - delta): the sink carries a zero vector, so delta = <g, out> exactly.
    dsum = tl.sum(delta, 0)
    for m in range(lo, hi):
        pm = _image_points(vis_ptr, n, q, m, stride_in, stride_iq, stride_im, pp, P, RANGES)
        for lvl in range(L):
            z = tl.load(z_base + m * stride_zm + lvl * stride_zl + pp * stride_zp, mask=pm, other=0.0).to(ACC)
            A = tl.where(pm, tl.exp(z - lse_safe), 0.0)
            ptrs = gz_base + (m * L + lvl) * P
            tl.store(ptrs, tl.load(ptrs, mask=pm, other=0.0) - A * dsum, mask=pm)
    tl.store(gref_ptr + row * 2, tl.sum(grx, 0))
    tl.store(gref_ptr + row * 2 + 1, tl.sum(gry, 0))


# --------------------------------------------------------------------------------------------- host side
# The four functions below are the backend contract of ``moss_kernels/deform_reference.py`` (same names,
# signatures, shapes and dtypes; the op layer has checked every argument). ``deterministic`` and
# ``head_major`` are extra keyword-only launch choices (defaults: deterministic, head-major).


def _acc(*tensors: torch.Tensor):
    """The compute dtype of the contract: float64 when any input is float64, else float32 (§d.2)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def _launch_shape(P: int, D: int) -> tuple:
    block_p = triton.next_power_of_2(max(int(P), 1))
    block_d = triton.next_power_of_2(max(int(D), 1))
    # Four corner tiles of BLOCK_P x BLOCK_D are live at once: one warp per 128 of them keeps each
    # thread at 4 values per tile; at 2 warps the MMFS backward needs 255 registers (sm_90, P=8, D=64),
    # at 4 warps 197, no spills (``python -m moss_kernels.triton_kernels.deform_attn``).
    warps = 1 if INTERPRETED else max(1, min(8, block_p * block_d // 128))
    return block_p, block_d, warps


def _levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, device: torch.device) -> tuple:
    shapes = spatial_shapes.to(device=device, dtype=torch.int64).contiguous()
    starts = level_start_index.to(device=device, dtype=torch.int64).contiguous()
    return shapes, starts


def _fixed_scale(gmax: torch.Tensor, weight_bound: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2^F`` with ``F = FIXED_BITS - ceil(log2 B)`` (a 1-element tensor on the device, no host sync);
    NaN when ``B`` is not finite.

    ``B = gmax * weight_bound`` bounds |any partial sum of any grad_value element|: an element of
    ``(n, ., h)`` receives ``A * w * g`` only from that ``(n, h)``'s queries, and ``w <= 1``. The exponent
    is clamped so that ``2^F`` is a finite float32 (``B = 0`` gives the finest scale).
    """
    bound = (gmax.double() * weight_bound.to(gmax.device).double()).clamp_min(2.0 ** -60)
    exponent = torch.ceil(torch.log2(bound)).clamp(-60.0, 64.0)
    scale = torch.exp2(FIXED_BITS - exponent)
    # Inf/NaN in grad_out or the weights cannot be held in fixed point: a NaN scale makes the whole
    # grad_value NaN (loud) instead of letting the float -> int64 conversion produce garbage.
    scale = torch.where(torch.isfinite(bound), scale, torch.full_like(scale, float("nan")))
    return scale.to(dtype).reshape(1)


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every tensor a kernel writes in full (one seam: the tests pre-fill these with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _grad_value_buffer(value: torch.Tensor, deterministic: bool, acc_dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(value.shape, dtype=torch.int64 if deterministic else acc_dtype, device=value.device)


def _finish_grad_value(buf: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return buf.to(dtype)
    return (buf.double() / scale.double()).to(dtype)  # exact: scale is a power of two


def ms_deform_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                      sampling_locations: torch.Tensor, attention_weights: torch.Tensor, *,
                      head_major: bool = True) -> torch.Tensor:
    """Forward of ``ms_deform_attn`` (MMFS.md §a.2; contract ``deform_reference.ms_deform_forward``).

    ``value (N, S, H, D)`` fp16/bf16/fp32/fp64 (any strides), ``spatial_shapes (L, 2)`` int64 rows
    ``(H_l, W_l)``, ``level_start_index (L,)`` int64, ``sampling_locations (N, Lq, H, L, P, 2)`` and
    ``attention_weights (N, Lq, H, L, P)`` of any float dtypes. Returns ``(N, Lq, H*D)`` in ``value.dtype``.
    """
    N, _, H, D = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    out = _empty((N, Lq, H * D), value.dtype, value.device)
    if out.numel() == 0:
        return out
    if value.shape[1] == 0 or P == 0:
        return out.zero_()
    shapes, starts = _levels(spatial_shapes, level_start_index, value.device)
    block_p, block_d, warps = _launch_shape(P, D)
    acc, _ = _acc(value, sampling_locations, attention_weights)
    msda_fwd_kernel[(N * Lq * H,)](
        value, shapes, starts, sampling_locations, attention_weights, out, Lq, H, L, P, D,
        *value.stride(), *sampling_locations.stride(), *attention_weights.stride(), *out.stride(),
        HEAD_MAJOR=head_major, BLOCK_P=block_p, BLOCK_D=block_d, ACC=acc, num_warps=warps)
    return out


def ms_deform_backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                       level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                       attention_weights: torch.Tensor, *, deterministic: bool = True,
                       head_major: bool = True) -> tuple:
    """Backward of ``ms_deform_attn``: ``(grad_value, grad_locations, grad_weights)``, each in its input's dtype.

    ``grad_out (N, Lq, H*D)``. ``deterministic`` selects the int64 fixed-point ``grad_value`` (bitwise
    reproducible; module docstring) over float atomics.
    """
    N, _, H, D = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    acc, acc_dtype = _acc(value, sampling_locations, attention_weights)
    gloc = _empty(sampling_locations.shape, sampling_locations.dtype, value.device)
    gattn = _empty(attention_weights.shape, attention_weights.dtype, value.device)
    gv = _grad_value_buffer(value, deterministic, acc_dtype)
    if gloc.numel() == 0 or value.numel() == 0:
        return gv.to(value.dtype), gloc.zero_(), gattn.zero_()
    scale = None
    if deterministic:
        weight_bound = attention_weights.abs().sum(dim=(1, 3, 4), dtype=torch.float64).amax()
        scale = _fixed_scale(grad_out.abs().amax(), weight_bound, acc_dtype)
    shapes, starts = _levels(spatial_shapes, level_start_index, value.device)
    block_p, block_d, warps = _launch_shape(P, D)
    msda_bwd_kernel[(N * Lq * H,)](
        value, shapes, starts, sampling_locations, attention_weights, grad_out, gv,
        scale if scale is not None else gv, gloc, gattn, Lq, H, L, P, D,
        *value.stride(), *sampling_locations.stride(), *attention_weights.stride(), *grad_out.stride(),
        gv.stride(0), gv.stride(1), gv.stride(2),
        HEAD_MAJOR=head_major, FIXED=deterministic, BLOCK_P=block_p, BLOCK_D=block_d, ACC=acc, num_warps=warps)
    return _finish_grad_value(gv, scale, value.dtype), gloc, gattn


def _mmfs_common(value, spatial_shapes, reference_points, sampling_offsets, attention_logits, visible,
                 offset_scale):
    acc, acc_dtype = _acc(value, reference_points, sampling_offsets, attention_logits, offset_scale)
    L = spatial_shapes.shape[0]
    sizes = spatial_shapes.to(device=value.device, dtype=torch.int64).prod(-1)
    shapes, starts = _levels(spatial_shapes, sizes.cumsum(0) - sizes, value.device)
    kappa = offset_scale.to(device=value.device, dtype=acc_dtype).expand(L, 2).contiguous()
    ref_strides = tuple(reference_points.stride())
    if reference_points.shape[0] == 1:  # one set of points for the whole batch
        ref_strides = (0, *ref_strides[1:])
    # A bool mask is read as bytes; int64 ranges [lo, hi) let the loops skip invisible images entirely.
    ranges = visible.dtype != torch.bool
    vis = visible if ranges else visible.view(torch.uint8)
    return acc, acc_dtype, shapes, starts, kappa, ref_strides, vis, ranges


def mmfs_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, reference_points: torch.Tensor,
                 sampling_offsets: torch.Tensor, attention_logits: torch.Tensor, visible: torch.Tensor,
                 offset_scale: torch.Tensor, sink: float, *, head_major: bool = True) -> tuple:
    """Forward of ``mmfs_attn`` (MMFS.md §c.2; contract ``deform_reference.mmfs_forward``).

    ``value (N, M, S, H, D)``; ``spatial_shapes (L, 2)`` per image; ``reference_points (N or 1, Lq, 2)``;
    ``sampling_offsets (N, Lq, H, M, P, 2)``; ``attention_logits (N, Lq, H, M, L, P)``; ``visible``
    int64 ranges ``(N, Lq, 2)`` (``[lo, hi)``) or bool ``(N, Lq, M)``; ``offset_scale (L, 2)``;
    ``sink >= 0``. Returns ``(out (N, Lq, H*D) in value.dtype, lse (N, Lq, H) in the compute dtype)``,
    ``lse = log(sink + sum_visible exp z)`` (``-inf`` when that is 0; the output is then 0).
    """
    N, M, _, H, D = value.shape
    Lq, P = sampling_offsets.shape[1], sampling_offsets.shape[4]
    acc, acc_dtype, shapes, starts, kappa, ref_strides, vis, ranges = _mmfs_common(
        value, spatial_shapes, reference_points, sampling_offsets, attention_logits, visible, offset_scale)
    L = shapes.shape[0]
    out = _empty((N, Lq, H * D), value.dtype, value.device)
    lse = _empty((N, Lq, H), acc_dtype, value.device)
    if out.numel() == 0:
        return out, lse
    block_p, block_d, warps = _launch_shape(P, D)
    mmfs_fwd_kernel[(N * Lq * H,)](
        value, shapes, starts, kappa, reference_points, sampling_offsets, attention_logits, vis, out, lse,
        Lq, H, M, L, P, D, float(sink),
        *value.stride(), *ref_strides, *sampling_offsets.stride(), *attention_logits.stride(), *vis.stride(),
        *out.stride(),
        RANGES=ranges, HEAD_MAJOR=head_major, BLOCK_P=block_p, BLOCK_D=block_d, ACC=acc, num_warps=warps)
    return out, lse


def mmfs_backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                  reference_points: torch.Tensor, sampling_offsets: torch.Tensor, attention_logits: torch.Tensor,
                  visible: torch.Tensor, offset_scale: torch.Tensor, sink: float, lse: torch.Tensor, *,
                  deterministic: bool = True, head_major: bool = True) -> tuple:
    """Backward of ``mmfs_attn`` from the saved ``lse`` only (the softmax weights are recomputed;
    ``sink`` is inside ``lse`` and not read again).

    Returns ``(grad_value (N, M, S, H, D), grad_reference_points (reference_points' shape),
    grad_offsets (N, Lq, H, M, P, 2), grad_logits (N, Lq, H, M, L, P))`` in the inputs' dtypes.
    """
    del sink
    N, M, _, H, D = value.shape
    Lq, P = sampling_offsets.shape[1], sampling_offsets.shape[4]
    acc, acc_dtype, shapes, starts, kappa, ref_strides, vis, ranges = _mmfs_common(
        value, spatial_shapes, reference_points, sampling_offsets, attention_logits, visible, offset_scale)
    L = shapes.shape[0]
    dev = value.device
    goff = torch.zeros(sampling_offsets.shape, dtype=sampling_offsets.dtype, device=dev)
    gz = torch.zeros(attention_logits.shape, dtype=acc_dtype, device=dev)
    gref = torch.zeros((N, Lq, H, 2), dtype=acc_dtype, device=dev)
    gv = _grad_value_buffer(value, deterministic, acc_dtype)
    scale = None
    if N * Lq * H > 0 and value.numel() > 0:
        if deterministic:  # the softmax weights of one (n, q, h) sum to at most 1: B <= Lq * max|g|
            scale = _fixed_scale(grad_out.abs().amax(), torch.tensor(float(Lq)), acc_dtype)
        block_p, block_d, warps = _launch_shape(P, D)
        mmfs_bwd_kernel[(N * Lq * H,)](
            value, shapes, starts, kappa, reference_points, sampling_offsets, attention_logits, vis, lse,
            grad_out, gv, scale if scale is not None else gv, goff, gz, gref,
            Lq, H, M, L, P, D,
            *value.stride(), *ref_strides, *sampling_offsets.stride(), *attention_logits.stride(), *vis.stride(),
            *grad_out.stride(), gv.stride(0), gv.stride(1), gv.stride(2), gv.stride(3),
            RANGES=ranges, HEAD_MAJOR=head_major, FIXED=deterministic, BLOCK_P=block_p, BLOCK_D=block_d,
            ACC=acc, num_warps=warps)
    grad_ref = gref.sum(2)  # over heads, in a fixed order
    if reference_points.shape[0] == 1 and N != 1:
        grad_ref = grad_ref.sum(0, keepdim=True)
    return (_finish_grad_value(gv, scale, value.dtype), grad_ref.to(reference_points.dtype), goff,
            gz.to(attention_logits.dtype))


# --------------------------------------------------------------------------------------------- cost model
def cost_model(N: int, Lq: int, H: int, D: int, levels, P: int, *, M: int = 1, visible_fraction: float = 1.0,
               value_bytes: int = 2, coord_bytes: int = 4) -> dict:
    """Bytes a forward must move at least, for the GPU target "within 1.5x of the bytes floor".

    ``levels``: ``[(H_l, W_l), ...]`` per image. The floor counts each input once and the output once:
    value ``N*M*S*H*D``, offsets/locations, logits/weights, output ``N*Lq*H*D``. ``gathered`` is what
    the kernel actually requests from L2 (4 corners x D channels per visible sample); it exceeds the
    floor when samples do not share cache lines, so the floor is reached only if L2 absorbs the reuse
    (value slices of one (n, h) are ``S*D*value_bytes``: 172 KiB for S=1344, D=64, fp16).
    """
    S = sum(h * w for h, w in levels)
    L = len(levels)
    samples = N * Lq * H * M * L * P * visible_fraction
    gathered = samples * 4 * D * value_bytes
    # A value element that no sample touches need not be read: the value term is capped by what is
    # gathered (this matters for decode, Lq = 1, where few pixels are read).
    floor = (min(N * M * S * H * D * value_bytes, gathered)
             + N * Lq * H * M * P * 2 * coord_bytes    # offsets (MMFS; MSDA reads L times as many locations)
             + N * Lq * H * M * L * P * coord_bytes    # logits / weights
             + N * Lq * H * D * value_bytes)           # output
    return {"samples": samples, "floor_bytes": floor, "gathered_bytes": gathered, "flops": samples * (8 * D + 40)}


# --------------------------------------------------------------------------------------------- resources
def _resource_cases(value: str = "bf16"):
    f32, i64 = "*fp32", "*i64"
    v = f"*{value}"
    ints = {"Lq", "H", "L", "P", "D", "M"}

    def sig(kernel, ptrs: dict):
        out = {}
        for name in kernel.arg_names:
            if name in ptrs:
                out[name] = ptrs[name]
            elif name.endswith("_ptr"):
                out[name] = v
            elif name == "sink":
                out[name] = "fp32"
            elif name in ints or name.startswith("stride_"):
                out[name] = "i32" if name in ints else "i64"
        return out

    consts = dict(HEAD_MAJOR=True, BLOCK_P=8, BLOCK_D=64, ACC=tl.float32)
    unit = ("stride_vd", "stride_od", "stride_gd", "stride_lc", "stride_fc", "stride_rc", "stride_zp", "stride_ap")
    base = {"shapes_ptr": i64, "starts_ptr": i64, "loc_ptr": f32, "attn_ptr": f32, "kappa_ptr": f32,
            "ref_ptr": f32, "off_ptr": f32, "z_ptr": f32, "lse_ptr": f32, "fix_ptr": f32, "gloc_ptr": f32,
            "gattn_ptr": f32, "goff_ptr": f32, "gz_ptr": f32, "gref_ptr": f32}
    yield "msda_fwd", msda_fwd_kernel, sig(msda_fwd_kernel, base), consts, unit
    for fixed in (True, False):
        ptrs = {**base, "gv_ptr": i64 if fixed else f32}
        yield (f"msda_bwd {'int64 fixed' if fixed else 'fp32 atomic'}", msda_bwd_kernel,
               sig(msda_bwd_kernel, ptrs), {**consts, "FIXED": fixed}, unit)
    ptrs = {**base, "vis_ptr": i64}
    yield "mmfs_fwd ranges", mmfs_fwd_kernel, sig(mmfs_fwd_kernel, ptrs), {**consts, "RANGES": True}, unit
    for fixed in (True, False):
        ptrs = {**base, "vis_ptr": i64, "gv_ptr": i64 if fixed else f32}
        yield (f"mmfs_bwd ranges {'int64 fixed' if fixed else 'fp32 atomic'}", mmfs_bwd_kernel,
               sig(mmfs_bwd_kernel, ptrs), {**consts, "RANGES": True, "FIXED": fixed}, unit)


def compile_resources(arch: int = 90, num_warps: int = 2, value: str = "bf16") -> list:
    """Compile every kernel for ``sm_<arch>`` (no GPU needed) -> ``[(label, "regs .. stack .. shared ..")]``."""
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .resources import _cuobjdump

    rows = []
    for label, kernel, sig, consts, unit in _resource_cases(value):
        consts = {**consts, **{u: 1 for u in unit if u in kernel.arg_names}}
        sig = {k: ("constexpr" if k in consts else t) for k, t in sig.items()}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if name.endswith("_ptr")}
        src = ASTSource(fn=kernel, signature=sig,
                        constexprs={(kernel.arg_names.index(k),): c for k, c in consts.items()}, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": 1})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                                  text=True).stdout
        usage = next((line for line in dump.splitlines() if "REG:" in line), "")
        fields = dict(part.split(":") for part in usage.split() if ":" in part)
        rows.append((label, f"regs {fields.get('REG', '?'):>3}  stack {fields.get('STACK', '?'):>4}  "
                            f"shared {compiled.metadata.shared} B"))
    return rows


# The MMFS.md §e shapes the GPU targets are about (mmfs_attn; causal: image m starts at query m * Lq / M).
BENCH_SHAPES = {
    "LLM-pairs": dict(N=2, Lq=2048, H=16, D=64, levels=((32, 32), (16, 16), (8, 8)), P=8, M=30, causal=True),
    "LLM-decode": dict(N=8, Lq=1, H=16, D=64, levels=((32, 32), (16, 16), (8, 8)), P=8, M=8, causal=False),
    "UNet-64": dict(N=16, Lq=4096, H=16, D=64, levels=((64, 64), (32, 32), (16, 16), (8, 8)), P=8, M=1,
                    causal=False),
}


def _bench_inputs(N, Lq, H, D, levels, P, M, causal, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    L, S = len(levels), sum(h * w for h, w in levels)
    value = torch.randn(N, M, S, H, D, generator=gen).to(device, dtype)
    ref = torch.full((N, Lq, 2), 0.5, device=device)
    off = (torch.rand(N, Lq, H, M, P, 2, generator=gen) * 6 - 3).to(device)  # the init distribution U(-3, 3)
    logits = torch.randn(N, Lq, H, M, L, P, generator=gen).to(device)
    kappa = torch.full((L, 2), 1.0 / levels[0][0], device=device)  # (s_l / s_base) / s_l for square maps
    hi = torch.full((N, Lq), M, dtype=torch.int64)
    if causal:
        hi = ((torch.arange(Lq) * M) // Lq + 1).clamp(max=M).expand(N, Lq)
    ranges = torch.stack([torch.zeros_like(hi), hi], -1).to(device).contiguous()
    sizes = torch.tensor(levels, dtype=torch.int64, device=device)
    return (value, sizes, ref, off, logits, ranges, kappa), float(hi.double().mean() / M)


def _timed(fn, reps: int, device) -> float:
    """Median seconds of ``reps`` calls after one warm-up (CUDA events on a GPU)."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(names=tuple(BENCH_SHAPES), dtype=torch.bfloat16, scale: float = 1.0, reps: int = 10,
          bandwidth: float = 4.8e12, device: Optional[torch.device] = None) -> list:
    """Time ``mmfs_attn``'s kernels on the §e shapes (``Lq`` and ``M`` multiplied by ``scale``, at least 1).

    Per shape: forward seconds and its ratio to the bytes floor at ``bandwidth`` B/s (target <= 1.5),
    the deterministic and the float-atomic backward and their ratio (target <= 1.3), and whether
    ``grad_value`` is bitwise identical over 5 runs and both launch orders. Runs on a GPU, or on the
    CPU under the interpreter with a small ``scale`` (a smoke test of this code, no speed meaning).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for name in names:
        kw = dict(BENCH_SHAPES[name])
        for key in ("Lq", "M"):
            kw[key] = max(1, int(kw[key] * scale))
        args, visible = _bench_inputs(**kw, dtype=dtype, device=device)
        out, lse = mmfs_forward(*args, 1.0)
        g = torch.randn_like(out)
        t_fwd = _timed(lambda args=args: mmfs_forward(*args, 1.0), reps, device)
        t_det = _timed(lambda args=args, g=g, lse=lse: mmfs_backward(g, *args, 1.0, lse), reps, device)
        t_atomic = _timed(lambda args=args, g=g, lse=lse: mmfs_backward(g, *args, 1.0, lse, deterministic=False),
                          reps, device)
        first = mmfs_backward(g, *args, 1.0, lse)[0]
        same = all(torch.equal(first, mmfs_backward(g, *args, 1.0, lse, head_major=hm)[0])
                   for hm in (True, True, True, True, False))
        c = cost_model(kw["N"], kw["Lq"], kw["H"], kw["D"], kw["levels"], kw["P"], M=kw["M"],
                       visible_fraction=visible, value_bytes=value_bytes(dtype))
        floor_s = c["floor_bytes"] / bandwidth
        rows.append(dict(shape=name, fwd_s=t_fwd, floor_s=floor_s, fwd_over_floor=t_fwd / floor_s,
                         bwd_det_s=t_det, bwd_atomic_s=t_atomic, det_over_atomic=t_det / t_atomic,
                         bitwise=same, **{k: kw[k] for k in ("N", "Lq", "M")}))
    return rows


def value_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="registers/spills of the deformable-attention kernels and the "
                                                 "bytes floor of the MMFS.md §e shapes; --bench times them")
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--bench", action="store_true", help="time the kernels (a GPU, or the interpreter)")
    parser.add_argument("--scale", type=float, default=1.0, help="--bench: multiply Lq and M by this")
    parser.add_argument("--bandwidth", type=float, default=4.8e12, help="--bench: B/s of the floor (H200)")
    parser.add_argument("--reps", type=int, default=10, help="--bench: timed calls per measurement")
    parser.add_argument("--shapes", nargs="+", default=list(BENCH_SHAPES), choices=list(BENCH_SHAPES))
    args = parser.parse_args(argv)
    if args.bench:
        for row in bench(args.shapes, scale=args.scale, reps=args.reps, bandwidth=args.bandwidth):
            print(f"{row['shape']:<11} N={row['N']} Lq={row['Lq']} M={row['M']}  fwd {row['fwd_s'] * 1e3:8.3f} ms "
                  f"({row['fwd_over_floor']:5.2f}x floor {row['floor_s'] * 1e3:.3f} ms)  bwd det "
                  f"{row['bwd_det_s'] * 1e3:8.3f} ms / atomic {row['bwd_atomic_s'] * 1e3:8.3f} ms "
                  f"= {row['det_over_atomic']:4.2f}x  grad_value bitwise: {row['bitwise']}")
        return
    if INTERPRETED:
        raise SystemExit("unset TRITON_INTERPRET: interpreter kernels cannot be compiled")
    for arch in args.arch:
        for warps in args.warps:
            for label, report in compile_resources(arch, warps):
                print(f"sm_{arch} w{warps}  P=8 D=64 bf16  {label:<30} {report}")
    for name, kw in BENCH_SHAPES.items():
        visible = 0.5 if kw["causal"] else 1.0  # causal: query q sees about (q / Lq) M images
        c = cost_model(kw["N"], kw["Lq"], kw["H"], kw["D"], kw["levels"], kw["P"], M=kw["M"],
                       visible_fraction=visible)
        ratio = c["gathered_bytes"] / c["floor_bytes"]
        print(f"{name:<11} samples {c['samples'] / 1e6:8.1f} M  floor {c['floor_bytes'] / 2**20:9.1f} MiB  "
              f"gathered {c['gathered_bytes'] / 2**30:7.2f} GiB ({ratio:5.1f}x floor)  "
              f"floor @4.8 TB/s {c['floor_bytes'] / 4.8e12 * 1e6:8.1f} us  flops {c['flops'] / 1e9:7.1f} G")


if __name__ == "__main__":
    main()
