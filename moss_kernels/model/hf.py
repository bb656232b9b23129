"""Hugging Face ``transformers`` glue (optional: ``pip install moss_kernels[hf]``).

``inject_moss`` needs nothing from here: it works on ``...ForCausalLM`` and
``...ForConditionalGeneration`` models as they are, and ``model.generate()`` keeps the conv states
in the cache it creates (``routing.attach_states`` gives that cache a ``moss_states`` slot and makes
its ``reorder_cache`` carry them under beam search). This module adds:

* ``MossCache``: a ``DynamicCache`` with the slot from the start, for hand-written decoding loops
  (``past_key_values=MossCache()``) or to pass to ``generate(past_key_values=...)``;
* ``lm_logits``: logits from the decoder's hidden states through the output head, for models whose
  forward masks image-token logits (Chameleon sets them to the dtype's minimum, so image tokens can
  neither be generated nor trained on through ``model(...).logits``);
* ``hidden_state_loss``: the causal-LM loss through those logits (what trains image codes on
  Chameleon / Anole, whose own ``loss`` is ``inf`` once labels hold image codes);
* ``allow_image_tokens``: a context in which Chameleon's forward leaves image-code logits unmasked, so
  ``generate()`` can emit image codes;
* ``MossTrainer``: a ``transformers.Trainer`` that writes adapter-only checkpoints (``save_moss``,
  plus the optimizer / scheduler / RNG state the Trainer writes), resumes and loads the best
  checkpoint from them, trains through the hidden states where the model masks image logits, and
  raises on a non-finite loss instead of logging it as 0.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Optional
from collections.abc import Iterator

import torch
from torch import nn

try:
    from transformers import DynamicCache, Trainer
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("moss_kernels.model.hf needs transformers: pip install 'moss_kernels[hf]'") from e

from .cache import MossCacheMixin
from .inject import is_injected
from .io import load_moss, save_moss, unwrap_model

__all__ = ["MossCache", "MossTrainer", "allow_image_tokens", "hidden_state_loss", "lm_logits", "masks_image_logits"]

TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer's name for it


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


def _vocabulary_mapping(model: nn.Module):
    inner = unwrap_model(model)
    base = getattr(inner, "base_model", None)
    return getattr(base, "vocabulary_mapping", None) if base is not None else None


def masks_image_logits(model: nn.Module) -> bool:
    """Whether ``model``'s forward masks image-code logits (Chameleon / Anole: its ``vocabulary_mapping``)."""
    mapping = _vocabulary_mapping(model)
    return mapping is not None and len(getattr(mapping, "image_tokens", ())) > 0


def hidden_state_loss(model: nn.Module, outputs: Any, labels: torch.Tensor,
                      num_items_in_batch: Optional[torch.Tensor] = None) -> tuple:
    """``(loss, logits)``: transformers' causal-LM loss of ``labels (B, S)`` over unmasked logits.

    ``outputs`` is the model's output of a forward with ``output_hidden_states=True`` (its last hidden
    state is the normed one the head reads). ``logits (B, S, vocab)`` are float32. The loss equals the
    model's own ``loss`` wherever that is finite (same function, same shift, ``-100`` ignored; a sum over
    ``num_items_in_batch`` when given, as under gradient accumulation).
    """
    hidden = getattr(outputs, "hidden_states", None)
    if not hidden:
        raise ValueError("hidden_state_loss: the outputs hold no hidden_states (call the model with "
                         "output_hidden_states=True)")
    logits = lm_logits(unwrap_model(model), hidden[-1])
    loss = ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
    return loss, logits


class _UnmaskedVocabulary:
    """Chameleon's vocabulary mapping with no image tokens to mask; everything else delegated."""

    def __init__(self, mapping):
        self._mapping = mapping
        self.image_tokens = []

    def __getattr__(self, name):
        return getattr(self._mapping, name)


@contextlib.contextmanager
def allow_image_tokens(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, Chameleon / Anole's forward leaves image-code logits unmasked: ``generate()``
    can then emit image codes (and ``model(...).logits`` / ``.loss`` cover them). Restores the mask on
    exit, error or not. ``ValueError`` for a model that masks nothing. Yields the model."""
    if not masks_image_logits(model):
        raise ValueError(f"allow_image_tokens: {type(model).__name__} masks no image-code logits (only "
                         "Chameleon-style models with a vocabulary_mapping do)")
    base = unwrap_model(model).base_model
    mapping = base.vocabulary_mapping
    base.vocabulary_mapping = _UnmaskedVocabulary(mapping)
    try:
        yield model
    finally:
        base.vocabulary_mapping = mapping


class MossTrainer(Trainer):
    """``transformers.Trainer`` for a MoSS-injected model (``inject_moss`` first); same arguments, plus:

    Args:
        hidden_state_loss: compute the loss from the hidden states through the output head
            (``hidden_state_loss``) instead of the model's ``loss``. ``None`` (default): when the model
            masks image-code logits (Chameleon / Anole), where the model's own loss is ``inf`` on image
            labels and image tokens would not train.

    Checkpoints (``save_steps``, ``save_model``) hold the adapters and ``modules_to_save`` only
    (``adapter_model.safetensors`` + ``moss_config.json``, see ``save_moss``) next to the Trainer's
    optimizer, scheduler, RNG and trainer state; ``resume_from_checkpoint`` and
    ``load_best_model_at_end`` load them back with ``load_moss``. A non-finite training loss raises
    ``FloatingPointError`` (the Trainer itself would log it as 0 under ``logging_nan_inf_filter``).
    """

    def __init__(self, *args, hidden_state_loss: Optional[bool] = None, **kwargs):
        super().__init__(*args, **kwargs)
        inner = unwrap_model(self.model)
        if not is_injected(inner):
            raise ValueError(f"MossTrainer: {type(inner).__name__} has no MoSS adapters (call "
                             "moss_kernels.inject_moss(model, config) first)")
        if hidden_state_loss is None:
            hidden_state_loss = masks_image_logits(inner) and self.compute_loss_func is None
        elif hidden_state_loss and self.compute_loss_func is not None:
            raise ValueError("MossTrainer: hidden_state_loss=True and compute_loss_func both define the loss; "
                             "pass one")
        self.hidden_state_loss = bool(hidden_state_loss)
        # Only the last position's (masked) logits from the model's own head: ours come from the hidden states.
        self._logits_to_keep = "logits_to_keep" in inspect.signature(inner.forward).parameters

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.hidden_state_loss or "labels" not in inputs or self.label_smoother is not None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        extra = {"output_hidden_states": True}
        if self._logits_to_keep:
            extra["logits_to_keep"] = 1
        outputs = model(**inputs, **extra)
        # Normalised over the whole accumulated batch only where the Trainer counts it for the model's own
        # loss (model_accepts_loss_kwargs): then it does not divide by the accumulation steps again.
        n = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss, logits = hidden_state_loss(model, outputs, labels, n)
        if self.args.average_tokens_across_devices and n is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if return_outputs:
            return loss, CausalLMOutputWithPast(loss=loss, logits=logits)
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            hint = (" The model masks image-code logits: train with hidden_state_loss=True." if
                    masks_image_logits(model) and not self.hidden_state_loss else "")
            raise FloatingPointError(f"MossTrainer: the training loss is {loss.item()} at step "
                                     f"{self.state.global_step + 1} (the Trainer would log it as 0).{hint}")
        return loss

    # ------------------------------------------------------------------ adapter-only checkpoints
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_moss(self.model, output_dir)  # every rank: FSDP2 shards are gathered; rank 0 writes
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        load_moss(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_moss(self.model, self.state.best_model_checkpoint)
