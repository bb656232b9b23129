"""Triton backend of moss_kernels (installed as ``moss_kernels.triton_kernels``).

Importing it registers the ``"triton"`` backend (``moss_kernels.backends``). It runs on CUDA GPUs, and
on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported):
that is how CI tests it. Kernels: ``forward.py`` (projection, fused expansion, state sums),
``backward.py`` (gradients without atomics), ``decode.py`` (the graph-capturable step),
``_common.py`` (the tile loops they share), ``deform_attn.py`` (``ms_deform_attn`` / ``mmfs_attn``);
``resources.py`` compiles them for sm_80/sm_90 without a GPU and reports registers and shared memory;
tuning notes and projections in ``TUNING.md``.
"""

from __future__ import annotations

try:
    import triton
    import triton.language  # noqa: F401
except ImportError as e:  # the backends module records this message and falls back
    raise ImportError(f"the Triton backend needs the 'triton' package ({e}); pip install triton") from e

import torch

from moss_kernels.backends import Backend, interpreting_triton, register_backend

from . import deform_attn
from ._common import INTERPRETED
from .backward import backward
from .decode import decode_step
from .forward import forward

__all__ = ["INTERPRETED", "TritonBackend"]


class TritonBackend(Backend):
    """The ``"triton"`` backend: ``forward``/``backward``/``decode_step`` with ``reference``'s contract."""

    name = "triton"
    forward = staticmethod(forward)
    backward = staticmethod(backward)
    decode_step = staticmethod(decode_step)
    deform_forward = staticmethod(deform_attn.ms_deform_forward)  # contract: moss_kernels/deform_reference.py
    deform_backward = staticmethod(deform_attn.ms_deform_backward)
    mmfs_forward = staticmethod(deform_attn.mmfs_forward)
    mmfs_backward = staticmethod(deform_attn.mmfs_backward)

    def is_available(self, device: torch.device) -> bool:
        device = torch.device(device)
        if device.type == "cuda":
            return torch.cuda.is_available()
        # The CPU runs only interpreted kernels, and only if they were built as such at import.
        return device.type == "cpu" and INTERPRETED and interpreting_triton()

    def supports(self, device: torch.device, dtype: torch.dtype, kernel_size: int) -> bool:
        return dtype in (torch.float32, torch.float16, torch.bfloat16) and kernel_size >= 1

    def supports_deform(self, device: torch.device, dtype: torch.dtype) -> bool:
        # float64 too: the deformable kernels take their compute dtype as a constexpr.
        return dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)


register_backend(TritonBackend())
