"""Fused vs eager: the MoSS adapter of this run's shapes through the op and through the literal definition.

"Fused" is ``moss_kernels.moss_lora`` with the default backend for the device (what ``MossLinear`` runs);
"eager" is ``moss_kernels.reference.literal_moss_lora``, the paper's definition written the way a user
would (gather each image, pad, ``F.conv2d``, scatter back). Both run forward and backward (gradients for
the input and every adapter weight) on the same inputs, layout and weights.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .. import backends
from ..conv_lora import moss_lora
from ..layout import ImageLayout
from ..reference import literal_moss_lora

__all__ = ["SpeedResult", "time_adapter"]


class SpeedResult:
    """Median milliseconds per forward+backward of both paths, and the backend the fused path used."""

    def __init__(self, backend: str, fused_ms: float, eager_ms: float, shape: str):
        self.backend, self.fused_ms, self.eager_ms, self.shape = backend, fused_ms, eager_ms, shape

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.fused_ms

    def line(self) -> str:
        return (f"adapter speed on this run's shapes ({self.shape}), forward+backward: fused "
                f"(backend {self.backend!r}) {self.fused_ms:.2f} ms vs eager literal {self.eager_ms:.2f} ms "
                f"-> {self.speedup:.2f}x")


def _median_ms(fn: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def time_adapter(ids: torch.Tensor, layout: ImageLayout, d_in: int, d_out: int, rank: int, kernel_size: int,
                 scale: float, repeats: int = 10, seed: int = 0, weights: Optional[tuple] = None) -> SpeedResult:
    """Time one MoSS adapter on ``(batch, seq) = ids.shape`` inputs of width ``d_in`` routed by ``layout``.

    ``weights``: ``(text_A, text_B, image_A, image_B)`` to use (a trained layer's); random otherwise.
    The eager path runs in float32 like the fused one.
    """
    gen = torch.Generator().manual_seed(seed)
    B, S = ids.shape
    x = torch.randn(B, S, d_in, generator=gen)
    if weights is None:
        weights = (torch.randn(rank, d_in, generator=gen) / d_in ** 0.5,
                   torch.randn(d_out, rank, generator=gen) / rank ** 0.5,
                   torch.randn(rank, d_in, kernel_size, kernel_size, generator=gen) / d_in ** 0.5,
                   torch.randn(d_out, rank, generator=gen) / rank ** 0.5)
    weights = [w.detach().float().clone().requires_grad_(True) for w in weights]
    x.requires_grad_(True)
    grad = torch.randn(B, S, d_out, generator=gen)
    backend = backends.default_backend(x.device, x.dtype, kernel_size)

    def run(fn):
        def step():
            for t in (x, *weights):
                t.grad = None
            fn(x, layout, *weights, scale).backward(grad)
        return step

    fused = _median_ms(run(lambda *a: moss_lora(*a, backend=backend)), repeats)
    eager = _median_ms(run(literal_moss_lora), repeats)
    shape = (f"batch {B} x seq {S}, {layout.num_image_tokens} image tokens, d {d_in}->{d_out}, rank {rank}, "
             f"k {kernel_size}")
    return SpeedResult(backend, fused, eager, shape)
