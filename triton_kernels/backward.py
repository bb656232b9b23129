"""Backward: ``dz`` once per modality, then every gradient from it, with no atomics.

Per modality (text: one tap, ``A``; image: ``k*k`` taps, ``K_all``), four launches:

1. ``dz = scale * grad_out[rows] B`` — ``rank_kernel`` with ``B^T`` as its weight (``(n, r)`` float32);
2. ``dB = scale * grad_out[rows]^T z`` — ``tn_kernel`` (``z``/``h`` saved by forward, not recomputed);
3. ``dA_tap = dP_tap^T x[rows]`` with ``dP_tap[t] = dz[targets[t, tap]]`` — ``tn_kernel``, one grid
   layer per tap, written straight into the ``(r, d_in, k, k)`` gradient;
4. ``dx[rows] = sum_tap dP_tap A_tap`` — ``expand_kernel`` gathering ``dz`` through ``conv_targets``
   (the right, lower and lower-right neighbours).

Each output tile is owned by one program that loops over all tokens in a fixed order: the same inputs
give the same bits run after run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune, dot_dtype, dummy, mma, rank_dot
from .forward import expand, project, stacked

__all__ = ["backward", "tn_kernel"]

_TN_CONFIGS = [
    triton.Config({"BLOCK_A": ba, "BLOCK_B": bb, "BLOCK_M": bm}, num_warps=w, num_stages=s)
    for ba, bb, bm, w, s in [(128, 128, 32, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4)]
]


@autotune(_TN_CONFIGS, key=["A", "B", "L_IDX", "R_IDX"],
          interpreter_config=triton.Config({"BLOCK_A": 32, "BLOCK_B": 32, "BLOCK_M": 32}))
@triton.jit(do_not_specialize=["M"])
def tn_kernel(
    l_ptr, stride_lm, stride_la, lidx_ptr, stride_li,  # left rows: l[lidx[m, tap]] (L_IDX) or l[m]
    r_ptr, stride_rm, stride_rb, ridx_ptr,  # right rows: r[ridx[m]] (R_IDX) or r[m]
    c_ptr, stride_ct, stride_ca, stride_cb,  # C element (tap, a, b)
    M, A, B, alpha,
    L_IDX: tl.constexpr, R_IDX: tl.constexpr, DOT: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``C[tap, a, b] = alpha * sum_m L[lrow(m, tap), a] R[rrow(m), b]``; index ``-1`` contributes zero.

    Grid ``(A tiles, B tiles, taps)``; the token loop is sequential (deterministic, no split-K)."""
    a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    amask = a < A
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = b < B
    tap = tl.program_id(2)
    cm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m = (m0 + cm).to(tl.int64)
        mm = m < M
        if L_IDX:
            lrow = tl.load(lidx_ptr + m * stride_li + tap, mask=mm, other=-1)
            lok = lrow >= 0
        else:
            lrow = m
            lok = mm
        if R_IDX:
            rrow = tl.load(ridx_ptr + m, mask=mm, other=-1)
            rok = rrow >= 0
        else:
            rrow = m
            rok = mm
        lt = tl.load(l_ptr + lrow[None, :] * stride_lm + a[:, None] * stride_la, mask=amask[:, None] & lok[None, :],
                     other=0.0)
        rt = tl.load(r_ptr + rrow[:, None] * stride_rm + b[None, :] * stride_rb, mask=rok[:, None] & bmask[None, :],
                     other=0.0)
        acc = mma(lt, rt, acc, DOT)
    acc = acc * tl.cast(alpha, tl.float32)
    tl.store(c_ptr + tap * stride_ct + a[:, None] * stride_ca + b[None, :] * stride_cb,
             acc.to(c_ptr.dtype.element_ty), mask=amask[:, None] & bmask[None, :])


def _tn(left, right, c, alpha, *, lidx=None, ridx=None, taps=1, tap_stride=0, dot_inputs=()):
    """Launch ``tn_kernel`` into ``c`` viewed as ``(taps, A, B)`` with tap stride ``tap_stride``.

    ``left``: ``(n_l, A)``, ``right``: ``(n_r, B)``; ``lidx``: ``(M, taps)`` or ``(M,)`` int64 rows of
    ``left``; ``ridx``: ``(M,)`` rows of ``right``. ``M`` is the number of tokens summed over. One
    operand is always a float32 intermediate (``z``, ``dz``), hence ``rank_dot``."""
    M = (lidx if lidx is not None else left).shape[0]
    A, B = left.shape[1], right.shape[1]
    li = lidx if lidx is not None else dummy(left).long()
    tn_kernel[lambda meta: (triton.cdiv(A, meta["BLOCK_A"]), triton.cdiv(B, meta["BLOCK_B"]), taps)](
        left, left.stride(0), left.stride(1), li, li.stride(0) if lidx is not None else 0,
        right, right.stride(0), right.stride(1), ridx if ridx is not None else dummy(left).long(),
        c, tap_stride, c.stride(0), c.stride(1),
        M, A, B, float(alpha),
        L_IDX=lidx is not None, R_IDX=ridx is not None, DOT=rank_dot(dot_dtype(*dot_inputs)),
    )


def _modality(grad_out, x, rows, targets, a3, b, saved, scale, dx, d_a, d_a_tap_stride, d_b):
    """Gradients of one adapter: ``a3`` ``(taps, r, d_in)`` its down weight, ``b`` ``(d_out, r)``,
    ``saved`` its forward's ``(n, r)`` intermediate, ``targets`` ``(n, taps)`` or ``None`` (one tap).

    Writes ``d_b`` ``(d_out, r)``, ``d_a`` (an ``(r, d_in)`` view, taps ``d_a_tap_stride`` apart) and,
    when ``dx`` is given, ``dx[rows]``."""
    taps = a3.shape[0]
    ins = (grad_out, x, a3, b)  # one MMA dtype for every product of the adapter (dot_dtype)
    # dz = scale * g B: B^T is the weight of a one-tap projection of grad_out's rows.
    dz = project(grad_out, rows, b.t().unsqueeze(0), alpha=scale, dot_inputs=ins)
    _tn(grad_out, saved, d_b, scale, lidx=rows, dot_inputs=ins)
    _tn(dz, x, d_a, 1.0, lidx=targets, ridx=rows, taps=taps, tap_stride=d_a_tap_stride, dot_inputs=ins)
    if dx is not None:
        expand(dz, rows, a3.transpose(1, 2), dx, 1.0, targets=targets, accumulate=False, dot_inputs=ins)


def backward(grad_out, x, text_rows, image_rows, conv_targets, text_a, text_b, image_weight, image_b, text_h,
             image_z, scale, needs_x=True):
    """``reference.backward``'s contract: ``(dx, d_text_a, d_text_b, d_image_weight, d_image_b)``, each in
    its input's dtype (``dx`` ``(N, d_in)`` or ``None`` unless ``needs_x``; ``None`` for absent adapters)."""
    n_text, n_image = text_rows.numel(), image_rows.numel()
    dx = None
    if needs_x:
        # Rows no kernel writes (an absent adapter's) must read zero; otherwise every row is written.
        covered = (text_a is not None or n_text == 0) and (image_weight is not None or n_image == 0)
        dx = (torch.empty_like if covered else torch.zeros_like)(x, memory_format=torch.contiguous_format)
    d_ta = d_tb = d_w = d_ib = None
    if text_a is not None:
        make = torch.empty if n_text else torch.zeros
        d_ta = make(text_a.shape, dtype=text_a.dtype, device=x.device)
        d_tb = make(text_b.shape, dtype=text_b.dtype, device=x.device)
        if n_text:
            _modality(grad_out, x, text_rows, None, text_a.unsqueeze(0), text_b, text_h, scale, dx, d_ta, 0, d_tb)
    if image_weight is not None:
        make = torch.empty if n_image else torch.zeros
        d_w = make(image_weight.shape, dtype=image_weight.dtype, device=x.device)
        d_ib = make(image_b.shape, dtype=image_b.dtype, device=x.device)
        if n_image:
            r, d_in, k, _ = image_weight.shape
            # d_w[j, c, a, b] for tap a*k+b sits at tap * 1 + j * d_in*k*k + c * k*k (contiguous layout).
            _modality(grad_out, x, image_rows, conv_targets if k > 1 else None, stacked(image_weight), image_b,
                      image_z, scale, dx, d_w.view(r, d_in, k * k)[:, :, 0], 1, d_ib)
    return dx, d_ta, d_tb, d_w, d_ib
