"""The differentiable ops: ``conv_lora``, ``moss_lora`` and the decode step ``moss_lora_step``.

Three ``torch.library`` custom ops in the ``moss`` namespace carry every call to a backend:

* ``moss::lora_forward`` (functional, autograd registered; backward is ``moss::lora_backward``) —
  training and plain inference;
* ``moss::lora_accumulate_`` (adds into ``out`` and updates a state's pending sums in place) —
  inference with ``out=`` or ``state=``;
* ``moss::lora_step_`` — one token per sequence, graph-capturable.

Layouts never reach the ops: they pass as their index tensors (``ImageLayout.index``), so
``torch.compile(fullgraph=True)`` traces a layer without a graph break. This module is the one place
that checks user input and resolves the backend (``backends.resolve``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .layout import ImageLayout
from .reference import compute_dtype
from .state import ConvLoRAState

__all__ = ["conv_lora", "moss_lora", "moss_lora_step"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ============================================================================ helpers
def _rows(t: Tensor) -> Tensor:
    """``(B, S, d)`` -> ``(B*S, d)`` without a copy when the rows allow it (strided rows are fine)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    n = t.shape[0] * t.shape[1]  # explicit: -1 is ambiguous for a tensor with no elements
    try:
        return t.view(n, t.shape[-1])
    except RuntimeError:
        return t.reshape(n, t.shape[-1])


def _eager_or_op(op, impl):
    """Call ``impl`` directly in eager mode, ``op`` while tracing.

    The mutating ops have no autograd formula, so outside ``torch.compile`` the custom-op dispatcher
    adds only latency (about 100 us a call, most of a CPU decode step); while tracing, the op keeps
    the graph whole.
    """

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else impl(*args)

    return call


def _no_autocast(fn):
    """Run a backend with autocast off: the ops compute from the dtypes they are given (README
    "dtypes"), and autocast must not re-round the float32 products inside a backend (the reference
    backend's matmuls would turn bfloat16 and then meet float32 operands)."""

    def call(*args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return fn(*args, **kwargs)  # the common case: no context to enter on every decode step
        with torch.autocast("cpu", enabled=False), _cuda_autocast_off():
            return fn(*args, **kwargs)

    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    return call


def _cuda_autocast_off():
    return torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else contextlib.nullcontext()


def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    """Ops return empty tensors where Python returns ``None`` (custom ops cannot return ``None``)."""
    return None if t is None or (t.numel() == 0 and t.dim() == 1) else t


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(0, dtype=dtype)


def _case_dtype(x: Tensor, *weights: Optional[Tensor]) -> torch.dtype:
    """The dtype a backend must handle: float64 if anything is float64, else ``x``'s."""
    return torch.float64 if compute_dtype(x, *weights) == torch.float64 else x.dtype


def _d_out(text_b, image_b) -> int:
    return (text_b if text_b is not None else image_b).shape[0]


# ============================================================================ ops
@torch.library.custom_op("moss::lora_forward", mutates_args=())
def _lora_forward(
    x: Tensor, text_rows: Tensor, image_rows: Tensor, conv_sources: Tensor, conv_targets: Tensor,
    text_a: Optional[Tensor], text_b: Optional[Tensor], image_weight: Optional[Tensor], image_b: Optional[Tensor],
    scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    B, S, _ = x.shape
    out = torch.zeros(B * S, _d_out(text_b, image_b), dtype=x.dtype, device=x.device)
    text_h, image_z = _no_autocast(backends.get_backend(backend).forward)(
        _rows(x), out, text_rows, image_rows, conv_sources, text_a, text_b, image_weight, image_b, scale)
    cdt = compute_dtype(x, text_a, image_weight)
    return (out.view(B, S, -1),
            _empty(x, cdt) if text_h is None else text_h,
            _empty(x, cdt) if image_z is None else image_z)


@_lora_forward.register_fake
def _(x, text_rows, image_rows, conv_sources, conv_targets, text_a, text_b, image_weight, image_b, scale, backend):
    B, S, _ = x.shape
    cdt = compute_dtype(x, text_a, image_weight)
    th = _empty(x, cdt) if text_a is None else x.new_empty(text_rows.shape[0], text_a.shape[0], dtype=cdt)
    iz = _empty(x, cdt) if image_weight is None else x.new_empty(image_rows.shape[0], image_weight.shape[0], dtype=cdt)
    if text_a is not None and text_rows.shape[0] == 0:
        th = _empty(x, cdt)
    if image_weight is not None and image_rows.shape[0] == 0:
        iz = _empty(x, cdt)
    return x.new_empty(B, S, _d_out(text_b, image_b)), th, iz


@torch.library.custom_op("moss::lora_backward", mutates_args=())
def _lora_backward(
    grad: Tensor, x: Tensor, text_rows: Tensor, image_rows: Tensor, conv_targets: Tensor,
    text_a: Optional[Tensor], text_b: Optional[Tensor], image_weight: Optional[Tensor], image_b: Optional[Tensor],
    text_h: Tensor, image_z: Tensor, scale: float, needs_x: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _no_autocast(backends.get_backend(backend).backward)(
        _rows(grad), _rows(x), text_rows, image_rows, conv_targets, text_a, text_b, image_weight, image_b,
        _opt(text_h), _opt(image_z), scale, needs_x)
    dx = _empty(x) if grads[0] is None else grads[0].view(x.shape)
    return (dx, *(_empty(x) if g is None else g for g in grads[1:]))


@_lora_backward.register_fake
def _(grad, x, text_rows, image_rows, conv_targets, text_a, text_b, image_weight, image_b, text_h, image_z,
      scale, needs_x, backend):
    like = lambda t: _empty(x) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if needs_x else _empty(x),
            like(text_a), like(text_b), like(image_weight), like(image_b))


def _setup_context(ctx, inputs, output):
    (x, text_rows, image_rows, _, conv_targets, text_a, text_b, image_weight, image_b, scale, backend) = inputs
    _, text_h, image_z = output
    ctx.save_for_backward(x, text_rows, image_rows, conv_targets, text_a, text_b, image_weight, image_b,
                          text_h, image_z)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(text_h, image_z)


def _backward(ctx, grad, _grad_text_h, _grad_image_z):
    x, text_rows, image_rows, conv_targets, text_a, text_b, image_weight, image_b, text_h, image_z = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, d_ta, d_tb, d_w, d_ib = _lora_backward(
        grad.contiguous(), x, text_rows, image_rows, conv_targets, text_a, text_b, image_weight, image_b,
        text_h, image_z, ctx.scale, needs[0], ctx.backend)
    keep = lambda g, i: g if needs[i] else None
    return (keep(dx, 0), None, None, None, None, keep(d_ta, 5), keep(d_tb, 6), keep(d_w, 7), keep(d_ib, 8),
            None, None)


_lora_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("moss::lora_accumulate_", mutates_args=("out", "pending"))
def _lora_accumulate(
    out: Tensor, x: Tensor, text_rows: Tensor, image_rows: Tensor, conv_sources: Tensor,
    text_a: Optional[Tensor], text_b: Optional[Tensor], image_weight: Optional[Tensor], image_b: Optional[Tensor],
    scale: float, backend: str, pending: Optional[Tensor], read_tokens: Optional[Tensor],
    read_slots: Optional[Tensor], write_slots: Optional[Tensor], write_sources: Optional[Tensor],
    write_keep: Optional[Tensor],
) -> None:
    state_index = None
    if pending is not None:
        from .layout import StateIndex

        state_index = StateIndex(read_tokens, read_slots, write_slots, write_sources, write_keep)
        pending = pending.view(-1, pending.shape[-1])
    _no_autocast(backends.get_backend(backend).forward)(
        _rows(x), out.view(-1, out.shape[-1]), text_rows, image_rows, conv_sources, text_a, text_b,
        image_weight, image_b, scale, pending, state_index)


@_lora_accumulate.register_fake
def _(*args):
    return None


_accumulate_call = _eager_or_op(_lora_accumulate, _lora_accumulate._init_fn)


@torch.library.custom_op("moss::lora_step_", mutates_args=("out", "pending"))
def _lora_step(
    out: Tensor, x: Tensor, text_a: Optional[Tensor], text_b: Optional[Tensor], image_weight: Optional[Tensor],
    image_b: Optional[Tensor], scale: float, pending: Tensor, image_pos: Tensor, height: Tensor, width: Tensor,
    backend: str,
) -> None:
    _no_autocast(backends.get_backend(backend).decode_step)(
        x, out, text_a, text_b, image_weight, image_b, scale, pending, image_pos, height, width)


@_lora_step.register_fake
def _(*args):
    return None


_step_call = _eager_or_op(_lora_step, _lora_step._init_fn)


# ============================================================================ checks
def _check_tensor(name: str, t, dims: int, device: Optional[torch.device] = None, floating: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but x is on {device}")


def _check_adapters(x: Tensor, text_a, text_b, image_weight, image_b) -> int:
    """Check adapter shapes against ``x``; return ``d_out``."""
    d_in = x.shape[-1]
    if (text_a is None) != (text_b is None):
        raise ValueError("text_a and text_b must be given together")
    if (image_weight is None) != (image_b is None):
        raise ValueError("image_weight and image_b must be given together")
    if text_a is None and image_weight is None:
        raise ValueError("give at least one adapter (text_a/text_b or image_weight/image_b)")
    if text_a is not None:
        _check_tensor("text_a", text_a, 2, x.device)
        _check_tensor("text_b", text_b, 2, x.device)
    if image_weight is not None:
        _check_tensor("image_weight", image_weight, 4, x.device)
        _check_tensor("image_b", image_b, 2, x.device)
    # When the adapters agree on their input width and x does not, x is what is wrong.
    widths = {name: t for name, t in (("text_a", text_a), ("image_weight", image_weight)) if t is not None}
    if len({t.shape[1] for t in widths.values()}) == 1:
        name, t = next(iter(widths.items()))
        if t.shape[1] != d_in:
            raise ValueError(f"x has last dimension {d_in}, but the adapters take inputs of width {t.shape[1]} "
                             f"({name} has shape {tuple(t.shape)}): x must end in {t.shape[1]}")
    d_out = None
    if text_a is not None:
        if text_a.shape[1] != d_in:
            raise ValueError(f"text_a must have shape (rank, {d_in}), got {tuple(text_a.shape)}")
        if text_b.shape[1] != text_a.shape[0]:
            raise ValueError(f"text_b must have shape (d_out, {text_a.shape[0]}), got {tuple(text_b.shape)}")
        d_out = text_b.shape[0]
    if image_weight is not None:
        r, wd, kh, kw = image_weight.shape
        if wd != d_in or kh != kw or kh < 1:
            raise ValueError(f"image_weight must have shape (rank, {d_in}, k, k), got {tuple(image_weight.shape)}")
        if image_b.shape[1] != r:
            raise ValueError(f"image_b must have shape (d_out, {r}), got {tuple(image_b.shape)}")
        if d_out is not None and image_b.shape[0] != d_out:
            raise ValueError(f"image_b has d_out {image_b.shape[0]} but text_b has {d_out}")
        d_out = image_b.shape[0]
    return d_out


def _check_positions(image_pos: Tensor, height: Tensor, width: Tensor, k: int, capacity: Optional[int]) -> None:
    """The one check of a decode step's positions, for every backend: each ``image_pos`` is ``-1``
    (text) or a raster index inside its ``height x width`` image (both at least 1), and with a ring
    (``capacity`` given, ``k > 1``) the image's ``(k-1)(width+1)`` slots fit the state. A bad row would
    index another sequence's slots, or memory past the state.

    On the CPU in eager mode the values are at hand: ``ValueError`` naming the argument and the row.
    On a GPU, and while ``torch.compile`` traces, the same predicate runs on the device as one
    ``torch._assert_async`` (no host synchronisation: CUDA-graph safe; a failure is a device-side
    assert). Every backend's kernel also leaves such a row untouched, so nothing is read or written
    out of bounds even past this check. All comparisons are overflow-free (``p // W < H``, not
    ``p < H * W``).
    """
    ring = capacity is not None and k > 1
    if image_pos.device.type == "cpu" and not torch.compiler.is_compiling():
        for b, (p, h, w) in enumerate(zip(image_pos.tolist(), height.tolist(), width.tolist())):
            if p < -1:
                raise ValueError(f"image_pos[{b}] = {p}: must be -1 (a text token) or a raster index >= 0")
            if p < 0:
                continue
            if h < 1 or w < 1:
                raise ValueError(f"height[{b}] = {h}, width[{b}] = {w}: an image token's grid must be at least 1x1")
            if p // w >= h:
                raise ValueError(f"image_pos[{b}] = {p} is beyond the {h}x{w} image")
            if ring and w > capacity // (k - 1) - 1:
                raise ValueError(f"width[{b}] = {w}: the state's capacity {capacity} is below the (k-1)*(width+1) = "
                                 f"{(k - 1) * (w + 1)} slots this image needs (reserve the width first)")
        return
    is_image = image_pos >= 0
    W = width.clamp(min=1)
    fits = (height >= 1) & (width >= 1) & (image_pos // W < height)
    if ring:
        fits &= W <= capacity // (k - 1) - 1
    torch._assert_async((image_pos >= -1).all() & (fits | ~is_image).all(),
                        "moss_lora_step: image_pos must be -1 or lie inside its height x width image (both >= 1), "
                        "and the state's capacity must cover (k-1)*(width+1)")


def _check_features(x: Tensor) -> None:
    if x.shape[-1] == 0:
        raise ValueError(f"x must have at least one feature (d_in >= 1), got shape {tuple(x.shape)}")


def _check_d_out(d_out: int, text_b: Optional[Tensor], image_b: Optional[Tensor]) -> None:
    if d_out == 0:
        name = "text_b" if text_b is not None else "image_b"
        raise ValueError(f"{name} must have at least one output row (d_out >= 1), got shape "
                         f"{tuple((text_b if text_b is not None else image_b).shape)}")


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number, got {scale!r}")
    return float(scale)


def _overlaps_itself(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (``expand``, ``as_strided``): the strides,
    sorted, must each pass every offset the smaller ones reach. (A few exotic interleaved layouts
    that do not overlap fail this too; they are refused as well, with the same message.)"""
    reach = 0
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(t.dim()) if t.shape[d] > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _byte_range(t: Tensor) -> tuple[int, int]:
    first = t.storage_offset() * t.element_size()
    last = first + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) * t.element_size()
    return first, last + t.element_size()


def _shares_memory(a: Tensor, b: Optional[Tensor]) -> bool:
    """Whether ``a`` and ``b`` may overlap: same storage and intersecting byte ranges."""
    if b is None or a.numel() == 0 or b.numel() == 0 or a.data_ptr() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False  # the common case, decided without the ranges
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


def _check_out(out, x: Tensor, d_out: int, leading: tuple, *inputs: Optional[Tensor]) -> None:
    """``out`` is written in place, by many threads on a GPU: it must have the right shape, no two
    of its elements may share memory, and it may not overlap ``x`` or a weight it is computed from."""
    _check_tensor("out", out, len(leading) + 1, x.device)
    if tuple(out.shape) != (*leading, d_out):
        raise ValueError(f"out must have shape {(*leading, d_out)}, got {tuple(out.shape)}")
    if _overlaps_itself(out):
        raise ValueError(f"out has elements that share memory (strides {tuple(out.stride())} for shape "
                         f"{tuple(out.shape)}, e.g. an expand()ed tensor): it is written in place, give one "
                         "with distinct elements")
    if not torch.compiler.is_compiling():  # while tracing, storages are fake; functionalization orders aliases
        for name, t in (("x", x), *zip(("text_a", "text_b", "image_weight", "image_b"), inputs)):
            if _shares_memory(out, t):
                raise ValueError(f"out shares memory with {name}: it is written while {name} is read")


# ============================================================================ public API
def moss_lora(
    x: Tensor,
    layout: ImageLayout,
    text_a: Optional[Tensor],
    text_b: Optional[Tensor],
    image_weight: Optional[Tensor],
    image_b: Optional[Tensor],
    scale: float = 1.0,
    *,
    out: Optional[Tensor] = None,
    state: Optional[ConvLoRAState] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Both MoSS adapters: text rows ``scale * x A_t^T B_t^T``, image rows the causal conv LoRA.

    Args:
        x: ``(batch, seq, d_in)`` float32/float16/bfloat16 (float64: reference backend only).
        layout: where the images are (``ImageLayout``), for ``batch x seq``.
        text_a, text_b: ``(r_t, d_in)``, ``(d_out, r_t)``, or both ``None`` (text rows get 0).
        image_weight, image_b: ``(r, d_in, k, k)`` (``nn.Conv2d`` layout), ``(d_out, r)``, or both
            ``None`` (image rows get 0).
        scale: ``alpha / r``.
        out: ``(batch, seq, d_out)``; when given, the delta is added into it in place and it is
            returned.
        state: a ``ConvLoRAState`` to continue images from (spans with ``offset > 0``) and to leave
            pending sums in; inference only.
        backend: ``"triton"``, ``"native"``, ``"reference"`` or ``None`` for the default.

    Returns the delta ``(batch, seq, d_out)`` in ``x``'s dtype (or ``out``).

    Dtypes, one policy on every backend: products take half-precision operands only when ``x`` and
    every weight given share that half dtype; any mix (bf16 ``x`` with float32 weights, float32 ``x``
    with half weights) computes with float32 operands, nothing rounded. Accumulation is float32;
    each gradient has its own tensor's dtype. A float32 rank-space intermediate of float16 inputs that
    feeds a tensor-core product is rounded to bfloat16 (float16 would overflow at 65504). Under
    ``torch.autocast`` the op computes from the dtypes it is given, exactly as without autocast.
    """
    _check_tensor("x", x, 3)
    _check_features(x)
    if not isinstance(layout, ImageLayout):
        raise TypeError(f"layout must be an ImageLayout, got {type(layout).__name__}")
    if tuple(x.shape[:2]) != (layout.batch_size, layout.seq_len):
        raise ValueError(f"x has shape {tuple(x.shape)}, but the layout is for "
                         f"(batch={layout.batch_size}, seq={layout.seq_len}, d_in)")
    d_out = _check_adapters(x, text_a, text_b, image_weight, image_b)
    _check_d_out(d_out, text_b, image_b)
    scale = _check_scale(scale)
    if out is not None:
        _check_out(out, x, d_out, tuple(x.shape[:2]), text_a, text_b, image_weight, image_b)
    k = image_weight.shape[-1] if image_weight is not None else 1
    name = backends.resolve(backend, x.device, _case_dtype(x, *(text_a, image_weight)), k)
    index = layout.index(x.device, k)
    weights = (text_a, text_b, image_weight, image_b)

    if state is not None:
        if not isinstance(state, ConvLoRAState):
            raise TypeError(f"state must be a ConvLoRAState, got {type(state).__name__}")
        if image_weight is None:
            raise ValueError("state= needs a conv adapter (image_weight)")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights)):
            raise ValueError("state= is for inference: run it under torch.no_grad() (gradients do not flow "
                             "through the pending sums of earlier calls)")
        state.check(layout, image_weight.shape[0], k, x.device)
        state.reserve(layout.max_width)
        si = layout.state_index(x.device, k, state.capacity)
        target = out if out is not None else x.new_zeros(*x.shape[:2], d_out)
        _accumulate(target, x, index, weights, scale, name, state.pending, si)
        state.advance(layout)
        return target

    grad_needed = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *weights, out))
    if out is not None and not grad_needed:
        _accumulate(out, x, index, weights, scale, name, None, None)
        return out
    delta, _, _ = _lora_forward(x, index.text_rows, index.image_rows, index.conv_sources, index.conv_targets,
                                *weights, scale, name)
    if out is not None:
        return out.add_(delta)
    return delta


def _accumulate(out, x, index, weights, scale, name, pending, si) -> None:
    target = out if _viewable(out) else out.contiguous()
    state_args = (None,) * 6 if pending is None else (pending, *si)
    _accumulate_call(target, x, index.text_rows, index.image_rows, index.conv_sources, *weights, scale, name,
                     *state_args)
    if target is not out:
        out.copy_(target)


def _viewable(t: Tensor) -> bool:
    try:
        t.view(-1, t.shape[-1])
        return t.stride(-1) == 1
    except RuntimeError:
        return False


def conv_lora(
    x: Tensor,
    layout: ImageLayout,
    weight: Tensor,
    lora_b: Tensor,
    scale: float = 1.0,
    *,
    out: Optional[Tensor] = None,
    state: Optional[ConvLoRAState] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """The convolutional LoRA alone: image rows get ``scale * conv(x) B^T``, text rows 0.

    ``weight``: ``(r, d_in, k, k)``; ``lora_b``: ``(d_out, r)``. Other arguments as ``moss_lora``.
    """
    return moss_lora(x, layout, None, None, weight, lora_b, scale, out=out, state=state, backend=backend)


def moss_lora_step(
    x: Tensor,
    text_a: Optional[Tensor],
    text_b: Optional[Tensor],
    image_weight: Optional[Tensor],
    image_b: Optional[Tensor],
    scale: float,
    state: Optional[ConvLoRAState],
    image_pos: Tensor,
    height: Tensor,
    width: Tensor,
    *,
    out: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """One decoding step, one token per sequence, with no host synchronisation (CUDA-graph safe).

    ``x``: ``(batch, d_in)``. ``image_pos``, ``height``, ``width``: ``(batch,)`` int64 on ``x``'s
    device; ``image_pos[b]`` is the raster index of the token in its image, ``-1`` for text.
    ``state.capacity`` must already cover the widest image (``ConvLoRAState(max_width=...)`` or
    ``reserve``). Returns the delta ``(batch, d_out)`` (or ``out`` with it added).

    Pending sums: a token at ``image_pos = 0`` starts a new image, and nothing an earlier image of
    that sequence left pending (finished, or left before its end) is added to it; the state needs no
    reset between images. Text tokens (``-1``) leave the ring as it is, so an image can be left and
    resumed at its next raster index (end-of-row tokens, interleaved text). Positions are checked
    once for every backend (``_check_positions``): on the CPU a ``ValueError``, on a GPU or while
    compiling a device-side assert, no host synchronisation.
    """
    _check_tensor("x", x, 2)
    _check_features(x)
    d_out = _check_adapters(x, text_a, text_b, image_weight, image_b)
    _check_d_out(d_out, text_b, image_b)
    scale = _check_scale(scale)
    batch = x.shape[0]
    for name_, t in (("image_pos", image_pos), ("height", height), ("width", width)):
        _check_tensor(name_, t, 1, x.device, floating=False)
        if t.dtype != torch.int64 or t.shape[0] != batch:
            raise ValueError(f"{name_} must be int64 of shape ({batch},), got {t.dtype} {tuple(t.shape)}")
    if out is None:
        out = x.new_zeros(batch, d_out)
    else:
        _check_out(out, x, d_out, (batch,), text_a, text_b, image_weight, image_b)
    k = image_weight.shape[-1] if image_weight is not None else 1
    if image_weight is not None:
        if not isinstance(state, ConvLoRAState):
            raise TypeError(f"state must be a ConvLoRAState, got {type(state).__name__}")
        if state.batch_size != batch or state.rank != image_weight.shape[0] or state.kernel_size != k:
            raise ValueError(f"state {state} does not fit batch {batch}, rank {image_weight.shape[0]}, kernel_size {k}")
        if state.pending.device != x.device:
            raise ValueError(f"state is on {state.pending.device}, x on {x.device}")
        _check_positions(image_pos, height, width, k, state.capacity)
        pending = state.pending
        state.mark_unchecked()
    else:
        _check_positions(image_pos, height, width, k, None)
        pending = x.new_zeros(batch, 0, 1, dtype=torch.float32)
    name = backends.resolve(backend, x.device, _case_dtype(x, text_a, image_weight), k)
    target = out if out.is_contiguous() else out.contiguous()
    _step_call(target, x, text_a, text_b, image_weight, image_b, scale, pending, image_pos, height, width, name)
    if target is not out:
        out.copy_(target)
    return out

