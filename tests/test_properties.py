"""Property-based tests: every backend against an independent float64 ground truth and each other.

Hypothesis draws layouts (several images a sequence, images cut by the sequence's end or left early
with an explicit ``length``, grids split into one span per row with end-of-row text between them,
``1 x W`` / ``H x 1`` grids, text-only sequences), kernel sizes 1-3, ranks 0-4, dtypes, views of
``x`` and ``out``, chunk cuts and decode schedules. The ground truth is ``F.conv2d`` over each image's
grid in float64 (``moss_kernels.testing.ground_truth``), never the code under test.

Profiles (environment variable ``MOSS_PROPERTY_PROFILE``):

* ``ci`` (default): derandomized (a fixed seed: the same examples every run), few examples, tiny
  Triton cases (the interpreter is slow); about a minute on 2 cores.
* ``long``: randomized, hundreds of examples per property, larger sizes; for a session of bug
  hunting: ``MOSS_PROPERTY_PROFILE=long pytest tests/test_properties.py``.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import moss_kernels as mk
from moss_kernels.layout import ImageSpan
from moss_kernels.testing import TOLERANCE, ground_truth

BACKENDS = mk.available_backends("cpu")
PROFILE = os.environ.get("MOSS_PROPERTY_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"MOSS_PROPERTY_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
LONG = PROFILE == "long"

# No example database, and hypothesis's own caches outside the checkout: a failure prints its
# reproducer blob instead.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "moss_kernels_hypothesis"))
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               database=None)
settings.register_profile("moss-ci", derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("moss-long", derandomize=False, print_blob=True, **_COMMON)


def examples(ci: int, long: int = 300):
    """This file's profile (not loaded globally: other test files keep their own settings)."""
    return settings(settings.get_profile(f"moss-{PROFILE}"), max_examples=long if LONG else ci)


MAX_SIDE = 6 if LONG else 4
MAX_SEQ = 40 if LONG else 18


@st.composite
def layouts(draw, max_batch: int = 3, max_seq: int = MAX_SEQ):
    """A random layout with every hard case of SPEC §2 (see the module docstring)."""
    B = draw(st.integers(1, max_batch))
    S = draw(st.integers(1, max_seq))
    spans = []
    for b in range(B):
        pos = draw(st.integers(0, 3))
        while pos < S and draw(st.booleans() if spans else st.just(True)):
            h, w = draw(st.integers(1, MAX_SIDE)), draw(st.integers(1, MAX_SIDE))
            size = h * w
            kind = draw(st.sampled_from(["whole", "left early", "row spans"]))
            if kind == "row spans" and h > 1:  # Emu3-style: one span per row, an end-of-row token after each
                for i in range(h):
                    if pos + w > S:
                        break
                    spans.append(ImageSpan(b, pos, h, w, i * w, w))
                    pos += w + 1
            else:
                length = None
                if kind == "left early" and size > 1:
                    length = min(draw(st.integers(1, size - 1)), S - pos)
                spans.append(ImageSpan(b, pos, h, w, 0, length))
                pos += (length if length is not None else size) + draw(st.integers(0, 3))
    return mk.ImageLayout.from_spans(B, S, spans)


@st.composite
def adapters(draw, d_in: int, dtype: torch.dtype, allow_rank0: bool = True, need_image: bool = False):
    """``(text_a, text_b, image_weight, image_b)``, O(1) outputs, some adapter absent, ranks 0-4."""
    d_out = draw(st.integers(1, 6))
    k = draw(st.integers(1, 3))
    which = draw(st.sampled_from(["both", "image"] if need_image else ["both", "both", "text", "image"]))
    lo = 0 if allow_rank0 else 1
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, fan):
        return (torch.randn(*shape, generator=g) / max(fan, 1) ** 0.5).to(dtype)

    ta = tb = w = ib = None
    if which in ("both", "text"):
        r = draw(st.integers(lo, 4))
        ta, tb = rnd(r, d_in, fan=d_in), rnd(d_out, r, fan=r)
    if which in ("both", "image"):
        r = draw(st.integers(lo, 4))
        w, ib = rnd(r, d_in, k, k, fan=d_in * k * k), rnd(d_out, r, fan=r)
    return ta, tb, w, ib


def _view(draw, x: torch.Tensor) -> torch.Tensor:
    """``x`` as given, or the same values as a non-contiguous view (strided rows, strided columns,
    batch-major storage)."""
    kind = draw(st.sampled_from(["contiguous", "rows", "columns", "batch-major"]))
    B, S, d = x.shape
    if kind == "rows":
        base = torch.full((B, S, d + 3), float("nan"), dtype=x.dtype)
        base[..., 1 : d + 1] = x
        return base[..., 1 : d + 1]
    if kind == "columns":
        base = torch.full((B, S, 2 * d), float("nan"), dtype=x.dtype)
        base[..., ::2] = x
        return base[..., ::2]
    if kind == "batch-major":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def _randn(data, *shape) -> torch.Tensor:
    """Normal samples seeded by a hypothesis draw: examples (and their shrinking) are reproducible,
    whatever torch's global generator did before."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    return torch.randn(*shape, generator=g)


def _tol(dtype):
    return TOLERANCE[dtype]


def _magnitudes(x, lay, ws, scale=1.0):
    """The ground truth of ``|x|`` and ``|weights|``: what the products carry before they cancel."""
    return ground_truth(x.abs(), lay, *(None if t is None else t.abs() for t in ws), scale=abs(scale))


def _assert_close(got, truth, magnitudes, tol, what):
    """SPEC §4's ``||got - truth|| <= tol ||truth||``, except where the true output cancels: a
    float32 sum of products is only exact to ``eps * sum |products|``, so the error is measured
    against ``max(||truth||, ||magnitudes|| / 32)`` (the same bound unless the output is 32x below
    the magnitudes it was summed from; hypothesis finds such cases, e.g. 2 products cancelling)."""
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: NaN or Inf in the output")
    err = (got.double() - truth).norm().item()
    scale = max(truth.norm().item(), magnitudes.norm().item() / 32)
    assert err <= tol * (scale if scale > 0 else 1.0), f"{what}: error {err:.3e} > {tol:.1e} x {scale:.3e}"


# ---------------------------------------------------------------------------- forward
@examples(ci=30)
@given(data=st.data())
def test_forward_matches_ground_truth_on_every_backend(data):
    """Every backend's forward (and ``out=`` accumulation into a view) against float64 ``F.conv2d``."""
    lay = data.draw(layouts())
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]))
    d_in = data.draw(st.integers(1, 8))
    ws = data.draw(adapters(d_in, dtype))
    x = _randn(data, lay.batch_size, lay.seq_len, d_in).to(dtype)
    scale = data.draw(st.sampled_from([1.0, 0.5, 2.0]))
    truth = ground_truth(x, lay, *ws, scale=scale)
    mags = _magnitudes(x, lay, ws, scale)
    xv = _view(data.draw, x)
    for backend in BACKENDS:
        if backend == "triton" and (lay.seq_len * lay.batch_size > 24 and not LONG):
            continue  # the interpreter is slow: tiny Triton cases only in CI
        got = mk.moss_lora(xv, lay, *ws, scale, backend=backend)
        assert got.dtype == dtype and got.shape == truth.shape
        _assert_close(got, truth, mags, _tol(dtype), f"{backend} forward")
        base = _randn(data, lay.batch_size, lay.seq_len, 2 * truth.shape[-1]).to(dtype)
        out = base[..., ::2]
        start = out.clone()
        with torch.no_grad():
            mk.moss_lora(xv, lay, *ws, scale, out=out, backend=backend)
        # out holds round(start + delta): its rounding is relative to the sum, not to the delta.
        _assert_close(out, start.double() + truth, mags + start.abs().double(), 3 * _tol(dtype), f"{backend} out=")


# ---------------------------------------------------------------------------- backward
@examples(ci=15)
@given(data=st.data())
def test_gradients_match_ground_truth_on_every_backend(data):
    """Gradients of ``x`` and every weight against autograd through the float64 literal conv."""
    lay = data.draw(layouts(max_batch=2))
    d_in = data.draw(st.integers(1, 6))
    ws = data.draw(adapters(d_in, torch.float32))
    x = _randn(data, lay.batch_size, lay.seq_len, d_in)
    grad = _randn(data, lay.batch_size, lay.seq_len, (ws[1] if ws[1] is not None else ws[3]).shape[0])
    x64 = x.double().requires_grad_(True)
    w64 = [None if t is None else t.double().requires_grad_(True) for t in ws]
    from moss_kernels.reference import literal_moss_lora

    def grads_of(xx, wws, g):
        ref = literal_moss_lora(xx, lay, *wws, 0.7)
        if ref.requires_grad:  # else nothing reaches a weight (no rows of its modality, or rank 0)
            ref.backward(g)
        return [None if t is None else (t.grad if t.grad is not None else torch.zeros_like(t)) for t in (xx, *wws)]

    expected = grads_of(x64, w64, grad.double())
    leaf = lambda t: None if t is None else t.detach().abs().requires_grad_(True)
    magnitudes = grads_of(leaf(x64), [leaf(t) for t in w64], grad.double().abs())
    for backend in BACKENDS:
        if backend == "triton" and lay.seq_len * lay.batch_size > 16 and not LONG:
            continue
        xs = x.clone().requires_grad_(True)
        wt = [None if t is None else t.clone().requires_grad_(True) for t in ws]
        mk.moss_lora(xs, lay, *wt, 0.7, backend=backend).backward(grad)
        for name, t, g64, m64 in zip(("x", "text_a", "text_b", "image_weight", "image_b"), (xs, *wt), expected,
                                     magnitudes):
            if t is not None:
                g = t.grad if t.grad is not None else torch.zeros_like(t)
                assert g.shape == t.shape and g.dtype == t.dtype
                _assert_close(g, g64, m64, TOLERANCE[torch.float32], f"{backend} d{name}")


# ---------------------------------------------------------------------------- prefill + decode
@st.composite
def schedules(draw, seq_len: int):
    """How a sequence of ``seq_len`` positions goes through a state: chunks ``[lo, hi)`` run by
    ``moss_lora(state=)`` and single positions run by ``moss_lora_step``, in order."""
    plan, t = [], 0
    while t < seq_len:
        if draw(st.booleans()):
            hi = draw(st.integers(t + 1, seq_len))
            plan.append(("chunk", t, hi))
            t = hi
        else:
            n = draw(st.integers(1, seq_len - t))
            plan += [("step", u, u + 1) for u in range(t, t + n)]
            t += n
    return plan


@examples(ci=25)
@given(data=st.data())
def test_any_mix_of_chunks_and_steps_equals_the_full_forward(data):
    """SPEC §1: chunked prefill cut anywhere, decode steps, and any interleaving of the two give the
    full forward's outputs, starting from a state whose ring holds NaN (leftovers of an earlier
    image must never be read), on every backend."""
    lay = data.draw(layouts())
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.float16]))
    d_in = data.draw(st.integers(1, 6))
    ws = data.draw(adapters(d_in, dtype, allow_rank0=False, need_image=True))
    w = ws[2]
    x = _randn(data, lay.batch_size, lay.seq_len, d_in).to(dtype)
    truth = ground_truth(x, lay, *ws, scale=0.9)
    mags = _magnitudes(x, lay, ws, 0.9)
    plan = data.draw(schedules(lay.seq_len))
    pos, height, width = lay.step_positions()
    for backend in BACKENDS:
        if backend == "triton" and (len(plan) > 8 or lay.batch_size * lay.seq_len > 30) and not LONG:
            continue
        state = mk.ConvLoRAState(lay.batch_size, w.shape[0], w.shape[-1], max_width=max(lay.max_width, 1))
        state.pending.fill_(float("nan"))
        outs = []
        with torch.no_grad():
            for kind, lo, hi in plan:
                if kind == "chunk":
                    outs.append(mk.moss_lora(x[:, lo:hi], lay.window(lo, hi), *ws, 0.9, state=state,
                                             backend=backend))
                else:
                    outs.append(mk.moss_lora_step(x[:, lo], *ws, 0.9, state, pos[lo], height[lo], width[lo],
                                                  backend=backend).unsqueeze(1))
        _assert_close(torch.cat(outs, 1), truth, mags, _tol(dtype), f"{backend} schedule {plan}")


# ---------------------------------------------------------------------------- backends agree bit-for-bit-ish
@examples(ci=10)
@given(data=st.data())
def test_backends_agree_and_repeat_bit_for_bit(data):
    """Each backend repeats its own bits exactly, and agrees with the others to float32's tolerance."""
    lay = data.draw(layouts(max_batch=2, max_seq=12))
    d_in = data.draw(st.integers(1, 6))
    ws = data.draw(adapters(d_in, torch.float32))
    x = _randn(data, lay.batch_size, lay.seq_len, d_in)
    results = {}
    for backend in BACKENDS:
        a = mk.moss_lora(x, lay, *ws, backend=backend)
        b = mk.moss_lora(x, lay, *ws, backend=backend)
        assert torch.equal(a, b), f"{backend} is not deterministic"
        results[backend] = a
    ref, mags = results["reference"].double(), _magnitudes(x, lay, ws)
    for backend, got in results.items():
        _assert_close(got, ref, mags, 2 * TOLERANCE[torch.float32], f"{backend} vs reference")


# ---------------------------------------------------------------------------- hostile sizes and values
@pytest.mark.parametrize("backend", BACKENDS)
@examples(ci=6, long=100)
@given(data=st.data())
def test_hostile_values_stay_in_their_sequence(backend, data):
    """Inf/NaN in one sequence's input never reaches another sequence's output, on any layout."""
    lay = data.draw(layouts(max_batch=3, max_seq=10).filter(lambda ly: ly.batch_size > 1))
    d_in = data.draw(st.integers(1, 5))
    ws = data.draw(adapters(d_in, torch.float32))
    x = _randn(data, lay.batch_size, lay.seq_len, d_in)
    truth = ground_truth(x, lay, *ws)
    mags = _magnitudes(x, lay, ws)
    bad = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    t = data.draw(st.integers(0, lay.seq_len - 1))
    xb = x.clone()
    xb[0, t] = bad
    got = mk.moss_lora(xb, lay, *ws, backend=backend)
    _assert_close(got[1:], truth[1:], mags[1:], TOLERANCE[torch.float32], f"{backend}: {bad} at (0, {t}) spread")
