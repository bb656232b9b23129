"""Save and load MoSS adapters: weights to ``adapter_model.safetensors``, settings to ``moss_config.json``.

Only adapter parameters are written (``<layer name>.text_A`` ... ``.image_B``); the base model is the
user's. ``load_moss`` injects a fresh model with the saved config (or checks an injected one against
it) and refuses any mismatch in layer names or shapes, so image weights are never silently dropped.
"""

from __future__ import annotations

import json
import os
from typing import Union

import torch
from torch import nn

from .config import MossConfig
from .inject import adapted_layers, inject_moss, is_injected

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_moss", "save_moss"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "moss_config.json"
_FORMAT = 1
_PARAMS = ("text_A", "text_B", "image_A", "image_B")


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise ImportError("saving and loading MoSS adapters needs safetensors: pip install safetensors") from e
    return st


def _adapter_tensors(model: nn.Module) -> dict:
    out = {}
    for name, layer in adapted_layers(model).items():
        for p in _PARAMS:
            t = getattr(layer, p)
            if t is not None:
                full = getattr(t, "full_tensor", None)  # FSDP2 shards: save the whole tensor
                out[f"{name}.{p}"] = (full() if callable(full) else t).detach()
    return out


def save_moss(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write the adapters of an injected ``model`` to ``directory`` (created if needed).

    Under ``torch.distributed`` call it on every rank: FSDP2-sharded adapters are gathered (a
    collective) and rank 0 writes.
    """
    if not is_injected(model):
        raise ValueError(f"{type(model).__name__} has no MoSS adapters to save: call inject_moss first")
    tensors = {k: v.to("cpu").contiguous() for k, v in _adapter_tensors(model).items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format": _FORMAT, "config": model.moss_config.to_dict(),
            "layers": {k: list(v.shape) for k, v in tensors.items()}}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=1)


def load_moss(model: nn.Module, directory: Union[str, os.PathLike], strict: bool = True) -> nn.Module:
    """Load adapters saved by ``save_moss`` into ``model`` and return it.

    A model without adapters is injected with the saved config first; an injected model must have
    the same adapter settings. Raises ``ValueError`` naming the layers that are missing, unexpected
    (``strict``) or of another shape — e.g. adapters saved from another model.
    """
    cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for path in (cfg_path, w_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_moss: {path} does not exist (not a save_moss directory?)")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"load_moss: {cfg_path} has format {meta.get('format')!r}, this version reads {_FORMAT}")
    saved = MossConfig.from_dict(meta["config"])
    if not is_injected(model):
        inject_moss(model, saved)
    else:
        have = model.moss_config
        for field in ("rank", "kernel_size", "adapter"):
            if getattr(have, field) != getattr(saved, field):
                raise ValueError(f"load_moss: the model's adapters have {field}={getattr(have, field)!r}, the saved "
                                 f"ones {field}={getattr(saved, field)!r}")
    tensors = _safetensors().load_file(w_path)
    layers = adapted_layers(model)
    own = {}
    for name, layer in layers.items():
        for p in _PARAMS:
            if getattr(layer, p) is not None:
                own[f"{name}.{p}"] = getattr(layer, p)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_few(missing)}")
    if unexpected and strict:
        problems.append(f"not in the model: {_few(unexpected)}")
    if wrong:
        problems.append("shape mismatch: " + _few([f"{k} model {tuple(own[k].shape)} vs saved "
                                                    f"{tuple(tensors[k].shape)}" for k in wrong]))
    if problems:
        raise ValueError(f"load_moss: the adapters in {directory} do not fit {type(model).__name__}: "
                         + "; ".join(problems))
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))
    return model


def _few(items: list, n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")
