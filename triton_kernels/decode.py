"""Decode step: one token per sequence, one launch, graph-capturable.

The grid depends only on the batch size (a shape), positions are read on the device, nothing is
synchronised with the host: ``torch.cuda.graphs`` can capture it. A program owns ``BLOCK_B`` sequences
(and their rows of the pending ring, so no two programs touch the same slot) and:

1. reads the pending sum earlier tokens left for its image token (slot ``p mod L``);
2. for every tap computes ``P_tap = x W_tap^T``: the token's own tap (``(k-1, k-1)``) joins ``z``, the
   others go to the ring for the later tokens they reach (tap ``(0, 0)`` lands on slot ``p mod L``
   itself, which it overwrites: that slot's sum was just consumed);
3. adds ``scale * (h_text B_t^T + z B_i^T)`` into ``out`` (each row has only one of them non-zero).

A block with no text (no image) row skips reading the text (image) weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune, dot_dtype, dummy, mma, pow2, rank_dot, shrink_tap
from .forward import stacked

__all__ = ["BLOCK_B", "ONE_LAUNCH_MAX_R", "SPLIT_BATCH_MAX", "decode_expand_kernel", "decode_kernel",
           "decode_rank_kernel", "decode_step"]

BLOCK_B = 16  # sequences per program: the smallest tl.dot tile
SPLIT_BLOCK_R = 32  # rank columns per program of the split step's first launch
# Up to this batch the split step runs (more programs than BLOCK_B-sequence blocks alone would give);
# larger batches already fill the GPU with the one-launch kernel.
SPLIT_BATCH_MAX = 64
ONE_LAUNCH_MAX_R = 256


@triton.jit
def _text_rank(row, is_txt, x_ptr, stride_xm, stride_xk, ta_ptr, stride_tar, stride_tak, rt, rtm, K,
               BLOCK_B: tl.constexpr, BLOCK_RT: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """``h = x A^T`` for the text rows of the block, columns ``rt`` (zeros elsewhere; A unread if no text)."""
    h = tl.zeros((BLOCK_B, BLOCK_RT), tl.float32)
    if tl.sum(is_txt.to(tl.int32)) > 0:
        h = shrink_tap(h, x_ptr, row, is_txt, stride_xm, stride_xk, ta_ptr, stride_tar, stride_tak, rt, rtm, K,
                       BLOCK_K, DOT)
    return h


@triton.jit
def _image_rank(row, bmask, pos, is_img, x_ptr, stride_xm, stride_xk, w_ptr, stride_wt, stride_wr, stride_wk,
                ri, rim, pend_ptr, stride_pb, stride_ps, stride_pr, height_ptr, width_ptr, capacity, K,
                KS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_RI: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT: tl.constexpr):
    """``z`` of the image rows of the block for rank columns ``ri``, and those columns of their rings
    updated (steps 1-2 of the module docstring); programs with disjoint ``ri`` never share a slot.

    A row whose position lies outside its image, or whose ring exceeds ``capacity`` slots, reads and
    writes nothing (``z = 0``): the ops refuse such input first, this keeps every access in bounds."""
    z = tl.zeros((BLOCK_B, BLOCK_RI), tl.float32)
    H = tl.load(height_ptr + row, mask=bmask, other=1)
    W = tl.maximum(tl.load(width_ptr + row, mask=bmask, other=1), 1)
    p = tl.maximum(pos, 0)
    valid = is_img & (H >= 1) & (tl.load(width_ptr + row, mask=bmask, other=1) >= 1) & (p // W < H)
    if KS > 1:
        valid = valid & (W <= capacity // (KS - 1) - 1)  # (k-1)(W+1) <= capacity, without overflow
    if tl.sum(valid.to(tl.int32)) > 0:
        if KS > 1:
            L = (KS - 1) * (tl.where(valid, W, 0) + 1)
            i = p // W
            j = p % W
            ring = pend_ptr + row[:, None] * stride_pb + ri[None, :] * stride_pr
            own = valid[:, None] & rim[None, :]
            # Token 0 has no earlier contributor: its slot may hold an earlier image's leftovers.
            z = tl.load(ring + (p % L)[:, None] * stride_ps, mask=own & (p > 0)[:, None], other=0.0).to(tl.float32)
            # The tap-0 store below rewrites the slot just read, from other threads of the program: order them.
            tl.debug_barrier()
        for t in tl.static_range(KS * KS):
            P = shrink_tap(tl.zeros((BLOCK_B, BLOCK_RI), tl.float32), x_ptr, row, valid, stride_xm, stride_xk,
                           w_ptr + t * stride_wt, stride_wr, stride_wk, ri, rim, K, BLOCK_K, DOT)
            if t == KS * KS - 1:
                z += P
            else:
                di = KS - 1 - t // KS
                dj = KS - 1 - t % KS
                ok = valid & (i < H - di) & (j + dj < W)
                ptrs = ring + ((p % L + di * W + dj) % L)[:, None] * stride_ps
                if t == 0:
                    # Slot p mod L itself: its old sum is in z now; it restarts with this tap (or zero).
                    tl.store(ptrs, tl.where(ok[:, None], P, 0.0).to(pend_ptr.dtype.element_ty), mask=own)
                else:
                    # The target's earliest contributor (layout.first_contributor) writes, later ones add.
                    first = ((i == 0) | (i * 0 + di == KS - 1)) & ((j == 0) | (j * 0 + dj == KS - 1))
                    m2 = ok[:, None] & rim[None, :]
                    old = tl.load(ptrs, mask=m2 & ~first[:, None], other=0.0).to(tl.float32)
                    tl.store(ptrs, (old + P).to(pend_ptr.dtype.element_ty), mask=m2)
    return z


@triton.jit
def _expand_rows(h, rt, rtm, tb_ptr, stride_tbn, stride_tbr, z, ri, rim, ib_ptr, stride_ibn, stride_ibr,
                 out_ptr, row, bmask, stride_om, stride_on, n_lo, n_hi, N, scale,
                 HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_TB: tl.constexpr, DOT_IB: tl.constexpr):
    """``out[row, n_lo:n_hi] += scale * (h B_t^T + z B_i^T)`` (a row's other part is zero)."""
    hq = h.to(DOT_TB)  # rounded once, not once per strip
    zq = z.to(DOT_IB)
    cn = tl.arange(0, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + cn
        nm = n < N
        d = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        if HAS_TEXT:
            bt = tl.load(tb_ptr + n[None, :] * stride_tbn + rt[:, None] * stride_tbr, mask=rtm[:, None] & nm[None, :],
                         other=0.0)
            d = mma(hq, bt, d, DOT_TB)
        if HAS_IMAGE:
            bi = tl.load(ib_ptr + n[None, :] * stride_ibn + ri[:, None] * stride_ibr, mask=rim[:, None] & nm[None, :],
                         other=0.0)
            d = mma(zq, bi, d, DOT_IB)
        ptrs = out_ptr + row[:, None] * stride_om + n[None, :] * stride_on
        om = bmask[:, None] & nm[None, :]
        o = tl.load(ptrs, mask=om, other=0.0).to(tl.float32) + tl.cast(scale, tl.float32) * d
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=om)


_DECODE_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    # Full-rank accumulators (3 x 16 x 256 fp32) need 8 warps to stay out of local memory (ptxas reports).
    for bk, bn, w, s in [(64, 64, 8, 2), (64, 32, 8, 1), (128, 32, 8, 1)]
]


@autotune(_DECODE_CONFIGS, key=["K", "RT", "RI", "N", "HAS_TEXT", "HAS_IMAGE", "KS"],
          interpreter_config=triton.Config({"BLOCK_K": 32, "BLOCK_N": 32}), restore_value=["out_ptr", "pend_ptr"])
@triton.jit(do_not_specialize=["batch", "capacity"])
def decode_kernel(
    x_ptr, stride_xm, stride_xk,
    ta_ptr, stride_tar, stride_tak, tb_ptr, stride_tbn, stride_tbr,  # text A (RT, K), B (N, RT)
    w_ptr, stride_wt, stride_wr, stride_wk, ib_ptr, stride_ibn, stride_ibr,  # image taps (KS*KS, RI, K), B (N, RI)
    out_ptr, stride_om, stride_on,
    pend_ptr, stride_pb, stride_ps, stride_pr,  # (batch, capacity, RI) pending ring
    pos_ptr, height_ptr, width_ptr,  # (batch,) int64
    batch, capacity, K, RT, RI, N, scale,
    HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr, KS: tl.constexpr,
    DOT_T: tl.constexpr, DOT_TB: tl.constexpr, DOT_I: tl.constexpr, DOT_IB: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_RT: tl.constexpr, BLOCK_RI: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The whole step for ``BLOCK_B`` sequences in one program: full rank, every output column."""
    row = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    bmask = row < batch
    pos = tl.load(pos_ptr + row, mask=bmask, other=-1)
    is_img = pos >= 0
    rt = tl.arange(0, BLOCK_RT)
    rtm = rt < RT
    ri = tl.arange(0, BLOCK_RI)
    rim = ri < RI
    h = tl.zeros((BLOCK_B, BLOCK_RT), tl.float32)
    z = tl.zeros((BLOCK_B, BLOCK_RI), tl.float32)
    if HAS_TEXT:
        h = _text_rank(row, bmask & (pos < 0), x_ptr, stride_xm, stride_xk, ta_ptr, stride_tar, stride_tak, rt, rtm,
                       K, BLOCK_B, BLOCK_RT, BLOCK_K, DOT_T)
    if HAS_IMAGE:
        z = _image_rank(row, bmask, pos, is_img, x_ptr, stride_xm, stride_xk, w_ptr, stride_wt, stride_wr, stride_wk,
                        ri, rim, pend_ptr, stride_pb, stride_ps, stride_pr, height_ptr, width_ptr, capacity, K,
                        KS, BLOCK_B, BLOCK_RI, BLOCK_K, DOT_I)
    _expand_rows(h, rt, rtm, tb_ptr, stride_tbn, stride_tbr, z, ri, rim, ib_ptr, stride_ibn, stride_ibr,
                 out_ptr, row, bmask, stride_om, stride_on, 0, N, N, scale,
                 HAS_TEXT, HAS_IMAGE, BLOCK_B, BLOCK_N, DOT_TB, DOT_IB)


@autotune([triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s) for bk, w, s in [(128, 4, 3), (256, 4, 3),
                                                                                      (512, 8, 3), (64, 4, 4)]],
          key=["K", "RT", "RI", "HAS_TEXT", "HAS_IMAGE", "KS"], interpreter_config=triton.Config({"BLOCK_K": 32}),
          restore_value=["pend_ptr"])
@triton.jit(do_not_specialize=["batch", "capacity"])
def decode_rank_kernel(
    x_ptr, stride_xm, stride_xk,
    ta_ptr, stride_tar, stride_tak,  # text A (RT, K)
    w_ptr, stride_wt, stride_wr, stride_wk,  # image taps (KS*KS, RI, K)
    hz_ptr, stride_hz,  # (batch, RT + RI) float32: [h | z]
    pend_ptr, stride_pb, stride_ps, stride_pr,
    pos_ptr, height_ptr, width_ptr,
    batch, capacity, K, RT, RI, NT_TILES,
    HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr, KS: tl.constexpr, DOT_T: tl.constexpr, DOT_I: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split step, launch 1: ``BLOCK_R`` rank columns (text tiles first, then image tiles) of ``h``/``z``
    for ``BLOCK_B`` sequences, with those columns of the rings; each weight element is read once."""
    row = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    bmask = row < batch
    pos = tl.load(pos_ptr + row, mask=bmask, other=-1)
    tile = tl.program_id(1)
    cr = tl.arange(0, BLOCK_R)
    if HAS_TEXT:
        if tile < NT_TILES:
            rt = tile * BLOCK_R + cr
            rtm = rt < RT
            h = _text_rank(row, bmask & (pos < 0), x_ptr, stride_xm, stride_xk, ta_ptr, stride_tar, stride_tak, rt,
                           rtm, K, BLOCK_B, BLOCK_R, BLOCK_K, DOT_T)
            tl.store(hz_ptr + row[:, None] * stride_hz + rt[None, :], h, mask=bmask[:, None] & rtm[None, :])
    if HAS_IMAGE:
        if tile >= NT_TILES:
            ri = (tile - NT_TILES) * BLOCK_R + cr
            rim = ri < RI
            z = _image_rank(row, bmask, pos, pos >= 0, x_ptr, stride_xm, stride_xk, w_ptr, stride_wt, stride_wr,
                            stride_wk, ri, rim, pend_ptr, stride_pb, stride_ps, stride_pr, height_ptr, width_ptr,
                            capacity, K, KS, BLOCK_B, BLOCK_R, BLOCK_K, DOT_I)
            tl.store(hz_ptr + row[:, None] * stride_hz + RT + ri[None, :], z, mask=bmask[:, None] & rim[None, :])


@autotune([triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=1) for bn, w in [(32, 4), (64, 4), (128, 8)]],
          key=["RT", "RI", "N", "HAS_TEXT", "HAS_IMAGE"], interpreter_config=triton.Config({"BLOCK_N": 32}),
          restore_value=["out_ptr"])
@triton.jit(do_not_specialize=["batch"])
def decode_expand_kernel(
    hz_ptr, stride_hz, tb_ptr, stride_tbn, stride_tbr, ib_ptr, stride_ibn, stride_ibr, out_ptr, stride_om, stride_on,
    batch, RT, RI, N, scale,
    HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr, DOT_TB: tl.constexpr, DOT_IB: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_RT: tl.constexpr, BLOCK_RI: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split step, launch 2: one ``BLOCK_N`` strip of ``out`` for ``BLOCK_B`` sequences from ``[h | z]``."""
    row = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    bmask = row < batch
    rt = tl.arange(0, BLOCK_RT)
    rtm = rt < RT
    ri = tl.arange(0, BLOCK_RI)
    rim = ri < RI
    base = hz_ptr + row[:, None] * stride_hz
    h = tl.load(base + rt[None, :], mask=bmask[:, None] & rtm[None, :], other=0.0)
    z = tl.load(base + RT + ri[None, :], mask=bmask[:, None] & rim[None, :], other=0.0)
    n_lo = tl.program_id(1) * BLOCK_N
    _expand_rows(h, rt, rtm, tb_ptr, stride_tbn, stride_tbr, z, ri, rim, ib_ptr, stride_ibn, stride_ibr,
                 out_ptr, row, bmask, stride_om, stride_on, n_lo, n_lo + BLOCK_N, N, scale,
                 HAS_TEXT, HAS_IMAGE, BLOCK_B, BLOCK_N, DOT_TB, DOT_IB)


def decode_step(x, out, text_a, text_b, image_weight, image_b, scale, pending, image_pos, height, width):
    """``reference.decode_step``'s contract: ``x`` ``(batch, d_in)``, ``out`` ``(batch, d_out)`` (added to
    in place), ``pending`` ``(batch, capacity, r)`` updated in place; ``image_pos``/``height``/``width``
    ``(batch,)`` int64 on the device (``image_pos = -1``: a text token). No host sync, shape-only grids.

    Batches up to ``SPLIT_BATCH_MAX`` (and ranks above ``ONE_LAUNCH_MAX_R``) run the split step (two
    launches: rank columns spread over programs so the weights stream through many SMs, then the
    expansion); larger batches one launch."""
    batch, d_in = x.shape
    n_out = out.shape[1]
    has_text, has_image = text_a is not None, image_weight is not None
    k = image_weight.shape[-1] if has_image else 1
    ta, tb = (text_a, text_b) if has_text else (dummy(x).view(1, 1),) * 2
    w, ib = (stacked(image_weight, copy=False), image_b) if has_image else (dummy(x).view(1, 1, 1), dummy(x).view(1, 1))
    rt, ri = ta.shape[0] if has_text else 0, w.shape[1] if has_image else 0
    pend = pending if k > 1 and pending.numel() else dummy(x).float().view(1, 1, 1)
    capacity = pending.shape[1] if k > 1 and pending.numel() else 0
    flags = dict(HAS_TEXT=has_text, HAS_IMAGE=has_image)
    # One MMA dtype per adapter from all its tensors (dot_dtype); h and z are intermediates (rank_dot).
    dot_t, dot_i = dot_dtype(x, ta, tb), dot_dtype(x, w, ib)
    dots = dict(DOT_TB=rank_dot(dot_t), DOT_IB=rank_dot(dot_i))
    blocks = triton.cdiv(batch, BLOCK_B)
    x_args = (x, x.stride(0), x.stride(1), ta, ta.stride(0), ta.stride(1))
    w_args = (w, w.stride(0), w.stride(1), w.stride(2))
    b_args = (tb, tb.stride(0), tb.stride(1), ib, ib.stride(0), ib.stride(1))
    ring = (pend, pend.stride(0), pend.stride(1), pend.stride(2), image_pos, height, width)
    # The one-launch kernel holds three BLOCK_B x pow2(r) float32 tiles: beyond r = 256 they would spill.
    if batch > SPLIT_BATCH_MAX and max(pow2(rt), pow2(ri)) <= ONE_LAUNCH_MAX_R:
        decode_kernel[(blocks,)](
            *x_args, tb, tb.stride(0), tb.stride(1), *w_args, ib, ib.stride(0), ib.stride(1),
            out, out.stride(0), out.stride(1), *ring, batch, capacity, d_in, rt, ri, n_out, float(scale),
            KS=k, DOT_T=dot_t, DOT_I=dot_i, BLOCK_B=BLOCK_B, BLOCK_RT=pow2(rt), BLOCK_RI=pow2(ri),
            **flags, **dots,
        )
        return
    nt = triton.cdiv(rt, SPLIT_BLOCK_R)
    hz = torch.empty(batch, rt + ri, dtype=torch.float32, device=x.device)
    decode_rank_kernel[(blocks, nt + triton.cdiv(ri, SPLIT_BLOCK_R))](
        *x_args, *w_args, hz, hz.stride(0), *ring, batch, capacity, d_in, rt, ri, nt,
        KS=k, DOT_T=dot_t, DOT_I=dot_i, BLOCK_B=BLOCK_B, BLOCK_R=SPLIT_BLOCK_R, **flags,
    )
    decode_expand_kernel[lambda meta: (blocks, triton.cdiv(n_out, meta["BLOCK_N"]))](
        hz, hz.stride(0), *b_args, out, out.stride(0), out.stride(1), batch, rt, ri, n_out, float(scale),
        BLOCK_B=BLOCK_B, BLOCK_RT=pow2(rt), BLOCK_RI=pow2(ri), **flags, **dots,
    )
