"""Save and load MoSS adapters: weights to ``adapter_model.safetensors``, settings to ``moss_config.json``.

Only adapter parameters (``<layer name>.text_A`` ... ``.image_B``) and the parameters of the
config's ``modules_to_save`` are written; the base model is the user's. ``moss_config.json`` records
everything needed to rebuild the adapters: the whole ``MossConfig`` (rank, alpha, kernel, adapter
kind, targets, routing, grid / boi, layout provider, ``modules_to_save``), the adapters' dtype and the
shape of every saved tensor. ``load_moss`` into a base model injects it from that config first (PEFT's
``from_pretrained`` shape); into an injected model it refuses any difference, naming the field.

Wrapped models (``torch.compile``'s ``OptimizedModule``, DDP / ``DataParallel`` / FSDP1 / DeepSpeed
``.module``) are unwrapped first, so they save and load like the model inside.
"""

from __future__ import annotations

import json
import os
from typing import Union

import torch
from torch import nn

from .config import MossConfig
from .inject import adapted_layers, inject_moss, is_injected
from .providers import CallableProvider

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_dtype", "load_moss", "save_moss", "unwrap_model"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "moss_config.json"
_FORMAT = 2
_READS = (1, 2)
_PARAMS = ("text_A", "text_B", "image_A", "image_B")
# Fields that do not change the function the adapters compute (dropout acts only in training; the
# backend and the target spec — the adapted layer names are compared instead — are how, not what).
_UNCHECKED = ("dropout", "backend", "target_modules")
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise ImportError("saving and loading MoSS adapters needs safetensors: pip install safetensors") from e
    return st


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` / DDP / ``DataParallel`` / FSDP1 / DeepSpeed wrappers."""
    while True:
        children = model.__dict__.get("_modules", {})  # not getattr: OptimizedModule forwards attributes
        inner = children.get("_orig_mod")
        if inner is None and any(c.__name__ in _WRAPPERS for c in type(model).__mro__):
            inner = children.get("module")
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # FSDP2 shards: save the whole tensor
    return (full() if callable(full) else t).detach()


def _adapter_params(model: nn.Module) -> dict:
    out = {}
    for name, layer in adapted_layers(model).items():
        for p in _PARAMS:
            t = getattr(layer, p)
            if t is not None:
                out[f"{name}.{p}"] = t
    return out


def _saved_module_params(model: nn.Module) -> dict:
    originals = getattr(model, "_moss_originals", None) or {}
    params = dict(model.named_parameters(remove_duplicate=False))
    return {n: params[n] for n in originals}


def adapter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's adapter parameters (all share one)."""
    dtypes = {p.dtype for p in _adapter_params(model).values()}
    if len(dtypes) != 1:
        raise ValueError(f"the adapters of {type(model).__name__} mix dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop()


def _config_record(config: MossConfig) -> dict:
    """``config.to_dict()`` with values JSON cannot hold (a user's layout-provider callable) recorded
    by name: loading then needs the model injected with that value first."""
    out = {}
    for k, v in config.to_dict().items():
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            out[k] = {"unserializable": _qualname(v)}
    return out


def _qualname(v) -> str:
    if isinstance(v, CallableProvider):  # the user's function is the routing, not the wrapper around it
        v = v.fn
    return f"{getattr(v, '__module__', type(v).__module__)}.{getattr(v, '__qualname__', type(v).__qualname__)}"


def save_moss(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write the adapters (and ``modules_to_save``) of an injected ``model`` to ``directory``.

    ``directory`` is created if needed. Raises ``ValueError`` if the model has no adapters, or if
    parameters outside the adapters and ``modules_to_save`` require grad: they would train and then
    be lost (freeze them, or inject with ``modules_to_save=[...]``). Under ``torch.distributed`` call it
    on every rank: FSDP2-sharded adapters are gathered (a collective) and rank 0 writes.
    """
    model = unwrap_model(model)
    if not is_injected(model):
        raise ValueError(f"{type(model).__name__} has no MoSS adapters to save: call inject_moss first")
    adapters, modules = _adapter_params(model), _saved_module_params(model)
    known = {id(p) for p in (*adapters.values(), *modules.values())}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in known]
    if stray:
        raise ValueError(f"save_moss: {_few(stray)} require grad but are neither adapters nor modules_to_save, so "
                         "they would not be saved: freeze them, or inject with modules_to_save=[their module names]")
    dtype = adapter_dtype(model)
    tensors = {k: _full(v).to("cpu").contiguous() for k, v in {**adapters, **modules}.items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format": _FORMAT, "config": _config_record(model.moss_config), "dtype": str(dtype).replace("torch.", ""),
            "base_model": type(model).__name__,
            "layers": {k: list(tensors[k].shape) for k in adapters},
            "modules_to_save": {k: list(tensors[k].shape) for k in modules}}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=1)


def read_moss_config(directory: Union[str, os.PathLike]) -> dict:
    """The metadata ``save_moss`` wrote to ``directory`` (``FileNotFoundError`` / ``ValueError`` if none)."""
    cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for path in (cfg_path, w_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_moss: {path} does not exist (not a save_moss directory?)")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") not in _READS:
        raise ValueError(f"load_moss: {cfg_path} has format {meta.get('format')!r}, this version reads {_READS}")
    return meta


def _check_config(have: MossConfig, record: dict, directory) -> None:
    mine = have.to_dict()
    diffs = []
    for field in sorted(set(mine) | set(record)):
        if field in _UNCHECKED:
            continue
        ours = mine.get(field)
        theirs = record.get(field, MossConfig.__dataclass_fields__[field].default
                            if field in MossConfig.__dataclass_fields__ else None)
        if isinstance(theirs, dict) and "unserializable" in theirs:
            ours, theirs = (_qualname(ours) if ours is not None else None), theirs["unserializable"]
        if field == "modules_to_save":
            ours, theirs = sorted(ours or []), sorted(theirs or [])
        if ours != theirs:
            diffs.append(f"{field}: the model has {ours!r}, the saved adapters {theirs!r}")
    if diffs:
        raise ValueError(f"load_moss: the model was injected with other settings than the adapters in {directory} "
                         f"were saved with: {'; '.join(diffs)} (load into the base model to inject from the saved "
                         "config)")


def _saved_config(record: dict) -> MossConfig:
    for field, v in record.items():
        if isinstance(v, dict) and "unserializable" in v:
            raise ValueError(f"load_moss: the saved {field} was a Python object ({v['unserializable']}) that "
                             f"{CONFIG_NAME} cannot hold: inject the model first with "
                             f"inject_moss(model, MossConfig(..., {field}=...)) and then call load_moss")
    return MossConfig.from_dict(record)


def load_moss(model: nn.Module, directory: Union[str, os.PathLike], strict: bool = True) -> nn.Module:
    """Load adapters saved by ``save_moss`` into ``model`` and return it (the model given, wrapped or not).

    A model without adapters is injected with the saved config first and its adapters take the
    saved dtype. An injected model must have been injected with the same settings: any other
    ``rank``, ``alpha``, ``kernel_size``, ``adapter``, ``boi_token_id``, ``grid``, ``routing``, layout
    provider, ``modules_to_save`` or adapter ``dtype`` raises ``ValueError`` naming the field
    (``dropout`` is not compared: it acts only in training). Raises ``ValueError`` naming the layers that
    are missing, unexpected (``strict``) or of another shape — e.g. adapters saved from another model.
    """
    meta = read_moss_config(directory)
    target = unwrap_model(model)
    record = meta["config"]
    saved_dtype = getattr(torch, meta["dtype"]) if "dtype" in meta else None
    if not is_injected(target):
        inject_moss(target, _saved_config(record))
        if saved_dtype is not None:
            for p in _adapter_params(target).values():
                p.data = p.data.to(saved_dtype)
    else:
        _check_config(target.moss_config, record, directory)
        if saved_dtype is not None and adapter_dtype(target) != saved_dtype:
            raise ValueError(f"load_moss: the model's adapters have dtype={adapter_dtype(target)}, the adapters in "
                             f"{directory} were saved with dtype={saved_dtype}")
    tensors = _safetensors().load_file(os.path.join(directory, WEIGHTS_NAME))
    own = {**_adapter_params(target), **_saved_module_params(target)}
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
        raise ValueError(f"load_moss: the adapters in {directory} do not fit {type(target).__name__}: "
                         + "; ".join(problems))
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))
    return model


def _few(items: list, n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")
