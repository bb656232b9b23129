"""``MossLinear``: a frozen ``nn.Linear`` plus MoSS adapters routed by a layout.

The layer holds parameters and calls the op; it computes no math itself.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .conv_lora import moss_lora
from .layout import ImageLayout
from .state import ConvLoRAState

__all__ = ["ADAPTERS", "MossLinear"]

# "moss": linear LoRA on text, k x k conv LoRA on images (the paper);
# "moe_lora": separate linear LoRAs per modality (a 1x1 image kernel);
# "lora": one linear LoRA shared by all tokens. The paper's Table 2 baselines, through one layer.
ADAPTERS = ("moss", "moe_lora", "lora")


class MossLinear(nn.Module):
    """``y = base(x) + scale * adapter(dropout(x))`` with the adapter routed per token by a layout.

    Args:
        base: the ``nn.Linear`` to adapt; it is frozen (``requires_grad=False``) and kept as is.
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
    ``lookup(layer) -> (layout, state)`` supplies them when the caller passes none.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 256,
        alpha: float = 256,
        dropout: float = 0.05,
        kernel_size: int = 2,
        adapter: str = "moss",
        dtype: Optional[torch.dtype] = torch.float32,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
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
        d_in, d_out = base.in_features, base.out_features
        factory = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
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
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that inspects linear layers keeps working
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

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
        if layout is None and self.routing is not None:
            layout, state = self.routing.lookup(self)
        y = self.base(x)
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

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapter={self.adapter!r}, "
                f"rank={self.rank}, alpha={self.alpha}, kernel_size={self.kernel_size}")


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
