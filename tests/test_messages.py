"""Errors a newcomer meets first: they name the argument (or the image) that is wrong.

* the op's input width: when the adapters agree with each other, a wrong last dimension of ``x``
  blames ``x``, not a weight;
* ``MossLinear``: a wrong width, an integer ``x`` or a dtype other than the base's are named before
  the base's raw ``mat1 and mat2`` error;
* ``ImageLayout.from_token_ids`` with ``eoi_token_id`` / ``image_token_ids``: a grid that does not
  match an image raises naming the image (batch row, ``<boi>`` position).
"""

import random
import re

import pytest
import torch

import moss_kernels as mk

# Chameleon/Anole's ids (NOTES): <boi> 8197, <eoi> 8196, image codes 4..8195.
BOI, EOI, CODES = 8197, 8196, range(4, 8196)
TEXT = 8300  # a text id outside the code range


def _layout():
    return mk.ImageLayout.from_spans(1, 6, [(0, 1, 2, 2)])


def test_wrong_input_width_blames_x():
    x = torch.randn(1, 6, 32)
    ta, tb, w, ib = torch.randn(8, 33), torch.randn(5, 8), torch.randn(8, 33, 2, 2), torch.randn(5, 8)
    want = "x has last dimension 32, but the adapters take inputs of width 33"
    with pytest.raises(ValueError, match=re.escape(want + " (text_a has shape (8, 33)): x must end in 33")):
        mk.moss_lora(x, _layout(), ta, tb, w, ib)
    with pytest.raises(ValueError, match=re.escape(want + " (image_weight has shape (8, 33, 2, 2))")):
        mk.conv_lora(x, _layout(), w, ib)
    # the adapters disagree with each other: the one that disagrees with x is named
    with pytest.raises(ValueError, match=re.escape("text_a must have shape (rank, 32), got (8, 33)")):
        mk.moss_lora(x, _layout(), ta, tb, torch.randn(8, 32, 2, 2), ib)
    with pytest.raises(ValueError, match=re.escape("image_weight must have shape (rank, 32, k, k), got (8, 33, 2, 2)")):
        mk.moss_lora(x, _layout(), torch.randn(8, 32), tb, w, ib)


def test_moss_linear_names_the_bad_input():
    layer = mk.MossLinear(torch.nn.Linear(32, 16), rank=4)
    lay = _layout()
    with pytest.raises(ValueError, match=re.escape("x must have shape (batch, seq, 32) (the base's in_features), "
                                                   "got (1, 6, 31)")):
        layer(torch.randn(1, 6, 31), lay)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor .* got torch.int64"):
        layer(torch.randint(0, 9, (1, 6, 32)), lay)
    want = "x is torch.bfloat16, but the base layer's weight is torch.float32: cast"
    with pytest.raises(TypeError, match=re.escape(want)):
        layer(torch.randn(1, 6, 32, dtype=torch.bfloat16), lay)
    with pytest.raises(TypeError, match=re.escape("x must be a torch.Tensor, got list")):
        layer([1.0], lay)
    # refused, not cast; but under autocast the base casts, so the layer runs (and matches fp32 loosely)
    x = torch.randn(1, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16(), lay)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), layer(x, lay), atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------- from_token_ids grids
def _sequence(rng: random.Random, seq_len: int, size: int, images: list):
    """Random text with images of ``size`` codes (each followed by <eoi>), the last one possibly cut
    by the end; returns the ids and, per image, (boi position, number of its codes in the row)."""
    ids, marks = [], []
    while len(ids) < seq_len:
        ids += [TEXT] * rng.randint(0, 3)
        if len(ids) >= seq_len:
            break
        marks.append((len(ids), min(size, seq_len - len(ids) - 1)))
        ids += [BOI] + [rng.randrange(CODES.start, CODES.stop) for _ in range(size)] + [EOI]
    images.append(marks)
    return ids[:seq_len]


@pytest.mark.parametrize("seed", range(6))
def test_matching_grids_pass_and_every_mismatch_names_the_image(seed):
    rng = random.Random(seed)
    height, width = rng.randint(1, 4), rng.randint(1, 4)
    size, batch, seq_len = height * width, rng.randint(1, 3), rng.randint(8, 60)
    images = []
    ids = torch.tensor([_sequence(rng, seq_len, size, images) for _ in range(batch)])
    checks = [dict(eoi_token_id=EOI), dict(image_token_ids=CODES), dict(image_token_ids=list(CODES)),
              dict(eoi_token_id=EOI, image_token_ids=CODES)]
    for routing in ("input", "output"):
        plain = mk.ImageLayout.from_token_ids(ids, BOI, (height, width), routing)
        for kw in checks:
            assert mk.ImageLayout.from_token_ids(ids, BOI, (height, width), routing, **kw).spans == plain.spans
    # one image made a token shorter (its last code becomes text) or longer (a code replaces <eoi>)
    full = [(b, pos) for b, marks in enumerate(images) for pos, n in marks if pos + 1 + size < seq_len]
    if not full:
        return
    b, pos = rng.choice(full)
    where = re.escape(f"the image after the <boi> at (batch {b}, position {pos}), grid ({height}, {width})")
    shorter, longer = ids.clone(), ids.clone()
    shorter[b, pos + size] = EOI
    longer[b, pos + size + 1] = CODES.start
    for kw in checks:
        if "eoi_token_id" in kw:
            with pytest.raises(ValueError, match=where + ".*image is shorter than the grid"):
                mk.ImageLayout.from_token_ids(shorter, BOI, (height, width), **kw)
            with pytest.raises(ValueError, match=where + ".*expected the <eoi>.*grid is smaller than the image"):
                mk.ImageLayout.from_token_ids(longer, BOI, (height, width), **kw)
        else:
            with pytest.raises(ValueError, match=where + ".*not an image code"):
                mk.ImageLayout.from_token_ids(shorter, BOI, (height, width), **kw)
            with pytest.raises(ValueError, match=where + ".*still holds an image code"):
                mk.ImageLayout.from_token_ids(longer, BOI, (height, width), **kw)


def test_the_issue_cases_on_a_16_token_image():
    row = [TEXT] * 3 + [BOI] + list(range(100, 116)) + [EOI] + [TEXT] * 4
    ids = torch.tensor([row, row])
    kw = dict(eoi_token_id=EOI, image_token_ids=CODES)
    assert [s.length for s in mk.ImageLayout.from_token_ids(ids, BOI, (4, 4), **kw).spans] == [16, 16]
    with pytest.raises(ValueError, match=r"\(batch 0, position 3\), grid \(5, 5\): a <eoi> \(id 8196\) at "
                                         r"position 20, after 16 of its 25 image tokens"):
        mk.ImageLayout.from_token_ids(ids, BOI, (5, 5), **kw)
    with pytest.raises(ValueError, match=r"grid \(3, 3\): expected the <eoi> \(id 8196\) after its 9 image "
                                         r"tokens, at position 13, found id 109"):
        mk.ImageLayout.from_token_ids(ids, BOI, (3, 3), **kw)
    cut = ids.clone()
    cut[1, 10:20] = TEXT  # text cuts the image of row 1 short: it still claims 16 tokens without checks
    assert [s.length for s in mk.ImageLayout.from_token_ids(cut, BOI, (4, 4)).spans] == [16, 16]
    with pytest.raises(ValueError, match=r"\(batch 1, position 3\).*position 10 \(image token 6 of 16\) holds "
                                         r"id 8300, not an image code \(range\(4, 8196\)\)"):
        mk.ImageLayout.from_token_ids(cut, BOI, (4, 4), image_token_ids=CODES)
    # the end of the sequence may cut an image (training data truncates): accepted
    short = ids[:, :12]
    assert [s.length for s in mk.ImageLayout.from_token_ids(short, BOI, (4, 4), **kw).spans] == [8, 8]
    with pytest.raises(TypeError, match="image_token_ids must be a range or a collection of ints"):
        mk.ImageLayout.from_token_ids(ids, BOI, (4, 4), image_token_ids=object())
    with pytest.raises(ValueError, match="eoi_token_id must be an int"):
        mk.ImageLayout.from_token_ids(ids, BOI, (4, 4), eoi_token_id="8196")


# ---------------------------------------------------------------------------- missing extras
def test_a_missing_extra_stops_the_demo_before_any_work(monkeypatch, tmp_path):
    import sys

    from moss_kernels.demo.__main__ import main

    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(SystemExit, match=re.escape("python -m moss_kernels.demo needs scikit-learn, tqdm, which are "
                                                   "not installed: pip install 'moss_kernels[demo]'")):
        main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
