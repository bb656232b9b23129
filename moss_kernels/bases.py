"""Which frozen linear layers ``MossLinear`` may adapt: ``nn.Linear``, its subclasses, and a registry.

The base is called as a black box (``y = base(x)``); MoSS only needs its two widths and the device
to put the adapters on. ``nn.Linear`` and every subclass of it (bitsandbytes-style quantized linears
are subclasses) are described from ``in_features`` / ``out_features`` / ``weight.device``. Other
types — ``torch.ao`` dynamic-quantized ``Linear`` is registered here; GPTQ / HQQ-style modules can be
added with ``register_linear_base`` — are described by a function given at registration.

Some quantized forwards have no autograd (``torch.ao``'s ``quantized::linear_dynamic`` returns no
input gradient: training through stacked layers would silently stop the gradient at the first one).
A type registered with ``input_grad_weight`` is called through ``base_forward``, whose backward gives
``grad_x = grad_y @ W`` from that (dequantized) weight, as QLoRA does.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

__all__ = ["LinearInfo", "base_forward", "describe_linear", "is_linear_base", "register_linear_base"]


class LinearInfo(NamedTuple):
    in_features: int
    out_features: int
    device: torch.device


_REGISTRY: dict = {}  # type -> Callable[[nn.Module], LinearInfo]
_GRAD_WEIGHT: dict = {}  # type -> Callable[[nn.Module], torch.Tensor]: the weight for the input gradient


def register_linear_base(cls: type, describe: Callable[[nn.Module], LinearInfo] | None = None,
                         input_grad_weight: Callable[[nn.Module], torch.Tensor] | None = None) -> None:
    """Let ``MossLinear`` adapt modules of type ``cls`` (and ``"all-linear"`` select them).

    Args:
        cls: an ``nn.Module`` subclass whose forward maps ``(..., in_features)`` to ``(..., out_features)``.
        describe: ``module -> LinearInfo`` (default: ``in_features`` / ``out_features`` attributes, the
            device of the first parameter or buffer, else the CPU).
        input_grad_weight: for a forward without autograd, ``module -> (out_features, in_features)``
            float weight from which the input gradient is computed (called in backward only).
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if describe is not None and not callable(describe):
        raise TypeError(f"describe must be callable, got {type(describe).__name__}")
    if input_grad_weight is not None and not callable(input_grad_weight):
        raise TypeError(f"input_grad_weight must be callable, got {type(input_grad_weight).__name__}")
    _REGISTRY[cls] = describe or _describe_by_attributes
    if input_grad_weight is not None:
        _GRAD_WEIGHT[cls] = input_grad_weight


def _describe_by_attributes(m: nn.Module) -> LinearInfo:
    tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    device = tensors[0].device if tensors else torch.device("cpu")
    return LinearInfo(int(m.in_features), int(m.out_features), device)


def _registered(m: nn.Module):
    for cls in type(m).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def is_linear_base(m: nn.Module) -> bool:
    """Whether ``MossLinear`` can adapt ``m`` (an ``nn.Linear``, a subclass, or a registered type)."""
    return isinstance(m, nn.Linear) or _registered(m) is not None


def describe_linear(m: nn.Module) -> LinearInfo:
    """Widths and device of a linear base; ``TypeError`` for a module that is none."""
    if isinstance(m, nn.Linear):
        return LinearInfo(m.in_features, m.out_features, m.weight.device)
    describe = _registered(m)
    if describe is None:
        raise TypeError(f"base must be an nn.Linear, a subclass of it or a type registered with "
                        f"moss_kernels.bases.register_linear_base, got {type(m).__name__}")
    return describe(m)


class _NoAutogradBase(torch.autograd.Function):
    """``y = base(x)`` with ``grad_x = grad_y @ weight``: for bases whose own forward has no backward."""

    @staticmethod
    def forward(ctx, x, base, weight_of):
        ctx.base, ctx.weight_of = base, weight_of
        return base(x)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.weight_of(ctx.base).to(device=grad.device, dtype=grad.dtype)
        return grad @ w, None, None


def base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``base(x)``, differentiable in ``x`` even for bases registered with ``input_grad_weight``."""
    weight_of = None
    if x.requires_grad and torch.is_grad_enabled():
        for cls in type(base).__mro__:
            if cls in _GRAD_WEIGHT:
                weight_of = _GRAD_WEIGHT[cls]
                break
    return base(x) if weight_of is None else _NoAutogradBase.apply(x, base, weight_of)


def _register_builtin() -> None:
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    except ImportError:  # pragma: no cover - torch builds without quantization
        return
    # Its weight lives in packed params (no parameters, no buffers): dynamic quantization is CPU-only.
    register_linear_base(DynamicQuantizedLinear,
                         lambda m: LinearInfo(int(m.in_features), int(m.out_features), torch.device("cpu")),
                         input_grad_weight=lambda m: m.weight().dequantize())


_register_builtin()
