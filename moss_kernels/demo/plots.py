"""The demo's PNGs: loss curves and a grid of digits (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["plot_digits", "plot_losses", "plot_overlaid"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a CI runner or a server
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_losses(curves: Mapping[str, Sequence[float]], path: str, title: str = "training loss") -> str:
    """One panel per curve (``name -> per-step losses``), raw and smoothed; returns ``path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        steps = np.arange(1, len(values) + 1)
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
        window = max(1, len(values) // 20)
        smooth = _smooth(values, window)
        ax.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=1.8, label=f"mean of {window}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_overlaid(curves: Mapping[str, Sequence[float]], path: str, title: str) -> str:
    """Smoothed curves (``name -> per-step losses``) on one axis; returns ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, values in curves.items():
        window = max(1, len(values) // 20)
        ax.plot(np.arange(window, len(values) + 1), _smooth(values, window), linewidth=1.6, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_digits(rows: Sequence[tuple[str, np.ndarray]], path: str, levels: int,
                captions: Sequence[Sequence[str]] = ()) -> str:
    """A grid of digits: one row per ``(title, images)`` with ``images`` ``(n, H, W)`` levels ``0..levels-1``
    (``-1`` marks a pixel not drawn, shown hatched grey). ``captions[i][j]`` goes under digit ``j`` of row
    ``i``. Returns ``path``."""
    plt = _pyplot()
    n_cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.1 * n_cols + 1.6, 1.35 * len(rows)), squeeze=False)
    for i, (title, images) in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(images):
                ax.axis("off")
                continue
            img = np.asarray(images[j], dtype=np.float64)
            shown = np.ma.masked_less(img, 0)
            ax.set_facecolor("#bbbbbb")
            ax.imshow(shown, cmap="gray_r", vmin=0, vmax=levels - 1, interpolation="nearest")
            if i < len(captions) and j < len(captions[i]):
                ax.set_xlabel(captions[i][j], fontsize=7)
        axes[i, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig, path: str) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
