"""``MossLinear``: a frozen ``nn.Linear`` plus MoSS adapters routed by a layout.

The layer holds parameters and calls the op; it computes no math itself.
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple, Optional

import torch
from torch import nn

from .bases import base_forward, describe_linear
from . import backends
from .conv_lora import moss_lora, moss_lora_step
from .layout import ImageLayout
from .state import ConvLoRAState

_ops = sys.modules[moss_lora.__module__]  # the module (the package re-exports a function named conv_lora)

__all__ = ["ADAPTERS", "MossLinear"]

# "moss": linear LoRA on text, k x k conv LoRA on images (the paper);
# "moe_lora": separate linear LoRAs per modality (a 1x1 image kernel);
# "lora": one linear LoRA shared by all tokens. The paper's Table 2 baselines, through one layer.
ADAPTERS = ("moss", "moe_lora", "lora")


class MossLinear(nn.Module):
    """``y = base(x) + scale * adapter(dropout(x))`` with the adapter routed per token by a layout.

    Args:
        base: the linear layer to adapt: an ``nn.Linear``, a subclass of it (e.g. a quantized linear) or a
            type registered in ``moss_kernels.bases``; it is frozen (``requires_grad=False``), kept as
            is and called as a black box.
        rank, alpha: LoRA rank ``r`` and ``alpha``; ``scale = alpha / rank``.
        dropout: dropout on the adapter's input only (the base sees the clean input); the conv's taps
            all read the same dropped-out input.
        kernel_size: ``k`` of the causal ``k x k`` image conv (ignored unless ``adapter="moss"``).
        adapter: ``"moss"``, ``"moe_lora"`` or ``"lora"`` (see ``ADAPTERS``).
        dtype: adapter parameter dtype (default float32, whatever the base's dtype: low-precision
            activations are accumulated in float32 and the adapter trains in full precision).
        backend: the backend for every call (``None``: the default for the device).

    Parameters: ``text_A (r, d_in)``, ``text_B (d_out, r)``, and for ``moss``/``moe_lora``
    ``image_A (r, d_in, k, k)`` (``nn.Conv2d`` weight layout), ``image_B (d_out, r)``. ``B``s start at
    zero; ``A``s as PEFT's LoRA A (kaiming-uniform, ``a = sqrt(5)``).

    ``forward(x, layout=None, state=None)``: ``x`` is ``(batch, seq, d_in)``; without a layout
    every token is text. A model wrapper may set ``routing`` to an object whose
    ``lookup(layer) -> (layout, state)`` supplies them when the caller passes none (``inject_moss``
    sets the model's ``MossRouter``, whose ``current()`` context also carries decoding steps: then the
    layer calls ``moss_lora_step`` with the step's device routing tensors, see ``model.routing``).

    ``adapters_enabled = False`` makes the layer its base exactly (``moss_kernels.disable_moss``).
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int = 256,
        alpha: float = 256,
        dropout: float = 0.05,
        kernel_size: int = 2,
        adapter: str = "moss",
        dtype: Optional[torch.dtype] = torch.float32,
        backend: Optional[str] = None,
    ):
        super().__init__()
        info = describe_linear(base)  # TypeError naming the type for anything that is no linear
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size <= 0:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha, self.adapter, self.backend = rank, alpha, adapter, backend
        self.kernel_size = kernel_size if adapter == "moss" else 1
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.routing = None
        self.adapters_enabled = True
        self._base_type = type(base)  # PEFT's get_peft_model would replace it (see forward)
        d_in, d_out = info.in_features, info.out_features
        if dtype is None:
            weight = getattr(base, "weight", None)
            dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
        factory = dict(device=info.device, dtype=dtype)
        self.text_A = nn.Parameter(torch.empty(rank, d_in, **factory))
        self.text_B = nn.Parameter(torch.zeros(d_out, rank, **factory))
        if adapter == "lora":
            self.register_parameter("image_A", None)
            self.register_parameter("image_B", None)
        else:
            k = self.kernel_size
            self.image_A = nn.Parameter(torch.empty(rank, d_in, k, k, **factory))
            self.image_B = nn.Parameter(torch.zeros(d_out, rank, **factory))
        self.reset_adapters()

    @property
    def in_features(self) -> int:
        return self.text_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.text_B.shape[0]

    @property
    def weight(self) -> torch.Tensor:  # code that inspects linear layers keeps working
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base, "bias", None)

    def reset_adapters(self) -> None:
        """A as PEFT's LoRA (kaiming-uniform, a = sqrt(5)), B zero: the layer starts as the base."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.text_A, a=math.sqrt(5))
            self.text_B.zero_()
            if self.image_A is not None:
                nn.init.kaiming_uniform_(self.image_A, a=math.sqrt(5))
                self.image_B.zero_()

    def new_state(self, batch_size: int, max_width: Optional[int] = None) -> Optional[ConvLoRAState]:
        """A decoding state for this layer (``None`` when it has no conv that needs one)."""
        if self.image_A is None:
            return None
        return ConvLoRAState(batch_size, self.rank, self.kernel_size, device=self.text_A.device,
                             max_width=max_width)

    def forward(self, x: torch.Tensor, layout: Optional[ImageLayout] = None,
                state: Optional[ConvLoRAState] = None) -> torch.Tensor:
        if not isinstance(self.base, self._base_type):
            raise TypeError(f"the base of this MossLinear was replaced by a {type(self.base).__name__} (PEFT's "
                            "get_peft_model on a MoSS model wraps the bases and freezes the MoSS adapters): MoSS "
                            "and PEFT adapters cannot be stacked; convert a PEFT LoRA with "
                            "moss_kernels.from_peft_lora, or merge it into the base before inject_moss")
        self._check_input(x)
        if not self.adapters_enabled:
            return base_forward(self.base, x)
        if layout is None and self.routing is not None:
            current = getattr(self.routing, "current", None)
            # A model's MossRouter: O(1), the top of this thread's routing stack; any other object: lookup().
            ctx = current() if current is not None else _Looked(*self.routing.lookup(self))
            if ctx is not None:
                if ctx.step is not None:
                    return self._decode_step(x, ctx)
                layout = ctx.layout
                state = ctx.states.state_for(self) if ctx.states is not None else getattr(ctx, "state", None)
        y = base_forward(self.base, x)
        if x.dim() != 3:
            raise ValueError(f"x must have shape (batch, seq, {self.in_features}), got {tuple(x.shape)}")
        if layout is None or self.adapter == "lora":
            layout = _text_layout(x.shape[0], x.shape[1])
        if self.adapter == "lora":
            state = None
        if self.kernel_size == 1:
            state = None  # a 1x1 conv has nothing pending between calls
        return moss_lora(self.dropout(x), layout, self.text_A, self.text_B, self.image_A, self.image_B,
                         self.scale, out=y, state=state, backend=self.backend)

    def _check_input(self, x) -> None:
        """What the base would reject with a raw ``mat1 and mat2`` error, named. Mixed dtypes are
        refused, not cast (as ``nn.Linear`` does; a silent cast would hide a model left in the wrong
        dtype), except under ``torch.autocast``, which casts for the base."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (float32, float16 or bfloat16), got {x.dtype}: "
                            "MossLinear takes hidden states (token ids go through the embedding first)")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (batch, seq, {self.in_features}) (the base's in_features), "
                             f"got {tuple(x.shape)}")
        weight = self.base.weight if type(self.base) is nn.Linear else None  # subclasses may cast themselves
        if weight is not None and x.device != weight.device:
            raise ValueError(f"x is on {x.device}, but the layer's base weight is on {weight.device}")
        if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x is {x.dtype}, but the base layer's weight is {weight.dtype}: cast one to the other "
                            "(model.to(dtype) or x.to(dtype)), or run under torch.autocast")

    def _decode_step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """One token per row (``x (B, 1, d_in)``), routed by ``ctx.step``'s device tensors through the
        graph-capturable ``moss_lora_step``: no layout, no host synchronisation."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"a decoding step takes x of shape (batch, 1, {self.in_features}), got {tuple(x.shape)}")
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in
                                           (x, self.text_A, self.text_B, self.image_A, self.image_B)):
            raise ValueError("cached decoding is for inference: run it under torch.no_grad() (gradients do not "
                             "flow through the conv states of earlier calls)")
        y = base_forward(self.base, x)
        B = x.shape[0]
        states = ctx.states
        route = ctx.step if self.image_A is not None else states.text_step()  # "lora": no routing
        state = states.state_for(self)
        xs = (self.dropout(x) if self.training else x).reshape(B, -1)  # dropout is the identity in eval
        ys = y.view(B, -1)
        # The first step of a layer on a cache (and every traced step) goes through moss_lora_step and all
        # its checks; later eager steps call the backend directly with what those checks established (the
        # backend, the same weight tensors and state; the positions are checked once per step for every
        # layer by MossStates.step): the per-call Python of a step is then about PEFT LoRA's.
        plan = None if torch.compiler.is_compiling() else states.checked.get(self)
        if (plan is not None and plan.text_A is self.text_A and plan.text_B is self.text_B
                and plan.image_A is self.image_A and plan.image_B is self.image_B and plan.state is state
                and ys.is_contiguous() and not _autocast_on()):
            pending = state.pending if state is not None else plan.pending
            plan.step(xs, ys, self.text_A, self.text_B, self.image_A, self.image_B, self.scale, pending,
                      route.image_pos, route.height, route.width)
            return y
        moss_lora_step(xs, self.text_A, self.text_B, self.image_A, self.image_B, self.scale, state, route.image_pos,
                       route.height, route.width, out=ys, backend=self.backend)
        if not torch.compiler.is_compiling():
            k = self.kernel_size if self.image_A is not None else 1
            name = backends.resolve(self.backend, x.device, _ops._case_dtype(x, self.text_A, self.image_A), k)
            states.checked[self] = _StepPlan(self.text_A, self.text_B, self.image_A, self.image_B, state,
                                             x.new_zeros(B, 0, 1, dtype=torch.float32),
                                             backends.get_backend(name).decode_step)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapter={self.adapter!r}, "
                f"rank={self.rank}, alpha={self.alpha}, kernel_size={self.kernel_size}")


class _StepPlan(NamedTuple):
    """What a layer's first checked decoding step on a cache established (``MossStates.checked``)."""

    text_A: Optional[torch.Tensor]
    text_B: Optional[torch.Tensor]
    image_A: Optional[torch.Tensor]
    image_B: Optional[torch.Tensor]
    state: Optional[ConvLoRAState]
    pending: torch.Tensor  # the empty ring of layers without a conv
    step: object  # the backend's decode_step


def _autocast_on() -> bool:
    """Whether an autocast region is active (the ops then go through ``moss_lora_step``, which turns it off)."""
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


class _Looked(NamedTuple):
    """What a plain ``routing.lookup(layer)`` supplies, in the shape of a router's context."""

    layout: Optional[ImageLayout]
    state: Optional[ConvLoRAState]
    states: None = None
    step: None = None


_TEXT_LAYOUTS: dict = {}


def _text_layout(batch_size: int, seq_len: int) -> ImageLayout:
    """All-text layouts, cached by shape (their index tensors are reused across calls)."""
    key = (batch_size, seq_len)
    layout = _TEXT_LAYOUTS.get(key)
    if layout is None:  # built locally first: another thread may clear the cache meanwhile
        layout = ImageLayout.text_only(batch_size, seq_len)
        if len(_TEXT_LAYOUTS) > 64:
            _TEXT_LAYOUTS.clear()
        _TEXT_LAYOUTS[key] = layout
    return layout
