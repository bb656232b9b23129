"""``ConvLoRAState``: what one adapted layer keeps between calls while images are generated.

Per sequence, a ring of ``L = (k-1)(W+1)`` pending ``r``-wide sums (``ring_size``): slot
``p mod L`` holds the sum of the taps of earlier tokens that land on image token ``p``. Nothing
``d_in``-wide is cached. ``pending`` is float32 by default, whatever the activations' dtype.

When pending sums are discarded: when a new image starts in a sequence (an image token at raster
index 0: a span with ``offset = 0`` in ``moss_lora(state=)``, ``image_pos = 0`` in
``moss_lora_step``), whatever an earlier image left in the ring (an image that was finished, or left
before its end) is never added to the new one. No reset is needed between images, and none is done:
a slot is read, or its sum kept, only once a token of the same image wrote it (its earliest
contributor writes rather than adds, ``layout.first_contributor``), so leftovers, even NaN, are
inert. Until a new image starts, an image that was left (text tokens followed) stays pending and can
be continued at its next raster index. ``reset`` forgets everything explicitly.

The host keeps, per sequence, which image it is in and the next token it expects, so that a chunk
that continues an image is checked against it (no device synchronisation). The graph-capturable
decode step (``moss_lora_step``) takes positions as device tensors instead and leaves that record
unchecked for the sequences it advanced.
"""

from __future__ import annotations

from typing import Optional, Union
from collections.abc import Sequence

import torch

from .layout import ImageLayout, ring_size

__all__ = ["ConvLoRAState"]


class ConvLoRAState:
    """Pending conv sums for ``batch_size`` sequences of one layer with a rank-``rank`` conv adapter.

    ``max_width`` sizes the ring up front (needed before capturing a CUDA graph); otherwise it grows
    to the widest image seen.
    """

    def __init__(
        self,
        batch_size: int,
        rank: int,
        kernel_size: int = 2,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        max_width: Optional[int] = None,
    ):
        for name, value in (("batch_size", batch_size), ("rank", rank), ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ConvLoRAState: {name} must be a positive int, got {value!r}")
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"ConvLoRAState: dtype must be a floating dtype, got {dtype}")
        self.batch_size = batch_size
        self.rank = rank
        self.kernel_size = kernel_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        capacity = ring_size(kernel_size, max_width) if max_width else 0
        self.pending = torch.zeros(batch_size, capacity, rank, device=self.device, dtype=dtype)
        # Per sequence: (height, width, next image-token index) of the image it is inside, or None;
        # "unchecked" after a device-side decode step advanced it.
        self._images: list = [None] * batch_size

    @property
    def capacity(self) -> int:
        return self.pending.shape[1]

    def nbytes(self) -> int:
        return self.pending.numel() * self.pending.element_size()

    def reserve(self, width: int) -> None:
        """Make room for images ``width`` wide (keeps what is pending)."""
        need = ring_size(self.kernel_size, width)
        if need > self.capacity:
            grown = torch.zeros(self.batch_size, need, self.rank, device=self.device, dtype=self.dtype)
            grown[:, : self.capacity] = self.pending
            self.pending = grown

    def reset(self, rows: Optional[Sequence[int]] = None) -> None:
        """Forget pending sums (all sequences, or ``rows``)."""
        rows = range(self.batch_size) if rows is None else rows
        for b in rows:
            self._images[b] = None
            self.pending[b].zero_()

    def reorder(self, indices: Union[torch.Tensor, Sequence[int]]) -> None:
        """Keep sequences ``indices`` in that order (reorder, duplicate or drop), as beam search does
        with its KV cache; the batch becomes ``len(indices)``."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if idx.dim() != 1 or idx.numel() == 0:
            raise ValueError(f"reorder: indices must be a non-empty 1-D sequence, got shape {tuple(idx.shape)}")
        host = idx.tolist()
        if min(host) < 0 or max(host) >= self.batch_size:
            raise ValueError(f"reorder: indices must lie in [0, {self.batch_size}), got {host}")
        self.pending = self.pending.index_select(0, idx.to(self.device))
        self._images = [self._images[i] for i in host]
        self.batch_size = len(host)

    # ------------------------------------------------------------------ used by the ops
    def check(self, layout: ImageLayout, rank: int, kernel_size: int, device: torch.device) -> None:
        """Raise ``ValueError`` unless ``layout`` can continue from this state."""
        if layout.batch_size != self.batch_size:
            raise ValueError(f"state: batch_size {self.batch_size} does not match the layout's {layout.batch_size}")
        if rank != self.rank:
            raise ValueError(f"state: rank {self.rank} does not match the adapter's rank {rank}")
        if kernel_size != self.kernel_size:
            raise ValueError(f"state: kernel_size {self.kernel_size} does not match the adapter's {kernel_size}")
        if self.pending.device != device:
            raise ValueError(f"state: on {self.pending.device}, inputs on {device}")
        for seg in layout.segments:
            if not seg.continues_from_state:
                continue
            span = layout.spans[seg.span_ids[0]]
            have = self._images[seg.batch]
            if have == "unchecked":
                continue
            if have is None or have != (seg.height, seg.width, seg.offset):
                raise ValueError(
                    f"span {span} continues image token {seg.offset} of a {seg.height}x{seg.width} image, "
                    f"but the state of sequence {seg.batch} expects "
                    + ("no image" if have is None else f"token {have[2]} of a {have[0]}x{have[1]} image")
                )

    def advance(self, layout: ImageLayout) -> None:
        """Record where each sequence stands after ``layout`` went through the layer."""
        last = {}
        for seg in layout.segments:
            last[seg.batch] = seg
        for b in range(self.batch_size):
            seg = last.get(b)
            if seg is None:
                continue  # a text-only chunk leaves an unfinished image pending
            self._images[b] = None if seg.complete else (seg.height, seg.width, seg.end)

    def mark_unchecked(self) -> None:
        self._images = ["unchecked"] * self.batch_size

    def __repr__(self) -> str:
        return (f"ConvLoRAState(batch_size={self.batch_size}, rank={self.rank}, kernel_size={self.kernel_size}, "
                f"capacity={self.capacity}, dtype={self.dtype}, device={self.device})")
