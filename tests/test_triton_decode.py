"""The weight-stationary Triton decode step (``triton_kernels/decode.py``) against the reference step.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py
before Triton is imported), with small shapes. ``split`` runs each case at both ends of the ``d_in``
split (one slice per rank block; as many 16-wide slices as ``d_in`` has), so the fixed-order
reduction of partial sums is exercised as well as the single-slice path.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

import moss_kernels as mk  # noqa: E402
from moss_kernels import backends  # noqa: E402
from moss_kernels.testing import TOLERANCE, assert_close_rel, random_adapters  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif("triton" not in backends.available_backends(DEVICE),
                                reason=f"no Triton backend on {DEVICE}: {backends.backend_problems()}")
if "triton" in backends.available_backends(DEVICE):
    from moss_kernels.triton_kernels import decode as DEC


@pytest.fixture(params=["one-slice", "many-slices"])
def split(request, monkeypatch):
    target = 1 if request.param == "one-slice" else 10**4
    monkeypatch.setattr(DEC, "program_target", lambda device: target)
    return request.param


@pytest.fixture
def nan_scratch(monkeypatch):
    """Every scratch buffer the step allocates starts as NaN: a read before a write would show."""
    real = DEC._workspace
    monkeypatch.setattr(DEC, "_workspace", lambda *a, **kw: real(*a, **kw).fill_(float("nan")))


# Rows of one batch, each with its own image size and schedule (position per step; -1 = text):
# 0 text throughout; 1 a 3x4 image from its first token; 2 a 2x5 image joined at token 3 (its ring
# holds what earlier tokens left); 3 two text tokens, then a 4x3 image; 4 the last two tokens of a 3x3
# image, then a new 3x3 image (the old image's leftovers must be discarded); 5 a 1x5 strip (one row:
# no upper neighbours), then text.
_SIZES = [(1, 1), (3, 4), (2, 5), (4, 3), (3, 3), (1, 5)]
_STEPS = 11


def _schedule(step: int) -> list:
    return [-1, step if step < 12 else -1, 3 + step if 3 + step < 10 else -1, step - 2 if 2 <= step < 14 else -1,
            7 + step if step < 2 else step - 2, step if step < 5 else -1]


def _run(backend, dtype, pending0, generator_seed=7, steps=_STEPS, d_in=24, d_out=10, rank=6):
    """Outputs and pending after each step of the mixed batch, from ``pending0`` (cloned)."""
    g = torch.Generator().manual_seed(generator_seed)
    ad = tuple(t.to(DEVICE, dtype) for t in random_adapters(d_in, d_out, rank, 2, generator=g))
    B = len(_SIZES)
    st = mk.ConvLoRAState(B, rank, 2, device=DEVICE, max_width=max(w for _, w in _SIZES))
    st.pending.copy_(pending0)
    hgt = torch.tensor([h for h, _ in _SIZES], device=DEVICE)
    wid = torch.tensor([w for _, w in _SIZES], device=DEVICE)
    outs, pends = [], []
    for step in range(steps):
        x = torch.randn(B, d_in, generator=g).to(DEVICE, dtype)
        base = torch.randn(B, d_out, generator=g).to(DEVICE, dtype)
        pos = torch.tensor(_schedule(step), device=DEVICE)
        outs.append(mk.moss_lora_step(x, *ad, 0.7, st, pos, hgt, wid, out=base, backend=backend))
        pends.append(st.pending.clone())
    return outs, pends


def _pending0(rank=6):
    """Rows that start an image at token 0 hold NaN (nothing may read it); others hold leftovers."""
    g = torch.Generator().manual_seed(3)
    p = torch.randn(len(_SIZES), mk.ConvLoRAState(1, rank, 2, max_width=5).capacity, rank, generator=g)
    p[[1, 3, 5]] = float("nan")
    return p.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_batch_matches_reference_step(dtype, split, nan_scratch):
    """Text rows and image rows at different positions of differently sized images in one batch,
    NaN in the rings of rows whose image starts at token 0 and in every scratch buffer: the outputs
    stay finite and equal the reference step's, and so do the rings (NaN where never written)."""
    p0 = _pending0()
    got, want = _run("triton", dtype, p0), _run("reference", dtype, p0)
    tol = TOLERANCE[dtype]
    for step, (o, r) in enumerate(zip(got[0], want[0])):
        assert torch.isfinite(o).all(), f"step {step}: non-finite output {o}"
        assert_close_rel(o, r, tol, f"step {step} out")
    for step, (p, r) in enumerate(zip(got[1], want[1])):
        assert torch.equal(p.isnan(), r.isnan()), f"step {step}: NaN pattern of the rings differs"
        assert_close_rel(p.nan_to_num(), r.nan_to_num(), tol, f"step {step} pending")


def test_bitwise_deterministic(split):
    """The same inputs give the same bits, outputs and rings (no atomics; fixed reduction order)."""
    bits = lambda ts: [t.view(torch.int32) for t in ts]  # NaN-safe bitwise comparison
    a, b = _run("triton", torch.float32, _pending0(), steps=6), _run("triton", torch.float32, _pending0(), steps=6)
    for u, v in zip(bits(a[0] + a[1]), bits(b[0] + b[1])):
        assert torch.equal(u, v)


def test_weights_are_read_in_place_and_changes_are_seen():
    """No prepared copy of the weights: the kernels get views of the parameters' storage, and a step
    after an in-place update (an optimizer step) uses the new values."""
    g = torch.Generator().manual_seed(11)
    ta, tb, w, ib = (t.to(DEVICE) for t in random_adapters(20, 7, 4, 2, generator=g))
    assert DEC._rows_view(w).data_ptr() == w.data_ptr() and DEC._rows_view(ta).data_ptr() == ta.data_ptr()
    x = torch.randn(2, 20, generator=g).to(DEVICE)
    pos, hw = torch.tensor([-1, 0], device=DEVICE), torch.tensor([2, 2], device=DEVICE)
    for _ in range(2):
        st = {n: mk.ConvLoRAState(2, 4, 2, device=DEVICE, max_width=2) for n in ("triton", "reference")}
        got = {n: mk.moss_lora_step(x, ta, tb, w, ib, 1.0, st[n], pos, hw, hw, backend=n) for n in st}
        assert_close_rel(got["triton"], got["reference"], 1e-5)
        with torch.no_grad():
            w.mul_(-2.0).add_(0.1)
            ta.mul_(3.0)


def test_row_offsets_past_2_to_the_31():
    """x rows 2^30 + 16 elements apart (a view into a large buffer; only three rows are touched):
    row 2 starts past 2^31 elements, so a 32-bit row offset would read the wrong memory."""
    stride = 2**30 + 16
    try:
        big = torch.empty(2 * stride + 32, dtype=torch.float16, device=DEVICE)
    except RuntimeError as e:  # no room for the (mostly untouched) buffer
        pytest.skip(f"cannot reserve {2 * stride * 2 / 2**30:.1f} GiB: {e}")
    x = big.as_strided((3, 32), (stride, 1))
    g = torch.Generator().manual_seed(12)
    x.copy_(torch.randn(3, 32, generator=g))
    ad = tuple(t.to(DEVICE, torch.float16) for t in random_adapters(32, 8, 4, 2, generator=g))
    pos, hw = torch.tensor([0, -1, 0], device=DEVICE), torch.tensor([2, 2, 2], device=DEVICE)
    st = {n: mk.ConvLoRAState(3, 4, 2, device=DEVICE, max_width=2) for n in ("triton", "reference")}
    got = mk.moss_lora_step(x, *ad, 1.0, st["triton"], pos, hw, hw, backend="triton")
    want = mk.moss_lora_step(x.contiguous(), *ad, 1.0, st["reference"], pos, hw, hw, backend="reference")
    del big, x
    assert_close_rel(got, want, TOLERANCE[torch.float16])
    assert_close_rel(st["triton"].pending, st["reference"].pending, TOLERANCE[torch.float16])


def test_single_sequence_through_text_and_an_image(split):
    """Batch 1, the image-generation case: text, then a 2x3 image token by token, then text."""
    g = torch.Generator().manual_seed(13)
    ad = tuple(t.to(DEVICE) for t in random_adapters(40, 9, 5, 2, generator=g))
    st = {n: mk.ConvLoRAState(1, 5, 2, device=DEVICE, max_width=3) for n in ("triton", "reference")}
    hw = torch.tensor([2], device=DEVICE), torch.tensor([3], device=DEVICE)
    for step, p in enumerate([-1, 0, 1, 2, 3, 4, 5, -1]):
        x = torch.randn(1, 40, generator=g).to(DEVICE)
        pos = torch.tensor([p], device=DEVICE)
        got = {n: mk.moss_lora_step(x, *ad, 0.5, st[n], pos, *hw, backend=n) for n in st}
        assert_close_rel(got["triton"], got["reference"], 1e-5, f"step {step}")
        assert_close_rel(st["triton"].pending, st["reference"].pending, 1e-5, f"state after step {step}")
