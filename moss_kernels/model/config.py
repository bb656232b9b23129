"""``MossConfig``: what a user sets to put MoSS adapters into a model."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union
from collections.abc import Sequence

from ..layers import ADAPTERS

__all__ = ["MossConfig"]

TargetModules = Union[str, Sequence[str]]


@dataclasses.dataclass
class MossConfig:
    """Settings of ``inject_moss``.

    Args:
        rank, alpha, dropout, kernel_size: of every ``MossLinear`` (paper defaults: 256, 256, 0.05, 2).
        target_modules: ``"all-linear"`` (every ``nn.Linear`` of the decoder layers: not the output head,
            not vision towers or VQ models), a list of names or name suffixes (``["q_proj", "v_proj"]``),
            or one string matched as a regular expression against the full module name (or as a suffix).
        adapter: ``"moss"`` (text LoRA + image conv LoRA), ``"moe_lora"`` (one linear LoRA per modality,
            a 1x1 kernel) or ``"lora"`` (one LoRA for all tokens): the paper's Table 2 baselines.
        boi_token_id, grid: with both set, every forward derives its layout from ``input_ids``: after
            each ``boi_token_id`` come ``grid = (H, W)`` image tokens. Without them, layouts are given
            explicitly (``moss_layout``) and every other forward is all text.
        routing: ``"input"`` (grid on the image tokens, the paper's Figure 2) or ``"output"`` (grid on the
            positions that predict them); see ``ImageLayout.from_token_ids``.
        modules_to_save: names or name suffixes of other modules (an embedding, the output head) that train
            in full next to the adapters: unfrozen by ``inject_moss``, saved by ``save_moss``, and run
            from a frozen copy of their original weights under ``disable_moss`` (PEFT's option).
        backend: the backend of every adapted layer's calls (``"native"``, ``"triton"``, ``"reference"``;
            ``None``: the fastest for each call's device); ``inject_moss(model, backend=...)`` alike.
        layout_provider: where a model family puts its image tokens, for training forwards, prefill and
            every decoding step alike (``moss_kernels.model.providers``): a ``LayoutProvider``
            (``Emu3Provider``, ``JanusProvider``, ``BoiGridProvider``) or a callable
            ``fn(input_ids) -> ImageLayout``. Default: ``BoiGridProvider(boi_token_id, grid, routing)``
            when those are set. Not saved by ``to_dict`` (code, not data).
    """

    rank: int = 256
    alpha: float = 256
    dropout: float = 0.05
    kernel_size: int = 2
    target_modules: TargetModules = "all-linear"
    adapter: str = "moss"
    boi_token_id: Optional[int] = None
    grid: Optional[Sequence[int]] = None
    routing: str = "input"
    modules_to_save: Optional[Sequence[str]] = None
    backend: Optional[str] = None
    layout_provider: Optional[object] = None

    def __post_init__(self):
        for name in ("rank", "kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MossConfig: {name} must be a positive int, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MossConfig: dropout must lie in [0, 1), got {self.dropout!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"MossConfig: adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.routing not in ("input", "output"):
            raise ValueError(f"MossConfig: routing must be 'input' or 'output', got {self.routing!r}")
        if (self.boi_token_id is None) != (self.grid is None):
            raise ValueError("MossConfig: boi_token_id and grid go together (both set to derive layouts from "
                             f"input_ids, or neither), got boi_token_id={self.boi_token_id!r}, grid={self.grid!r}")
        if self.grid is not None:
            try:
                grid = tuple(int(g) for g in self.grid)
            except (TypeError, ValueError):
                raise ValueError(f"MossConfig: grid must be a pair (height, width), got {self.grid!r}") from None
            if len(grid) != 2 or min(grid) <= 0:
                raise ValueError(f"MossConfig: grid must be a positive (height, width) pair, got {self.grid!r}")
            self.grid = grid
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) and m
                                                                for m in self.modules_to_save):
                raise ValueError("MossConfig: modules_to_save must be a list of module names, got "
                                 f"{self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save) or None
        if self.backend is not None and (not isinstance(self.backend, str) or self.backend == "auto"):
            if self.backend != "auto":
                raise ValueError(f"MossConfig: backend must be a backend name or None, got {self.backend!r}")
            self.backend = None
        if self.layout_provider is not None and not callable(self.layout_provider) and not hasattr(
                self.layout_provider, "step"):
            raise ValueError("MossConfig: layout_provider must be a LayoutProvider or a callable "
                             f"fn(input_ids) -> ImageLayout, got {type(self.layout_provider).__name__}")
        if isinstance(self.target_modules, str):
            pass
        elif isinstance(self.target_modules, (list, tuple, set, frozenset)) and self.target_modules and all(
                isinstance(t, str) for t in self.target_modules):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, (set, frozenset)) \
                else list(self.target_modules)
        else:
            raise ValueError("MossConfig: target_modules must be 'all-linear', a regex string or a non-empty list of "
                             f"names, got {self.target_modules!r}")

    @property
    def derives_layout(self) -> bool:
        """Whether layouts come from ``input_ids`` (``boi_token_id`` and ``grid`` set)."""
        return self.grid is not None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid) if self.grid is not None else None
        from .providers import provider_spec  # providers import layers; config is imported first

        d["layout_provider"] = provider_spec(self.layout_provider)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MossConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"MossConfig: unknown keys {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("layout_provider"), dict):
            from .providers import provider_from_spec

            d["layout_provider"] = provider_from_spec(d["layout_provider"])
        return cls(**d)
