"""Decode step: one token per sequence, weight-stationary, graph-capturable.

At decode time the step is bound by the bytes of the adapter weights (a few MB per layer against a
few KB of activations), so the kernels are organised around the weights (the BGMV idea), not the
sequences. Three launches, each over a grid that depends only on shapes and on the GPU's SM count:

1. ``decode_shrink_kernel``: every program owns one block of rank rows ``[c0, c1)`` times one slice
   ``[i0, i1)`` of ``d_in`` of one adapter, and reads that block of the weight exactly once, for every
   row of the batch at a time (a row takes the image adapter if ``image_pos >= 0``, the text adapter
   otherwise: masks, no host-side split). The conv weight is read **in place**: ``(r, d_in, k, k)``
   viewed as ``(r, d_in*k*k)`` is contiguous along the reduction, so a program's block is one
   contiguous run per rank row (16-byte loads), reshaped in registers to ``(rank, d_in, tap)`` and
   reduced against ``x`` for all ``k*k`` taps at once; text ``A`` is the ``k = 1`` case. Nothing is
   prepared or stacked: there is no copy to invalidate when the optimizer changes the weights, and
   nothing to rebuild per call or per graph replay. Programs: at least as many per adapter as the GPU
   has SMs, balanced (``plan``). Each writes float32 partial sums for its ``d_in`` slice into a
   workspace; a program whose batch has no row of its adapter reads nothing.
2. ``decode_ring_kernel``: sums the partials of the ``d_in`` slices in a fixed order (no atomics:
   bit-identical from run to run), all taps of its rank columns in one tile, then the ring update of
   ``reference.decode_step`` (first-writer rule: token ``p = 0`` reads nothing; the target's earliest
   contributor writes, later ones add) as one gather of every slot it reads and one scatter, and
   stores ``[h | z]`` (in the expansion's operand dtype).
3. ``decode_expand_kernel``: ``out += scale * (h B_t^T + z B_i^T)``, weight-stationary over ``d_out``
   slices (each program reads its rows of ``B_t``/``B_i`` once for the whole batch).

No host synchronisation and nothing read back: positions, sizes and the modality of each row are read
on the device, so ``torch.cuda.graphs`` can capture the step. Rows failing the ring guard (position
outside the image, ring larger than the state) change nothing, as in ``reference.decode_step``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, dot_dtype, dummy, mma, pow2, rank_dot

__all__ = ["Plan", "cost_model", "decode_expand_kernel", "decode_ring_kernel", "decode_shrink_kernel",
           "decode_step", "expand_block_n", "plan", "program_target", "ring_block_r"]

# Shrink tiles. BLOCK_I: d_in columns per loop iteration; GRAIN: the unit a d_in slice is a multiple of
# (its start stays 16-byte aligned); rank rows per program: at most MAX_BLOCK_C and BLOCK_C * pow2(k*k)
# <= SHRINK_COLS accumulator columns. Batch rows per pass: pow2(batch) up to MAX_BLOCK_B, so up to that
# batch every weight byte is read once; larger batches re-read their slice once per pass (from L1/L2:
# a slice is tens of KB). GPU_*: the GPU values, also used by the cost model under the interpreter.
GPU_GRAIN, GPU_MAX_BLOCK_B = 32, 64
BLOCK_I = 16 if INTERPRETED else 64
GRAIN = 16 if INTERPRETED else GPU_GRAIN
MAX_BLOCK_C = 16
SHRINK_COLS = 64
MAX_BLOCK_B = 16 if INTERPRETED else GPU_MAX_BLOCK_B
RING_BLOCK_B = 16
RING_BLOCK_R = 32
EXPAND_BLOCK_R = 16 if INTERPRETED else 64
EXPAND_BLOCK_NS = (64, 32, 16)  # widest d_out strip that still gives every SM a program
SHRINK_WARPS, SHRINK_STAGES = 4, 3
RING_WARPS = 4
EXPAND_WARPS, EXPAND_STAGES = 4, 3
# Under the interpreter there are no SMs: a small fixed count still splits d_in (tests patch it).
INTERPRETER_SMS = 4

_SMS: dict[int, int] = {}


def program_target(device: torch.device) -> int:
    """The number of programs one adapter's weights are spread over: the SM count (cached per device)."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


@dataclass(frozen=True)
class Plan:
    """How one adapter's ``(rank, d_in * kk)`` weight is split over shrink programs (plain ints)."""

    block_c: int  # rank rows per program
    kkp: int  # taps padded to a power of two
    nc: int  # rank blocks
    slice_i: int  # d_in columns per program (a multiple of ``grain``)
    ni: int  # d_in slices

    @property
    def programs(self) -> int:
        return self.nc * self.ni


def plan(rank: int, d_in: int, kk: int, sms: int, grain: int = GRAIN) -> Plan:
    """The fewest balanced ``d_in`` slices that give at least ``sms`` programs (or one per ``grain``).

    Fewer slices mean a smaller partial-sum workspace; a slice is a multiple of ``grain`` columns so
    every program's loads start 16-byte aligned."""
    kkp = triton.next_power_of_2(kk)
    block_c = min(MAX_BLOCK_C, max(1, SHRINK_COLS // kkp))
    nc = triton.cdiv(rank, block_c)
    want = triton.cdiv(sms, nc)
    chunks = triton.cdiv(d_in, grain)
    per = triton.cdiv(chunks, want)
    while per > 1 and triton.cdiv(chunks, per) < want:
        per -= 1
    slice_i = per * grain
    return Plan(block_c, kkp, nc, slice_i, triton.cdiv(d_in, slice_i))


def ring_block_r(kkp: int) -> int:
    """Rank columns per ring program: ``RING_BLOCK_R``, fewer for large kernels (the program holds every
    tap of its columns: ``RING_BLOCK_B x BLOCK_R x pow2(k*k)`` sums)."""
    return max(1, min(RING_BLOCK_R, 128 // kkp))


def expand_block_n(d_out: int, sms: int) -> int:
    """The widest ``d_out`` strip per expand program that still gives at least ``sms`` programs."""
    return next((bn for bn in EXPAND_BLOCK_NS if triton.cdiv(d_out, bn) >= sms), EXPAND_BLOCK_NS[-1])


def cost_model(d_in: int, d_out: int, rank: int, k: int, batch: int, sms: int, elem: int = 2,
               bandwidth: float = 3.35e12) -> dict:
    """Bytes of one layer-step on a GPU with ``sms`` SMs, from the launch plan alone (plain ints: no
    torch, no GPU), for text and image adapters of rank ``rank``, ``elem``-byte weights and activations.

    Per adapter and launch: ``programs``, ``max_program_bytes`` (the weight bytes the largest program
    reads), ``mean_program_bytes`` (total weight bytes / programs) and ``covered_bytes`` (summed over
    the programs' actual blocks: equals the weight's bytes iff every byte is read exactly once per
    pass; batches above ``GPU_MAX_BLOCK_B`` rows take ``passes`` passes, re-read from L1/L2).
    ``floor_bytes``: what must cross DRAM at least (the weights of both adapters, ``x``, the ``out``
    read-modify-write, the ring slots touched) and ``floor_us`` at ``bandwidth`` bytes/s;
    ``l2_bytes``: on-chip traffic the split adds (``x`` re-read by every rank block, the float32
    partial sums written and read back, ``[h | z]`` written and re-read by every expand program)."""
    kk = k * k
    passes = triton.cdiv(batch, GPU_MAX_BLOCK_B)
    report, l2 = {}, 0
    for name, taps in (("text_shrink", 1), ("image_shrink", kk)):
        p = plan(rank, d_in, taps, sms, GPU_GRAIN)
        total = rank * d_in * taps * elem
        rows = [min(p.block_c, rank - c * p.block_c) for c in range(p.nc)]
        cols = [min(p.slice_i, d_in - s * p.slice_i) for s in range(p.ni)]
        covered = sum(r * c * taps * elem for r in rows for c in cols)
        report[name] = dict(programs=p.programs, max_program_bytes=max(rows) * max(cols) * taps * elem,
                            mean_program_bytes=total / p.programs, covered_bytes=covered, total_bytes=total,
                            passes=passes)
        l2 += p.nc * batch * d_in * elem + 2 * p.ni * batch * rank * taps * 4
    bn = expand_block_n(d_out, sms)
    strips = [min(bn, d_out - n) for n in range(0, d_out, bn)]
    total = d_out * 2 * rank * elem
    report["expand"] = dict(programs=len(strips), max_program_bytes=max(strips) * 2 * rank * elem,
                            mean_program_bytes=total / len(strips), covered_bytes=sum(strips) * 2 * rank * elem,
                            total_bytes=total, passes=passes)
    l2 += (1 + len(strips)) * batch * 2 * rank * elem  # [h | z] (in the operand dtype) written, re-read
    weights = sum(v["total_bytes"] for v in report.values())
    ring = batch * rank * 4 * (2 * kk)  # one slot read, k*k - 1 slots written (some read first)
    floor = weights + batch * d_in * elem + 2 * batch * d_out * elem + ring
    report.update(weight_bytes=weights, floor_bytes=floor, floor_us=floor / bandwidth * 1e6, l2_bytes=l2)
    return report


@triton.jit
def _shrink_piece(piece, x_ptr, stride_xm, stride_xk, pos_ptr, batch, K, w_ptr, stride_wr, ws_ptr, stride_ws,
                  stride_wb, R, slice_i, NC, IMAGE: tl.constexpr, KK: tl.constexpr, KKP: tl.constexpr,
                  DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """``ws[s, b, c*KK + t] = sum_{i in slice s} x[b, i] w[c, i*KK + t]`` for this program's rank block
    and ``d_in`` slice ``s``, for the rows ``b`` of its adapter (others are neither read nor written)."""
    s = piece // NC
    c = (piece % NC) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < R
    i_lo = s * slice_i
    i_hi = tl.minimum(i_lo + slice_i, K)
    j = tl.arange(0, BLOCK_I * KKP)  # flat (input, tap) index of one chunk
    ji = j // KKP
    if KK == KKP:
        jo = j  # the chunk is one contiguous run per rank row: vectorised loads
    else:
        jo = ji * KK + j % KKP
    wb = w_ptr + c[:, None] * stride_wr
    ci = tl.arange(0, BLOCK_I)
    col = c[None, :, None] * KK + tl.arange(0, KKP)[None, None, :]  # (1, BLOCK_C, KKP) workspace columns
    colm = cm[None, :, None] & (tl.arange(0, KKP) < KK)[None, None, :]
    for b0 in range(0, batch, BLOCK_B):
        row = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        bm = row < batch
        pos = tl.load(pos_ptr + row, mask=bm, other=0)
        if IMAGE:
            act = bm & (pos >= 0)
        else:
            act = bm & (pos < 0)
        if tl.sum(act.to(tl.int32)) > 0:
            acc = tl.zeros((BLOCK_B, BLOCK_C * KKP), tl.float32)
            xb = x_ptr + row[:, None] * stride_xm
            for i0 in range(i_lo, i_hi, BLOCK_I):
                if KK == KKP:
                    # Compared flat (not per input) so the mask is constant over 16-byte runs.
                    jm = i0 * KK + j < i_hi * KK
                else:
                    jm = (i0 + ji < i_hi) & (j % KKP < KK)
                wt = tl.load(wb + i0 * KK + jo[None, :], mask=cm[:, None] & jm[None, :], other=0.0)
                # (rank, input, tap) -> (input, rank * tap): the reduction runs over the inputs.
                if KKP == 1:
                    wt = tl.trans(wt)
                else:
                    wt = tl.reshape(tl.permute(tl.reshape(wt, (BLOCK_C, BLOCK_I, KKP)), (1, 0, 2)),
                                    (BLOCK_I, BLOCK_C * KKP))
                xt = tl.load(xb + (i0 + ci)[None, :] * stride_xk, mask=act[:, None] & (i0 + ci < i_hi)[None, :],
                             other=0.0)
                acc = mma(xt, wt, acc, DOT)
            ptrs = ws_ptr + s * stride_ws + row[:, None, None] * stride_wb + col
            tl.store(ptrs, tl.reshape(acc, (BLOCK_B, BLOCK_C, KKP)), mask=act[:, None, None] & colm)


@triton.jit(do_not_specialize=["batch"])
def decode_shrink_kernel(
    x_ptr, stride_xm, stride_xk, pos_ptr, batch, K,
    ta_ptr, stride_tar, wst_ptr, stride_wts, stride_wtb, RT, slice_t, NC_T, NT_PROGS,  # text A (RT, K)
    w_ptr, stride_wr, wsi_ptr, stride_wis, stride_wib, RI, slice_i, NC_I,  # image weight (RI, K * KK)
    HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr, KK: tl.constexpr, KKP: tl.constexpr,
    DOT_T: tl.constexpr, DOT_I: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_CT: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """Launch 1: programs ``[0, NT_PROGS)`` own text blocks, the rest image blocks (``plan``)."""
    pid = tl.program_id(0)
    if HAS_TEXT:
        if pid < NT_PROGS:
            _shrink_piece(pid, x_ptr, stride_xm, stride_xk, pos_ptr, batch, K, ta_ptr, stride_tar, wst_ptr,
                          stride_wts, stride_wtb, RT, slice_t, NC_T, False, 1, 1, DOT_T, BLOCK_B, BLOCK_CT, BLOCK_I)
    if HAS_IMAGE:
        if pid >= NT_PROGS:
            _shrink_piece(pid - NT_PROGS, x_ptr, stride_xm, stride_xk, pos_ptr, batch, K, w_ptr, stride_wr, wsi_ptr,
                          stride_wis, stride_wib, RI, slice_i, NC_I, True, KK, KKP, DOT_I, BLOCK_B, BLOCK_CI,
                          BLOCK_I)


@triton.jit
def _slice_sum(acc, ptrs, stride_ws, NI, mask):
    """``acc + sum_s ws[s][ptrs]`` over the ``NI`` slices in order ``0, 1, ...`` (fixed: deterministic)."""
    for s in range(NI):
        acc += tl.load(ptrs + s * stride_ws, mask=mask, other=0.0)
    return acc


@triton.jit
def _image_rows(row, bmask, pos, height_ptr, width_ptr, capacity, KS: tl.constexpr):
    """``(valid, H, W, p)``: the rows whose ring update runs. A row whose position lies outside its
    image, or whose ring exceeds ``capacity`` slots, reads and writes nothing (``z = 0``): the ops
    refuse such input first, this keeps every access in bounds."""
    H = tl.load(height_ptr + row, mask=bmask, other=1)
    w_raw = tl.load(width_ptr + row, mask=bmask, other=1)
    W = tl.maximum(w_raw, 1)
    p = tl.maximum(pos, 0)
    valid = bmask & (pos >= 0) & (H >= 1) & (w_raw >= 1) & (p // W < H)
    if KS > 1:
        valid = valid & (W <= capacity // (KS - 1) - 1)  # (k-1)(W+1) <= capacity, without overflow
    return valid, H, W, p


@triton.jit
def _ring_update(P, row, valid, H, W, p, ri, rim, pend_ptr, stride_pb, stride_ps, stride_pr, KS: tl.constexpr,
                 KKP: tl.constexpr):
    """``z`` for rank columns ``ri`` from the taps' sums ``P`` ``(rows, ri, KKP)``, and those columns of
    the rings updated as ``reference.decode_step`` does; programs with disjoint ``ri`` never share a
    slot. Tap ``(k-1, k-1)`` is the token's own; tap ``t`` else goes to the slot of the later token it
    reaches (tap 0: slot ``p mod L`` itself, whose old sum joins ``z`` first)."""
    t = tl.arange(0, KKP)[None, None, :]
    z = tl.sum(tl.where(t == KS * KS - 1, P, 0.0), axis=2)
    if KS > 1:
        L = ((KS - 1) * (tl.where(valid, W, 0) + 1))[:, None, None]
        Wc = W[:, None, None]
        i = (p // W)[:, None, None]
        j = (p % W)[:, None, None]
        di = KS - 1 - t // KS
        dj = KS - 1 - t % KS
        ring_tap = t < KS * KS - 1
        own = valid[:, None, None] & rim[None, :, None]
        ok = own & ring_tap & (i < H[:, None, None] - di) & (j + dj < Wc)
        # The target's earliest contributor (layout.first_contributor) writes, later ones add.
        first = ((i == 0) | (di == KS - 1)) & ((j == 0) | (dj == KS - 1))
        ptrs = (pend_ptr + row[:, None, None] * stride_pb + ((p[:, None, None] % L + di * Wc + dj) % L) * stride_ps
                + ri[None, :, None] * stride_pr)
        # One gather for every tap: slot p mod L (what earlier tokens left for p; token 0 has no earlier
        # contributor, its slot may hold an earlier image's leftovers) and the sums later contributors
        # add to. The targets of one row are distinct slots (offsets di*W + dj in (0, L), dj < W).
        first_read = (t == 0) & (p > 0)[:, None, None]
        old = tl.load(ptrs, mask=own & (first_read | (ok & ~first & (t > 0))), other=0.0).to(tl.float32)
        z += tl.sum(tl.where(t == 0, old, 0.0), axis=2)
        # Slot p mod L is rewritten below, possibly from other threads of the program: order them.
        tl.debug_barrier()
        new = tl.where(t == 0, tl.where(ok, P, 0.0), old + P)  # slot p mod L restarts with tap 0 (or zero)
        tl.store(ptrs, new.to(pend_ptr.dtype.element_ty), mask=own & ring_tap & ((t == 0) | ok))
    return z


@triton.jit(do_not_specialize=["batch", "capacity"])
def decode_ring_kernel(
    wst_ptr, stride_wts, stride_wtb, NI_T, wsi_ptr, stride_wis, stride_wib, NI_I,  # partial-sum workspaces
    hz_ptr, stride_hz,  # (batch, RT + RI) [h | z], float32 or the expansion's bfloat16
    pend_ptr, stride_pb, stride_ps, stride_pr,  # (batch, capacity, RI) pending ring
    pos_ptr, height_ptr, width_ptr,  # (batch,) int64
    batch, capacity, RT, RI, NT_TILES,
    HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr, KS: tl.constexpr, KKP: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Launch 2: ``BLOCK_R`` rank columns (text tiles first, then image tiles) of ``[h | z]`` for
    ``BLOCK_B`` sequences, with those columns of the rings (every row stored: 0 where not its adapter).
    All taps and slices of a tile are loaded before the ring is touched: few dependent round trips."""
    row = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    bmask = row < batch
    pos = tl.load(pos_ptr + row, mask=bmask, other=-1)
    tile = tl.program_id(1)
    cr = tl.arange(0, BLOCK_R)
    if HAS_TEXT:
        if tile < NT_TILES:
            rt = tile * BLOCK_R + cr
            rtm = rt < RT
            h = _slice_sum(tl.zeros((BLOCK_B, BLOCK_R), tl.float32), wst_ptr + row[:, None] * stride_wtb + rt[None, :],
                           stride_wts, NI_T, (bmask & (pos < 0))[:, None] & rtm[None, :])
            tl.store(hz_ptr + row[:, None] * stride_hz + rt[None, :], h.to(hz_ptr.dtype.element_ty),
                     mask=bmask[:, None] & rtm[None, :])
    if HAS_IMAGE:
        if tile >= NT_TILES:
            ri = (tile - NT_TILES) * BLOCK_R + cr
            rim = ri < RI
            valid, H, W, p = _image_rows(row, bmask, pos, height_ptr, width_ptr, capacity, KS)
            tc = tl.arange(0, KKP)[None, None, :]
            cols = ri[None, :, None] * (KS * KS) + tc  # workspace columns c * k*k + tap
            P = _slice_sum(tl.zeros((BLOCK_B, BLOCK_R, KKP), tl.float32),
                           wsi_ptr + row[:, None, None] * stride_wib + cols, stride_wis, NI_I,
                           valid[:, None, None] & rim[None, :, None] & (tc < KS * KS))
            z = _ring_update(P, row, valid, H, W, p, ri, rim, pend_ptr, stride_pb, stride_ps, stride_pr, KS, KKP)
            tl.store(hz_ptr + row[:, None] * stride_hz + RT + ri[None, :], z.to(hz_ptr.dtype.element_ty),
                     mask=bmask[:, None] & rim[None, :])


@triton.jit
def _expand_part(d, hz_ptr, stride_hz, row, bmask, b_ptr, stride_bn, stride_br, n, nm, R, DOT: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """``d += hz[row, :R] @ b[n, :R]^T``; ``hz`` (float32 or already bfloat16) rounded to ``DOT`` (``rank_dot``)."""
    cr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + cr
        rm = r < R
        h = tl.load(hz_ptr + row[:, None] * stride_hz + r[None, :], mask=bmask[:, None] & rm[None, :], other=0.0)
        b = tl.load(b_ptr + n[None, :] * stride_bn + r[:, None] * stride_br, mask=rm[:, None] & nm[None, :], other=0.0)
        d = mma(h, b, d, DOT)
    return d


@triton.jit(do_not_specialize=["batch"])
def decode_expand_kernel(
    hz_ptr, stride_hz, tb_ptr, stride_tbn, stride_tbr, ib_ptr, stride_ibn, stride_ibr, out_ptr, stride_om, stride_on,
    batch, RT, RI, N, scale,
    HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr, DOT_TB: tl.constexpr, DOT_IB: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Launch 3: ``out[:, strip] += scale * (h B_t^T + z B_i^T)`` for one ``BLOCK_N`` strip, all rows."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    for b0 in range(0, batch, BLOCK_B):
        row = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        bmask = row < batch
        d = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        if HAS_TEXT:
            d = _expand_part(d, hz_ptr, stride_hz, row, bmask, tb_ptr, stride_tbn, stride_tbr, n, nm, RT, DOT_TB,
                             BLOCK_R)
        if HAS_IMAGE:
            d = _expand_part(d, hz_ptr + RT, stride_hz, row, bmask, ib_ptr, stride_ibn, stride_ibr, n, nm, RI,
                             DOT_IB, BLOCK_R)
        ptrs = out_ptr + row[:, None] * stride_om + n[None, :] * stride_on
        om = bmask[:, None] & nm[None, :]
        o = tl.load(ptrs, mask=om, other=0.0).to(tl.float32) + tl.cast(scale, tl.float32) * d
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=om)


def _rows_view(weight: torch.Tensor) -> torch.Tensor:
    """``(r, d_in[, k, k])`` as ``(r, d_in * k * k)`` without a copy when the reduction is contiguous
    (parameters always are); a strided view the user passes is copied, once per call."""
    flat = weight.reshape(weight.shape[0], -1)
    return flat if flat.stride(1) == 1 else flat.contiguous()


def _workspace(slices: int, batch: int, cols: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """Scratch ``(slices, batch, cols)`` (partial sums, ``[h | z]``) left uninitialised: every element
    a kernel reads was written by an earlier launch of the same step."""
    return torch.empty(slices, batch, cols, dtype=dtype, device=device)


def decode_step(x, out, text_a, text_b, image_weight, image_b, scale, pending, image_pos, height, width):
    """``reference.decode_step``'s contract: ``x`` ``(batch, d_in)``, ``out`` ``(batch, d_out)`` (added to
    in place), ``pending`` ``(batch, capacity, r)`` updated in place; ``image_pos``/``height``/``width``
    ``(batch,)`` int64 on the device (``image_pos = -1``: a text token). No host sync, shape-only grids,
    the weights read in place (module docstring)."""
    batch, d_in = x.shape
    n_out = out.shape[1]
    has_text, has_image = text_a is not None, image_weight is not None
    k = image_weight.shape[-1] if has_image else 1
    kk = k * k
    sms = program_target(x.device)
    ta, tb = (_rows_view(text_a), text_b) if has_text else (dummy(x).view(1, 1),) * 2
    w, ib = (_rows_view(image_weight), image_b) if has_image else (dummy(x).view(1, 1),) * 2
    rt, ri = ta.shape[0] if has_text else 0, w.shape[0] if has_image else 0
    pt = plan(rt, d_in, 1, sms) if has_text else Plan(1, 1, 0, GRAIN, 0)
    pi = plan(ri, d_in, kk, sms) if has_image else Plan(1, 1, 0, GRAIN, 0)
    ws_t = _workspace(pt.ni, batch, rt, x.device) if has_text else dummy(x).float().view(1, 1, 1)
    ws_i = _workspace(pi.ni, batch, ri * kk, x.device) if has_image else dummy(x).float().view(1, 1, 1)
    pend = pending if k > 1 and pending.numel() else dummy(x).float().view(1, 1, 1)
    capacity = pending.shape[1] if k > 1 and pending.numel() else 0
    flags = dict(HAS_TEXT=has_text, HAS_IMAGE=has_image)
    # One MMA dtype per adapter from all its tensors (dot_dtype); h and z are intermediates (rank_dot).
    dot_t = dot_dtype(x, text_a, text_b) if has_text else tl.float32
    dot_i = dot_dtype(x, image_weight, image_b) if has_image else tl.float32
    block_b = min(MAX_BLOCK_B, pow2(batch))
    decode_shrink_kernel[(pt.programs + pi.programs,)](
        x, x.stride(0), x.stride(1), image_pos, batch, d_in,
        ta, ta.stride(0), ws_t, ws_t.stride(0), ws_t.stride(1), rt, pt.slice_i, max(pt.nc, 1), pt.programs,
        w, w.stride(0), ws_i, ws_i.stride(0), ws_i.stride(1), ri, pi.slice_i, max(pi.nc, 1),
        KK=kk, KKP=pi.kkp, DOT_T=dot_t, DOT_I=dot_i, BLOCK_B=block_b, BLOCK_CT=pt.block_c, BLOCK_CI=pi.block_c,
        BLOCK_I=BLOCK_I, num_warps=SHRINK_WARPS, num_stages=SHRINK_STAGES, **flags,
    )
    # [h | z] is stored already rounded to the expansion's operand dtype (rank_dot; the same single
    # rounding the MMA would do): bfloat16 halves what every expand program re-reads from L2.
    dots = {rank_dot(d) for d, used in ((dot_t, has_text), (dot_i, has_image)) if used}
    hz_dtype = torch.bfloat16 if dots == {tl.bfloat16} else torch.float32
    hz = _workspace(1, batch, rt + ri, x.device, hz_dtype)[0]
    block_r = ring_block_r(pi.kkp)
    nt = triton.cdiv(rt, block_r)
    decode_ring_kernel[(triton.cdiv(batch, RING_BLOCK_B), nt + triton.cdiv(ri, block_r))](
        ws_t, ws_t.stride(0), ws_t.stride(1), pt.ni, ws_i, ws_i.stride(0), ws_i.stride(1), pi.ni,
        hz, hz.stride(0), pend, pend.stride(0), pend.stride(1), pend.stride(2), image_pos, height, width,
        batch, capacity, rt, ri, nt, KS=k, KKP=pi.kkp, BLOCK_B=RING_BLOCK_B, BLOCK_R=block_r,
        num_warps=RING_WARPS, **flags,
    )
    block_n = expand_block_n(n_out, sms)
    decode_expand_kernel[(triton.cdiv(n_out, block_n),)](
        hz, hz.stride(0), tb, tb.stride(0), tb.stride(1), ib, ib.stride(0), ib.stride(1),
        out, out.stride(0), out.stride(1), batch, rt, ri, n_out, float(scale),
        DOT_TB=rank_dot(dot_t), DOT_IB=rank_dot(dot_i), BLOCK_B=block_b, BLOCK_R=EXPAND_BLOCK_R, BLOCK_N=block_n,
        num_warps=EXPAND_WARPS, num_stages=EXPAND_STAGES, **flags,
    )
