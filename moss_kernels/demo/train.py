"""Training and evaluation of the demo: a tiny base decoder, frozen, then MoSS (or a baseline) on top.

Everything is seeded: the same knobs and seed give the same losses, metrics and images (on one machine;
CPU kernels with another thread count may round differently).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..model import MossConfig, inject_moss
from ..model.decoder import DecoderConfig, MossDecoder
from .data import NUMBER_WORDS, DigitsData, TaskBatch, Vocab

__all__ = [
    "DemoSettings",
    "build_decoder",
    "evaluate",
    "masked_cross_entropy",
    "pretrain_base",
    "seed_everything",
    "train",
    "tune_adapter",
]


@dataclasses.dataclass
class DemoSettings:
    """The demo's knobs (the CLI's flags; see ``python -m moss_kernels.demo --help``)."""

    seed: int = 0
    levels: int = 4
    transform: str = "turn"
    given_rows: int = 3
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    tune_steps: int = 200
    tune_lr: float = 3e-3
    batch_size: int = 32
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    kernel_size: int = 2
    limit: Optional[int] = None  # keep only the first `limit` digits (tiny test runs)
    progress: bool = True

    def data(self) -> DigitsData:
        return DigitsData(levels=self.levels, transform=self.transform, given_rows=self.given_rows, limit=self.limit)

    def moss_config(self, vocab: Vocab, adapter: str = "moss") -> MossConfig:
        return MossConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, kernel_size=self.kernel_size,
                          adapter=adapter, boi_token_id=vocab.boi_id, grid=(8, 8))


def seed_everything(seed: int) -> None:
    """Seed torch's global generator (adapter init and dropout draw from it)."""
    torch.manual_seed(seed)


def build_decoder(settings: DemoSettings, vocab: Vocab) -> MossDecoder:
    """A fresh built-in decoder whose vocabulary is the demo's (``Vocab`` follows the decoder's order)."""
    cfg = DecoderConfig(text_vocab_size=vocab.text_size, image_vocab_size=vocab.levels, grid=(8, 8),
                        hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
                        num_layers=settings.num_layers, num_heads=settings.num_heads, eos_token_id=vocab.eos_id)
    model = MossDecoder(cfg)
    assert (cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_start, cfg.vocab_size) == \
        (vocab.boi_id, vocab.eoi_id, vocab.image_start, vocab.size), "demo vocabulary and decoder disagree"
    return model


def masked_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target positions ``mask[:, 1:]``.

    ``logits``: ``(B, S, V)`` float32; ``ids``: ``(B, S)`` int64; ``mask``: ``(B, S)`` bool, position
    ``t`` marks target ``ids[:, t]`` predicted from ``logits[:, t-1]``.
    """
    target_mask = mask[:, 1:]
    pred = logits[:, :-1][target_mask]
    return F.cross_entropy(pred, ids[:, 1:][target_mask])


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of ``peak``."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model: torch.nn.Module, task: TaskBatch, steps: int, batch_size: int, lr: float, seed: int,
          desc: str = "train", progress: bool = True) -> list[float]:
    """AdamW on the parameters that require grad, minibatches drawn epoch by epoch; returns per-step losses."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(task), generator=gen), 0
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    for step in bar:
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(task), generator=gen), 0
        batch = task.subset(order[cursor:cursor + batch_size])
        cursor += batch_size
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        loss = masked_cross_entropy(model(batch.ids).logits, batch.ids, batch.loss_mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: TaskBatch, vocab: Vocab, batch_size: int = 128) -> dict:
    """Teacher-forced metrics on ``task`` (held-out data in the comparison).

    * ``loss``: mean cross-entropy over the task's loss positions (full vocabulary, as trained);
    * ``image_loss`` / ``image_acc``: over the image tokens the model must draw (``image_target``), with
      the logits restricted to the image vocabulary as the generation loop restricts them: negative
      log-likelihood of the true intensity level, and how often its argmax is the true level;
    * ``answer_acc``: how often the argmax at the digit-name position is the right number word
      (``nan`` when the task names no digit after the image).
    """
    model.eval()
    number_ids = torch.tensor([vocab.word_id[w] for w in NUMBER_WORDS])
    sums = dict(loss=0.0, n_loss=0, image_nll=0.0, image_hit=0, n_image=0, answer_hit=0, n_answer=0)
    for start in range(0, len(task), batch_size):
        b = task.subset(torch.arange(start, min(start + batch_size, len(task))))
        logits = model(b.ids).logits[:, :-1]
        targets = b.ids[:, 1:]
        lm = b.loss_mask[:, 1:]
        sums["loss"] += F.cross_entropy(logits[lm], targets[lm], reduction="sum").item()
        sums["n_loss"] += int(lm.sum())
        im = b.image_target[:, 1:]
        image_logits = logits[im][:, vocab.image_start:]
        image_targets = targets[im] - vocab.image_start
        sums["image_nll"] += F.cross_entropy(image_logits, image_targets, reduction="sum").item()
        sums["image_hit"] += int((image_logits.argmax(-1) == image_targets).sum())
        sums["n_image"] += int(im.sum())
        am = lm & torch.isin(targets, number_ids) & ~im
        sums["answer_hit"] += int((logits[am].argmax(-1) == targets[am]).sum())
        sums["n_answer"] += int(am.sum())
    div = lambda a, n: sums[a] / sums[n] if sums[n] else float("nan")
    return dict(loss=div("loss", "n_loss"), image_loss=div("image_nll", "n_image"),
                image_acc=div("image_hit", "n_image"), answer_acc=div("answer_hit", "n_answer"))


def pretrain_base(settings: DemoSettings, data: DigitsData) -> tuple[MossDecoder, list[float]]:
    """Train the whole tiny decoder on captioned digits (both orders); returns it frozen, and its losses."""
    seed_everything(settings.seed)
    model = build_decoder(settings, data.vocab)
    losses = train(model, data.pretrain("train"), settings.pretrain_steps, settings.batch_size, settings.pretrain_lr,
                   seed=settings.seed, desc="pretrain base", progress=settings.progress)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, losses


def tune_adapter(settings: DemoSettings, data: DigitsData, base_state: dict, adapter: str = "moss",
                 seed: Optional[int] = None) -> tuple[MossDecoder, list[float]]:
    """A copy of the frozen base (``base_state``) with ``adapter`` injected, tuned on the instruction task.

    ``seed`` (default ``settings.seed``) seeds the adapter initialisation, dropout and minibatch order.
    """
    seed = settings.seed if seed is None else seed
    model = build_decoder(settings, data.vocab)
    model.load_state_dict(base_state)
    seed_everything(seed)
    inject_moss(model, settings.moss_config(data.vocab, adapter))
    losses = train(model, data.complete("train"), settings.tune_steps, settings.batch_size, settings.tune_lr,
                   seed=seed, desc=f"tune {adapter} (seed {seed})", progress=settings.progress)
    return model, losses
