"""The native backend's deformable-attention functions: ``deform_reference.py``'s contract over the
CPU kernels of ``csrc/cpu/deform_attn.cpp``.

The kernels read ``value`` in its own dtype and everything else in the compute dtype (float32, or
float64 when any input is float64), and write every element of the buffers allocated here. This
module converts the inputs (never down-casting), allocates, and casts the results back to each
input's dtype. The compiled extension comes from ``moss_kernels.native`` (imported at call time,
so that module can import this one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .deform_reference import compute_dtype

__all__ = ["mmfs_backward", "mmfs_forward", "ms_deform_backward", "ms_deform_forward"]


def _ext():
    from .native import extension

    return extension


def _value(value: Tensor, cdt: torch.dtype) -> Tensor:
    """The kernels compute float32 for float32/float16/bfloat16 values and float64 for float64:
    a float64 case with a lower-precision value reads a float64 copy of it."""
    return value.double() if cdt == torch.float64 and value.dtype != torch.float64 else value


def _tables(spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    shapes = spatial_shapes.to("cpu", torch.int64).contiguous()
    sizes = shapes.prod(-1)
    return shapes, torch.cumsum(sizes, 0) - sizes


def _acc(t: Tensor, cdt: torch.dtype) -> Tensor:
    return t.to(cdt).contiguous()


def ms_deform_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    cdt = compute_dtype(value, sampling_locations, attention_weights)
    v = _value(value, cdt)
    N, _, H, D = v.shape
    shapes, starts = _tables(spatial_shapes)
    out = v.new_empty(N, sampling_locations.shape[1], H * D)
    _ext().ms_deform_forward(v, shapes, starts, _acc(sampling_locations, cdt), _acc(attention_weights, cdt), out)
    return out.to(value.dtype)


def ms_deform_backward(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    cdt = compute_dtype(value, sampling_locations, attention_weights)
    v = _value(value, cdt)
    shapes, starts = _tables(spatial_shapes)
    grad_value = v.new_empty(v.shape, dtype=cdt)
    grad_loc = v.new_empty(sampling_locations.shape, dtype=cdt)
    grad_att = v.new_empty(attention_weights.shape, dtype=cdt)
    _ext().ms_deform_backward(_acc(grad_out, cdt), v, shapes, starts, _acc(sampling_locations, cdt),
                              _acc(attention_weights, cdt), grad_value, grad_loc, grad_att)
    return (grad_value.to(value.dtype), grad_loc.to(sampling_locations.dtype),
            grad_att.to(attention_weights.dtype))


def mmfs_forward(value, spatial_shapes, reference_points, sampling_offsets, attention_logits, visible, offset_scale,
                 sink):
    cdt = compute_dtype(value, reference_points, sampling_offsets, attention_logits, offset_scale)
    v = _value(value, cdt)
    N, _, _, H, D = v.shape
    Lq = attention_logits.shape[1]
    shapes, starts = _tables(spatial_shapes)
    out = v.new_empty(N, Lq, H * D)
    lse = v.new_empty(N, Lq, H, dtype=cdt)
    _ext().mmfs_forward(v, shapes, starts, _acc(reference_points, cdt), _acc(sampling_offsets, cdt),
                        _acc(attention_logits, cdt), visible.contiguous(), _acc(offset_scale, cdt), float(sink),
                        out, lse)
    return out.to(value.dtype), lse


def mmfs_backward(grad_out, value, spatial_shapes, reference_points, sampling_offsets, attention_logits, visible,
                  offset_scale, sink, lse):
    cdt = compute_dtype(value, reference_points, sampling_offsets, attention_logits, offset_scale)
    v = _value(value, cdt)
    N, _, _, H, _ = v.shape
    Lq = attention_logits.shape[1]
    shapes, starts = _tables(spatial_shapes)
    grad_value = v.new_empty(v.shape, dtype=cdt)
    grad_ref = v.new_empty(N, Lq, H, 2, dtype=cdt)  # per head: the kernel's tasks own one head each
    grad_off = v.new_empty(sampling_offsets.shape, dtype=cdt)
    grad_z = v.new_empty(attention_logits.shape, dtype=cdt)
    _ext().mmfs_backward(_acc(grad_out, cdt), v, shapes, starts, _acc(reference_points, cdt),
                         _acc(sampling_offsets, cdt), _acc(attention_logits, cdt), visible.contiguous(),
                         _acc(offset_scale, cdt), float(sink), _acc(lse, cdt), grad_value, grad_ref, grad_off, grad_z)
    return (grad_value.to(value.dtype), grad_ref.sum(2).to(reference_points.dtype),
            grad_off.to(sampling_offsets.dtype), grad_z.to(attention_logits.dtype))
