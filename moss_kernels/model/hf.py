"""Hugging Face ``transformers`` glue (optional: ``pip install moss_kernels[hf]``).

``inject_moss`` needs nothing from here: it works on ``...ForCausalLM`` and
``...ForConditionalGeneration`` models as they are, and ``model.generate()`` keeps the conv states
in the cache it creates (``routing.attach_states`` gives that cache a ``moss_states`` slot and makes
its ``reorder_cache`` carry them under beam search). This module adds:

* ``MossCache``: a ``DynamicCache`` with the slot from the start, for hand-written decoding loops
  (``past_key_values=MossCache()``) or to pass to ``generate(past_key_values=...)``;
* ``lm_logits``: logits from the decoder's hidden states through the output head, for models whose
  forward masks image-token logits (Chameleon sets them to the dtype's minimum, so image tokens can
  neither be generated nor trained on through ``model(...).logits``).
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from transformers import DynamicCache
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("moss_kernels.model.hf needs transformers: pip install 'moss_kernels[hf]'") from e

from .cache import MossCacheMixin

__all__ = ["MossCache", "lm_logits"]


class MossCache(MossCacheMixin, DynamicCache):
    """``DynamicCache`` plus the MoSS conv states of every adapted layer (``moss_states``, filled by
    the injected model's first forward on this cache)."""


def lm_logits(model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``(B, S, vocab)`` float32 logits of ``hidden_states (B, S, hidden)`` through the output head,
    unmasked (for Chameleon: ``hidden = model.model(input_ids).last_hidden_state``)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    return head(hidden_states).float()
