"""PEFT interop: start MoSS from a PEFT LoRA adapter directory (``from_peft_lora``).

A PEFT LoRA adds ``s_p * B_p A_p x`` (``s_p = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) to a
linear layer; MoSS's text adapter adds ``s * text_B text_A x`` (``s = alpha / rank``). With
``rank >= r`` the mapping is exact: ``text_A[:r] = A_p``, ``text_B[:, :r] = B_p * s_p / s``, the other
columns of ``text_B`` zero. The image adapter's causal ``k x k`` kernel reads the current token
through its last tap (``image_A[..., k-1, k-1]``, the "self tap"): putting ``A_p`` there and zero in
the other taps makes the image adapter the same LoRA on image tokens, so the MoSS model then equals
the PEFT model on every input, and training grows the other taps from there.

Stacking the two libraries is refused instead: ``inject_moss`` raises on a model carrying PEFT
layers, and a MoSS layer whose base PEFT's ``get_peft_model`` replaced raises on its next forward.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Union

import torch
from torch import nn

from .inject import adapted_layers, is_injected
from .io import _few, _safetensors, unwrap_model

__all__ = ["from_peft_lora"]

_PREFIX = "base_model.model."
# adapter_config.json options whose adapters are not a plain LoRA on linear layers.
_REFUSED = {"use_dora": "DoRA", "lora_bias": "a LoRA bias", "use_qalora": "QA-LoRA", "layer_replication":
            "layer replication", "modules_to_save": "modules trained in full", "trainable_token_indices":
            "trainable token embeddings", "target_parameters": "LoRA on parameters"}


def _pattern_value(name: str, pattern: dict, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the layer name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def from_peft_lora(model: nn.Module, peft_dir: Union[str, os.PathLike], image_self_tap: bool = False) -> nn.Module:
    """Initialise the text adapters of an injected ``model`` from a PEFT LoRA saved in ``peft_dir``.

    Args:
        model: a model injected with ``inject_moss`` (wrapped or not) whose base is the base the PEFT
            adapter was trained on; every PEFT-adapted layer must be a MoSS layer (its ``target_modules``
            cover PEFT's) of ``rank`` at least PEFT's ``r``.
        peft_dir: a directory written by PEFT's ``save_pretrained`` (``adapter_config.json`` and
            ``adapter_model.safetensors``) of a ``LORA`` adapter without DoRA, biases or
            ``modules_to_save``.
        image_self_tap: also set the image adapter to the same LoRA through the conv's self tap (other
            taps zero), so the model equals the PEFT model on image tokens too; otherwise the image
            adapters keep their values and only text tokens match PEFT.

    Returns ``model``. Layers the PEFT adapter does not touch keep their adapters. Raises
    ``ValueError`` naming the offending option, layer or rank.
    """
    inner = unwrap_model(model)
    if not is_injected(inner):
        raise ValueError("from_peft_lora: inject MoSS into the base model first (moss_kernels.inject_moss(model, "
                         "config)), then initialise its text adapters from the PEFT directory")
    cfg_path = os.path.join(peft_dir, "adapter_config.json")
    w_path = os.path.join(peft_dir, "adapter_model.safetensors")
    for path in (cfg_path, w_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"from_peft_lora: {path} does not exist (not a PEFT save_pretrained directory?)")
    with open(cfg_path) as f:
        pcfg = json.load(f)
    if pcfg.get("peft_type") != "LORA":
        raise ValueError(f"from_peft_lora: {peft_dir} holds a {pcfg.get('peft_type')!r} adapter, not a LORA")
    for key, what in _REFUSED.items():
        if pcfg.get(key):
            raise ValueError(f"from_peft_lora: the PEFT adapter uses {key}={pcfg[key]!r} ({what}), which has no MoSS "
                             "equivalent; only plain LoRA on linear layers converts")
    if pcfg.get("bias", "none") != "none":
        raise ValueError(f"from_peft_lora: the PEFT adapter trains biases (bias={pcfg['bias']!r}), which MoSS does not")
    if image_self_tap and inner.moss_config.adapter == "lora":
        raise ValueError("from_peft_lora: image_self_tap=True needs an image adapter, the model was injected with "
                         "adapter='lora'")

    tensors = _safetensors().load_file(w_path)
    pairs: dict = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key[len(_PREFIX):] if key.startswith(_PREFIX) else key)
        if m is None:
            raise ValueError(f"from_peft_lora: {key} in {w_path} is not the lora_A / lora_B weight of a linear layer")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    layers = adapted_layers(inner)
    absent = sorted(set(pairs) - set(layers))
    if absent:
        raise ValueError(f"from_peft_lora: the PEFT adapter adapts {_few(absent)}, which are not MoSS layers of "
                         f"{type(inner).__name__}: inject with target_modules covering PEFT's "
                         f"{pcfg.get('target_modules')!r}")
    alpha, rank_pattern, alpha_pattern = pcfg["lora_alpha"], pcfg.get("rank_pattern") or {}, \
        pcfg.get("alpha_pattern") or {}
    updates = []
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"from_peft_lora: {name} has only lora_{''.join(ab)} in {w_path}")
        a, b = ab["A"].double(), ab["B"].double()
        layer = layers[name]
        r = a.shape[0]
        if a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
            raise ValueError(f"from_peft_lora: {name} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, the "
                             f"model's layer is {layer.in_features} -> {layer.out_features} (another base model?)")
        if r != _pattern_value(name, rank_pattern, pcfg["r"]):
            raise ValueError(f"from_peft_lora: {name} has rank {r} in the weights but not in adapter_config.json")
        if layer.rank < r:
            raise ValueError(f"from_peft_lora: {name} has PEFT rank r={r}, the MoSS layer rank={layer.rank}: inject "
                             f"with rank >= {r}")
        a_l = _pattern_value(name, alpha_pattern, alpha)
        s_p = a_l / (math.sqrt(r) if pcfg.get("use_rslora") else r)
        updates.append((layer, a, b * (s_p / layer.scale)))
    with torch.no_grad():
        for layer, a, b in updates:
            r = a.shape[0]
            targets = [(layer.text_A, layer.text_B, None)]
            if image_self_tap:
                targets.append((layer.image_A, layer.image_B, layer.kernel_size - 1))
            for A, B, tap in targets:
                if tap is None:
                    A[:r].copy_(a.to(A.dtype))
                else:
                    A[:r].zero_()
                    A[:r, :, tap, tap].copy_(a.to(A.dtype))
                B.zero_()
                B[:, :r].copy_(b.to(B.dtype))
    return model
