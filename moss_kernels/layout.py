"""Where the images are: ``ImageSpan`` and ``ImageLayout``.

This module is the only code that knows where image tokens sit in a batch. It turns a list of
spans into index tensors that every backend consumes without knowing anything about grids:

* ``text_rows`` / ``image_rows``: flat row indices ``b * seq_len + position`` (int64).
* ``conv_sources[t, tap]``: for image token ``t`` (its index in ``image_rows``) and tap
  ``tap = a * k + b`` of a ``k x k`` kernel, the image-token index whose input that tap reads, or
  ``-1`` where the causal zero padding (or a token that came before this call) is.
* ``conv_targets[t, tap]``: the inverse map, used by backward passes that gather instead of
  scatter (no atomics): the token whose ``tap`` reads token ``t``, or ``-1``.
* a ``StateIndex`` for calls that continue images from a ``ConvLoRAState``.

Spans of one image may be split: a span whose ``offset`` equals the end of the previous span of
the same ``height x width`` in the same sequence *continues* it (the two form one "image part").
That is how grids that skip tokens are expressed — for Emu3 or Lumina-mGPT, whose rows end with an
end-of-row token, give one span per grid row and leave the end-of-row tokens as text; nothing else
in the package changes. A span with ``offset > 0`` that continues no earlier span of its sequence
continues an image from a ``ConvLoRAState`` (chunked prefill, decoding).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union
from collections.abc import Iterable, Sequence

import torch

__all__ = ["MAX_SIDE", "ConvIndex", "ImageLayout", "ImageSegment", "ImageSpan", "StateIndex", "first_contributor",
           "ring_size"]


# The largest image side a layout accepts: with both sides below 2^31, H*W and every index derived
# from it (plus a kernel's reach, k*W with k < 2^31) stays below 2^63.
MAX_SIDE = 2**31 - 1


def ring_size(kernel_size: int, width: int) -> int:
    """Pending ``r``-wide sums a sequence needs while inside a ``width``-wide image: ``(k-1)(W+1)``.

    Token ``p`` receives contributions from tokens at most ``(k-1)(W+1)`` positions earlier, so a
    ring with that many slots, indexed by ``p mod L``, holds every sum still owed to a later token.
    """
    return (kernel_size - 1) * (width + 1)


def first_contributor(p: torch.Tensor, kernel_size: int, width: int) -> torch.Tensor:
    """The earliest image token (raster index) whose taps reach image token ``p``; ``p`` itself
    for ``p = 0`` (nothing earlier reaches it).

    The taps reaching ``(i, j)`` come from the ``k x k`` block up and left of it, clipped to the
    grid, so the first in raster order is ``(max(i-k+1, 0), max(j-k+1, 0))``. This is what makes a
    state need no reset: a slot of the ring is read, or its old sum kept, only when this token has
    an earlier contributor in its own image (``first_contributor(p) < p``, or ``< offset`` for a
    chunk starting at ``offset``); the earliest contributor writes the slot rather than adding to it.
    """
    k1 = kernel_size - 1
    i, j = p // width, p % width
    return (i - k1).clamp(min=0) * width + (j - k1).clamp(min=0)


@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """Positions ``start, start+1, ...`` of sequence ``batch`` hold image tokens ``offset, ...``
    (raster order) of a ``height x width`` image. ``length`` defaults to the rest of the image, cut
    at the end of the sequence."""

    batch: int
    start: int
    height: int
    width: int
    offset: int = 0
    length: Optional[int] = None

    @property
    def end(self) -> int:
        """One past the last image-token index (raster order) this span holds (needs ``length``)."""
        assert self.length is not None
        return self.offset + self.length


class ImageSegment(NamedTuple):
    """A maximal chain of spans of one image in one sequence (see module docstring)."""

    batch: int
    height: int
    width: int
    offset: int  # first image-token index held in this layout
    end: int  # one past the last
    first_local: int  # index in ``image_rows`` of the token at ``offset``
    span_ids: tuple  # indices into ``layout.spans``

    @property
    def continues_from_state(self) -> bool:
        return self.offset > 0

    @property
    def complete(self) -> bool:
        return self.end == self.height * self.width


class ConvIndex(NamedTuple):
    """Device index tensors for one kernel size (see module docstring)."""

    text_rows: torch.Tensor  # (n_text,) int64
    image_rows: torch.Tensor  # (n_image,) int64
    conv_sources: torch.Tensor  # (n_image, k*k) int64, -1 = padding
    conv_targets: torch.Tensor  # (n_image, k*k) int64, -1 = none


class StateIndex(NamedTuple):
    """How a call reads and leaves the pending sums of a ``ConvLoRAState``.

    Slots are flat indices into ``pending.view(-1, r)`` (``batch * capacity + p mod L``).
    """

    read_tokens: torch.Tensor  # (n_read,) image-token indices that add a pending sum
    read_slots: torch.Tensor  # (n_read,)
    write_slots: torch.Tensor  # (n_write,) slots of the positions this call leaves sums for
    write_sources: torch.Tensor  # (n_write, k*k) image-token index per tap, -1 = none
    write_keep: torch.Tensor  # (n_write,) bool: keep the sum that earlier calls left there


SpanLike = Union[ImageSpan, Sequence[int]]


class _GridCheck:
    """Checks the ids of the image after one ``<boi>`` against the grid (``from_token_ids``)."""

    def __init__(self, input_ids: torch.Tensor, grid: tuple[int, int], boi: int, eoi: int | None, image_ids) -> None:
        self.ids = input_ids.cpu()
        self.grid, self.boi, self.eoi = grid, boi, eoi
        self.codes = None  # (batch, seq) bool: which tokens are image codes
        if image_ids is not None:
            if isinstance(image_ids, range) and image_ids.step == 1:
                self.codes = (self.ids >= image_ids.start) & (self.ids < image_ids.stop)
                self.code_desc = f"range({image_ids.start}, {image_ids.stop})"
            else:
                try:
                    allowed = torch.as_tensor(list(image_ids), dtype=self.ids.dtype)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError("image_token_ids must be a range or a collection of ints, got "
                                    f"{type(image_ids).__name__}") from None
                self.codes = torch.isin(self.ids, allowed)
                self.code_desc = f"the {allowed.numel()} ids of image_token_ids"

    def __call__(self, b: int, pos: int) -> None:
        (height, width), row = self.grid, self.ids[b]
        size, seq_len, start = height * width, row.numel(), pos + 1
        end = min(start + size, seq_len)
        where = f"from_token_ids: the image after the <boi> at (batch {b}, position {pos}), grid {self.grid}"
        body = row[start:end]
        for marker, mid in (("<eoi>", self.eoi), ("<boi>", self.boi)):
            if mid is None:
                continue
            hits = (body == mid).nonzero()
            if hits.numel():
                j = int(hits[0])
                raise ValueError(f"{where}: a {marker} (id {mid}) at position {start + j}, after {j} of its {size} "
                                 "image tokens: the image is shorter than the grid")
        if self.codes is not None:
            bad = (~self.codes[b, start:end]).nonzero()
            if bad.numel():
                j = int(bad[0])
                raise ValueError(f"{where}: position {start + j} (image token {j} of {size}) holds id "
                                 f"{int(body[j])}, not an image code ({self.code_desc}): the image is shorter "
                                 "than the grid, or text cuts it short")
        if start + size >= seq_len:
            return  # the sequence ends inside the image, or right after it: nothing follows to check
        after = int(row[start + size])
        if self.eoi is not None and after != self.eoi:
            raise ValueError(f"{where}: expected the <eoi> (id {self.eoi}) after its {size} image tokens, at position "
                             f"{start + size}, found id {after}: the grid is smaller than the image")
        if self.codes is not None and bool(self.codes[b, start + size]):
            raise ValueError(f"{where}: position {start + size}, after its {size} image tokens, still holds an image "
                             f"code (id {after}): the grid is smaller than the image")


def _check_int(name: str, value, span_desc: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                return int(value)
        except ImportError:  # pragma: no cover
            pass
        raise ValueError(f"{span_desc}: {name} must be an int, got {type(value).__name__} {value!r}")
    return value


class ImageLayout:
    """The image spans of a batch of inputs of shape ``(batch_size, seq_len, d_in)``.

    Build it once per batch (``from_spans`` or ``from_token_ids``) and pass it to every adapted
    layer: index tensors are built on first use per device and kernel size, then cached.
    """

    def __init__(self, batch_size: int, seq_len: int, spans: Sequence[ImageSpan]):
        # Use from_spans(); this constructor trusts that spans are validated and resolved.
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.spans: tuple[ImageSpan, ...] = tuple(spans)
        self._device_cache: dict = {}
        self._build_host_tables()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_spans(cls, batch_size: int, seq_len: int, spans: Iterable[SpanLike]) -> ImageLayout:
        """Validate ``spans`` (``ImageSpan``s or tuples in its field order) and build the layout.

        Raises ``ValueError`` naming the span for a span outside the sequence, overlapping spans,
        non-positive sizes, an offset beyond the image or a length that overruns the image.
        """
        batch_size = _check_int("batch_size", batch_size, "ImageLayout")
        seq_len = _check_int("seq_len", seq_len, "ImageLayout")
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(
                f"ImageLayout: batch_size and seq_len must be positive, got {batch_size} and {seq_len}"
            )
        resolved = []
        for n, item in enumerate(spans):
            if isinstance(item, ImageSpan):
                span = item
            else:
                try:
                    span = ImageSpan(*item)
                except TypeError as e:
                    raise ValueError(f"span #{n} {item!r}: not an ImageSpan or a tuple of its fields ({e})") from None
            desc = f"span #{n} {span}"
            batch = _check_int("batch", span.batch, desc)
            start = _check_int("start", span.start, desc)
            height = _check_int("height", span.height, desc)
            width = _check_int("width", span.width, desc)
            offset = _check_int("offset", span.offset, desc)
            if height <= 0 or width <= 0:
                raise ValueError(f"{desc}: height and width must be positive")
            if height > MAX_SIDE or width > MAX_SIDE:
                # Bounding the sides keeps every raster index, neighbour offset and ring slot
                # (k*W, (k-1)(W+1), H*W + k*W) far from int64 overflow in every backend.
                raise ValueError(f"{desc}: height and width must be at most {MAX_SIDE} (2^31 - 1), "
                                 f"got {height} x {width}")
            if not 0 <= batch < batch_size:
                raise ValueError(f"{desc}: batch {batch} is outside the batch of size {batch_size}")
            if not 0 <= start < seq_len:
                raise ValueError(f"{desc}: start {start} is outside the sequence of length {seq_len}")
            size = height * width
            if not 0 <= offset < size:
                raise ValueError(f"{desc}: offset {offset} is beyond the {height}x{width} image")
            if span.length is None:
                length = min(size - offset, seq_len - start)
            else:
                length = _check_int("length", span.length, desc)
                if length <= 0:
                    raise ValueError(f"{desc}: length must be positive, got {length}")
                if offset + length > size:
                    raise ValueError(
                        f"{desc}: offset {offset} + length {length} overruns the {height}x{width} image"
                    )
                if start + length > seq_len:
                    raise ValueError(
                        f"{desc}: start {start} + length {length} runs past the sequence of length {seq_len}"
                    )
            resolved.append((n, ImageSpan(batch, start, height, width, offset, length)))

        resolved.sort(key=lambda t: (t[1].batch, t[1].start))
        for (na, a), (nb, b) in zip(resolved, resolved[1:]):
            if a.batch == b.batch and b.start < a.start + a.length:
                raise ValueError(f"span #{nb} {b} overlaps span #{na} {a}")
        return cls(batch_size, seq_len, [s for _, s in resolved])

    @classmethod
    def from_token_ids(
        cls,
        input_ids: torch.Tensor,
        boi_token_id: int,
        grid: Sequence[int],
        routing: str = "input",
        *,
        eoi_token_id: int | None = None,
        image_token_ids: range | Sequence[int] | torch.Tensor | None = None,
    ) -> ImageLayout:
        """Derive the layout from token ids: after every ``boi_token_id`` come the ``H x W`` image
        tokens of one image (``grid = (H, W)``), cut at the end of the sequence.

        ``routing="input"`` puts the grid on the image tokens themselves (the paper's Figure 2);
        ``routing="output"`` on the ``H x W`` positions whose outputs predict them (the marker
        through the second-to-last image token). This reads the ids on the host once per batch.

        Without the optional ids, a marker inside an earlier image is image data, not a new image,
        and nothing checks that the grid fits. With them, every image is checked against its ids
        and a grid that does not match raises ``ValueError`` naming the image (batch row, ``<boi>``
        position):

        * ``eoi_token_id``: the token after the ``H x W`` image tokens must be this id (unless the
          sequence ends first), and no ``<eoi>`` or ``<boi>`` may come inside them;
        * ``image_token_ids``: the ids of image codes, a ``range`` (Chameleon/Anole:
          ``range(4, 8196)``) or a collection of ids; every token of the grid must be one, and the
          token after the grid must not be one.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integers, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        if routing not in ("input", "output"):
            raise ValueError(f"routing must be 'input' or 'output', got {routing!r}")
        try:
            height, width = (int(g) for g in grid)
        except (TypeError, ValueError):
            raise ValueError(f"grid must be a pair (height, width), got {grid!r}") from None
        if height <= 0 or width <= 0:
            raise ValueError(f"grid must be positive, got {grid!r}")
        boi_token_id = _check_int("boi_token_id", boi_token_id, "from_token_ids")
        if eoi_token_id is not None:
            eoi_token_id = _check_int("eoi_token_id", eoi_token_id, "from_token_ids")
        batch_size, seq_len = input_ids.shape
        size = height * width
        marks = (input_ids == boi_token_id).nonzero().tolist()  # one host sync per batch
        check = None
        if eoi_token_id is not None or image_token_ids is not None:
            check = _GridCheck(input_ids, (height, width), boi_token_id, eoi_token_id, image_token_ids)
        spans = []
        busy_until = [-1] * batch_size  # positions < busy_until[b] belong to an earlier image
        for b, pos in marks:
            if pos < busy_until[b]:
                continue
            if check is not None:
                check(b, pos)
            start = pos + 1 if routing == "input" else pos
            length = min(size, seq_len - start)
            busy_until[b] = pos + 1 + size
            if length > 0:
                spans.append(ImageSpan(b, start, height, width, 0, length))
        return cls.from_spans(batch_size, seq_len, spans).prepare(input_ids.device)

    @classmethod
    def text_only(cls, batch_size: int, seq_len: int) -> ImageLayout:
        return cls.from_spans(batch_size, seq_len, [])

    # ------------------------------------------------------------------ host tables
    def _build_host_tables(self) -> None:
        S = self.seq_len
        is_image = torch.zeros(self.batch_size * S, dtype=torch.bool)
        rows, positions, segments = [], [], []
        local = 0
        current = None  # segment under construction: dict
        for sid, span in enumerate(self.spans):
            flat = span.batch * S + span.start
            rows.append(torch.arange(flat, flat + span.length, dtype=torch.int64))
            positions.append(torch.arange(span.offset, span.end, dtype=torch.int64))
            is_image[flat : flat + span.length] = True
            chains = (
                current is not None
                and current["batch"] == span.batch
                and (current["height"], current["width"]) == (span.height, span.width)
                and current["end"] == span.offset
            )
            if chains:
                current["end"] = span.end
                current["span_ids"].append(sid)
            else:
                if current is not None:
                    segments.append(current)
                if span.offset > 0 and any(seg["batch"] == span.batch for seg in segments):
                    raise ValueError(
                        f"span #{sid} {span}: offset {span.offset} > 0 continues an image, but it neither "
                        "follows the previous part of that image nor comes first in its sequence"
                    )
                current = dict(batch=span.batch, height=span.height, width=span.width, offset=span.offset,
                               end=span.end, first_local=local, span_ids=[sid])
            local += span.length
        if current is not None:
            segments.append(current)
        self.segments: tuple[ImageSegment, ...] = tuple(
            ImageSegment(s["batch"], s["height"], s["width"], s["offset"], s["end"], s["first_local"],
                         tuple(s["span_ids"])) for s in segments
        )
        self._image_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        self._image_positions = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
        self._text_rows = (~is_image).nonzero().flatten()
        # A plain int, computed once: ``torch.compile`` traces ``state=`` calls that read it.
        self._max_width = max([s.width for s in self.spans] + [0])
        self._conv_tables: dict = {}
        self.prepare("cpu")

    @property
    def num_image_tokens(self) -> int:
        return int(self._image_rows.numel())

    @property
    def num_text_tokens(self) -> int:
        return int(self._text_rows.numel())

    @property
    def max_width(self) -> int:
        """The widest image's width (0 without images): what a state's ring must hold."""
        return self._max_width

    def _segment_arrays(self):
        """Per image token: its segment's height, width, offset, end and first local index."""
        n = self.num_image_tokens
        cols = torch.zeros(5, n, dtype=torch.int64)
        for seg in self.segments:
            sl = slice(seg.first_local, seg.first_local + seg.end - seg.offset)
            cols[:, sl] = torch.tensor([seg.height, seg.width, seg.offset, seg.end, seg.first_local]).unsqueeze(1)
        return cols.unbind(0)

    def conv_tables(self, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host ``(conv_sources, conv_targets)`` for a ``kernel_size`` kernel (cached)."""
        k = kernel_size
        if k not in self._conv_tables:
            H, W, off, end, first = self._segment_arrays()
            p = self._image_positions
            i, j = p // W.clamp(min=1), p % W.clamp(min=1)
            taps = torch.arange(k * k, dtype=torch.int64)
            di = (k - 1 - taps // k).unsqueeze(0)  # tap (a, b) reads the token di rows, dj columns back
            dj = (k - 1 - taps % k).unsqueeze(0)
            i, j, p = i.unsqueeze(1), j.unsqueeze(1), p.unsqueeze(1)
            H, W, off, end, first = (t.unsqueeze(1) for t in (H, W, off, end, first))
            src = p - di * W - dj
            ok = (i >= di) & (j >= dj) & (src >= off)
            sources = torch.where(ok, first + src - off, torch.full_like(src, -1))
            dst = p + di * W + dj
            ok = (i + di < H) & (j + dj < W) & (dst < end)
            targets = torch.where(ok, first + dst - off, torch.full_like(dst, -1))
            self._conv_tables[k] = (sources.contiguous(), targets.contiguous())
        return self._conv_tables[k]

    # ------------------------------------------------------------------ device tensors
    def prepare(self, device: Union[str, torch.device], kernel_sizes: Sequence[int] = (1, 2)) -> ImageLayout:
        """Build the index tensors on ``device`` now (returns ``self``).

        Layouts are built outside compiled regions; preparing them there too keeps index building
        out of ``torch.compile``'s graphs (a traced build would recompile for every new layout).
        ``from_token_ids`` prepares the ids' device; ``from_spans`` the CPU.
        """
        for k in kernel_sizes:
            self.index(device, k)
        return self

    def index(self, device: Union[str, torch.device], kernel_size: int = 2) -> ConvIndex:
        """Index tensors on ``device`` for a ``kernel_size`` kernel (built once, then cached)."""
        device = torch.device(device)
        key = ("conv", str(device), kernel_size)
        if key not in self._device_cache:
            sources, targets = self.conv_tables(kernel_size)
            self._device_cache[key] = ConvIndex(
                self._text_rows.to(device), self._image_rows.to(device), sources.to(device), targets.to(device)
            )
        return self._device_cache[key]

    def state_index(self, device: Union[str, torch.device], kernel_size: int, capacity: int) -> StateIndex:
        """How this layout reads and leaves the pending sums of a state with ``capacity`` slots a row.

        Reads: tokens of a segment that continues an image from state, within ``L`` positions of
        its offset (``L = ring_size(k, W)``). Writes: for the last segment of a sequence when its
        image is not complete, the ``L`` positions after it; each is the sum of the taps of this
        call's tokens that reach it, plus (``write_keep``) what earlier calls left there.
        """
        device = torch.device(device)
        key = ("state", str(device), kernel_size, capacity)
        if key in self._device_cache:
            return self._device_cache[key]
        k = kernel_size
        kk = k * k
        taps = torch.arange(kk, dtype=torch.int64)
        di, dj = k - 1 - taps // k, k - 1 - taps % k
        read_tokens, read_slots, write_slots, write_sources, write_keep = [], [], [], [], []
        last_in_row = {}
        for seg in self.segments:
            last_in_row[seg.batch] = seg
        for seg in self.segments:
            L = ring_size(k, seg.width)
            if L == 0:
                continue
            if L > capacity:
                raise ValueError(f"state capacity {capacity} is below the {L} slots a {seg.width}-wide image needs")
            base = seg.batch * capacity
            if seg.offset > 0:
                p = torch.arange(seg.offset, min(seg.offset + L, seg.end), dtype=torch.int64)
                # Only a slot some earlier token of this image wrote is read: the ring may hold
                # anything else (what an earlier image, finished or left, had pending).
                p = p[first_contributor(p, k, seg.width) < seg.offset]
                read_tokens.append(seg.first_local + p - seg.offset)
                read_slots.append(base + p % L)
            if last_in_row[seg.batch] is seg and not seg.complete:
                q = torch.arange(seg.end, min(seg.end + L, seg.height * seg.width), dtype=torch.int64)
                qi, qj = (q // seg.width).unsqueeze(1), (q % seg.width).unsqueeze(1)
                src = q.unsqueeze(1) - di * seg.width - dj
                ok = (qi >= di) & (qj >= dj) & (src >= seg.offset) & (src < seg.end)
                write_sources.append(torch.where(ok, seg.first_local + src - seg.offset, torch.full_like(src, -1)))
                write_slots.append(base + q % L)
                write_keep.append(first_contributor(q, k, seg.width) < seg.offset)

        def cat(parts, shape_tail=(), dtype=torch.int64):
            if parts:
                return torch.cat(parts).to(device)
            return torch.zeros((0, *shape_tail), dtype=dtype, device=device)

        result = StateIndex(
            cat(read_tokens), cat(read_slots), cat(write_slots), cat(write_sources, (kk,)),
            cat(write_keep, dtype=torch.bool),
        )
        self._device_cache[key] = result
        return result

    def window(self, start: int, stop: int) -> ImageLayout:
        """The layout of positions ``[start, stop)`` of every sequence (a prefill chunk).

        Spans cut by the window keep their image coordinates: the part after a cut continues the
        image (``offset > 0``), so feeding consecutive windows with a ``ConvLoRAState`` gives the
        same outputs as one call on the whole layout.
        """
        if not 0 <= start < stop <= self.seq_len:
            raise ValueError(f"window [{start}, {stop}) must lie within [0, {self.seq_len}) and be non-empty")
        spans = []
        for s in self.spans:
            lo, hi = max(s.start, start), min(s.start + s.length, stop)
            if lo < hi:
                spans.append(ImageSpan(s.batch, lo - start, s.height, s.width, s.offset + lo - s.start, hi - lo))
        return ImageLayout.from_spans(self.batch_size, stop - start, spans)

    # ------------------------------------------------------------------ misc
    def image_mask(self, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """``(batch, seq)`` bool mask of image tokens."""
        mask = torch.zeros(self.batch_size * self.seq_len, dtype=torch.bool)
        mask[self._image_rows] = True
        return mask.view(self.batch_size, self.seq_len).to(device)

    def step_positions(
        self, device: Union[str, torch.device] = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``moss_lora_step`` takes at each step when the sequences are decoded one token at a
        time: ``(image_pos, height, width)``, each ``(seq, batch)`` int64, so that row ``t`` (one
        contiguous vector per argument) is step ``t``. ``image_pos`` is the token's raster index in
        its image (``-1`` for text, whose height and width are 1)."""
        pos = torch.full((self.batch_size, self.seq_len), -1, dtype=torch.int64)
        height = torch.ones(self.batch_size, self.seq_len, dtype=torch.int64)
        width = torch.ones(self.batch_size, self.seq_len, dtype=torch.int64)
        for s in self.spans:
            pos[s.batch, s.start : s.start + s.length] = torch.arange(s.offset, s.end)
            height[s.batch, s.start : s.start + s.length] = s.height
            width[s.batch, s.start : s.start + s.length] = s.width
        return tuple(t.t().contiguous().to(device) for t in (pos, height, width))

    def __repr__(self) -> str:
        return (f"ImageLayout(batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"image_tokens={self.num_image_tokens}, spans={list(self.spans)!r})")
