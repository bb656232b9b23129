"""The math, twice: literal and rank-space.

* ``literal_moss_lora`` is the paper's definition written the way a user would: gather an image's
  tokens, lay them on a ``(d_in, H, W)`` grid, ``F.pad`` left/top by ``k-1``, ``F.conv2d``, scatter
  back. Run in float64 it is the ground truth; it is also the "eager" benchmark baseline. Plain
  autograd differentiates it.
* The rank-space functions (``forward``, ``backward``, ``decode_step``) are the reference backend:
  one GEMM over all ``k*k`` taps stacked (``P = x K_all^T``), then masked shifts of ``r``-wide rows
  driven by the layout's index tables (SPEC §1). They work on any device and are what the fast
  backends are checked against, besides the ground truth.

The rank-space functions take raw tensors (no layouts), the same arguments every backend takes;
see ``backends.Backend`` for the contract.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .layout import ImageLayout, StateIndex

__all__ = ["backward", "compute_dtype", "decode_step", "forward", "literal_moss_lora", "stacked_taps"]


# ---------------------------------------------------------------------------- literal
def literal_moss_lora(
    x: torch.Tensor,
    layout: ImageLayout,
    text_a: Optional[torch.Tensor],
    text_b: Optional[torch.Tensor],
    image_weight: Optional[torch.Tensor],
    image_b: Optional[torch.Tensor],
    scale: float = 1.0,
) -> torch.Tensor:
    """The adapter delta ``(batch, seq, d_out)`` straight from the definition, in ``x``'s dtype.

    Every image segment must start at image token 0 (no state here). Text rows get
    ``scale * x A_t^T B_t^T`` (zero when no text adapter is given).
    """
    B, S, d_in = x.shape
    d_out = (text_b if text_b is not None else image_b).shape[0]
    flat = x.reshape(B * S, d_in)
    delta = x.new_zeros(B * S, d_out)
    if text_a is not None:
        rows = layout.index(x.device).text_rows
        xt = flat[rows]
        delta = delta.index_put((rows,), scale * (xt @ text_a.to(x.dtype).t()) @ text_b.to(x.dtype).t())
    if image_weight is not None and layout.num_image_tokens and image_weight.shape[0] > 0:  # rank 0: adds zero
        k = image_weight.shape[-1]
        w = image_weight.to(x.dtype)
        rows_all = layout.index(x.device).image_rows
        for seg in layout.segments:
            if seg.offset != 0:
                raise ValueError("literal_moss_lora: segments continuing from a state are not supported")
            n = seg.end - seg.offset
            rows = rows_all[seg.first_local : seg.first_local + n]
            grid = x.new_zeros(seg.height * seg.width, d_in)
            grid = grid.index_put((torch.arange(n, device=x.device),), flat[rows])
            grid = grid.t().reshape(1, d_in, seg.height, seg.width)
            z = F.conv2d(F.pad(grid, (k - 1, 0, k - 1, 0)), w)  # (1, r, H, W)
            z = z.reshape(w.shape[0], seg.height * seg.width).t()[:n]
            delta = delta.index_put((rows,), scale * z @ image_b.to(x.dtype).t())
    return delta.view(B, S, d_out)


# ---------------------------------------------------------------------------- rank space
def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), else float32: low precision accumulates in fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def stacked_taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(r, d_in, k, k)`` conv weight -> ``K_all`` of shape ``(k*k*r, d_in)``, tap ``a*k+b`` major."""
    r, d_in, k, _ = weight.shape
    return weight.to(dtype).permute(2, 3, 0, 1).reshape(k * k * r, d_in)


def _gather_taps(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[t, tap] = rows[index[t, tap]]`` (zero where ``index == -1``): ``(n, k*k, r)``.

    Masked taps are selected away (``where``), never multiplied by zero: ``0 * inf`` is NaN, and a
    padding tap reads some unrelated row (another sequence's) that may hold one.
    """
    picked = rows.index_select(0, index.clamp(min=0).flatten()).view(*index.shape, rows.shape[1])
    return torch.where((index >= 0).unsqueeze(2), picked, picked.new_zeros(()))


def _shift_sum(per_tap: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_tap per_tap[index[t, tap], tap]`` with ``index == -1`` contributing nothing.

    ``per_tap``: ``(n, k*k, r)``. This is the masked ``r``-wide shift of SPEC §1.
    """
    n, kk, r = per_tap.shape
    out = per_tap.new_zeros(index.shape[0], r)
    if n == 0:
        return out
    for tap in range(kk):
        idx = index[:, tap]
        rows = per_tap[:, tap].index_select(0, idx.clamp(min=0))
        out += torch.where((idx >= 0).unsqueeze(1), rows, rows.new_zeros(()))
    return out


def forward(
    x: torch.Tensor,
    out: torch.Tensor,
    text_rows: torch.Tensor,
    image_rows: torch.Tensor,
    conv_sources: torch.Tensor,
    text_a: Optional[torch.Tensor],
    text_b: Optional[torch.Tensor],
    image_weight: Optional[torch.Tensor],
    image_b: Optional[torch.Tensor],
    scale: float,
    pending: Optional[torch.Tensor] = None,
    state_index: Optional[StateIndex] = None,
):
    """Accumulate ``scale * delta`` into ``out`` (``(N, d_out)``, in place); return ``(text_h, image_z)``.

    ``x``: ``(N, d_in)``, rows may be strided. ``text_h = x_t A_t^T`` and ``image_z`` (the conv
    output, ``(n_image, r)``) are in the compute dtype, saved for backward. With ``pending`` (the
    state's ``(batch * capacity, r)`` view) and ``state_index``, images continue from and leave
    pending sums.
    """
    cdt = compute_dtype(x, text_a, image_weight)
    text_h = image_z = None
    if text_a is not None and text_rows.numel():
        xt = x.index_select(0, text_rows).to(cdt)
        text_h = xt @ text_a.to(cdt).t()
        _add_rows(out, text_rows, scale * (text_h @ text_b.to(cdt).t()))
    if image_weight is not None and image_rows.numel():
        r, _, k, _ = image_weight.shape
        xi = x.index_select(0, image_rows).to(cdt)
        taps = (xi @ stacked_taps(image_weight, cdt).t()).view(xi.shape[0], k * k, r)
        image_z = _shift_sum(taps, conv_sources)
        if state_index is not None:
            image_z.index_add_(0, state_index.read_tokens, pending.index_select(0, state_index.read_slots).to(cdt))
            left = _shift_sum(taps, state_index.write_sources)
            kept = pending.index_select(0, state_index.write_slots).to(cdt)
            left += torch.where(state_index.write_keep.unsqueeze(1), kept, kept.new_zeros(()))
            pending.index_copy_(0, state_index.write_slots, left.to(pending.dtype))
        _add_rows(out, image_rows, scale * (image_z @ image_b.to(cdt).t()))
    return text_h, image_z


def _add_rows(out: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> None:
    """``out[rows] += delta``, summed in ``delta``'s precision and rounded once."""
    out.index_copy_(0, rows, (out.index_select(0, rows).to(delta.dtype) + delta).to(out.dtype))


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    text_rows: torch.Tensor,
    image_rows: torch.Tensor,
    conv_targets: torch.Tensor,
    text_a: Optional[torch.Tensor],
    text_b: Optional[torch.Tensor],
    image_weight: Optional[torch.Tensor],
    image_b: Optional[torch.Tensor],
    text_h: Optional[torch.Tensor],
    image_z: Optional[torch.Tensor],
    scale: float,
    needs_x: bool = True,
):
    """Gradients ``(dx, d_text_a, d_text_b, d_image_weight, d_image_b)`` in each input's dtype.

    ``dx`` is ``(N, d_in)`` (``None`` unless ``needs_x``); weights' gradients are ``None`` where the
    adapter is absent. The conv's transpose gathers ``dz`` through ``conv_targets`` (the right,
    lower and lower-right neighbours): ``dP[t, tap] = dz[targets[t, tap]]``,
    ``dK_all = dP^T x``, ``dx = dP K_all``.
    """
    cdt = compute_dtype(x, text_a, image_weight)
    d_in = x.shape[1]
    dx = torch.zeros(x.shape[0], d_in, dtype=cdt, device=x.device) if needs_x else None
    d_ta = d_tb = d_w = d_ib = None
    if text_a is not None:
        d_ta, d_tb = torch.zeros_like(text_a, dtype=cdt), torch.zeros_like(text_b, dtype=cdt)
        if text_rows.numel():
            g = grad_out.index_select(0, text_rows).to(cdt)
            d_tb = scale * g.t() @ text_h
            dh = scale * g @ text_b.to(cdt)
            d_ta = dh.t() @ x.index_select(0, text_rows).to(cdt)
            if needs_x:
                dx.index_copy_(0, text_rows, dh @ text_a.to(cdt))
    if image_weight is not None:
        d_w, d_ib = torch.zeros_like(image_weight, dtype=cdt), torch.zeros_like(image_b, dtype=cdt)
        if image_rows.numel():
            r, _, k, _ = image_weight.shape
            g = grad_out.index_select(0, image_rows).to(cdt)
            d_ib = scale * g.t() @ image_z
            dz = scale * g @ image_b.to(cdt)
            d_taps = _gather_taps(dz, conv_targets).reshape(dz.shape[0], k * k * r)
            xi = x.index_select(0, image_rows).to(cdt)
            d_w = (d_taps.t() @ xi).view(k, k, r, d_in).permute(2, 3, 0, 1)
            if needs_x:
                dx.index_copy_(0, image_rows, d_taps @ stacked_taps(image_weight, cdt))
    cast = lambda g, like: None if g is None else g.to(like.dtype).contiguous()
    return (
        None if dx is None else dx.to(x.dtype),
        cast(d_ta, text_a), cast(d_tb, text_b), cast(d_w, image_weight), cast(d_ib, image_b),
    )


def decode_step(
    x: torch.Tensor,
    out: torch.Tensor,
    text_a: Optional[torch.Tensor],
    text_b: Optional[torch.Tensor],
    image_weight: Optional[torch.Tensor],
    image_b: Optional[torch.Tensor],
    scale: float,
    pending: torch.Tensor,
    image_pos: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
) -> None:
    """One token per sequence: accumulate the adapter output into ``out`` ``(batch, d_out)`` and
    update ``pending`` ``(batch, capacity, r)`` in place, with no host synchronisation.

    ``image_pos[b]`` is the raster index of sequence ``b``'s token in its ``height[b] x width[b]``
    image, or ``-1`` for a text token. Slot ``p mod L`` is read (what earlier tokens left for ``p``;
    nothing at ``p = 0``), reset and given this token's own contribution to ``p + L``; the other taps
    add to ``p + di*W + dj``, or write it where this token is the first to reach that position
    (``layout.first_contributor``). So whatever an earlier image, finished or left before its end,
    still had pending in the ring is never added to a new one. A row whose position lies
    outside its image, or whose ring would not fit the state, changes nothing (the ops refuse such
    input before any backend runs; this keeps every index in bounds regardless).
    """
    cdt = compute_dtype(x, text_a, image_weight)
    is_image = image_pos >= 0
    delta = torch.zeros(out.shape, dtype=cdt, device=out.device)
    zero = delta.new_zeros(())
    if text_a is not None:
        h = x.to(cdt) @ text_a.to(cdt).t()
        delta += torch.where((~is_image).unsqueeze(1), h @ text_b.to(cdt).t(), zero)
    if image_weight is not None:
        r, _, k, _ = image_weight.shape
        batch, capacity = pending.shape[0], pending.shape[1]
        taps = (x.to(cdt) @ stacked_taps(image_weight, cdt).t()).view(batch, k * k, r)
        z = taps[:, k * k - 1].clone()  # tap (k-1, k-1): the token itself
        H, W = height.clamp(min=1), width.clamp(min=1)
        p = image_pos.clamp(min=0)
        valid = is_image & (height >= 1) & (width >= 1) & (p // W < H)
        if k > 1:
            valid &= W <= capacity // (k - 1) - 1  # (k-1)(W+1) <= capacity, without overflow
        if k > 1 and capacity > 0:
            L = (k - 1) * (torch.where(valid, W, 0) + 1)
            i, j = p // W, p % W
            rows = torch.arange(batch, device=x.device)
            own = rows * capacity + torch.where(valid, p % L, 0)
            flat = pending.view(batch * capacity, r)
            mine = flat.index_select(0, own)
            # Token 0 has no earlier contributor: its slot holds an earlier image's leftovers, if anything.
            z += torch.where((valid & (p > 0)).unsqueeze(1), mine.to(cdt), zero)
            flat.index_copy_(0, own, torch.where(valid.unsqueeze(1), mine.new_zeros(()), mine))  # text: unchanged
            for tap in range(k * k - 1):
                di, dj = k - 1 - tap // k, k - 1 - tap % k
                ok = valid & (i < H - di) & (j + dj < W)  # i + di < H without overflow
                slot = rows * capacity + torch.where(ok, (p % L + di * W + dj) % L, 0)
                # The target's earliest contributor (layout.first_contributor) writes, later ones add.
                first = ok & ((i == 0) | (di == k - 1)) & ((j == 0) | (dj == k - 1))
                old = flat.index_select(0, slot)
                new = torch.where(first.unsqueeze(1), taps[:, tap], old.to(cdt) + taps[:, tap])
                flat.index_copy_(0, slot, torch.where(ok.unsqueeze(1), new.to(flat.dtype), old))
        delta += torch.where(valid.unsqueeze(1), z @ image_b.to(cdt).t(), zero)
    out.copy_((out.to(cdt) + scale * delta).to(out.dtype))
