"""Layout providers: where a model family puts its image tokens, for every kind of forward.

A provider answers two questions with one rule, so training forwards, prefill and every decoding
step route the same tokens the same way:

* ``layout(input_ids, tracker)`` — the ``ImageLayout`` of a multi-token forward (training, prefill,
  prefill chunks). Reads the ids on the host once per call. With a ``Tracker`` (a cached forward)
  it continues the image each row was in and leaves the tracker where the chunk ends.
* ``step(tracker, input_ids)`` — one new token per row (a decoding step): advances the tracker with
  tensor ops on the device only (no ``.item()``, ``.tolist()``, ``nonzero()``, no loop over rows)
  and returns ``StepRoute(image_pos, height, width)``, what ``moss_lora_step`` takes.

Providers:

* ``BoiGridProvider(boi_token_id, grid, routing)`` — Chameleon / Anole (and the built-in decoder):
  after each ``<boi>`` come ``H x W`` image tokens. ``MossConfig(boi_token_id=..., grid=...)``.
* ``Emu3Provider(...)`` — Emu3: ``<|image start|> H * W <|image token|>``, then ``H`` rows of ``W``
  image tokens each ended by an end-of-line token (which stays text), ``<|image end|>``. The size
  is parsed from the text, so every image may have its own resolution.
* ``JanusProvider(boi_token_id, grid)`` — Janus image generation: a boi-grid provider whose
  ``inputs_embeds`` prefill (generation mode: the prompt ends with ``<begin_of_image>``) opens the
  image, so the image tokens that follow as ``inputs_embeds`` steps are routed as image tokens.
* ``CallableProvider(fn)`` — a user function ``fn(input_ids) -> ImageLayout`` for full forwards;
  decoding steps continue the images it left open (by the layout's own grid) as a boi-grid
  provider would, and are text once an image is complete.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional
from collections.abc import Sequence

import torch

from ..layout import ImageLayout, ImageSpan

__all__ = ["BoiGridProvider", "CallableProvider", "Emu3Provider", "JanusProvider", "LayoutProvider", "StepRoute",
           "Tracker", "make_provider", "provider_from_spec", "provider_spec"]


class StepRoute(NamedTuple):
    """The routing of one decoding step: each ``(batch,)`` int64 on the device (``moss_lora_step``'s
    ``image_pos``, ``height``, ``width``); ``image_pos = -1`` for a text token."""

    image_pos: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor


class Tracker:
    """Where each row of a batch stands, as ``(batch,)`` int64 device tensors (``mode``, ``pos``,
    ``height``, ``width``, ``aux``): the provider defines them. ``mode = 0`` is text everywhere. Every
    field is replaced (not written in place) by a step, so a reorder or a copy is an ``index_select``."""

    FIELDS = ("mode", "pos", "height", "width", "aux")

    def __init__(self, batch_size: int, device: torch.device, height: int = 1, width: int = 1):
        z = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.mode, self.pos, self.aux = z, z.clone(), z.clone()
        self.height = torch.full_like(z, height)
        self.width = torch.full_like(z, width)

    def host(self) -> list:
        """Rows as Python lists ``[mode, pos, height, width, aux]`` (one synchronisation)."""
        return torch.stack([getattr(self, f) for f in self.FIELDS], 1).tolist()

    def set_host(self, rows: list) -> None:
        t = torch.tensor(rows, dtype=torch.int64).to(self.mode.device)
        for n, f in enumerate(self.FIELDS):
            setattr(self, f, t[:, n].contiguous())

    def select(self, index: torch.Tensor) -> None:
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f).index_select(0, index))


class LayoutProvider:
    """Base class (see the module docstring). ``max_width``: the widest image the provider can open
    (sizes the conv states' rings before decoding); ``expects_images``: warn once when a batch of a
    training forward routes no image token."""

    max_width: int = 0
    expects_images: bool = True

    def layout(self, input_ids: torch.Tensor, tracker: Optional[Tracker] = None) -> ImageLayout:
        raise NotImplementedError

    def step(self, tracker: Tracker, input_ids: Optional[torch.Tensor]) -> StepRoute:
        raise NotImplementedError

    def embeds_prefill(self, tracker: Tracker, batch_size: int, seq_len: int) -> Optional[ImageLayout]:
        """The layout of an ``inputs_embeds`` forward without an explicit layout (``None``: cannot say)."""
        return None

    def after_explicit(self, tracker: Tracker, layout: ImageLayout) -> None:
        """Set the tracker after an explicit layout: a row whose last tokens are an unfinished image
        continues it; any other row is in text."""
        rows = []
        last = {}
        for seg in layout.segments:
            last[seg.batch] = seg
        for b in range(layout.batch_size):
            seg = last.get(b)
            span = layout.spans[seg.span_ids[-1]] if seg is not None else None
            at_end = span is not None and span.start + span.length == layout.seq_len
            if at_end and not seg.complete:
                rows.append([1, seg.end, seg.height, seg.width, 0])  # mode 1: the next token is image token `end`
            else:
                rows.append([0, 0, 1, 1, 0])
        tracker.set_host(rows)

    def warn_no_images(self, layout: ImageLayout) -> None:
        if self.expects_images and layout.num_image_tokens == 0 and not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(f"MoSS: {type(self).__name__} routed no image token in a batch of shape "
                          f"({layout.batch_size}, {layout.seq_len}): every token went through the text adapter "
                          "(no image marker in input_ids?). Said once.", UserWarning, stacklevel=4)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_warned"}


def _runs_to_spans(batch: int, runs: list, height: int, width: int) -> list:
    return [ImageSpan(batch, start, height, width, g0, n) for start, g0, n in runs]


class BoiGridProvider(LayoutProvider):
    """After every ``boi_token_id`` come ``grid = (H, W)`` image tokens (Chameleon, Anole).

    Tracker: ``mode = 1`` inside an image, ``pos`` how many tokens came after its ``<boi>``
    (``0``: the marker was the last token). ``routing="input"`` routes the image tokens,
    ``"output"`` the positions that predict them (the marker through the second-to-last token).
    """

    def __init__(self, boi_token_id: int, grid: Sequence[int], routing: str = "input"):
        self.boi_token_id = int(boi_token_id)
        self.grid = tuple(int(g) for g in grid)
        self.routing = routing
        self.max_width = self.grid[1]
        self.shift = 1 if routing == "input" else 0

    def layout(self, input_ids, tracker=None):
        if tracker is None:  # one nonzero() per batch, then spans
            return ImageLayout.from_token_ids(input_ids, self.boi_token_id, self.grid, self.routing)
        H, W = self.grid
        n, boi, shift = H * W, self.boi_token_id, self.shift
        spans, rows = [], []
        for b, (row, st) in enumerate(zip(input_ids.tolist(), tracker.host())):
            s = st[1] if st[0] == 1 else -1
            runs = []
            for pos, tok in enumerate(row):
                if s >= 0:
                    s += 1
                    if s > n:
                        s = -1
                if s < 0 and tok == boi:
                    s = 0
                g = s - shift
                if s >= 0 and 0 <= g < n:
                    if runs and g == runs[-1][1] + runs[-1][2] and runs[-1][0] + runs[-1][2] == pos:
                        runs[-1][2] += 1
                    else:
                        runs.append([pos, g, 1])
            spans += _runs_to_spans(b, runs, H, W)
            rows.append([1, s, H, W, 0] if s >= 0 else [0, 0, H, W, 0])
        tracker.set_host(rows)
        return ImageLayout.from_spans(input_ids.shape[0], input_ids.shape[1], spans).prepare(input_ids.device)

    def step(self, tracker, input_ids):
        H, W = self.grid
        n = H * W
        inside = tracker.mode == 1
        s = torch.where(inside, tracker.pos + 1, -1)
        s = torch.where(s > n, -1, s)
        if input_ids is not None:
            s = torch.where((s < 0) & (input_ids[:, 0] == self.boi_token_id), 0, s)
        g = s - self.shift
        tracker.mode = (s >= 0).long()
        tracker.pos = s.clamp(min=0)
        image = (s >= 0) & (g >= 0) & (g < n)
        return StepRoute(torch.where(image, g, -1), torch.full_like(s, H), torch.full_like(s, W))

    def after_explicit(self, tracker, layout):
        # In this provider's terms: inside an image whose next token has grid index `end`, the
        # tracker counts tokens since <boi>, i.e. `end - 1 + shift` came already.
        super().after_explicit(tracker, layout)
        rows = tracker.host()
        H, W = self.grid
        for r in rows:
            if r[0] == 1:
                if (r[2], r[3]) != (H, W):
                    raise ValueError(f"the explicit layout leaves a {r[2]}x{r[3]} image unfinished, but this "
                                     f"model's provider decodes {H}x{W} images")
                r[1] = r[1] - 1 + self.shift
        tracker.set_host(rows)


class JanusProvider(BoiGridProvider):
    """Janus image generation: ``BoiGridProvider`` with ``routing="input"``, plus: a cached
    ``inputs_embeds`` prefill without a layout is the generation-mode prompt, all text and ending
    with ``<begin_of_image>``, so the steps that follow (image tokens as ``inputs_embeds``) are the
    ``H x W`` image tokens."""

    def __init__(self, boi_token_id: int, grid: Sequence[int] = (24, 24)):
        super().__init__(boi_token_id, grid, "input")

    def embeds_prefill(self, tracker, batch_size, seq_len):
        if tracker is None:
            return None
        tracker.set_host([[1, 0, self.grid[0], self.grid[1], 0]] * batch_size)
        return ImageLayout.text_only(batch_size, seq_len)


class Emu3Provider(LayoutProvider):
    """Emu3: ``<|image start|>``, the size as text ``H * W`` (digit tokens, ``*``), ``<|image token|>``,
    then ``H`` rows of ``W`` image tokens, each row ended by ``eol_token_id`` (text), ``<|image end|>``.

    Args:
        image_start_id, image_token_id, eol_token_id: the marker ids (``<|image start|>``,
            ``<|image token|>``, ``<|extra_200|>`` in Emu3's vocabulary).
        digit_ids: ``digit_ids[d]`` is the token id of the digit ``d`` (0-9); ``times_id`` the ``*``.
        max_width: the widest image decoding must handle (sizes the rings before decoding).

    Tracker: ``mode`` 0 text, 2 reading the height, 3 reading the width, 1 inside the image;
    ``pos`` the next image-token index (raster, end-of-line tokens excluded); ``aux`` the column
    of the next token within its row (``W`` means: the end-of-line token comes next).
    """

    def __init__(self, image_start_id: int, image_token_id: int, eol_token_id: int, digit_ids: Sequence[int],
                 times_id: int, max_width: int):
        if len(digit_ids) != 10:
            raise ValueError(f"Emu3Provider: digit_ids must hold the ids of the 10 digits, got {len(digit_ids)}")
        self.image_start_id, self.image_token_id = int(image_start_id), int(image_token_id)
        self.eol_token_id, self.times_id = int(eol_token_id), int(times_id)
        self.digit_ids = tuple(int(d) for d in digit_ids)
        self.max_width = int(max_width)
        self._digit_table = None

    def _digit(self, ids: torch.Tensor) -> torch.Tensor:
        """The digit each id stands for, ``-1`` for a non-digit (a table lookup, on the device)."""
        table = self._digit_table
        if table is None or table.device != ids.device:
            size = max(self.digit_ids) + 1
            table = torch.full((size,), -1, dtype=torch.int64)
            table[list(self.digit_ids)] = torch.arange(10)
            self._digit_table = table = table.to(ids.device)
        inside = (ids >= 0) & (ids < table.shape[0])
        return torch.where(inside, table[ids.clamp(0, table.shape[0] - 1)], -1)

    def _advance(self, st: list, tok: int) -> int:
        """Host rule (mirrors ``step``): update ``st = [mode, pos, H, W, col]``; return the image
        index of this token, or -1."""
        mode, pos, H, W, col = st
        digit = self.digit_ids.index(tok) if tok in self.digit_ids else -1
        g = -1
        if mode == 1:
            if col < W:  # an image token
                g = pos
                pos, col = pos + 1, col + 1
            else:  # the end-of-line token closing a row (text)
                col = 0
                if pos >= H * W:
                    mode = 0
        elif mode == 2:
            if digit >= 0:
                H = H * 10 + digit
            elif tok == self.times_id:
                mode = 3
            else:
                mode = 0
        elif mode == 3:
            if digit >= 0:
                W = W * 10 + digit
            elif tok == self.image_token_id and H > 0 and W > 0:
                mode, pos, col = 1, 0, 0
            else:
                mode = 0
        if mode == 0 and g < 0 and tok == self.image_start_id:
            mode, H, W = 2, 0, 0
        st[:] = [mode, pos, H, W, col]
        return g

    def layout(self, input_ids, tracker=None):
        B, S = input_ids.shape
        states = tracker.host() if tracker is not None else [[0, 0, 0, 0, 0] for _ in range(B)]
        spans = []
        for b, (row, st) in enumerate(zip(input_ids.tolist(), states)):
            run = None  # [start, first index, length, H, W]: one span per grid row
            for t, tok in enumerate(row):
                g = self._advance(st, tok)
                if g < 0:
                    continue
                if run is not None and run[0] + run[2] == t and run[1] + run[2] == g:
                    run[2] += 1
                else:
                    if run is not None:
                        spans.append(ImageSpan(b, run[0], run[3], run[4], run[1], run[2]))
                    run = [t, g, 1, st[2], st[3]]
            if run is not None:
                spans.append(ImageSpan(b, run[0], run[3], run[4], run[1], run[2]))
        if tracker is not None:
            tracker.set_host(states)
        return ImageLayout.from_spans(B, S, spans).prepare(input_ids.device)

    def step(self, tracker, input_ids):
        if input_ids is None:
            raise ValueError("Emu3Provider: a decoding step needs input_ids (the size is parsed from the tokens)")
        tok = input_ids[:, 0]
        mode, pos, H, W, col = tracker.mode, tracker.pos, tracker.height, tracker.width, tracker.aux
        digit = self._digit(tok)
        in_img, reading_h, reading_w = mode == 1, mode == 2, mode == 3
        is_img_tok = in_img & (col < W)
        g = torch.where(is_img_tok, pos, -1)
        # inside an image: an image token advances; the end-of-line token resets the column, and
        # after the last row closes the image.
        pos_n = torch.where(is_img_tok, pos + 1, pos)
        col_n = torch.where(is_img_tok, col + 1, torch.where(in_img, 0, col))
        closes = in_img & ~is_img_tok & (pos >= H * W)
        H_n = torch.where(reading_h & (digit >= 0), H * 10 + digit, H)
        W_n = torch.where(reading_w & (digit >= 0), W * 10 + digit, W)
        opens = reading_w & (tok == self.image_token_id) & (H > 0) & (W > 0)
        mode_n = torch.where(closes, 0, mode)
        mode_n = torch.where(reading_h & (digit < 0), torch.where(tok == self.times_id, 3, 0), mode_n)
        mode_n = torch.where(reading_w & (digit < 0), torch.where(opens, 1, 0), mode_n)
        pos_n = torch.where(opens, 0, pos_n)
        col_n = torch.where(opens, 0, col_n)
        start = (mode_n == 0) & (g < 0) & (tok == self.image_start_id)
        mode_n = torch.where(start, 2, mode_n)
        H_n = torch.where(start, 0, H_n)
        W_n = torch.where(start, 0, W_n)
        tracker.mode, tracker.pos, tracker.height, tracker.width, tracker.aux = mode_n, pos_n, H_n, W_n, col_n
        # The step op takes the size of the image a token belongs to (text rows: any positive size).
        return StepRoute(g, torch.where(is_img_tok, H, 1), torch.where(is_img_tok, W, 1))

    def after_explicit(self, tracker, layout):
        super().after_explicit(tracker, layout)
        rows = tracker.host()
        for r in rows:
            if r[0] == 1:  # continue mid-row: the column follows from the raster index
                r[4] = r[1] % r[3]
        tracker.set_host(rows)


class CallableProvider(LayoutProvider):
    """``fn(input_ids (B, S)) -> ImageLayout`` for the multi-token forwards; cached forwards continue
    the images a chunk leaves open (each by its own grid), and decoding steps finish them on the
    device; new images are not opened by steps (give a provider class for that)."""

    expects_images = True

    def __init__(self, fn: Callable[[torch.Tensor], ImageLayout]):
        if not callable(fn):
            raise TypeError(f"layout_provider must be callable, got {type(fn).__name__}")
        self.fn = fn

    def layout(self, input_ids, tracker=None):
        layout = self.fn(input_ids)
        if not isinstance(layout, ImageLayout):
            raise TypeError(f"layout_provider returned {type(layout).__name__}, not an ImageLayout")
        if tuple(input_ids.shape) != (layout.batch_size, layout.seq_len):
            raise ValueError(f"layout_provider returned a layout for ({layout.batch_size}, {layout.seq_len}), "
                             f"the input has shape {tuple(input_ids.shape)}")
        if tracker is not None:
            self.after_explicit(tracker, layout)
        return layout.prepare(input_ids.device)

    def step(self, tracker, input_ids):
        inside = (tracker.mode == 1) & (tracker.pos < tracker.height * tracker.width)
        g = torch.where(inside, tracker.pos, -1)
        tracker.pos = torch.where(inside, tracker.pos + 1, tracker.pos)
        tracker.mode = torch.where(inside & (tracker.pos < tracker.height * tracker.width), 1, 0)
        return StepRoute(g, tracker.height, tracker.width)


_SPEC_FIELDS = {
    "BoiGridProvider": ("boi_token_id", "grid", "routing"),
    "JanusProvider": ("boi_token_id", "grid"),
    "Emu3Provider": ("image_start_id", "image_token_id", "eol_token_id", "digit_ids", "times_id", "max_width"),
}


def provider_spec(provider):
    """A JSON-able description of a built-in provider (``{"type": ..., fields}``); ``None`` and user
    callables are returned as they are (a callable is code: it cannot be written to a config file)."""
    name = type(provider).__name__
    if isinstance(provider, LayoutProvider) and name in _SPEC_FIELDS:
        spec = {"type": name}
        for f in _SPEC_FIELDS[name]:
            v = getattr(provider, f)
            spec[f] = list(v) if isinstance(v, tuple) else v
        return spec
    return provider


def provider_from_spec(spec: dict) -> LayoutProvider:
    kinds = {"BoiGridProvider": BoiGridProvider, "JanusProvider": JanusProvider, "Emu3Provider": Emu3Provider}
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in kinds:
        raise ValueError(f"layout_provider: unknown provider type {kind!r} (known: {sorted(kinds)})")
    return kinds[kind](**spec)


def make_provider(config) -> Optional[LayoutProvider]:
    """The provider a ``MossConfig`` describes (``None``: layouts only explicit)."""
    p = getattr(config, "layout_provider", None)
    if isinstance(p, LayoutProvider):
        return p
    if p is not None:
        return CallableProvider(p)
    if config.grid is not None:
        return BoiGridProvider(config.boi_token_id, config.grid, config.routing)
    return None
