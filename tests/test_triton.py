"""The Triton backend against the float64 ground truth and the reference backend.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set here before
Triton is imported): the same kernel code, block by block in NumPy, with small shapes. There bfloat16
is computed with float32 MMAs (the interpreter's bf16 ``dot`` is wrong); the bf16 tensor-core path,
autotuning and full-size shapes run only in the tests marked for CUDA.
"""

import importlib
import os
import random
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere below

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

import moss_kernels as mk  # noqa: E402
from moss_kernels import backends  # noqa: E402
from moss_kernels.layout import ImageLayout  # noqa: E402
from moss_kernels.testing import TOLERANCE, assert_close_rel, ground_truth, random_adapters, random_layout  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (full sizes, bf16 tensor cores, autotuning)")


def _triton_package():
    """The backend module, rebuilt as interpreter kernels if an earlier import decorated them compiled."""
    import moss_kernels.triton_kernels as tk

    if not CUDA and not tk.INTERPRETED:
        for name in ("_common", "forward", "backward", "decode"):
            importlib.reload(importlib.import_module(f"moss_kernels.triton_kernels.{name}"))
        tk = importlib.reload(tk)
    return tk


TK = _triton_package()
FWD = importlib.import_module("moss_kernels.triton_kernels.forward")
DEC = importlib.import_module("moss_kernels.triton_kernels.decode")


@pytest.fixture(params=["one-slice", "many-slices"])
def decode_mode(request, monkeypatch):
    """Both ends of the decode split: one program per rank block (the whole of ``d_in``), and ``d_in``
    cut into as many slices as it allows (partial sums reduced across slices)."""
    target = 1 if request.param == "one-slice" else 10**4
    monkeypatch.setattr(DEC, "program_target", lambda device: target)
    return request.param


def _case(seed, dtype=torch.float32, k=2, B=None, S=None, d_in=19, d_out=23, r=5, text=True, image=True,
          weight_dtype=None):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lay = random_layout(rng, batch_size=B, seq_len=S)
    x = torch.randn(lay.batch_size, lay.seq_len, d_in, generator=g).to(DEVICE, dtype)
    ad = random_adapters(d_in, d_out, r, k, dtype=weight_dtype or dtype, generator=g, text=text, image=image)
    return lay, x, tuple(None if t is None else t.to(DEVICE) for t in ad)


def _tol(dtype):
    return TOLERANCE[dtype]


# ---------------------------------------------------------------------------- registration
def test_registered_and_listed_for_this_device():
    assert "triton" in backends.available_backends(DEVICE), backends.backend_problems()
    be = backends.get_backend("triton")
    assert isinstance(be, TK.TritonBackend)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert be.supports(torch.device(DEVICE), dt, 2)
    assert not be.supports(torch.device(DEVICE), torch.float64, 2)
    with pytest.raises(ValueError, match="does not compute"):
        mk.moss_lora(torch.zeros(1, 2, 3, dtype=torch.float64, device=DEVICE), ImageLayout.text_only(1, 2),
                     torch.zeros(1, 3, dtype=torch.float64, device=DEVICE),
                     torch.zeros(2, 1, dtype=torch.float64, device=DEVICE), None, None, backend="triton")


# ---------------------------------------------------------------------------- forward
FORWARD_CASES = [(seed, k, dt) for seed, k in [(0, 1), (1, 2), (2, 2), (3, 3)]
                 for dt in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("seed,k,dtype", FORWARD_CASES)
def test_forward_matches_ground_truth_and_reference(seed, k, dtype):
    lay, x, ad = _case(seed, dtype, k)
    got = mk.moss_lora(x, lay, *ad, scale=0.7, backend="triton")
    assert got.dtype == dtype and got.shape == (*x.shape[:2], 23)
    assert_close_rel(got, ground_truth(x, lay, *ad, scale=0.7), _tol(dtype), "vs ground truth")
    assert_close_rel(got, mk.moss_lora(x, lay, *ad, scale=0.7, backend="reference"), _tol(dtype), "vs reference")


def test_every_layout_shape():
    """1xW and Hx1 grids, 1x1, several images a row, text between, images cut by the sequence end."""
    spans = [(0, 0, 1, 5), (0, 5, 3, 1), (0, 9, 1, 1), (0, 11, 3, 4), (1, 2, 4, 3), (1, 14, 2, 2),
             (1, 19, 5, 5)]  # the last is cut at the end of the 24-token sequence
    lay = ImageLayout.from_spans(2, 24, spans)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 24, 17, generator=g).to(DEVICE)
    for k in (1, 2, 3):
        ad = tuple(t.to(DEVICE) for t in random_adapters(17, 9, 3, k, generator=g))
        got = mk.moss_lora(x, lay, *ad, scale=1.3, backend="triton")
        assert_close_rel(got, ground_truth(x, lay, *ad, scale=1.3), 1e-5, f"k={k}")


@pytest.mark.parametrize("text,image", [(True, False), (False, True)])
def test_one_adapter_alone(text, image):
    lay, x, ad = _case(6, text=text, image=image)
    got = mk.moss_lora(x, lay, *ad, scale=0.5, backend="triton")
    assert_close_rel(got, ground_truth(x, lay, *ad, scale=0.5), 1e-5)
    if image:
        assert_close_rel(mk.conv_lora(x, lay, ad[2], ad[3], 0.5, backend="triton"), got, 0.0, "conv_lora")


def test_layouts_without_text_or_without_images():
    g = torch.Generator().manual_seed(7)
    ad = tuple(t.to(DEVICE) for t in random_adapters(11, 6, 4, 2, generator=g))
    for lay in (ImageLayout.text_only(2, 9), ImageLayout.from_spans(2, 6, [(0, 0, 2, 3), (1, 0, 3, 2)])):
        x = torch.randn(2, lay.seq_len, 11, generator=g).to(DEVICE)
        assert_close_rel(mk.moss_lora(x, lay, *ad, scale=0.9, backend="triton"), ground_truth(x, lay, *ad, scale=0.9),
                         1e-5, repr(lay))


def test_large_rank_takes_the_two_launch_path():
    """r = 260 pads to 512 > FUSE_MAX_R: rank split over programs, expansion in a second launch."""
    assert FWD.pow2(260) > FWD.FUSE_MAX_R
    lay, x, ad = _case(8, d_in=9, d_out=11, r=260)
    got = mk.moss_lora(x, lay, *ad, scale=0.25, backend="triton")
    assert_close_rel(got, ground_truth(x, lay, *ad, scale=0.25), 1e-5)


def test_rank_one_and_mixed_weight_dtype():
    lay, x, ad = _case(9, r=1)
    assert_close_rel(mk.moss_lora(x, lay, *ad, backend="triton"), ground_truth(x, lay, *ad), 1e-5, "r=1")
    lay, x, ad = _case(10, dtype=torch.float16, weight_dtype=torch.float32)
    assert_close_rel(mk.moss_lora(x, lay, *ad, backend="triton"), ground_truth(x, lay, *ad), 1e-2, "fp16 x, fp32 W")


def test_strided_rows_and_out_accumulates_in_place():
    lay, x_full, _ = _case(11, d_in=25)
    x = x_full[..., 3:22]  # rows 25 apart, 19 wide: read in place, never copied
    assert x.stride(1) == 25
    ad = tuple(t.to(DEVICE) for t in random_adapters(19, 23, 5, 2, generator=torch.Generator().manual_seed(11)))
    base = torch.randn(*x.shape[:2], 23, device=DEVICE)
    y = base.clone()
    with torch.no_grad():
        got = mk.moss_lora(x, lay, *ad, scale=0.4, out=y, backend="triton")
    assert got is y
    assert_close_rel(y - base, ground_truth(x, lay, *ad, scale=0.4), 1e-5)


def test_backend_forward_returns_the_rank_space_intermediates():
    lay, x, (ta, tb, w, ib) = _case(12, k=2)
    idx = lay.index(DEVICE, 2)
    flat = x.view(-1, x.shape[-1])
    outs, saved = [], []
    for name in ("triton", "reference"):
        out = torch.zeros(flat.shape[0], 23, device=DEVICE)
        saved.append(backends.get_backend(name).forward(flat, out, idx.text_rows, idx.image_rows, idx.conv_sources,
                                                         ta, tb, w, ib, 0.5))
        outs.append(out)
    (th, iz), (th_ref, iz_ref) = saved
    assert th.dtype == iz.dtype == torch.float32
    assert_close_rel(th, th_ref, 1e-5, "text_h")
    assert_close_rel(iz, iz_ref, 1e-5, "image_z")
    assert_close_rel(outs[0], outs[1], 1e-5, "out")


# ---------------------------------------------------------------------------- backward
def _grads(lay, x, ad, backend, g, scale=0.6):
    xs = x.detach().clone().requires_grad_()
    ws = [None if t is None else t.detach().clone().requires_grad_() for t in ad]
    mk.moss_lora(xs, lay, *ws, scale=scale, backend=backend).backward(g)
    return [xs.grad] + [None if t is None else t.grad for t in ws]


def _literal_grads(lay, x, ad, g, scale=0.6):
    xs = x.detach().double().requires_grad_()
    ws = [None if t is None else t.detach().double().requires_grad_() for t in ad]
    mk.reference.literal_moss_lora(xs, lay, *ws, scale).backward(g.double())
    # A weight the layout never uses (no image tokens) gets no grad from autograd: zero.
    return [xs.grad] + [None if t is None else torch.zeros_like(t) if t.grad is None else t.grad for t in ws]


@pytest.mark.parametrize("seed,k,dtype", [(20, 1, torch.float32), (21, 2, torch.float32), (22, 3, torch.float32),
                                          (23, 2, torch.float16), (24, 2, torch.bfloat16)])
def test_gradients_match_literal_and_reference(seed, k, dtype):
    lay, x, ad = _case(seed, dtype, k)
    g = torch.randn(*x.shape[:2], 23, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    got = _grads(lay, x, ad, "triton", g)
    ref = _grads(lay, x, ad, "reference", g)
    lit = _literal_grads(lay, x, ad, g)
    for name, a, b, c, like in zip(("x", "text_a", "text_b", "image_weight", "image_b"), got, ref, lit, (x, *ad)):
        assert a.dtype == like.dtype and a.shape == like.shape, name
        assert_close_rel(a, c, _tol(dtype), f"d{name} vs literal")
        assert_close_rel(a, b, _tol(dtype), f"d{name} vs reference")


@pytest.mark.parametrize("text,image", [(True, False), (False, True)])
def test_gradients_of_one_adapter_and_uncovered_rows_are_zero(text, image):
    """With one adapter the other modality's rows of dx must be exactly zero (written, not left)."""
    lay, x, ad = _case(25, text=text, image=image)
    g = torch.randn(*x.shape[:2], 23, generator=torch.Generator().manual_seed(25)).to(DEVICE)
    got, lit = _grads(lay, x, ad, "triton", g), _literal_grads(lay, x, ad, g)
    for a, c in zip(got, lit):
        assert (a is None) == (c is None)
        if a is not None:
            assert_close_rel(a, c, 1e-5)
    mask = lay.image_mask(DEVICE)
    assert (got[0][mask if text else ~mask] == 0).all()


def test_backward_writes_every_output_element():
    """Outputs allocated uninitialised are filled with NaN here: a missed element would show."""
    lay, x, ad = _case(26, k=2)
    g = torch.randn(*x.shape[:2], 23, generator=torch.Generator().manual_seed(26)).to(DEVICE)
    old = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        got = _grads(lay, x, ad, "triton", g)
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]
    for a, c in zip(got, _literal_grads(lay, x, ad, g)):
        assert_close_rel(a, c, 1e-5)


def test_needs_x_false_skips_dx():
    lay, x, (ta, tb, w, ib) = _case(27)
    idx = lay.index(DEVICE, 2)
    flat = x.view(-1, x.shape[-1])
    be = backends.get_backend("triton")
    out = torch.zeros(flat.shape[0], 23, device=DEVICE)
    th, iz = be.forward(flat, out, idx.text_rows, idx.image_rows, idx.conv_sources, ta, tb, w, ib, 0.5)
    grads = be.backward(torch.ones_like(out), flat, idx.text_rows, idx.image_rows, idx.conv_targets, ta, tb, w, ib,
                        th, iz, 0.5, False)
    assert grads[0] is None and all(gr is not None for gr in grads[1:])


def test_deterministic_bits():
    lay, x, ad = _case(28, k=2)
    g = torch.randn(*x.shape[:2], 23, generator=torch.Generator().manual_seed(28)).to(DEVICE)
    runs = [(mk.moss_lora(x, lay, *ad, backend="triton"), _grads(lay, x, ad, "triton", g)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- state: chunked prefill
@pytest.mark.parametrize("seed,k,dtype", [(30, 2, torch.float32), (31, 3, torch.float32), (32, 2, torch.float16),
                                          (33, 1, torch.float32)])
def test_chunked_prefill_with_state_equals_full_forward(seed, k, dtype):
    rng = random.Random(seed)
    lay, x, ad = _case(seed, dtype, k, S=36)
    cuts = sorted(rng.sample(range(1, 36), 4))
    chunks = list(zip([0, *cuts], [*cuts, 36]))
    outs, states = {}, {}
    with torch.no_grad():
        for name in ("triton", "reference"):
            st = mk.ConvLoRAState(lay.batch_size, 5, k, device=DEVICE, max_width=lay.max_width)
            outs[name] = torch.cat([mk.moss_lora(x[:, a:b], lay.window(a, b), *ad, scale=0.8, state=st,
                                                 backend=name) for a, b in chunks], dim=1)
            states[name] = st.pending
    assert_close_rel(outs["triton"], ground_truth(x, lay, *ad, scale=0.8), _tol(dtype), "chunked vs full")
    assert_close_rel(outs["triton"], outs["reference"], _tol(dtype), "vs reference backend")
    assert_close_rel(states["triton"], states["reference"], _tol(dtype), "pending sums")


def test_state_slots_not_kept_are_overwritten_not_read():
    """Pending slots start as NaN: every slot this backend reads was written by an earlier chunk, and
    slots it writes without ``write_keep`` are overwritten, so nothing of the NaN may leak."""
    lay = ImageLayout.from_spans(2, 30, [(0, 2, 4, 5), (0, 24, 3, 3), (1, 0, 6, 4)])
    g = torch.Generator().manual_seed(34)
    x = torch.randn(2, 30, 13, generator=g).to(DEVICE)
    ad = tuple(t.to(DEVICE) for t in random_adapters(13, 7, 4, 2, generator=g))
    results = []
    with torch.no_grad():
        for poison in (False, True):
            st = mk.ConvLoRAState(2, 4, 2, device=DEVICE, max_width=5)
            if poison:
                st.pending.fill_(float("nan"))
            results.append(torch.cat([mk.moss_lora(x[:, a:b], lay.window(a, b), *ad, state=st, backend="triton")
                                      for a, b in [(0, 9), (9, 17), (17, 30)]], dim=1))
    assert torch.isfinite(results[1]).all()
    assert torch.equal(results[0], results[1])
    assert_close_rel(results[0], ground_truth(x, lay, *ad), 1e-5)


# ---------------------------------------------------------------------------- decode step
def _positions(layout: ImageLayout, s: int):
    """Per sequence at position ``s``: (image token index or -1, height, width) as device tensors."""
    pos, hgt, wid = [-1] * layout.batch_size, [1] * layout.batch_size, [1] * layout.batch_size
    for sp in layout.spans:
        if sp.start <= s < sp.start + sp.length:
            pos[sp.batch], hgt[sp.batch], wid[sp.batch] = sp.offset + s - sp.start, sp.height, sp.width
    return tuple(torch.tensor(v, dtype=torch.int64, device=DEVICE) for v in (pos, hgt, wid))


@pytest.mark.parametrize("seed,k,dtype,text,image", [
    (40, 2, torch.float32, True, True), (41, 3, torch.float32, True, True), (42, 1, torch.float32, True, True),
    (43, 2, torch.float16, True, True), (44, 2, torch.float32, False, True), (45, 2, torch.float32, True, False),
])
def test_prefill_then_decode_matches_full_forward_and_reference_step(seed, k, dtype, text, image, decode_mode):
    lay, x, ad = _case(seed, dtype, k, B=3, S=26, text=text, image=image)
    prefill = 9
    truth = ground_truth(x, lay, *ad, scale=0.6)
    steps, pend = {}, {}
    with torch.no_grad():
        for name in ("triton", "reference"):
            st = mk.ConvLoRAState(3, 5, k, device=DEVICE, max_width=max(lay.max_width, 1))
            if image:
                mk.moss_lora(x[:, :prefill], lay.window(0, prefill), *ad, scale=0.6, state=st, backend=name)
            outs = []
            for s in range(prefill, lay.seq_len):
                outs.append(mk.moss_lora_step(x[:, s], *ad, 0.6, st if image else None, *_positions(lay, s),
                                              backend=name))
            steps[name], pend[name] = torch.stack(outs, dim=1), st.pending
    assert_close_rel(steps["triton"], truth[:, prefill:], _tol(dtype), "steps vs full forward")
    assert_close_rel(steps["triton"], steps["reference"], _tol(dtype), "vs reference step")
    if image and k > 1:
        assert_close_rel(pend["triton"], pend["reference"], _tol(dtype), "pending sums")


def test_decode_step_adds_into_out_and_handles_strided_x_and_large_batch(decode_mode):
    """More sequences than one pass holds (BLOCK_B = 16), rows of x read with a stride, rank > one rank block."""
    B, W, H = 21, 3, 3
    g = torch.Generator().manual_seed(46)
    ad = tuple(t.to(DEVICE) for t in random_adapters(10, 8, 40, 2, generator=g))
    sts = {n: mk.ConvLoRAState(B, 40, 2, device=DEVICE, max_width=W) for n in ("triton", "reference")}
    hw = torch.full((B,), H, device=DEVICE), torch.full((B,), W, device=DEVICE)
    start = torch.randint(-3, 2, (B,), generator=g).to(DEVICE)  # some sequences begin with text
    for step in range(H * W + 1):
        p = start + step
        pos = torch.where((p >= 0) & (p < H * W), p, -1)
        xs = torch.randn(B, 16, generator=g).to(DEVICE)[:, 2:12]
        base = torch.randn(B, 8, generator=g).to(DEVICE)
        got = {n: mk.moss_lora_step(xs, *ad, 0.3, sts[n], pos, *hw, out=base.clone(), backend=n) for n in sts}
        assert_close_rel(got["triton"], got["reference"], 1e-5, f"step {step}")
        assert_close_rel(sts["triton"].pending, sts["reference"].pending, 1e-5, f"state after step {step}")


def test_compiles_fullgraph_through_the_custom_ops():
    lay, x, ad = _case(47)
    xs = x.clone().requires_grad_()
    f = torch.compile(lambda inp: mk.moss_lora(inp, lay, *ad, scale=0.5, backend="triton"), fullgraph=True,
                      backend="aot_eager")
    out = f(xs)
    assert_close_rel(out, ground_truth(x, lay, *ad, scale=0.5), 1e-5, "compiled forward")
    out.square().sum().backward()
    want = _literal_grads(lay, x, ad, 2 * ground_truth(x, lay, *ad, scale=0.5).float(), 0.5)[0]
    assert_close_rel(xs.grad, want, 1e-5, "compiled backward")


def test_every_kernel_compiles_for_hopper_without_spilling():
    """The interpreter is lenient about types; this compiles each kernel (first config) for sm_90 with
    Triton's own ptxas, no GPU needed, and checks the cubin's stack (spills) is empty."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "moss_kernels.triton_kernels.resources", "--arch", "90", "--quick",
                          "--rank", "64"], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode and ("ptxas" in run.stderr or "cuobjdump" in run.stderr) and "No such file" in run.stderr:
        pytest.skip(f"Triton's CUDA toolchain is not installed: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("sm_90")]
    assert len(lines) == 6, run.stdout
    for line in lines:
        assert " stack     0 " in line, line


def test_decode_step_large_rank(decode_mode):
    """r = 260: a partial last rank block in the shrink (17 blocks of 16) and in the ring (9 tiles of 32)."""
    B, W, H = 3, 2, 2
    g = torch.Generator().manual_seed(48)
    ad = tuple(t.to(DEVICE) for t in random_adapters(6, 5, 260, 2, generator=g))
    sts = {n: mk.ConvLoRAState(B, 260, 2, device=DEVICE, max_width=W) for n in ("triton", "reference")}
    hw = torch.full((B,), H, device=DEVICE), torch.full((B,), W, device=DEVICE)
    for step in range(H * W):
        pos = torch.tensor([step, -1, step], device=DEVICE)
        x = torch.randn(B, 6, generator=g).to(DEVICE)
        got = {n: mk.moss_lora_step(x, *ad, 0.5, sts[n], pos, *hw, backend=n) for n in sts}
        assert_close_rel(got["triton"], got["reference"], 1e-5, f"step {step}")
        assert_close_rel(sts["triton"].pending, sts["reference"].pending, 1e-5, f"state after step {step}")


# ---------------------------------------------------------------------------- GPU sizes
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_full_size_forward_backward(dtype):
    """Chameleon-like shapes (32x32 grids, r = 256), scaled to fit a test: tensor-core paths and autotuning."""
    spans = [(b, 3 + 1100 * i, 32, 32) for b in range(2) for i in range(2)]
    lay = ImageLayout.from_spans(2, 2300, spans)
    g = torch.Generator().manual_seed(50)
    x = torch.randn(2, 2300, 1000, generator=g).to(DEVICE, dtype)
    ad = tuple(t.to(DEVICE) for t in random_adapters(1000, 1500, 256, 2, dtype=dtype, generator=g))
    gr = torch.randn(2, 2300, 1500, generator=g).to(DEVICE, dtype)
    got = mk.moss_lora(x, lay, *ad, scale=1.0, backend="triton")
    assert_close_rel(got, ground_truth(x, lay, *ad), _tol(dtype), "forward")
    for a, c in zip(_grads(lay, x, ad, "triton", gr, 1.0), _literal_grads(lay, x, ad, gr, 1.0)):
        assert_close_rel(a, c, _tol(dtype), "gradient")


@cuda_only
def test_gpu_offsets_past_2_to_the_31():
    """tokens * d_in > 2^31: every row offset must be 64-bit (rows near the end are checked)."""
    S, d_in, tail = 2_200_000, 1024, 48
    assert S * d_in > 2**31
    lay = ImageLayout.from_spans(1, S, [(0, S - 30, 4, 5), (0, 5, 2, 2)])
    g = torch.Generator().manual_seed(52)
    x = torch.randn(1, S, d_in, dtype=torch.bfloat16, device=DEVICE)
    ad = tuple(t.to(DEVICE, torch.bfloat16) for t in random_adapters(d_in, 16, 8, 2, generator=g))
    got = mk.moss_lora(x, lay, *ad, backend="triton")[:, -tail:]
    want = ground_truth(x[:, -tail:], ImageLayout.from_spans(1, tail, [(0, tail - 30, 4, 5)]), *ad)
    assert_close_rel(got, want, 1e-2)
    del x, got


@cuda_only
def test_gpu_decode_step_is_graph_capturable(decode_mode):
    B, W = 8, 32
    g = torch.Generator().manual_seed(51)
    ad = tuple(t.to(DEVICE, torch.bfloat16) for t in random_adapters(512, 384, 64, 2, generator=g))
    st = mk.ConvLoRAState(B, 64, 2, device=DEVICE, max_width=W)
    ref = mk.ConvLoRAState(B, 64, 2, device=DEVICE, max_width=W)
    x = torch.randn(B, 512, device=DEVICE, dtype=torch.bfloat16)
    pos = torch.zeros(B, dtype=torch.int64, device=DEVICE)
    hw = torch.full((B,), W, device=DEVICE), torch.full((B,), W, device=DEVICE)
    out = torch.zeros(B, 384, device=DEVICE, dtype=torch.bfloat16)
    mk.moss_lora_step(x, *ad, 1.0, st, pos, *hw, out=out, backend="triton")  # warm up (autotune) outside
    st.pending.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mk.moss_lora_step(x, *ad, 1.0, st, pos, *hw, out=out, backend="triton")
    for step in range(40):
        x.copy_(torch.randn(B, 512, device=DEVICE))
        pos.fill_(step)
        out.zero_()
        graph.replay()
        want = mk.moss_lora_step(x, *ad, 1.0, ref, pos, *hw, backend="reference")
        assert_close_rel(out, want, 1e-2, f"step {step}")
