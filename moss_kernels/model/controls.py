"""Adapter controls: run the frozen base (``disable_moss``), merge the text adapter (``merge_text_adapter``).

Why only the text adapter merges: a text LoRA is a per-token linear map, ``scale * B_t A_t x``, so it
folds into the base weight (``W + scale * B_t A_t``). The image adapter is a causal ``k x k``
convolution over the image grid: the update of an image token reads the inputs of its neighbours
(the tokens above and to its left), and which tokens are image tokens, and where they stand in their
grid, changes per sequence. No weight of a per-token linear layer can express that, so a merged
model can only be exact where no token is routed to the image adapter: text-only use. (For
``adapter="moe_lora"`` the image LoRA is per token but still applies to image tokens only; it cannot
share one weight with the text LoRA either.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .inject import adapted_layers, is_injected
from .io import unwrap_model

__all__ = ["disable_moss", "merge_text_adapter"]


def _injected(model: nn.Module, what: str) -> nn.Module:
    inner = unwrap_model(model)
    if not is_injected(inner):
        raise ValueError(f"{what}: {type(model).__name__} has no MoSS adapters (call moss_kernels.inject_moss first)")
    return inner


@contextlib.contextmanager
def disable_moss(model: nn.Module) -> Iterator[nn.Module]:
    """Run the frozen base model exactly inside the block (PEFT's ``disable_adapter``).

    Every ``MossLinear`` returns its base's output, and the ``modules_to_save`` run their original
    (frozen-copy) weights. Nests, restores the previous state on exit even after an error, and covers
    ``generate()`` (a cache filled inside the block holds the base's keys and values only: do not
    continue it outside). Not thread-local: other threads using the model see the base meanwhile.
    Yields the model.
    """
    inner = _injected(model, "disable_moss")
    layers = list(adapted_layers(inner).values())
    before = [layer.adapters_enabled for layer in layers]
    params = dict(inner.named_parameters(remove_duplicate=False))
    originals = getattr(inner, "_moss_originals", None) or {}
    swapped = {}
    try:
        for layer in layers:
            layer.adapters_enabled = False
        with torch.no_grad():
            for name, orig in originals.items():
                p = params[name]
                if orig.device != p.device or orig.dtype != p.dtype:  # the model moved since injection
                    orig = originals[name] = orig.to(device=p.device, dtype=p.dtype)
                swapped[name] = p.data
                p.data = orig
        yield model
    finally:
        with torch.no_grad():
            for name, data in swapped.items():
                params[name].data = data
        for layer, was in zip(layers, before):
            layer.adapters_enabled = was


def merge_text_adapter(model: nn.Module, drop_image_adapter: bool = False) -> nn.Module:
    """Fold every text adapter into its base weight and remove MoSS from ``model`` (in place).

    Each ``MossLinear`` is replaced by its base ``nn.Linear`` with ``W + scale * text_B @ text_A``
    (computed in float64, stored in the base's dtype); the routing hooks go. The result is a plain
    model, equal to the MoSS model on inputs with no image tokens (exactly for ``adapter="lora"``,
    where every token used the text adapter).

    The image adapter cannot be merged (see the module docstring): for ``adapter="moss"`` or
    ``"moe_lora"`` this raises ``ValueError`` unless ``drop_image_adapter=True`` says the merged model
    is for text-only use. ``modules_to_save`` keep their trained weights. Bases other than a plain
    ``nn.Linear`` with a floating-point weight (quantized linears) raise ``TypeError``: their weights
    cannot take the update. Returns the unwrapped model.
    """
    inner = _injected(model, "merge_text_adapter")
    layers = adapted_layers(inner)
    if inner.moss_config.adapter != "lora" and not drop_image_adapter:
        raise ValueError("merge_text_adapter: the image adapter (a causal conv over the image grid: each image "
                         "token's update reads its neighbours' inputs) cannot be folded into a per-token linear "
                         "weight; pass drop_image_adapter=True for a text-only model (exact on inputs without "
                         "image tokens), or keep the MoSS model for images")
    for name, layer in layers.items():
        base = layer.base
        if type(base) is not nn.Linear or not base.weight.is_floating_point():
            raise TypeError(f"merge_text_adapter: {name} has a {type(base).__name__} base, whose weight cannot take "
                            "the adapter's update (only plain nn.Linear bases merge)")
    with torch.no_grad():
        for layer in layers.values():
            w = layer.base.weight
            delta = layer.scale * (layer.text_B.double() @ layer.text_A.double())
            w.copy_((w.double() + delta.to(w.device)).to(w.dtype))
    for name, layer in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        setattr(parent, attr, layer.base)
    for handle in inner._moss_hooks:
        handle.remove()
    for attr in ("_moss_router", "_moss_hooks", "moss_config", "_moss_originals"):
        if attr in inner.__dict__:
            object.__delattr__(inner, attr)
    return inner
