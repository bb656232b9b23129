"""scikit-learn's handwritten digits as interleaved text + image token sequences.

The 1797 ``8 x 8`` digits of ``sklearn.datasets.load_digits`` (shipped with scikit-learn, no download)
become discrete image tokens: each pixel intensity ``0..16`` is quantised to one of ``levels`` image
tokens, and an image is its 64 tokens in raster order between ``<boi>`` and ``<eoi>``. Text is a tiny
word vocabulary. Two tasks:

* ``pretrain``: captioned digits in both orders, ``<bos> a handwritten seven <boi> [64] <eoi> <eos>``
  (drawing) and ``<bos> <boi> [64] <eoi> a handwritten seven <eos>`` (captioning). Every token counts.
* ``complete``: an instruction the base never saw, ``<bos> complete the turned digit <boi> [64] <eoi>
  it is a seven <eos>``, on digits turned by ``transform`` (default: a quarter turn, an image
  distribution the base never saw either). The prompt is everything up to the first
  ``given_rows`` image rows; the model must draw the rest of the image, close it and name the digit.
  Only the answer counts in the loss.

Token ids: specials and words, ``<boi>``, ``<eoi>``, then the ``levels`` image tokens (``Vocab``), the
order of the built-in decoder's vocabulary. Sequences of one task
all have the same length, so batches need no padding.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

__all__ = ["NUMBER_WORDS", "TRANSFORMS", "DigitsData", "TaskBatch", "Vocab"]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPECIALS = ("<bos>", "<eos>")
WORDS = ("a", "handwritten", "complete", "the", "turned", "mirrored", "plain", "digit", "it", "is", *NUMBER_WORDS)
GRID = (8, 8)  # load_digits images are 8 x 8
MAX_INTENSITY = 16  # load_digits pixel values are integers 0..16

# Image transforms of the instruction task: the name used in the instruction and the numpy op.
TRANSFORMS = {
    "turn": ("turned", lambda im: np.rot90(im, k=1)),
    "mirror": ("mirrored", lambda im: im[:, ::-1]),
    "none": ("plain", lambda im: im),
}


class Vocab:
    """Token ids in the built-in decoder's order (``moss_kernels.model.decoder.DecoderConfig``): the
    ``text_size`` text tokens (``SPECIALS`` then ``WORDS``), ``<boi>``, ``<eoi>``, then ``levels`` image
    tokens. Image token ``image_start + v`` stands for quantised intensity ``v`` in ``0 .. levels-1``.
    """

    def __init__(self, levels: int = 4):
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= MAX_INTENSITY + 1:
            raise ValueError(f"levels must be an int in [2, {MAX_INTENSITY + 1}], got {levels!r}")
        self.levels = levels
        self.words = SPECIALS + WORDS
        self.word_id = {w: i for i, w in enumerate(self.words)}
        self.text_size = len(self.words)
        self.boi_id, self.eoi_id = self.text_size, self.text_size + 1
        self.image_start = self.text_size + 2
        self.size = self.image_start + levels

    bos_id = property(lambda self: self.word_id["<bos>"])
    eos_id = property(lambda self: self.word_id["<eos>"])

    def text(self, sentence: str) -> list[int]:
        """Word ids of a space-separated sentence (``KeyError`` names an unknown word)."""
        try:
            return [self.word_id[w] for w in sentence.split()]
        except KeyError as e:
            raise KeyError(f"word {e.args[0]!r} is not in the demo vocabulary {self.words}") from None

    def quantise(self, images: np.ndarray) -> np.ndarray:
        """``(..., 8, 8)`` intensities ``0..16`` -> int64 levels ``0..levels-1`` (equal-width bins)."""
        return np.minimum((images * self.levels) // (MAX_INTENSITY + 1), self.levels - 1).astype(np.int64)

    def image_tokens(self, levels: np.ndarray) -> np.ndarray:
        """``(n, 8, 8)`` levels -> ``(n, 64)`` token ids in raster order."""
        return levels.reshape(levels.shape[0], -1) + self.image_start

    def decode(self, ids) -> str:
        """Readable text of a token sequence; an image prints as ``[image HxW]`` (or its token count)."""
        out, n_img, in_img = [], 0, False
        for t in (int(i) for i in ids):
            if t == self.boi_id:
                in_img, n_img = True, 0
            elif t == self.eoi_id:
                out.append(f"[image {n_img} tokens]" if n_img != GRID[0] * GRID[1] else f"[image {GRID[0]}x{GRID[1]}]")
                in_img = False
            elif t >= self.image_start:
                n_img += 1
            elif t < self.text_size and t != self.bos_id:
                out.append(self.words[t])
        if in_img:
            out.append(f"[unfinished image, {n_img} tokens]")
        return " ".join(out)


@dataclasses.dataclass
class TaskBatch:
    """Token sequences of one task, all of length ``seq_len``.

    ``ids``: ``(n, seq_len)`` int64. ``loss_mask``: ``(n, seq_len)`` bool, the *target* positions
    that count in the loss (position ``t`` is predicted from ``ids[:, :t]``). ``image_target``:
    ``(n, seq_len)`` bool, the image tokens scored by the image metrics (the ones the model must
    draw). ``prompt_len``: how many leading tokens a generation prompt holds. ``labels``: ``(n,)``
    digit classes. ``images``: ``(n, 8, 8)`` levels of the image each sequence holds.
    """

    ids: torch.Tensor
    loss_mask: torch.Tensor
    image_target: torch.Tensor
    prompt_len: int
    labels: torch.Tensor
    images: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    def subset(self, index) -> TaskBatch:
        index = torch.as_tensor(index, dtype=torch.int64)
        return TaskBatch(self.ids[index], self.loss_mask[index], self.image_target[index], self.prompt_len,
                         self.labels[index], self.images[index])


def _build(vocab: Vocab, before: list[int], image_tokens: np.ndarray, after_per_label: list[list[int]],
           labels: np.ndarray, images: np.ndarray, before_per_label: Optional[list[list[int]]] = None):
    """Rows ``<bos> before <boi> image <eoi> after <eos>`` (``before``/``after`` may depend on the label)."""
    rows = []
    for tokens, y in zip(image_tokens, labels):
        head = before_per_label[y] if before_per_label is not None else before
        rows.append([vocab.bos_id, *head, vocab.boi_id, *tokens.tolist(), vocab.eoi_id, *after_per_label[y],
                     vocab.eos_id])
    lengths = {len(r) for r in rows}
    assert len(lengths) == 1, "templates of one task must have one length"
    ids = torch.tensor(rows, dtype=torch.int64)
    return ids, torch.as_tensor(labels, dtype=torch.int64), torch.as_tensor(images, dtype=torch.int64)


class DigitsData:
    """The digits split once into a training and a held-out part, and the task sequences built from them.

    Args:
        levels: image-token vocabulary size (intensity bins).
        test_fraction: share of the digits held out from every training stage (fixed split, seed 0,
            whatever the run's seed, so held-out numbers of different seeds are comparable).
        transform: the instruction task's image transform, a key of ``TRANSFORMS``.
        given_rows: image rows the ``complete`` prompt gives (``0 .. 7``).
        limit: keep only the first ``limit`` digits (tiny test runs).
    """

    def __init__(self, levels: int = 4, test_fraction: float = 0.2, transform: str = "turn", given_rows: int = 3,
                 limit: Optional[int] = None):
        from sklearn.datasets import load_digits

        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {sorted(TRANSFORMS)}, got {transform!r}")
        if isinstance(given_rows, bool) or not isinstance(given_rows, int) or not 0 <= given_rows < GRID[0]:
            raise ValueError(f"given_rows must be an int in [0, {GRID[0] - 1}], got {given_rows!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
        digits = load_digits()
        images, labels = digits.images, digits.target.astype(np.int64)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.vocab = Vocab(levels)
        self.transform = transform
        self.given_rows = given_rows
        order = np.random.default_rng(0).permutation(len(labels))
        n_test = max(1, round(test_fraction * len(labels)))
        self.test_index, self.train_index = np.sort(order[:n_test]), np.sort(order[n_test:])
        self._images, self._labels = images, labels

    @property
    def grid(self) -> tuple[int, int]:
        return GRID

    def _split(self, split: str):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        index = self.train_index if split == "train" else self.test_index
        return self._images[index], self._labels[index]

    def pretrain(self, split: str = "train") -> TaskBatch:
        """Captioned digits, drawing and captioning order (two sequences per digit); all tokens count."""
        v = self.vocab
        images, labels = self._split(split)
        levels = v.quantise(images)
        tokens = v.image_tokens(levels)
        captions = [v.text(f"a handwritten {w}") for w in NUMBER_WORDS]
        empty = [[] for _ in NUMBER_WORDS]
        draw, y, im = _build(v, [], tokens, empty, labels, levels, before_per_label=captions)
        caption, _, _ = _build(v, [], tokens, captions, labels, levels)
        ids = torch.cat([draw, caption])
        loss_mask = torch.ones_like(ids, dtype=torch.bool)
        loss_mask[:, 0] = False  # <bos> is never predicted
        image_target = ids >= v.image_start
        return TaskBatch(ids, loss_mask, image_target, prompt_len=1 + 3 + 1, labels=torch.cat([y, y]),
                         images=torch.cat([im, im]))

    def complete(self, split: str = "train") -> TaskBatch:
        """The instruction task: finish a transformed digit from its top ``given_rows`` rows, then name it."""
        v = self.vocab
        word, op = TRANSFORMS[self.transform]
        images, labels = self._split(split)
        levels = v.quantise(np.stack([np.ascontiguousarray(op(im)) for im in images]) if len(images) else images)
        tokens = v.image_tokens(levels)
        instruction = v.text(f"complete the {word} digit")
        answers = [v.text(f"it is a {w}") for w in NUMBER_WORDS]
        ids, y, im = _build(v, instruction, tokens, answers, labels, levels)
        boi_pos = 1 + len(instruction)
        prompt_len = boi_pos + 1 + self.given_rows * GRID[1]
        positions = torch.arange(ids.shape[1])
        loss_mask = (positions >= prompt_len).expand_as(ids).clone()
        image_end = boi_pos + 1 + GRID[0] * GRID[1]
        image_target = ((positions >= prompt_len) & (positions < image_end)).expand_as(ids).clone()
        return TaskBatch(ids, loss_mask, image_target, prompt_len=prompt_len, labels=y, images=im)

