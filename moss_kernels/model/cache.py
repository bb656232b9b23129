"""Decoding state of an injected model: every adapted layer's ``ConvLoRAState`` and, per sequence,
where it stands in its current image, kept next to the model's KV cache.

``MossStates`` lives on the KV cache object (``cache.moss_states``): the built-in decoder's
``DecoderCache`` has the attribute, and any other cache (Hugging Face's ``DynamicCache``...) gets it
when an injected model first sees it empty (``attach_states``). The cache's beam-search reorder
then reorders the states too.
"""

from __future__ import annotations

from typing import Optional, Union
from collections.abc import Sequence

import torch

from ..layout import ImageLayout
from ..state import ConvLoRAState
from .config import MossConfig
from .providers import LayoutProvider, StepRoute, Tracker, make_provider

__all__ = ["MossCacheMixin", "MossStates", "attach_states"]


class MossStates:
    """Conv states of the adapted layers and, per sequence, where it stands (``tracker``).

    ``tracker`` is a ``providers.Tracker``: ``(batch,)`` int64 tensors on the inputs' device. A
    decoding step (one token per row) advances it with tensor ops only (``step``); multi-token
    forwards (prefill, chunks) read it on the host once (``layout_for``). The conv states' rings are
    sized for the provider's widest image when created, so a step never reallocates them.
    """

    def __init__(self, batch_size: int, config: MossConfig, provider: Union[LayoutProvider, str, None] = "auto",
                 device: Union[str, torch.device, None] = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"MossStates: batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.config = config
        self.provider = make_provider(config) if provider == "auto" else provider  # None: all text
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.tracker = Tracker(batch_size, self.device)
        self.states: dict = {}  # MossLinear -> ConvLoRAState
        self.checked: dict = {}  # MossLinear -> what its first checked step established (see MossLinear)
        self._text_step: Optional[StepRoute] = None

    def state_for(self, layer) -> Optional[ConvLoRAState]:
        """The layer's state (created on first use; ``None`` for layers without an image adapter)."""
        st = self.states.get(layer)
        if st is None:
            if layer.image_A is None:
                return None
            width = self.provider.max_width if self.provider is not None else 0
            st = layer.new_state(self.batch_size, max_width=width or None)
            self.states[layer] = st
        return st

    def nbytes(self) -> int:
        return sum(st.nbytes() for st in self.states.values())

    # ------------------------------------------------------------------ routing of new tokens
    def layout_for(self, input_ids: torch.Tensor) -> ImageLayout:
        """The layout of the new tokens ``input_ids (batch, S)``, continuing images; advances the
        tracker. Reads the ids on the host (one sync per call)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids must have shape ({self.batch_size}, seq), got {tuple(input_ids.shape)}")
        if self.provider is None:
            return ImageLayout.text_only(*input_ids.shape)
        return self.provider.layout(input_ids, self.tracker)

    def step(self, input_ids: Optional[torch.Tensor]) -> StepRoute:
        """The routing of one new token per row (``input_ids (batch, 1)``, or ``None`` for an
        ``inputs_embeds`` step), advancing the tracker on the device (no host synchronisation)."""
        if self.provider is None:
            return self.text_step()
        route = self.provider.step(self.tracker, input_ids)
        self._check_step(route)
        return route

    def _check_step(self, route: StepRoute) -> None:
        """Once per step for every layer: each image row's position lies in its image and its ring
        fits the states (sized for the provider's ``max_width``). On a CPU a ``ValueError``; on a GPU
        (or while tracing) a device-side assert, no synchronisation."""
        pos, h, w = route
        k = self.config.kernel_size
        room = self.provider.max_width if self.provider.max_width else None
        fits = (pos < h * w) & (h > 0) & (w > 0)
        if room is not None and k > 1:
            fits = fits & (w <= room)
        ok = fits | (pos < 0)
        if pos.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(ok.all()):
                b = int((~ok).nonzero()[0, 0])
                raise ValueError(f"decoding step: row {b} is at image token {int(pos[b])} of a {int(h[b])}x{int(w[b])} "
                                 f"image, beyond the image or wider than the provider's max_width {room}")
        else:
            torch._assert_async(ok.all(), "MoSS decoding step: an image position beyond its image or max_width")

    def text_step(self) -> StepRoute:
        """All rows text (``image_pos = -1``): for adapters that do not route by modality."""
        ts = self._text_step
        if ts is None or ts.image_pos.shape[0] != self.batch_size:
            ones = torch.ones(self.batch_size, dtype=torch.int64, device=self.device)
            ts = self._text_step = StepRoute(-ones, ones, ones)
        return ts

    def advance_from_layout(self, layout: ImageLayout) -> None:
        """Set the tracker after an explicit ``layout`` (e.g. an ``inputs_embeds`` prefill): a sequence
        whose last tokens are an unfinished image continues it; any other is in text."""
        if layout.batch_size != self.batch_size:
            raise ValueError(f"layout has batch_size {layout.batch_size}, the states {self.batch_size}")
        (self.provider or LayoutProvider()).after_explicit(self.tracker, layout)

    # ------------------------------------------------------------------ beam search & co
    def reorder(self, indices: Union[torch.Tensor, Sequence[int]]) -> None:
        """Select (reorder, duplicate, drop) sequences: ``indices (n,)`` int, the new batch is ``n``.

        Device tensors stay on the device (no synchronisation for a device ``indices``; a CPU one is
        range-checked here); a reorder that keeps the batch size writes the rings in place, so their
        storage (captured by a CUDA graph) stays the same.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64).flatten()
        if idx.numel() == 0:
            raise ValueError("reorder: indices must be non-empty")
        if idx.device.type == "cpu":
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.batch_size:
                raise ValueError(f"reorder: indices must lie in [0, {self.batch_size}), got {idx.tolist()}")
        idx = idx.to(self.device)
        n = int(idx.shape[0])
        for st in self.states.values():
            picked = st.pending.index_select(0, idx.to(st.pending.device))
            if n == st.batch_size:
                st.pending.copy_(picked)
            else:
                st.pending, st.batch_size = picked, n
            st.mark_unchecked()
        if n != self.batch_size:
            self.checked.clear()  # new pending tensors and batch: the next step checks again
        self.tracker.select(idx)
        self.batch_size = n


class MossCacheMixin:
    """Adds ``moss_states`` to a KV cache class and keeps them in step with Hugging Face's cache API:
    ``reorder_cache`` (beam search), ``batch_repeat_interleave``, ``batch_select_indices``, ``reset``.
    ``crop`` (assisted decoding) cannot undo conv states and raises once states hold anything."""

    moss_states: Optional[MossStates] = None

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        if self.moss_states is not None:
            self.moss_states.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.moss_states is not None:
            self.moss_states.reorder(torch.arange(self.moss_states.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        if self.moss_states is not None:
            self.moss_states.reorder(indices)

    def reset(self):
        super().reset()
        self.moss_states = None

    def crop(self, tokens_to_remove: int):
        if self.moss_states is not None and self.moss_states.states:
            raise NotImplementedError("MoSS conv states cannot be cropped (assisted/speculative decoding is not "
                                      "supported with MoSS adapters)")
        super().crop(tokens_to_remove)


_MIXED: dict = {}


def _seq_length(cache) -> int:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return len(cache)


def attach_states(cache, config: MossConfig, batch_size: int, provider: Union[LayoutProvider, str, None] = "auto",
                  device: Union[str, torch.device, None] = None) -> MossStates:
    """The ``MossStates`` of ``cache``, created if the cache is still empty.

    A cache class without a ``moss_states`` slot (Hugging Face caches) is given one by switching the
    instance to a subclass with ``MossCacheMixin``, so that its reorders carry the states along.
    Raises ``ValueError`` for a cache that already holds tokens but no states (it was filled by a
    forward that did not go through the injected model), or whose batch differs.
    """
    states = getattr(cache, "moss_states", None)
    if states is None:
        if _seq_length(cache) > 0:
            raise ValueError("the cache already holds tokens but no MoSS states: it was filled outside the injected "
                             "model's forward; start decoding from an empty cache so the conv states are kept")
        if not hasattr(cache, "moss_states"):
            cls = type(cache)
            if cls not in _MIXED:
                _MIXED[cls] = type(f"Moss{cls.__name__}", (MossCacheMixin, cls), {})
            cache.__class__ = _MIXED[cls]
        states = MossStates(batch_size, config, provider, device)
        cache.moss_states = states
    elif states.batch_size != batch_size:
        raise ValueError(f"the cache's MoSS states are for batch {states.batch_size}, the input has batch {batch_size}")
    return states
