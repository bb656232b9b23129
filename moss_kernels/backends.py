"""Backends: which implementations exist, which one runs.

A backend is an object with a ``name`` and three methods taking raw tensors, with exactly the
signatures and semantics of ``reference.forward``, ``reference.backward`` and
``reference.decode_step`` (flattened ``(N, d)`` rows, layout index tables, in-place accumulation
into ``out``). A backend knows only how to compute fast; it never builds layouts or checks user
input (the ops in ``conv_lora`` did that).

Backends register themselves with ``register_backend``. The optional ones are loaded lazily, on the
first question about backends, from:

* ``moss_kernels.triton_kernels`` (the ``triton_kernels/`` directory of the repository) — needs
  Triton and a GPU, or ``TRITON_INTERPRET=1`` on the CPU;
* ``moss_kernels.native`` — the compiled ``csrc/`` extension.

If one cannot load, the package keeps working with the others and says why once.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Optional, Union

import torch

from . import deform_reference, reference

__all__ = [
    "Backend",
    "BackendDisabled",
    "available_backends",
    "backend_problems",
    "default_backend",
    "get_backend",
    "interpreting_triton",
    "register_backend",
]


class BackendDisabled(ImportError):
    """Raised by an optional backend's module when the user switched it off (``MOSS_KERNELS_NATIVE=0``):
    recorded in ``backend_problems()``, but not warned about — the user asked for it."""


class Backend:
    """Base class; subclasses override ``is_available`` and the three compute methods."""

    name = "?"

    def is_available(self, device: torch.device) -> bool:
        raise NotImplementedError

    def supports(self, device: torch.device, dtype: torch.dtype, kernel_size: int) -> bool:
        """Whether this backend computes the case at all (e.g. float64 only in the reference)."""
        return dtype in (torch.float32, torch.float16, torch.bfloat16)

    forward: Callable
    backward: Callable
    decode_step: Callable

    # The deformable-attention ops (contract: deform_reference.py); None where not computed.
    deform_forward: Optional[Callable] = None
    deform_backward: Optional[Callable] = None
    mmfs_forward: Optional[Callable] = None
    mmfs_backward: Optional[Callable] = None

    def supports_deform(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this backend computes ``ms_deform_attn`` / ``mmfs_attn`` for ``value`` of ``dtype``."""
        return self.mmfs_forward is not None and dtype in (torch.float32, torch.float16, torch.bfloat16)


class ReferenceBackend(Backend):
    name = "reference"
    forward = staticmethod(reference.forward)
    backward = staticmethod(reference.backward)
    decode_step = staticmethod(reference.decode_step)
    deform_forward = staticmethod(deform_reference.ms_deform_forward)
    deform_backward = staticmethod(deform_reference.ms_deform_backward)
    mmfs_forward = staticmethod(deform_reference.mmfs_forward)
    mmfs_backward = staticmethod(deform_reference.mmfs_backward)

    def is_available(self, device: torch.device) -> bool:
        return True

    def supports_deform(self, device, dtype) -> bool:
        return True

    def supports(self, device, dtype, kernel_size) -> bool:
        return True


_BACKENDS: dict[str, Backend] = {"reference": ReferenceBackend()}
_PROBLEMS: dict[str, str] = {}  # backend name -> why it could not be loaded
_LOADED = False
_WARNED: set = set()

# The order in which the default is chosen, per device type: fastest first.
_PREFERENCE = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}
_OPTIONAL_MODULES = {"triton": "moss_kernels.triton_kernels", "native": "moss_kernels.native"}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def interpreting_triton() -> bool:
    """True when this process runs Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_optional() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for name, module in _OPTIONAL_MODULES.items():
        try:
            importlib.import_module(module)  # registers itself
        except Exception as e:
            _PROBLEMS[name] = f"{type(e).__name__}: {e}"
            if isinstance(e, BackendDisabled):
                _WARNED.add(name)


def backend_problems() -> dict[str, str]:
    """Why each optional backend that failed to load did (empty when all loaded)."""
    _load_optional()
    return dict(_PROBLEMS)


def available_backends(device: Union[str, torch.device] = "cpu") -> list[str]:
    """Names of the backends usable on ``device``, fastest first."""
    _load_optional()
    device = torch.device(device)
    order = _PREFERENCE.get(device.type, ("reference",))
    names = [n for n in order if n in _BACKENDS and _BACKENDS[n].is_available(device)]
    names += [n for n, b in _BACKENDS.items() if n not in names and b.is_available(device)]
    return names


def get_backend(name: str) -> Backend:
    _load_optional()
    if name not in _BACKENDS:
        why = f" ({_PROBLEMS[name]})" if name in _PROBLEMS else ""
        raise ValueError(f"backend {name!r} is not available{why}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def default_backend(device: torch.device, dtype: torch.dtype, kernel_size: int) -> str:
    """The fastest backend that is available on ``device`` and computes this case."""
    _load_optional()
    for name in _PREFERENCE.get(device.type, ("reference",)):
        backend = _BACKENDS.get(name)
        if backend is None:
            if name in _PROBLEMS and name not in _WARNED:
                _WARNED.add(name)
                warnings.warn(f"moss_kernels: the {name} backend is unavailable ({_PROBLEMS[name]}); "
                              "falling back to the next backend", RuntimeWarning, stacklevel=3)
            continue
        if backend.is_available(device) and backend.supports(device, dtype, kernel_size):
            return name
    return "reference"


def resolve(name: Optional[str], device: torch.device, dtype: torch.dtype, kernel_size: int) -> str:
    """The backend a call runs on: ``name`` checked, or the default."""
    if name is None or name == "auto":
        return default_backend(device, dtype, kernel_size)
    backend = get_backend(name)
    if not backend.is_available(device):
        raise ValueError(f"backend {name!r} is not available on {device}; available: {available_backends(device)}")
    if not backend.supports(device, dtype, kernel_size):
        raise ValueError(f"backend {name!r} does not compute {dtype} with kernel_size {kernel_size} on {device}")
    return name


# Decided once while tracing: torch.compile treats resolve's result as a constant and never traces
# the lazy loading inside it. This is what ``torch._dynamo.assume_constant_result`` sets; calling
# that would import torch._dynamo (about as long as torch itself) at ``import moss_kernels``.
# tests/test_fallback.py checks that the decorator still sets exactly this.
resolve._dynamo_marked_constant = True


def resolve_deform(name: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """``resolve`` for the deformable-attention ops: ``name`` checked, or the fastest backend that
    computes them for ``dtype`` (float64 when any input is float64) on ``device``."""
    if name is None or name == "auto":
        _load_optional()
        for candidate in _PREFERENCE.get(device.type, ("reference",)):
            backend = _BACKENDS.get(candidate)
            if backend is None and candidate in _PROBLEMS and candidate not in _WARNED:
                _WARNED.add(candidate)
                warnings.warn(f"moss_kernels: the {candidate} backend is unavailable ({_PROBLEMS[candidate]}); "
                              "falling back to the next backend", RuntimeWarning, stacklevel=3)
            if backend is not None and backend.is_available(device) and backend.supports_deform(device, dtype):
                return candidate
        return "reference"
    backend = get_backend(name)
    if not backend.is_available(device):
        raise ValueError(f"backend {name!r} is not available on {device}; available: {available_backends(device)}")
    if not backend.supports_deform(device, dtype):
        raise ValueError(f"backend {name!r} does not compute the deformable-attention ops for {dtype} on {device}")
    return name


resolve_deform._dynamo_marked_constant = True  # as resolve's
