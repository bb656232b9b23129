"""Forward: the rank-``r`` projection of routed rows and its expansion into the base output.

``rank_kernel`` is the one kernel that reads ``d``-wide rows through the layout's tables. Per tile of
``BLOCK_M`` same-modality tokens (consecutive entries of ``text_rows`` or ``image_rows``; image rows
are in raster order, so the rows ``W`` back that the upper taps read were just read by earlier tiles
and sit in L2) it runs the implicit GEMM ``h = sum_tap x[src(tap)] W_tap^T`` (``K = taps * d_in``, the
load pointer switching per tap, padded neighbours masked) and, when the whole rank fits one tile
(``r <= FUSE_MAX_R``), multiplies by ``B`` and adds ``scale * h B^T`` into ``out`` in the same launch:
the intermediate never leaves the chip except as the ``r``-wide copy saved for backward. Larger ranks
split the rank over programs and expand in a second launch (``expand_kernel``).

The same kernel, with other tables, computes the new pending sums of a ``ConvLoRAState`` and, in
backward, ``dz = scale * grad_out B`` (one tap, ``B^T`` as the weight).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune, dot_dtype, dummy, expand_into, mma, pow2, rank_dot, shrink_tap

__all__ = ["FUSE_MAX_R", "SPLIT_BLOCK_R", "expand", "expand_kernel", "forward", "project", "rank_kernel", "stacked"]

# Ranks whose padded width is at most this run the one-pass kernel: a 64 x 256 float32 accumulator is
# 64 registers a thread at 8 warps (plus its half copy for the expansion MMA), the most that stays out
# of local memory; wider ranks would spill.
FUSE_MAX_R = 256
SPLIT_BLOCK_R = 128


def _rank_prune(configs, named_args, **kwargs):
    """Drop configs whose (BLOCK_M x BLOCK_R) accumulator would spill (BLOCK_R comes from the caller)."""
    block_r = kwargs.get("BLOCK_R", named_args.get("BLOCK_R"))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * block_r <= 64 * 256]
    return kept or configs[:1]


_RANK_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bk, bn, w, s in [
        # Chosen from ptxas reports (python -m moss_kernels.triton_kernels.resources): no spills on sm_80/sm_90.
        (64, 32, 64, 8, 3), (64, 32, 64, 8, 2), (32, 32, 64, 4, 3), (64, 64, 64, 8, 2), (128, 32, 64, 8, 3),
    ]
]


@autotune(_RANK_CONFIGS, key=["K", "R", "N", "TAPS", "FUSE", "BLOCK_R"],
          interpreter_config=triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32}),
          prune_configs_by={"early_config_prune": _rank_prune}, restore_value=["out_ptr", "h_ptr"])
@triton.jit(do_not_specialize=["M"])
def rank_kernel(
    x_ptr, stride_xm, stride_xk,  # (rows, K) activations or grad_out
    rows_ptr,  # (M,) int64 x-rows of the tokens (INDIRECT: the table src indexes into)
    src_ptr, stride_src,  # INDIRECT: (M, TAPS) int64 index into rows_ptr per tap, -1 = zero padding
    w_ptr, stride_wt, stride_wr, stride_wk,  # weight element (tap, j, c)
    add_ptr, stride_am, add_idx_ptr,  # ADD: h[m] += add[add_idx[m]] where add_idx[m] >= 0 (pending sums)
    h_ptr, stride_hm, h_idx_ptr,  # STORE_H: h[m] (or h[h_idx[m]] with STORE_IDX) = result, cast
    b_ptr, stride_bn, stride_br, out_ptr, stride_om, stride_on,  # FUSE: out[rows[m]] += alpha_out h B^T
    M, K, R, N, alpha_in, alpha_out,
    TAPS: tl.constexpr, INDIRECT: tl.constexpr, ADD: tl.constexpr, STORE_H: tl.constexpr,
    STORE_IDX: tl.constexpr, FUSE: tl.constexpr, DOT: tl.constexpr, DOT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``h[m] = alpha_in * sum_tap x[row(m, tap)] W_tap^T (+ add)``; optionally ``out += alpha_out h B^T``."""
    m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mmask = m < M
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for t in range(TAPS):
        if INDIRECT:
            loc = tl.load(src_ptr + m * stride_src + t, mask=mmask, other=-1)
            ok = loc >= 0
            xrow = tl.load(rows_ptr + loc, mask=ok, other=0)
        else:
            ok = mmask
            xrow = tl.load(rows_ptr + m, mask=mmask, other=0)
        acc = shrink_tap(acc, x_ptr, xrow, ok, stride_xm, stride_xk, w_ptr + t * stride_wt, stride_wr, stride_wk,
                         rr, rmask, K, BLOCK_K, DOT)
    acc = acc * tl.cast(alpha_in, tl.float32)
    if ADD:
        slot = tl.load(add_idx_ptr + m, mask=mmask, other=-1)
        sm = (slot >= 0)[:, None] & rmask[None, :]
        acc += tl.load(add_ptr + slot[:, None] * stride_am + rr[None, :], mask=sm, other=0.0).to(tl.float32)
    if STORE_H:
        if STORE_IDX:
            hrow = tl.load(h_idx_ptr + m, mask=mmask, other=0)
        else:
            hrow = m
        tl.store(h_ptr + hrow[:, None] * stride_hm + rr[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=mmask[:, None] & rmask[None, :])
    if FUSE:
        orow = tl.load(rows_ptr + m, mask=mmask, other=0)
        expand_into(acc, rr, rmask, b_ptr, stride_bn, stride_br, out_ptr, orow, mmask, stride_om, stride_on, N,
                    tl.cast(alpha_out, tl.float32), True, BLOCK_M, BLOCK_N, DOT_OUT)


_EXPAND_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br}, num_warps=w, num_stages=s)
    for bm, bn, br, w, s in [(128, 128, 32, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4)]
]


@autotune(_EXPAND_CONFIGS, key=["N", "R", "TAPS", "GATHER", "ACCUMULATE"],
          interpreter_config=triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_R": 32}),
          restore_value=["out_ptr"])
@triton.jit(do_not_specialize=["M"])
def expand_kernel(
    h_ptr, stride_hm,  # (n_h, R) float32 rank-space rows
    tgt_ptr, stride_tg,  # GATHER: (M, TAPS) int64 h-row per tap, -1 = none; else h-row m
    m_ptr, stride_mt, stride_mn, stride_mr,  # matrix element (tap, n, j)
    rows_ptr, out_ptr, stride_om, stride_on,  # out row of token m: rows[m]
    M, N, R, alpha,
    TAPS: tl.constexpr, GATHER: tl.constexpr, ACCUMULATE: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``out[rows[m], n] (+)= alpha * sum_tap sum_j h[row(m, tap), j] Mat_tap[n, j]`` (gather, no atomics)."""
    m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mmask = m < M
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    cr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for t in range(TAPS):
        if GATHER:
            src = tl.load(tgt_ptr + m * stride_tg + t, mask=mmask, other=-1)
            ok = src >= 0
        else:
            src = m
            ok = mmask
        for j0 in range(0, R, BLOCK_R):
            j = j0 + cr
            jm = j < R
            ht = tl.load(h_ptr + src[:, None] * stride_hm + j[None, :], mask=ok[:, None] & jm[None, :], other=0.0)
            mt = tl.load(m_ptr + t * stride_mt + n[None, :] * stride_mn + j[:, None] * stride_mr,
                         mask=jm[:, None] & nmask[None, :], other=0.0)
            acc = mma(ht, mt, acc, DOT)
    acc = acc * tl.cast(alpha, tl.float32)
    orow = tl.load(rows_ptr + m, mask=mmask, other=0)
    ptrs = out_ptr + orow[:, None] * stride_om + n[None, :] * stride_on
    omask = mmask[:, None] & nmask[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=omask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


# ---------------------------------------------------------------------------- host side
def _grid_mr(n_rows: int, r_tiles: int):
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), r_tiles)


def project(
    x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, *, sources: torch.Tensor | None = None,
    alpha: float = 1.0, add: tuple | None = None, store: tuple | None = None,
    expand_to: tuple | None = None, dot_inputs: tuple = (),
) -> torch.Tensor | None:
    """Launch ``rank_kernel``: ``alpha * sum_tap x[row(m, tap)] W_tap^T`` for ``M`` tokens.

    Args:
        x: ``(rows, K)``, any row stride.
        rows: ``(n,)`` int64 rows of ``x``; without ``sources`` token ``m`` reads ``x[rows[m]]``.
        weight: ``(taps, r, K)`` (any strides): tap ``t``'s ``W_t``.
        sources: ``(M, taps)`` int64 indices into ``rows`` (``-1``: zero padding), or ``None``.
        add: ``(table (n_slots, r), index (M,))``: adds ``table[index[m]]`` where ``index >= 0``.
        store: ``(dest, index or None)``: the result goes to ``dest[index[m]]`` (cast to its dtype)
            instead of a new float32 ``(M, r)`` tensor.
        expand_to: ``(out (rows, N), b (N, r), scale)``: also ``out[rows[m]] += scale * h B^T``.
        dot_inputs: every user tensor of the call (``x``, all the adapter's weights; see ``dot_dtype``).
    Returns the new ``(M, r)`` float32 ``h``, or ``None`` with ``store``.
    """
    taps, R, K = weight.shape
    M = rows.numel() if sources is None else sources.shape[0]
    h = torch.empty(M, R, dtype=torch.float32, device=x.device) if store is None else None
    dest, dest_idx = (h, None) if store is None else store
    add_tab, add_idx = add if add is not None else (dummy(x), dummy(rows))
    block_r = pow2(R)
    fuse = expand_to is not None and block_r <= FUSE_MAX_R
    if not fuse:
        block_r = min(block_r, SPLIT_BLOCK_R)
    if fuse:
        out, b, scale = expand_to
        b_args = (b, b.stride(0), b.stride(1), out, out.stride(0), out.stride(1))
        n_out, dot_out = out.shape[1], rank_dot(dot_dtype(*dot_inputs))
    else:
        b_args = (dummy(x), 0, 0, dummy(x), 0, 0)
        n_out, dot_out, scale = 0, dot_dtype(), 1.0
    src = sources if sources is not None else dummy(rows)
    rank_kernel[_grid_mr(M, 1 if fuse else triton.cdiv(R, block_r))](
        x, x.stride(0), x.stride(1), rows, src, taps if sources is None else sources.stride(0),
        weight, weight.stride(0), weight.stride(1), weight.stride(2),
        add_tab, add_tab.stride(0), add_idx,
        dest, dest.stride(0), dest_idx if dest_idx is not None else dummy(rows),
        *b_args, M, K, R, n_out, float(alpha), float(scale),
        TAPS=taps, INDIRECT=sources is not None, ADD=add is not None, STORE_H=True,
        STORE_IDX=dest_idx is not None, FUSE=fuse, DOT=dot_dtype(*dot_inputs), DOT_OUT=dot_out, BLOCK_R=block_r,
    )
    if expand_to is not None and not fuse:
        out, b, scale = expand_to
        expand(h, rows, b.unsqueeze(0), out, scale, accumulate=True, dot_inputs=dot_inputs)
    return h


def expand(
    h: torch.Tensor, rows: torch.Tensor, mat: torch.Tensor, out: torch.Tensor, alpha: float, *,
    targets: torch.Tensor | None = None, accumulate: bool, dot_inputs: tuple,
) -> None:
    """Launch ``expand_kernel``: ``out[rows[m]] (+)= alpha * sum_tap h[row(m, tap)] Mat_tap^T``.

    ``h``: ``(n_h, r)`` float32, contiguous. ``mat``: ``(taps, N, r)`` (any strides). ``targets``:
    ``(M, taps)`` int64 rows of ``h`` per tap (``-1``: none); without it token ``m`` reads ``h[m]``.
    ``dot_inputs``: every user tensor of the call (``h`` is an intermediate: ``rank_dot``).
    """
    taps, N, R = mat.shape
    M = rows.numel()
    tg = targets if targets is not None else dummy(rows)
    expand_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
        h, h.stride(0), tg, taps if targets is None else targets.stride(0),
        mat, mat.stride(0), mat.stride(1), mat.stride(2), rows, out, out.stride(0), out.stride(1),
        M, N, R, float(alpha),
        TAPS=taps, GATHER=targets is not None, ACCUMULATE=accumulate, DOT=rank_dot(dot_dtype(*dot_inputs)),
    )


def stacked(image_weight: torch.Tensor) -> torch.Tensor:
    """``(r, d_in, k, k)`` -> ``(k*k, r, d_in)``, tap ``a*k+b`` major, contiguous: each tap's rows read
    along ``d_in`` with unit stride (a copy of the weight, never of activations; the GEMMs re-read it
    many times). The decode step reads the weight in place instead (``decode.py``)."""
    r, d_in, k, _ = image_weight.shape
    return image_weight.permute(2, 3, 0, 1).reshape(k * k, r, d_in).contiguous()


def forward(x, out, text_rows, image_rows, conv_sources, text_a, text_b, image_weight, image_b, scale,
            pending=None, state_index=None):
    """``reference.forward``'s contract (see ``moss_kernels.backends``): ``out (N, d_out) += scale * delta``
    in place; returns ``(text_h (n_text, r_t), image_z (n_image, r))`` float32, ``None`` where absent."""
    text_h = image_z = None
    if text_a is not None and text_rows.numel():
        text_h = project(x, text_rows, text_a.unsqueeze(0), expand_to=(out, text_b, scale),
                         dot_inputs=(x, text_a, text_b))
    if image_weight is not None and image_rows.numel():
        k = image_weight.shape[-1]
        w = stacked(image_weight)
        # k == 1: the only tap is the token itself, so the source table is the identity.
        sources = conv_sources if k > 1 else None
        add = None
        if state_index is not None and state_index.read_tokens.numel():
            # Dense per-token slot table (-1: nothing pending), so the kernel adds the pending sum in-tile.
            slot_of = torch.full((image_rows.numel(),), -1, dtype=torch.int64, device=x.device)
            slot_of.index_copy_(0, state_index.read_tokens, state_index.read_slots)
            add = (pending, slot_of)
        image_z = project(x, image_rows, w, sources=sources, add=add, expand_to=(out, image_b, scale),
                          dot_inputs=(x, image_weight, image_b))
        if state_index is not None and state_index.write_slots.numel():
            # After the reads above (stream order): the same slots may be read and then rewritten.
            keep = torch.where(state_index.write_keep, state_index.write_slots, -1)
            project(x, image_rows, w, sources=state_index.write_sources, add=(pending, keep),
                    store=(pending, state_index.write_slots), dot_inputs=(x, image_weight, image_b))
    return text_h, image_z

