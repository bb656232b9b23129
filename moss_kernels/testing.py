"""Shared test and benchmark helpers: random layouts, the float64 ground truth, error measures.

One definition of each, so tests of every backend and the benchmarks compare the same things.
"""

from __future__ import annotations

import random
from typing import Optional

import torch

from .layout import ImageLayout, ImageSpan
from .reference import literal_moss_lora

__all__ = ["TOLERANCE", "assert_close_rel", "ground_truth", "random_adapters", "random_layout", "rel_err"]

# README, "Backends": relative error against the float64 ground truth.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` if ``out`` has NaN/Inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def random_layout(
    rng: random.Random,
    batch_size: Optional[int] = None,
    seq_len: Optional[int] = None,
    max_side: int = 5,
    image_share: float = 0.7,
) -> ImageLayout:
    """A random layout with the hard cases: several images a row, text between them, images cut
    by the end of the sequence, ``1 x W`` and ``H x 1`` grids, odd sizes, text-only rows."""
    B = batch_size or rng.randint(1, 3)
    S = seq_len or rng.randint(8, 40)
    spans = []
    for b in range(B):
        if rng.random() < 0.15:
            continue  # a text-only sequence
        pos = rng.randint(0, 3)
        while pos < S:
            shape = rng.choice(["square", "row", "col", "any"])
            h = 1 if shape == "row" else rng.randint(1, max_side)
            w = 1 if shape == "col" else (h if shape == "square" else rng.randint(1, max_side))
            spans.append(ImageSpan(b, pos, h, w))  # length None: cut at the sequence's end
            pos += h * w + (rng.randint(0, 4) if rng.random() < image_share else rng.randint(2, 8))
    return ImageLayout.from_spans(B, S, spans)


def random_adapters(d_in: int, d_out: int, rank: int, kernel_size: int, dtype=torch.float32, device="cpu",
                    generator: Optional[torch.Generator] = None, text: bool = True, image: bool = True):
    """``(text_a, text_b, image_weight, image_b)`` with O(1) outputs (no zero B: zeros hide bugs)."""
    g = dict(generator=generator, dtype=dtype, device=device)
    ta = torch.randn(rank, d_in, **g) / d_in**0.5 if text else None
    tb = torch.randn(d_out, rank, **g) / rank**0.5 if text else None
    k = kernel_size
    w = torch.randn(rank, d_in, k, k, **g) / (d_in * k * k) ** 0.5 if image else None
    ib = torch.randn(d_out, rank, **g) / rank**0.5 if image else None
    return ta, tb, w, ib


def ground_truth(x, layout, text_a, text_b, image_weight, image_b, scale=1.0) -> torch.Tensor:
    """The float64 delta from the literal definition (``F.pad`` + ``F.conv2d``)."""
    d = lambda t: None if t is None else t.detach().double()
    return literal_moss_lora(d(x), layout, d(text_a), d(text_b), d(image_weight), d(image_b), scale)


def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Nonzero ``B`` matrices in every adapted layer of ``model`` (an untrained adapter is the
    identity and would hide routing bugs)."""
    from .model import adapted_layers  # imported here: the layout/op helpers above need no model code

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for p in (layer.text_B, layer.image_B):
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
