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

from ..layout import ImageLayout, ImageSpan
from ..state import ConvLoRAState
from .config import MossConfig

__all__ = ["MossCacheMixin", "MossStates", "attach_states"]


class MossStates:
    """Conv states of the adapted layers and the image tracker for ``batch_size`` sequences.

    ``since_boi[b]``: ``-1`` in text, else how many tokens came after sequence ``b``'s last ``<boi>``
    (``0``: the marker itself was the last token), the host-side record from which the layout of the
    next tokens is built with spans that continue the image (``offset > 0``).
    """

    def __init__(self, batch_size: int, config: MossConfig):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"MossStates: batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.config = config
        self.since_boi = [-1] * batch_size
        self.states: dict = {}  # MossLinear -> ConvLoRAState

    def state_for(self, layer) -> Optional[ConvLoRAState]:
        """The layer's state (created on first use; ``None`` for layers without a conv that needs one)."""
        if layer.image_A is None or layer.kernel_size == 1:
            return None
        st = self.states.get(layer)
        if st is None:
            st = layer.new_state(self.batch_size)
            self.states[layer] = st
        return st

    def nbytes(self) -> int:
        return sum(st.nbytes() for st in self.states.values())

    # ------------------------------------------------------------------ layouts of new tokens
    def layout_for(self, input_ids: torch.Tensor) -> ImageLayout:
        """The layout of the new tokens ``input_ids (batch, S)``, continuing images; advances the tracker.

        Reads the ids on the host (one sync per call), like ``ImageLayout.from_token_ids``, which it
        equals for a fresh tracker.
        """
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids must have shape ({self.batch_size}, seq), got {tuple(input_ids.shape)}")
        H, W = cfg.grid
        n = H * W
        shift = 1 if cfg.routing == "input" else 0  # grid index = since_boi - shift
        spans = []
        for b, row in enumerate(input_ids.tolist()):
            s = self.since_boi[b]
            run = None  # [start, first grid index, length]
            for pos, tok in enumerate(row):
                if s >= 0:
                    s += 1
                    if s > n:  # past the last image token: the image is over
                        s = -1
                if s < 0 and tok == cfg.boi_token_id:
                    s = 0
                g = s - shift
                if s >= 0 and 0 <= g < n:
                    if run is not None and g == run[1] + run[2]:
                        run[2] += 1
                    else:
                        if run is not None:
                            spans.append(ImageSpan(b, run[0], H, W, run[1], run[2]))
                        run = [pos, g, 1]
            if run is not None:
                spans.append(ImageSpan(b, run[0], H, W, run[1], run[2]))
            self.since_boi[b] = s
        return ImageLayout.from_spans(self.batch_size, input_ids.shape[1], spans)

    def advance_from_layout(self, layout: ImageLayout) -> None:
        """Set the tracker after an explicit ``layout`` (e.g. an ``inputs_embeds`` prefill): a sequence
        whose last tokens are an unfinished image continues it; any other is in text."""
        if layout.batch_size != self.batch_size:
            raise ValueError(f"layout has batch_size {layout.batch_size}, the states {self.batch_size}")
        shift = 1 if self.config.routing == "input" else 0
        last = {}
        for seg in layout.segments:
            last[seg.batch] = seg
        for b in range(self.batch_size):
            seg = last.get(b)
            at_end = seg is not None and layout.spans[seg.span_ids[-1]].start + \
                layout.spans[seg.span_ids[-1]].length == layout.seq_len
            self.since_boi[b] = seg.end - 1 + shift if at_end and not seg.complete else -1

    # ------------------------------------------------------------------ beam search & co
    def reorder(self, indices: Union[torch.Tensor, Sequence[int]]) -> None:
        """Select (reorder, duplicate, drop) sequences: ``indices (n,)`` int, the new batch is ``n``."""
        idx = torch.as_tensor(indices, dtype=torch.int64).flatten()
        host = idx.tolist()
        if not host or min(host) < 0 or max(host) >= self.batch_size:
            raise ValueError(f"reorder: indices must be non-empty and lie in [0, {self.batch_size}), got {host}")
        for st in self.states.values():
            st.reorder(idx)
        self.since_boi = [self.since_boi[i] for i in host]
        self.batch_size = len(host)


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


def attach_states(cache, config: MossConfig, batch_size: int) -> MossStates:
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
        states = MossStates(batch_size, config)
        cache.moss_states = states
    elif states.batch_size != batch_size:
        raise ValueError(f"the cache's MoSS states are for batch {states.batch_size}, the input has batch {batch_size}")
    return states
