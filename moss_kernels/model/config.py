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
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MossConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"MossConfig: unknown keys {sorted(unknown)}")
        return cls(**d)
