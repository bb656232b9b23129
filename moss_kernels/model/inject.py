"""``inject_moss``: rewrite a model's target ``nn.Linear``s as ``MossLinear``s and route them.

Works on any ``nn.Module`` whose forward takes ``input_ids`` (first positional argument or keyword)
or ``inputs_embeds``, and optionally a KV cache as ``cache=`` or ``past_key_values=``: the built-in
``MossDecoder`` and Hugging Face causal LMs alike.
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import NamedTuple, Optional

from torch import nn

from ..bases import is_linear_base
from ..layers import MossLinear
from .config import MossConfig
from .routing import MossRouter

__all__ = ["MossSummary", "adapted_layers", "inject_moss", "is_injected", "moss_summary"]

# Module-path components of vision towers, VQ tokenizers and projectors: never "all-linear" targets.
_VISION = re.compile(r"(vision|visual|vq|image_encoder|img_encoder|projector|aligner|patch_embed|siglip|clip)",
                     re.IGNORECASE)


def is_injected(model: nn.Module) -> bool:
    return getattr(model, "_moss_router", None) is not None


def adapted_layers(model: nn.Module) -> dict:
    """``{qualified name: MossLinear}`` of the model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MossLinear)}


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if head is not None else getattr(model, "lm_head", None)


def _block_names(model: nn.Module) -> set:
    """Names of the elements of every ``nn.ModuleList`` (decoder layers and the like)."""
    blocks = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            blocks.update(f"{name}.{child}" if name else child for child, _ in m.named_children())
    return blocks


def _enclosing_block(name: str, blocks: set) -> Optional[str]:
    parts = name.split(".")
    for n in range(1, len(parts)):  # the outermost: a decoder layer, not an expert inside it
        prefix = ".".join(parts[:n])
        if prefix in blocks:
            return prefix
    return None


def _is_vision(name: str) -> bool:
    return any(_VISION.search(part) for part in name.split("."))


def _select(model: nn.Module, config: MossConfig) -> list:
    linears = [(n, m) for n, m in model.named_modules() if is_linear_base(m)]
    head = _output_head(model)
    target = config.target_modules
    if target == "all-linear":
        blocks = _block_names(model)
        chosen = [n for n, m in linears if m is not head and not _is_vision(n) and _enclosing_block(n, blocks)]
        if not chosen:  # no decoder layers in a ModuleList: every linear but the head
            chosen = [n for n, m in linears if m is not head and not _is_vision(n)]
    elif isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise ValueError(f"target_modules {target!r} is not a valid regular expression: {e}") from None
        chosen = [n for n, _ in linears if pattern.fullmatch(n) or n == target or n.endswith("." + target)]
    else:
        chosen = [n for n, _ in linears if any(n == t or n.endswith("." + t) for t in target)]
    if not chosen:
        sample = ", ".join(n for n, _ in linears[:8]) or "none"
        raise ValueError(f"target_modules {target!r} matches no nn.Linear of {type(model).__name__} "
                         f"(its linear layers: {sample}{', ...' if len(linears) > 8 else ''})")
    return chosen


def _refuse_peft(model: nn.Module) -> None:
    """PEFT adapters inside the model: MoSS would wrap PEFT's internals and freeze them."""
    if "peft" not in sys.modules:  # a model cannot carry PEFT layers without peft being imported
        return
    for name, m in model.named_modules():
        kinds = {c.__name__ for c in type(m).__mro__}
        if kinds & {"PeftModel", "BaseTunerLayer", "BaseTuner"}:
            raise ValueError(f"inject_moss: {type(model).__name__} carries PEFT adapters ({name or 'the model'} is a "
                             f"{type(m).__name__}); MoSS and PEFT adapters cannot be stacked. Either merge the PEFT "
                             "LoRA into the base (model = model.merge_and_unload()) and inject MoSS into the result, "
                             "or inject MoSS into the plain base model and initialise its text adapter from the PEFT "
                             "adapter directory with moss_kernels.from_peft_lora(model, peft_dir)")


def _modules_to_save(model: nn.Module, names: list, adapted: list) -> dict:
    """Unfreeze the ``modules_to_save``; returns ``{parameter name: frozen copy of its original}``."""
    originals = {}
    for target in names:
        found = [(n, m) for n, m in model.named_modules() if n and (n == target or n.endswith("." + target))]
        if not found:
            raise ValueError(f"modules_to_save: {target!r} matches no module of {type(model).__name__}")
        for n, m in found:
            if any(n == a or n.startswith(a + ".") or a.startswith(n + ".") for a in adapted):
                raise ValueError(f"modules_to_save: {n} is or holds an adapted layer (target_modules); a module "
                                 "either gets adapters or trains in full, not both")
            for pn, p in m.named_parameters():
                originals[f"{n}.{pn}"] = p.detach().clone()
                p.requires_grad_(True)
    return originals


def inject_moss(model: nn.Module, config: Optional[MossConfig] = None, **overrides) -> nn.Module:
    """Replace the targeted ``nn.Linear``s of ``model`` by ``MossLinear``s, freeze everything else.

    Args:
        model: a decoder (``MossDecoder``, a Hugging Face ``...ForCausalLM`` /
            ``...ForConditionalGeneration``, or any module taking ``input_ids``).
        config: a ``MossConfig`` (default ``MossConfig()``); ``overrides`` replace its fields.

    Returns ``model`` itself, rewritten in place: only adapter parameters (float32) require grad; its
    forward routes one layout per call to every adapted layer (``moss_kernels.model.routing``);
    ``model.moss_config`` holds the config. Targets are ``nn.Linear``s, their subclasses and the types
    registered in ``moss_kernels.bases`` (``torch.ao`` dynamic-quantized linears). Raises ``ValueError``
    if the model already has MoSS or PEFT adapters or nothing matches ``target_modules``.
    """
    if config is None:
        config = MossConfig(**overrides)
    elif overrides:
        config = MossConfig(**{**config.to_dict(), **overrides})
    if not isinstance(config, MossConfig):
        raise TypeError(f"config must be a MossConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_injected(model) or any(isinstance(m, MossLinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has MoSS adapters")
    _refuse_peft(model)

    names = _select(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    router = MossRouter(config)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, attr)
        layer = MossLinear(base, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                           kernel_size=config.kernel_size, adapter=config.adapter, backend=config.backend)
        layer.routing = router
        setattr(parent, attr, layer)
    originals = _modules_to_save(model, config.modules_to_save or [], names)

    # Entry hooks on the model and on every module between it and the decoder layers; block hooks on
    # the decoder layers (see routing's docstring).
    blocks = _block_names(model)
    block_names = sorted({b for b in (_enclosing_block(n, blocks) for n in names) if b is not None})
    entries = {""}
    for b in block_names:
        parts = b.split(".")
        entries.update(".".join(parts[:n]) for n in range(1, len(parts) - 1))
    handles = []
    for e in sorted(entries, key=len):
        module = model.get_submodule(e) if e else model
        if "layout" not in inspect.signature(module.forward).parameters:
            router.pop_layout_kwarg.add(id(module))
        handles.append(module.register_forward_pre_hook(router.entry_pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(router.entry_post_hook, always_call=True))
    for b in block_names:
        module = model.get_submodule(b)
        handles.append(module.register_forward_pre_hook(router.block_pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(router.block_post_hook, always_call=True))

    # Plain attributes (not submodules, not parameters): they never reach state_dict().
    object.__setattr__(model, "_moss_router", router)
    object.__setattr__(model, "_moss_hooks", handles)
    object.__setattr__(model, "moss_config", config)
    object.__setattr__(model, "_moss_originals", originals)
    return model


class MossSummary(NamedTuple):
    adapted_layers: int
    trainable: int
    total: int
    adapter: str
    rank: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return (f"MoSS ({self.adapter}, rank {self.rank}): {self.adapted_layers} adapted layers, "
                f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {pct:.4f}")


def moss_summary(model: nn.Module) -> MossSummary:
    """Counts of adapted layers and of trainable / all parameters (``print(moss_summary(model))``)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    cfg = getattr(model, "moss_config", None)
    return MossSummary(len(adapted_layers(model)), trainable, total, cfg.adapter if cfg else "none",
                       cfg.rank if cfg else 0)
