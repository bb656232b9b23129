"""Pieces every Triton kernel of the backend shares: the MMA dtype rule, the two tile loops
(``shrink_tap``: ``d``-wide rows -> rank ``r``; ``expand_into``: rank ``r`` -> ``d``-wide rows), and the
autotune wrapper that keeps the interpreter to one config.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "autotune", "dot_dtype", "dummy", "expand_into", "mma", "pow2", "rank_dot", "shrink_tap"]

# Fixed when the kernels are decorated: ``triton.jit`` builds interpreter functions only if the variable
# is set at that moment, so the backend must know which kind it holds.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(*inputs: torch.Tensor):
    """The dtype the MMA operands are rounded to: the half dtype every *input* shares, else float32.

    This is the package's one mixed-dtype policy (README "dtypes", ``moss_lora``): pass every tensor
    the user gave that takes part in the call (``x``, *all* weights of the adapter, ``grad_out``), the
    same tuple for every launch of one adapter, never a subset. Mixed inputs (bf16 ``x``, float32
    weights; float32 ``x``, half weights) and float32 use exact float32 products (``ieee``, not tf32,
    so float32 meets SPEC's 1e-5). The interpreter's bf16 ``dot`` is wrong, so there bf16 computes in
    float32. Products with a float32 intermediate operand (``h``, ``z``, ``dz``) go through
    ``rank_dot``.
    """
    kinds = {t.dtype for t in inputs}
    if len(kinds) == 1:
        (kind,) = kinds
        if kind == torch.float16 or (kind == torch.bfloat16 and not INTERPRETED):
            return _TL[kind]
    return tl.float32


def rank_dot(dot):
    """The MMA dtype of a product whose operand is a float32 rank-space intermediate (``h``, ``z``,
    ``dz``), given the call's ``dot_dtype``: float16 would overflow at 65504 (rank-space sums of
    float16 inputs exceed it long before the outputs do), so those products round to bfloat16, whose
    range is float32's (the float16 weight they multiply is rounded to bfloat16 too: 2^-9 relative,
    within SPEC's 1e-2). Under the interpreter, whose bf16 ``dot`` is wrong, float32."""
    if dot == tl.float16:
        return tl.float32 if INTERPRETED else tl.bfloat16
    return dot


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= ``max(n, lo)`` (``tl.dot`` tiles are at least 16 wide)."""
    return max(lo, triton.next_power_of_2(int(n)))


def dummy(like: torch.Tensor) -> torch.Tensor:
    """A stand-in for a pointer argument a kernel's constexpr flags never touch."""
    return like.new_empty(1)


# Timing-based autotuning picks configs by the clock, so two processes could pick different block
# sizes and reduce in different orders: results would be reproducible only within one process. By
# default each kernel therefore runs one pinned config (the first of its list, chosen from ptxas
# reports); MOSS_TRITON_AUTOTUNE=1 opts in to tuning over the whole list, for speed, at the price of
# bits that may differ between processes.
AUTOTUNE = os.environ.get("MOSS_TRITON_AUTOTUNE", "0") not in ("", "0")


def autotune(configs, key, interpreter_config, **kwargs):
    """``triton.autotune`` with one pinned config on a GPU (``configs[0]``; all of ``configs`` with
    ``MOSS_TRITON_AUTOTUNE=1``), exactly ``interpreter_config`` under the interpreter (benchmarking
    configs there would cost minutes and measure nothing). A pinned config keeps every reduction's
    order fixed by the shapes alone: the same bits in every process."""
    chosen = [interpreter_config] if INTERPRETED else (configs if AUTOTUNE else configs[:1])
    if not AUTOTUNE:
        kwargs.pop("prune_configs_by", None)  # one config: nothing to prune, nothing timed
    return triton.autotune(configs=chosen, key=key, **kwargs)


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr):
    """``acc + a @ b`` with operands rounded to ``DOT`` and float32 accumulation."""
    if DOT == tl.float32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(DOT), b.to(DOT), acc)
    return acc


@triton.jit
def shrink_tap(acc, x_ptr, xrow, xmask, stride_xm, stride_xk, w_ptr, stride_wr, stride_wk, rr, rmask, K,
               BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """``acc (BM, BR) += x[xrow, :K] @ w[rr, :K]^T``.

    ``xrow`` (BM,) int64 row indices of ``x``; rows with ``xmask`` false read zeros — that is the conv's
    zero padding and the tile's tail, done in place (no padded copy of ``x`` exists).
    """
    # Row indices are int64 (tokens x d can pass 2^31); column offsets stay int32 (no row or weight
    # holds 2^31 elements), which keeps the pointer tiles' registers down.
    ck = tl.arange(0, BLOCK_K)
    xb = x_ptr + xrow[:, None] * stride_xm
    wb = w_ptr + rr[None, :] * stride_wr
    for c0 in range(0, K, BLOCK_K):
        c = c0 + ck
        cm = c < K
        xt = tl.load(xb + c[None, :] * stride_xk, mask=xmask[:, None] & cm[None, :], other=0.0)
        wt = tl.load(wb + c[:, None] * stride_wk, mask=cm[:, None] & rmask[None, :], other=0.0)
        acc = mma(xt, wt, acc, DOT)
    return acc


@triton.jit
def expand_into(h, rr, rmask, b_ptr, stride_bn, stride_br, out_ptr, orow, omask, stride_om, stride_on, N, alpha,
                ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """``out[orow, :N] (+)= alpha * h @ b[:N, rr]^T`` one ``BLOCK_N`` strip at a time; ``h`` (BM, BR)
    float32 stays in registers. Accumulation happens in float32 and is rounded once into ``out``."""
    hq = h.to(DOT)  # rounded once, not once per strip
    cn = tl.arange(0, BLOCK_N)
    ob = out_ptr + orow[:, None] * stride_om
    bb = b_ptr + rr[:, None] * stride_br
    for n0 in range(0, N, BLOCK_N):
        n = n0 + cn
        nm = n < N
        bt = tl.load(bb + n[None, :] * stride_bn, mask=rmask[:, None] & nm[None, :], other=0.0)
        d = alpha * mma(hq, bt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT)
        m = omask[:, None] & nm[None, :]
        ptrs = ob + n[None, :] * stride_on
        if ACCUMULATE:
            d += tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
        tl.store(ptrs, d.to(out_ptr.dtype.element_ty), mask=m)
