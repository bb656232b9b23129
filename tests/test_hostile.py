"""Regression tests for the hostile-input findings of issue 11, one per finding, on every backend.

Each test here failed before its fix. The float64 ground truth is ``F.conv2d`` over the grid
(``moss_kernels.testing.ground_truth``); Triton runs under the interpreter on the CPU, so its cases
stay tiny.
"""

from __future__ import annotations

import pytest
import torch

import moss_kernels as mk
from moss_kernels.reference import literal_moss_lora
from moss_kernels.testing import TOLERANCE, assert_close_rel, ground_truth, random_adapters

BACKENDS = mk.available_backends("cpu")


def _decode_after_prefill(x, layout, adapters, scale, cut, backend):
    """Prefill positions ``[0, cut)`` with ``moss_lora(state=)``, then decode the rest one token at a
    time with ``moss_lora_step`` (positions from ``layout.step_positions``); returns all outputs."""
    B, S, _ = x.shape
    w = adapters[2]
    st = mk.ConvLoRAState(B, w.shape[0], w.shape[-1], max_width=layout.max_width)
    pos, height, width = layout.step_positions()
    outs = []
    with torch.no_grad():
        if cut:
            outs.append(mk.moss_lora(x[:, :cut], layout.window(0, cut), *adapters, scale, state=st, backend=backend))
        for t in range(cut, S):
            step = mk.moss_lora_step(x[:, t], *adapters, scale, st, pos[t], height[t], width[t], backend=backend)
            outs.append(step.unsqueeze(1))
    return torch.cat(outs, dim=1)


# Per sequence: an image cut by the chunk boundary and completed, then one, two or three more images
# decoded step by step, some left before their end (explicit lengths), with text between them.
_FINDING1_SPANS = [
    (0, 1, 2, 3), (0, 8, 3, 2, 0, 4), (0, 13, 2, 2),
    (1, 0, 3, 3, 0, 5), (1, 6, 2, 3),
    (2, 2, 2, 2), (2, 7, 1, 3, 0, 2), (2, 10, 2, 3, 0, 4), (2, 15, 2, 2),
]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_discards_what_an_earlier_image_left(backend, k):
    """Finding 1: prefill at every cut point, then step-by-step decoding of further images (some
    truncated) gives the full forward's outputs: nothing an earlier image left reaches a new one."""
    torch.manual_seed(1)
    lay = mk.ImageLayout.from_spans(3, 19, _FINDING1_SPANS)
    adapters = random_adapters(6, 5, 3, k)
    x = torch.randn(3, 19, 6)
    truth = ground_truth(x, lay, *adapters, scale=0.7)
    cuts = range(lay.seq_len) if backend != "triton" else (0, 3, 9, 14)  # the interpreter is slow
    for cut in cuts:
        got = _decode_after_prefill(x, lay, adapters, 0.7, cut, backend)
        assert_close_rel(got, truth, TOLERANCE[torch.float32], f"{backend}: prefill [0, {cut}), then steps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ring_leftovers_are_never_read(backend):
    """Finding 1, the ring's own view: a state whose every slot holds NaN (an earlier image's
    leftovers, as bad as they get) decodes new images, by prefill and by steps, exactly as a fresh
    one: a slot is read only after a token of the same image wrote it."""
    torch.manual_seed(2)
    lay = mk.ImageLayout.from_spans(2, 11, [(0, 0, 2, 3), (0, 7, 2, 2), (1, 1, 3, 3, 0, 7)])
    adapters = random_adapters(5, 4, 3, 2)
    x = torch.randn(2, 11, 5)
    truth = ground_truth(x, lay, *adapters)
    pos, height, width = lay.step_positions()
    for cut in (0, 2, 4, 8):
        st = mk.ConvLoRAState(2, 3, 2, max_width=3)
        st.pending.fill_(float("nan"))
        outs = []
        with torch.no_grad():
            if cut:
                outs.append(mk.moss_lora(x[:, :cut], lay.window(0, cut), *adapters, state=st, backend=backend))
            for t in range(cut, lay.seq_len):
                step = mk.moss_lora_step(x[:, t], *adapters, 1.0, st, pos[t], height[t], width[t], backend=backend)
                outs.append(step.unsqueeze(1))
        assert_close_rel(torch.cat(outs, 1), truth, TOLERANCE[torch.float32], f"{backend}, prefill [0, {cut})")


# ---------------------------------------------------------------------------- finding 2: NaN stays put
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_one_sequence_stays_in_it(backend):
    """Finding 2: a masked tap contributes nothing (not ``0 * x``): NaN/Inf in sequence 0's first
    image token leaves sequence 1 finite and exact, forward and backward (``dx``)."""
    torch.manual_seed(3)
    lay = mk.ImageLayout.from_spans(2, 9, [(0, 1, 2, 3), (1, 0, 3, 3)])
    ta, tb, w, ib = random_adapters(6, 5, 3, 2)
    x = torch.randn(2, 9, 6)
    truth = ground_truth(x, lay, ta, tb, w, ib)
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[0, 1, 0] = bad
        xb.requires_grad_(True)
        out = mk.moss_lora(xb, lay, ta, tb, w, ib, backend=backend)
        assert_close_rel(out[1], truth[1], TOLERANCE[torch.float32], f"{backend}: sequence 1 with {bad} in 0")
        grad = torch.zeros_like(out)
        grad[1] = torch.randn(9, 5)
        grad[0, 1] = bad  # the same in the upstream gradient of sequence 0
        out.backward(grad)
        assert torch.isfinite(xb.grad[1]).all(), f"{backend}: {bad} leaked into sequence 1's dx"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_one_decode_row_stays_in_it(backend):
    """Finding 2's relative in the step: NaN in row 0's input and ring leaves row 1 exact."""
    torch.manual_seed(4)
    ta, tb, w, ib = random_adapters(5, 4, 3, 2)
    x = torch.randn(3, 5)
    pos, h, wd = torch.tensor([4, -1, 5]), torch.tensor([3, 1, 3]), torch.tensor([3, 1, 3])
    st = mk.ConvLoRAState(3, 3, 2, max_width=3)
    st.pending[1:].normal_()
    clean = mk.ConvLoRAState(3, 3, 2, max_width=3)
    clean.pending.copy_(st.pending)
    st.pending[0] = float("nan")
    xb = x.clone()
    xb[0] = float("nan")
    with torch.no_grad():
        a = mk.moss_lora_step(xb, ta, tb, w, ib, 1.0, st, pos, h, wd, backend=backend)
        b = mk.moss_lora_step(x, ta, tb, w, ib, 1.0, clean, pos, h, wd, backend=backend)
    torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=0)
    torch.testing.assert_close(st.pending[1:], clean.pending[1:], rtol=0, atol=0)


# ---------------------------------------------------------------------------- finding 3: autocast
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_forward_and_backward(backend):
    """Finding 3: under ``torch.autocast`` (CPU bf16) every backend runs forward and backward and
    matches the same call without autocast (the ops compute from the dtypes they are given)."""
    torch.manual_seed(5)
    lay = mk.ImageLayout.from_spans(2, 8, [(0, 1, 2, 3), (1, 0, 2, 2)])
    adapters = [t.requires_grad_(True) for t in random_adapters(6, 5, 3, 2)]
    x = torch.randn(2, 8, 6, requires_grad=True)
    grad = torch.randn(2, 8, 5)

    def run(autocast):
        for t in (x, *adapters):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = mk.moss_lora(x, lay, *adapters, 0.5, backend=backend)
            out.backward(grad)
        return out.detach(), [t.grad.clone() for t in (x, *adapters)]

    plain, plain_grads = run(False)
    cast, cast_grads = run(True)
    assert_close_rel(cast, plain, TOLERANCE[torch.bfloat16], f"{backend} autocast forward")
    for g, ref, name in zip(cast_grads, plain_grads, ("x", "text_a", "text_b", "image_weight", "image_b")):
        assert_close_rel(g, ref, TOLERANCE[torch.bfloat16], f"{backend} autocast d{name}")


# ---------------------------------------------------------------------------- finding 4: step positions
_BAD_POSITIONS = [
    ((0, 0), (-1, 3), (-1, 3), "height"),  # height = width = -1 (finding 4)
    ((0, 0), (3, 0), (3, 3), "height"),  # a zero-height grid
    ((9, 0), (3, 3), (3, 3), "beyond the 3x3 image"),
    ((-2, 0), (3, 3), (3, 3), "image_pos"),
    ((0, 0), (2**62, 3), (2**62, 3), "capacity"),  # H*W overflows int64; the ring cannot fit
    ((2**62, 0), (3, 3), (2**61, 3), "capacity"),
]


@pytest.mark.parametrize("pos, height, width, message", _BAD_POSITIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_refuses_positions_outside_the_image(backend, pos, height, width, message):
    """Finding 4: one check of the step's positions for every backend, a ValueError naming it."""
    ta, tb, w, ib = random_adapters(4, 3, 2, 2)
    st = mk.ConvLoRAState(2, 2, 2, max_width=3)
    before = st.pending.clone()
    with pytest.raises(ValueError, match=message), torch.no_grad():
        mk.moss_lora_step(torch.randn(2, 4), ta, tb, w, ib, 1.0, st, torch.tensor(pos), torch.tensor(height),
                          torch.tensor(width), backend=backend)
    assert torch.equal(st.pending, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_kernels_leave_bad_rows_untouched(backend):
    """Findings 4 and 13: past the op's check, every backend's kernel leaves a row with a position
    outside its image, or a ring larger than the state, unchanged (nothing out of bounds) and
    computes the good rows."""
    from moss_kernels import backends

    if backend == "native":
        pytest.skip("the native CPU kernel refuses such rows itself (ValueError), checked below")
    torch.manual_seed(6)
    _, _, w, ib = random_adapters(4, 3, 2, 2)
    pending = torch.randn(4, 4, 2)
    before = pending.clone()
    pos = torch.tensor([0, 9, 1, 2])
    h, wd = torch.tensor([-1, 3, 2, 1]), torch.tensor([-1, 3, 9, 3])  # rows 0-2 bad, row 3 good
    x = torch.randn(4, 4)
    out = torch.zeros(4, 3)
    backends.get_backend(backend).decode_step(x, out, None, None, w, ib, 1.0, pending, pos, h, wd)
    assert torch.equal(out[:3], torch.zeros(3, 3)), "bad rows must get nothing"
    assert torch.equal(pending[:3], before[:3]), "bad rows' rings must stay as they were"
    assert out[3].abs().sum() > 0


def test_native_step_kernel_refuses_bad_rows():
    if "native" not in BACKENDS:
        pytest.skip("no native backend")
    from moss_kernels import backends

    _, _, w, ib = random_adapters(4, 3, 2, 2)
    for h, wd in ((-1, -1), (2**62, 2**62)):
        with pytest.raises(ValueError, match=r"image_pos|capacity"):
            backends.get_backend("native").decode_step(
                torch.randn(1, 4), torch.zeros(1, 3), None, None, w, ib, 1.0, torch.zeros(1, 4, 2),
                torch.tensor([0]), torch.tensor([h]), torch.tensor([wd]))


# ---------------------------------------------------------------------------- finding 6: rank 0
@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_zero_adapters_contribute_zero(backend):
    """Finding 6: a rank-0 adapter (image, text, both) is a correct zero contribution with
    zero-size gradients, forward and backward."""
    torch.manual_seed(7)
    lay = mk.ImageLayout.from_spans(2, 7, [(0, 1, 2, 2), (1, 0, 2, 3)])
    x = torch.randn(2, 7, 5, requires_grad=True)
    for r_text, r_image in ((3, 0), (0, 3), (0, 0)):
        ta, tb, _, _ = random_adapters(5, 4, r_text, 2)
        _, _, w, ib = random_adapters(5, 4, r_image, 2)
        ws = [t.requires_grad_(True) for t in (ta, tb, w, ib)]
        out = mk.moss_lora(x, lay, *ws, backend=backend)
        assert_close_rel(out, ground_truth(x, lay, *ws), TOLERANCE[torch.float32], f"{backend} r={r_text},{r_image}")
        out.backward(torch.randn_like(out))
        for t in ws:
            assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()
        x.grad = None


# ---------------------------------------------------------------------------- finding 7: huge sizes
@pytest.mark.parametrize("size", [2**63 - 1, 2**62, 2**31])
def test_layout_bounds_image_sides(size):
    """Finding 7: sides are bounded where the layout is built (ValueError naming the span), so no
    backend's raster arithmetic ever sees a size near 2^63."""
    with pytest.raises(ValueError, match=r"span #0 .*at most 2147483647"):
        mk.ImageLayout.from_spans(1, 5, [(0, 0, 1, size, 0, 4)])
    with pytest.raises(ValueError, match=r"span #0 .*at most 2147483647"):
        mk.ImageLayout.from_spans(1, 5, [(0, 0, size, 1, 0, 4)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_widest_allowed_image_is_exact(backend):
    """Finding 7: at the bound (width 2^31 - 1, k = 3) every backend's ``dx`` and output are right:
    a one-row image only sees its left neighbours, so a 1 x 5 grid is the ground truth."""
    torch.manual_seed(8)
    big = mk.ImageLayout.from_spans(1, 6, [(0, 1, 1, 2**31 - 1, 0, 5)])
    small = mk.ImageLayout.from_spans(1, 6, [(0, 1, 1, 5)])
    ws = [t.requires_grad_(True) for t in random_adapters(4, 3, 2, 3)]
    x = torch.randn(1, 6, 4, requires_grad=True)
    out = mk.moss_lora(x, big, *ws, backend=backend)
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    x64 = x.detach().double().requires_grad_(True)
    truth = mk.moss_lora(x64, small, *[t.detach().double() for t in ws], backend="reference")
    (dx64,) = torch.autograd.grad(truth, x64, torch.ones_like(truth))
    assert_close_rel(out, truth, TOLERANCE[torch.float32], f"{backend} output")
    assert_close_rel(dx, dx64, TOLERANCE[torch.float32], f"{backend} dx")


# ---------------------------------------------------------------------------- findings 8, 9: compile
def test_compile_fullgraph_inference_paths():
    """Findings 8 and 9: ``moss_lora(state=)``, ``moss_lora(out=)`` and ``moss_lora_step`` (CPU) trace
    with ``fullgraph=True`` and give the eager results."""
    torch.manual_seed(9)
    lay = mk.ImageLayout.from_spans(2, 6, [(0, 1, 2, 3), (1, 0, 2, 2, 0, 3)])
    adapters = random_adapters(5, 4, 3, 2)
    x = torch.randn(2, 6, 5)

    def prefill(x, st):
        return mk.moss_lora(x, lay, *adapters, 0.5, state=st)

    def accumulate(x, out):
        return mk.moss_lora(x, lay, *adapters, 0.5, out=out)

    def step(x, st, p, h, w):
        return mk.moss_lora_step(x, *adapters, 0.5, st, p, h, w)

    with torch.no_grad():
        st_e, st_c = (mk.ConvLoRAState(2, 3, 2, max_width=3) for _ in range(2))
        eager = prefill(x, st_e)
        got = torch.compile(prefill, fullgraph=True, backend="eager")(x, st_c)
        torch.testing.assert_close(got, eager)
        out = torch.randn(2, 6, 4)
        torch.testing.assert_close(torch.compile(accumulate, fullgraph=True, backend="eager")(x, out.clone()),
                                   accumulate(x, out.clone()))
        p, h, w = torch.tensor([3, 3]), torch.tensor([2, 2]), torch.tensor([3, 2])
        xs = torch.randn(2, 5)
        eager = step(xs, st_e, p, h, w)
        got = torch.compile(step, fullgraph=True, backend="eager")(xs, st_c, p, h, w)
        torch.testing.assert_close(got, eager)
        torch.testing.assert_close(st_c.pending, st_e.pending)
        with pytest.raises(RuntimeError, match="image_pos must be -1 or lie inside"):
            torch.compile(step, fullgraph=True, backend="eager")(xs, st_c, p, torch.tensor([-1, 2]),
                                                                 torch.tensor([-1, 2]))


# ---------------------------------------------------------------------------- finding 12: overlapping out
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_that_overlaps_is_refused(backend):
    """Finding 12: an ``out`` whose elements share memory, or that shares memory with ``x``, is
    refused (ValueError naming it) by every backend, for ``moss_lora`` and ``moss_lora_step``."""
    lay = mk.ImageLayout.from_spans(2, 4, [(0, 0, 2, 2)])
    adapters = random_adapters(4, 4, 2, 2)
    x = torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="out has elements that share memory"), torch.no_grad():
        mk.moss_lora(x, lay, *adapters, out=torch.zeros(1, 1, 4).expand(2, 4, 4), backend=backend)
    with pytest.raises(ValueError, match="out shares memory with x"), torch.no_grad():
        mk.moss_lora(x, lay, *adapters, out=x, backend=backend)
    st = mk.ConvLoRAState(2, 2, 2, max_width=2)
    args = (st, torch.tensor([0, -1]), torch.tensor([2, 1]), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="out has elements that share memory"), torch.no_grad():
        mk.moss_lora_step(x[:, 0], *adapters, 1.0, *args, out=torch.zeros(1, 4).expand(2, 4), backend=backend)
    xs = torch.randn(2, 4)
    with pytest.raises(ValueError, match="out shares memory with x"), torch.no_grad():
        mk.moss_lora_step(xs, *adapters, 1.0, *args, out=xs, backend=backend)
    # A strided but non-overlapping out is fine.
    big = torch.zeros(2, 4, 8)
    with torch.no_grad():
        mk.moss_lora(x, lay, *adapters, out=big[..., ::2], backend=backend)
    assert_close_rel(big[..., ::2], ground_truth(x, lay, *adapters), TOLERANCE[torch.float32])


# ---------------------------------------------------------------------------- d_in = 0
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_input_features_raise_naming_x(backend):
    lay = mk.ImageLayout.from_spans(1, 3, [(0, 0, 1, 2)])
    adapters = random_adapters(0, 3, 2, 2)
    with pytest.raises(ValueError, match=r"x must have at least one feature"):
        mk.moss_lora(torch.randn(1, 3, 0), lay, *adapters, backend=backend)
    st = mk.ConvLoRAState(1, 2, 2, max_width=2)
    with pytest.raises(ValueError, match=r"x must have at least one feature"):
        mk.moss_lora_step(torch.randn(1, 0), *adapters, 1.0, st, torch.tensor([0]), torch.tensor([1]),
                          torch.tensor([2]), backend=backend)


# ---------------------------------------------------------------------------- finding 14: bits across processes
_BITS_SCRIPT = r"""
import hashlib, sys
import torch
import moss_kernels as mk
from moss_kernels.testing import random_adapters

torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
d_in, d_out, r, S = 12, 10, 4, 20
ws = [t.to(device) for t in random_adapters(d_in, d_out, r, 2)]
xa, xb = torch.randn(1, S, d_in, device=device), 3 * torch.randn(1, S, d_in, device=device)
for backend in mk.available_backends(device):
    for n in (1, 3):  # sequence 0 alone, then beside two others
        lay = mk.ImageLayout.from_spans(n, S, [(b, 2 + 3 * b, 3, 5) for b in range(n)])
        x = torch.cat([xa] + [xb] * (n - 1)).requires_grad_(True)
        out = mk.moss_lora(x, lay, *ws, 0.5, backend=backend)
        out.backward(torch.ones_like(out))
        st = mk.ConvLoRAState(n, r, 2, device=device, max_width=5)
        pos, h, w = (t.to(device) for t in lay.step_positions())
        with torch.no_grad():
            steps = torch.stack([mk.moss_lora_step(x[:, t].detach(), *ws, 0.5, st, pos[t], h[t], w[t],
                                                   backend=backend) for t in range(S)], 1)
        blob = b"".join(t[0].detach().cpu().numpy().tobytes() for t in (out, x.grad, steps))
        print(backend, n, hashlib.sha256(blob).hexdigest())
"""


def test_bits_do_not_depend_on_the_process_or_the_batch():
    """Finding 14: a sequence's output, ``dx`` and decode steps are the same bits in two processes
    (different thread counts) and, on the fast backends, whatever else is in the batch (reduction
    order fixed by shapes alone: pinned Triton configs, one native path per shape class). On a GPU
    this runs the CUDA backends."""
    import os
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _BITS_SCRIPT, str(threads)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ)) for threads in (1, 2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    lines = [sorted(line for line in out.split("\n") if line) for out in outs]
    assert lines[0] == lines[1], "two processes computed different bits"
    by_backend = {}
    for line in lines[0]:
        backend, _, digest = line.split()
        by_backend.setdefault(backend, set()).add(digest)
    assert set(by_backend) == set(BACKENDS)
    on_gpu = torch.cuda.is_available()
    for backend, digests in by_backend.items():
        if backend == "reference" or (backend == "native" and not on_gpu):
            # These call torch's CPU BLAS, which picks its kernels by the number of rows (a GEMV for
            # one): their bits are fixed per process and batch, not across batch compositions.
            continue
        assert len(digests) == 1, f"{backend}: sequence 0's bits depend on the rest of the batch"


def test_native_binding_refuses_overlapping_out():
    """Finding 12 at the raw binding too (it is reachable without the Python checks)."""
    if "native" not in BACKENDS:
        pytest.skip("no native backend")
    from moss_kernels.native import extension

    _, _, w, ib = random_adapters(4, 4, 2, 2)
    x = torch.randn(2, 4)
    pos, h, wd = torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([2, 2])
    with pytest.raises(ValueError, match="'out' has elements that share memory"):
        extension.decode_step(x, torch.zeros(1, 4).expand(2, 4), None, None, w, ib, 1.0, torch.zeros(2, 3, 2),
                              pos, h, wd)
    with pytest.raises(ValueError, match="'out' shares memory with x"):
        extension.decode_step(x, x, None, None, w, ib, 1.0, torch.zeros(2, 3, 2), pos, h, wd)


# ---------------------------------------------------------------------------- GPU-only relatives
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("backend", [b for b in ("native", "triton") if b in mk.available_backends("cuda")]
                         if torch.cuda.is_available() else [])
def test_gpu_hostile_cases(backend):
    """Findings 5, 10 and 11 where they live, on a GPU: float16 whose rank-space sums pass 65504
    stays finite and right; mixed dtypes compute in float32 (1e-5); a row-strided ``out`` of the
    decode step is written at its own stride."""
    dev = "cuda"
    lay = mk.ImageLayout.from_spans(1, 6, [(0, 0, 2, 3)])
    d = 64
    ta = torch.full((4, d), 0.25, device=dev, dtype=torch.float16)
    tb = torch.full((8, 4), 1 / 160, device=dev, dtype=torch.float16)
    w = torch.full((4, d, 2, 2), 0.25, device=dev, dtype=torch.float16)
    x = torch.full((1, 6, d), 2000.0, device=dev, dtype=torch.float16)
    got = mk.moss_lora(x, lay, ta, tb, w, tb, backend=backend)
    truth = ground_truth(x, lay, ta, tb, w, tb)
    assert_close_rel(got, truth, TOLERANCE[torch.float16], f"{backend} float16 past 65504")
    torch.manual_seed(0)
    for xd, wd in ((torch.float32, torch.float16), (torch.bfloat16, torch.float32)):
        ws = [t.to(dev, wd) for t in random_adapters(32, 16, 300, 2)]
        xm = torch.randn(1, 6, 32, device=dev, dtype=xd)
        truth = ground_truth(xm, lay, *ws)
        tol = TOLERANCE[torch.float32] if xd == torch.float32 else TOLERANCE[xd]
        assert_close_rel(mk.moss_lora(xm, lay, *ws, backend=backend), truth, tol, f"{backend} mixed {xd}/{wd}")
    ws = [t.to(dev) for t in random_adapters(8, 6, 3, 2)]
    xs = torch.randn(2, 8, device=dev)
    args = (torch.tensor([0, -1], device=dev), torch.tensor([2, 1], device=dev), torch.tensor([3, 1], device=dev))
    want = torch.zeros(2, 6, device=dev)
    from moss_kernels import backends
    from moss_kernels.reference import decode_step

    decode_step(xs, want, *ws, 1.0, torch.zeros(2, 4, 3, device=dev), *args)
    base = torch.zeros(2, 12, device=dev)
    out = base[:, :6]  # row stride 12: the raw kernels must not address row b at b * d_out
    backends.get_backend(backend).decode_step(xs, out, *ws, 1.0, torch.zeros(2, 4, 3, device=dev), *args)
    assert torch.equal(base[:, 6:], torch.zeros(2, 6, device=dev))
    assert_close_rel(out, want, TOLERANCE[torch.float32], f"{backend} strided out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_sums_and_mixed_dtypes_on_the_cpu(backend):
    """Findings 5 and 10 on the CPU backends (Triton under its interpreter, whose float16 ``dot`` is
    honoured): float16 inputs whose rank-space sums pass 65504 stay finite and right, and float32 ``x``
    with float16 weights computes with float32 operands (1e-5) in the forward at r = 300 (Triton's
    two-launch expansion) and in ``dx`` (Triton's backward expansion)."""
    lay = mk.ImageLayout.from_spans(1, 6, [(0, 0, 2, 3)])
    d = 64
    ta = torch.full((4, d), 0.25, dtype=torch.float16)
    tb = torch.full((8, 4), 1 / 160, dtype=torch.float16)
    w = torch.full((4, d, 2, 2), 0.25, dtype=torch.float16)
    x = torch.full((1, 6, d), 2000.0, dtype=torch.float16)
    got = mk.moss_lora(x, lay, ta, tb, w, tb, backend=backend)
    truth = ground_truth(x, lay, ta, tb, w, tb)
    assert_close_rel(got, truth, TOLERANCE[torch.float16], f"{backend} float16 past 65504")
    torch.manual_seed(0)
    ws = [t.to(torch.float16) for t in random_adapters(32, 16, 300, 2)]
    xm = torch.randn(1, 6, 32, dtype=torch.float64)
    truth = ground_truth(xm, lay, *ws)
    xm = xm.float().requires_grad_()
    got = mk.moss_lora(xm, lay, *ws, backend=backend)
    assert_close_rel(got, truth, TOLERANCE[torch.float32], f"{backend} mixed float32 x / float16 weights")
    grad = torch.randn_like(got)
    (dx,) = torch.autograd.grad(got, xm, grad)
    x64 = xm.detach().double().requires_grad_()
    truth64 = literal_moss_lora(x64, lay, *(t.double() for t in ws), 1.0)
    (dx_truth,) = torch.autograd.grad(truth64, x64, grad.double())
    assert_close_rel(dx, dx_truth, TOLERANCE[torch.float32], f"{backend} mixed dtypes, dx")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_output_features_raise_naming_the_weight(backend):
    """d_in = 0's relative: ``d_out = 0`` is a ValueError naming the up weight (it crashed the native
    CPU step with an integer division by zero, SIGFPE)."""
    lay = mk.ImageLayout.from_spans(1, 3, [(0, 0, 1, 2)])
    adapters = random_adapters(4, 0, 2, 2)
    with pytest.raises(ValueError, match=r"text_b must have at least one output row"):
        mk.moss_lora(torch.randn(1, 3, 4), lay, *adapters, backend=backend)
    st = mk.ConvLoRAState(1, 2, 2, max_width=2)
    with pytest.raises(ValueError, match=r"image_b must have at least one output row"):
        mk.moss_lora_step(torch.randn(1, 4), None, None, *adapters[2:], 1.0, st, torch.tensor([0]),
                          torch.tensor([1]), torch.tensor([2]), backend=backend)
