"""ImageSpan / ImageLayout: validation, token-id routing, index tables."""

import random

import pytest
import torch

from moss_kernels import ImageLayout, ImageSpan
from moss_kernels.layout import ring_size
from moss_kernels.testing import random_layout


# --------------------------------------------------------------------------- bad spans, one by one
@pytest.mark.parametrize(
    "span, message",
    [
        ((0, 10, 2, 2), "start 10 is outside the sequence"),
        ((0, -1, 2, 2), "start -1 is outside the sequence"),
        ((2, 0, 2, 2), "batch 2 is outside the batch"),
        ((-1, 0, 2, 2), "batch -1 is outside the batch"),
        ((0, 0, 0, 2), "height and width must be positive"),
        ((0, 0, 2, -3), "height and width must be positive"),
        ((0, 0, 2, 2, 4), "offset 4 is beyond the 2x2 image"),
        ((0, 0, 2, 2, -1), "offset -1 is beyond the 2x2 image"),
        ((0, 0, 2, 2, 0, 0), "length must be positive"),
        ((0, 0, 2, 2, 1, 4), "overruns the 2x2 image"),
        ((0, 8, 3, 3, 0, 4), "runs past the sequence"),
        ((0, 0, 2.0, 2), "height must be an int"),
        ((0, 0, True, 2), "height must be an int"),
        ((0, 0), "not an ImageSpan"),
    ],
)
def test_invalid_span_raises_naming_it(span, message):
    with pytest.raises(ValueError, match=message) as info:
        ImageLayout.from_spans(2, 10, [(0, 0, 1, 1), span] if span[1] != 0 or span[0] != 0 else [span])
    assert "span #" in str(info.value)


def test_overlapping_spans_name_both():
    with pytest.raises(ValueError, match=r"span #1 .* overlaps span #0"):
        ImageLayout.from_spans(1, 20, [ImageSpan(0, 2, 2, 2), ImageSpan(0, 5, 2, 2)])
    # adjacent is fine, and other sequences never overlap
    ImageLayout.from_spans(2, 20, [ImageSpan(0, 2, 2, 2), ImageSpan(0, 6, 2, 2), ImageSpan(1, 3, 2, 2)])


def test_nonpositive_layout_sizes():
    with pytest.raises(ValueError, match="batch_size and seq_len must be positive"):
        ImageLayout.from_spans(0, 5, [])
    with pytest.raises(ValueError, match="batch_size and seq_len must be positive"):
        ImageLayout.from_spans(1, 0, [])


def test_continuation_must_follow_its_image_or_come_first():
    with pytest.raises(ValueError, match="continues an image"):
        ImageLayout.from_spans(1, 30, [ImageSpan(0, 0, 2, 2), ImageSpan(0, 10, 3, 3, offset=2)])
    # first in its sequence: continues from a state
    lay = ImageLayout.from_spans(1, 30, [ImageSpan(0, 3, 3, 3, offset=2)])
    assert lay.segments[0].continues_from_state and lay.spans[0].length == 7


# --------------------------------------------------------------------------- defaults and tables
def test_default_length_is_cut_at_sequence_end():
    lay = ImageLayout.from_spans(1, 10, [(0, 6, 3, 3)])
    assert lay.spans[0].length == 4 and lay.num_image_tokens == 4 and lay.num_text_tokens == 6
    lay = ImageLayout.from_spans(1, 10, [(0, 1, 3, 3, 5)])
    assert lay.spans[0].length == 4


def test_paper_figure_2_patch_9_mixes_5_6_8_9():
    # a 3x3 grid, patches numbered 1..9 in raster order at positions 1..9 after a marker at 0
    lay = ImageLayout.from_spans(1, 10, [(0, 1, 3, 3)])
    sources, targets = lay.conv_tables(2)
    # patch 9 is image token 8; taps (a, b) = (0,0) upper-left, (0,1) upper, (1,0) left, (1,1) itself
    assert sources[8].tolist() == [4, 5, 7, 8]  # patches 5, 6, 8, 9
    assert sources[0].tolist() == [-1, -1, -1, 0]  # patch 1 only sees itself
    assert sources[3].tolist() == [-1, 0, -1, 3]  # patch 4: upper is patch 1, no left neighbours
    # the transpose: patch 5 (token 4) is read by patch 9's upper-left tap, patch 8's upper, patch 6's left
    assert targets[4].tolist() == [8, 7, 5, 4]
    assert lay.index("cpu").image_rows.tolist() == list(range(1, 10))
    assert lay.index("cpu").text_rows.tolist() == [0]


def test_tables_are_inverse_of_each_other():
    rng = random.Random(0)
    for _ in range(20):
        lay = random_layout(rng)
        for k in (1, 2, 3):
            src, dst = lay.conv_tables(k)
            for t, tap in (src >= 0).nonzero().tolist():
                assert dst[src[t, tap], tap] == t
            assert (src >= 0).sum() == (dst >= 0).sum()


def test_chained_spans_skip_end_of_row_tokens():
    """Emu3-style rows: [row0][EOL][row1][EOL] — one span per row gives the same grid."""
    H, W = 3, 4
    full = ImageLayout.from_spans(1, H * W, [(0, 0, H, W)])
    rows = [(0, i * (W + 1), H, W, i * W, W) for i in range(H)]
    eol = ImageLayout.from_spans(1, H * (W + 1), rows)
    assert len(eol.segments) == 1 and eol.segments[0].complete
    assert torch.equal(eol.conv_tables(2)[0], full.conv_tables(2)[0])
    assert eol.num_text_tokens == H  # the end-of-row tokens


def test_window_splits_images_into_continuations():
    lay = ImageLayout.from_spans(2, 20, [(0, 2, 3, 3), (1, 15, 4, 4)])
    w = lay.window(5, 20)
    assert w.spans[0] == ImageSpan(0, 0, 3, 3, 3, 6) and w.spans[1] == ImageSpan(1, 10, 4, 4, 0, 5)
    with pytest.raises(ValueError, match="window"):
        lay.window(5, 5)


def test_index_is_cached_per_device_and_kernel():
    lay = ImageLayout.from_spans(1, 10, [(0, 1, 3, 3)])
    assert lay.index("cpu", 2) is lay.index("cpu", 2)
    assert lay.index("cpu", 3) is not lay.index("cpu", 2)


def test_ring_size():
    assert ring_size(2, 32) == 33 and ring_size(1, 32) == 0 and ring_size(3, 4) == 10


# --------------------------------------------------------------------------- from_token_ids
BOI = 99


def _ids(rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_from_token_ids_input_routing():
    ids = _ids([[1, BOI, 5, 6, 7, 8, 2, BOI, 5, 6], [BOI, 5, 6, 7, 8, BOI, 1, 1, 1, 1]])
    lay = ImageLayout.from_token_ids(ids, BOI, (2, 2))
    assert lay.spans == (
        ImageSpan(0, 2, 2, 2, 0, 4), ImageSpan(0, 8, 2, 2, 0, 2),  # the second image is cut by the end
        ImageSpan(1, 1, 2, 2, 0, 4), ImageSpan(1, 6, 2, 2, 0, 4),
    )


def test_from_token_ids_output_routing():
    ids = _ids([[1, BOI, 5, 6, 7, 8, 2, 3]])
    lay = ImageLayout.from_token_ids(ids, BOI, (2, 2), routing="output")
    # the marker through the second-to-last image token predict the four image tokens
    assert lay.spans == (ImageSpan(0, 1, 2, 2, 0, 4),)


def test_marker_inside_an_image_is_image_data():
    ids = _ids([[BOI, 5, BOI, 6, 7, 1, 1]])
    lay = ImageLayout.from_token_ids(ids, BOI, (2, 2))
    assert lay.spans == (ImageSpan(0, 1, 2, 2, 0, 4),)


def test_marker_at_the_very_end_makes_no_span():
    lay = ImageLayout.from_token_ids(_ids([[1, 2, BOI]]), BOI, (2, 2))
    assert lay.spans == ()


@pytest.mark.parametrize(
    "ids, grid, routing, error, message",
    [
        ([[1.0, 2.0]], (2, 2), "input", TypeError, "input_ids must hold integers"),
        ([1, 2], (2, 2), "input", ValueError, "input_ids must have shape"),
        ([[1, 2]], (2, 0), "input", ValueError, "grid must be positive"),
        ([[1, 2]], (2,), "input", ValueError, "grid must be a pair"),
        ([[1, 2]], (2, 2), "middle", ValueError, "routing must be"),
    ],
)
def test_from_token_ids_bad_input(ids, grid, routing, error, message):
    with pytest.raises(error, match=message):
        ImageLayout.from_token_ids(torch.tensor(ids), BOI, grid, routing=routing)
    with pytest.raises(TypeError, match=r"input_ids must be a torch\.Tensor"):
        ImageLayout.from_token_ids([[1, 2]], BOI, (2, 2))


def test_step_positions():
    # row 0: text, a 2x3 image cut after 4 tokens; row 1: the last 2 tokens of that image (offset 4), text
    layout = ImageLayout.from_spans(2, 6, [ImageSpan(0, 2, 2, 3, 0, 4), ImageSpan(1, 0, 2, 3, 4, 2)])
    pos, height, width = layout.step_positions()
    assert pos.dtype == height.dtype == width.dtype == torch.int64
    assert pos.t().tolist() == [[-1, -1, 0, 1, 2, 3], [4, 5, -1, -1, -1, -1]]
    assert height.t().tolist() == [[1, 1, 2, 2, 2, 2], [2, 2, 1, 1, 1, 1]]
    assert width.t().tolist() == [[1, 1, 3, 3, 3, 3], [3, 3, 1, 1, 1, 1]]
    assert all(t.shape == (6, 2) and t[3].is_contiguous() for t in (pos, height, width))  # row t: step t
