"""The Triton kernels of ``ms_deform_attn`` / ``mmfs_attn`` (run under the interpreter on the CPU).

Ground truth: float64 ``F.grid_sample`` (MMFS.md §c.1), built here and independent of every backend;
gradients by autograd through it. Also checked against the reference backend, for determinism of
``grad_value`` (bitwise, across launch orders and thread counts) and for NaN locations. Shapes are
small (the interpreter runs each program in Python); budget about 60 s on 2 cores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moss_kernels as mk
from moss_kernels import backends
from moss_kernels.testing import rel_err

pytestmark = pytest.mark.skipif("triton" not in backends.available_backends("cpu"),
                                reason=f"Triton backend unavailable: {backends.backend_problems().get('triton')}")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}
# Non-square and 1 x W / H x 1 levels.
SHAPES = [(3, 5), (1, 4), (4, 1), (2, 2)]


def _kernels():
    from moss_kernels.triton_kernels import deform_attn

    return deform_attn


# ---------------------------------------------------------------------------------------------- ground truth
def truth_msda(value, shapes, loc, attn):
    """float64 ``grid_sample`` per level, accumulated level by level (MMFS.md §c.1)."""
    value, loc, attn = value.double(), loc.double(), attn.double()
    N, _, H, D = value.shape
    Lq, P = loc.shape[1], loc.shape[4]
    out = torch.zeros(N * H, D, Lq, dtype=torch.float64)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(N * H, D, h, w)
        grid = (2 * loc[:, :, :, lvl] - 1).transpose(1, 2).reshape(N * H, Lq, P, 2)
        s = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (NH, D, Lq, P)
        a = attn[:, :, :, lvl].transpose(1, 2).reshape(N * H, 1, Lq, P)
        out = out + (s * a).sum(-1)
        start += h * w
    return out.view(N, H, D, Lq).permute(0, 3, 1, 2).reshape(N, Lq, H * D)


def truth_mmfs(value, shapes, ref, off, logits, mask, kappa, sink):
    """float64 MMFS from the generic truth: tiled levels, -inf for invisible entries, a ``log(sink)``
    column, one softmax per (n, q, h) (MMFS.md §c.2 "Ground truth")."""
    N, M, S, H, D = value.shape
    L, P = logits.shape[4], logits.shape[5]
    kappa = kappa.double()
    loc = ref.double()[:, :, None, None, None, None, :] + off.double()[:, :, :, :, None] * kappa[:, None, :]
    z = logits.double().masked_fill(~mask[:, :, None, :, None, None], -math.inf).flatten(3)
    if sink > 0:
        z = torch.cat([z, torch.full_like(z[..., :1], math.log(sink))], -1)
    a = torch.softmax(z, -1).nan_to_num(0.0)[..., :M * L * P].reshape(N, -1, H, M * L, P)
    return truth_msda(value.reshape(N, M * S, H, D), list(shapes) * M, loc.flatten(3, 4), a)


def _levels(shapes):
    t = torch.tensor(shapes, dtype=torch.int64)
    sizes = t.prod(-1)
    return t, sizes.cumsum(0) - sizes, int(sizes.sum())


def _away_from_kinks(loc, shapes_per_level):
    """Move ``u = x W - 1/2`` (and ``v``) at least 0.05 px from integers so finite differences and
    float rounding never cross a bilinear kink."""
    out = loc.clone()
    for lvl, (h, w) in enumerate(shapes_per_level):
        for c, size in ((0, w), (1, h)):
            u = out[..., lvl, :, c] * size - 0.5
            frac = u - u.floor()
            u = u.floor() + frac.clamp(0.05, 0.95)
            out[..., lvl, :, c] = (u + 0.5) / size
    return out


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out.backward(g.to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


# ---------------------------------------------------------------------------------------------- ms_deform_attn
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_msda_against_grid_sample(dtype):
    gen = torch.Generator().manual_seed(1)
    N, Lq, H, D, P = 2, 3, 2, 5, 3
    shapes, starts, S = _levels(SHAPES)
    L = len(SHAPES)
    value = torch.randn(N, S, H, D, generator=gen).to(dtype)
    # [-0.3, 1.3): a third of the points fall partly or wholly outside the map.
    loc = _away_from_kinks(torch.rand(N, Lq, H, L, P, 2, generator=gen) * 1.6 - 0.3, SHAPES).to(dtype)
    attn = torch.randn(N, Lq, H, L, P, generator=gen).to(dtype)
    out, (gv, gl, ga) = _grads(lambda v, x, a: mk.ms_deform_attn(v, shapes, starts, x, a, backend="triton"),
                                  [value, loc, attn])
    ref_out, (rv, rl, ra) = _grads(lambda v, x, a: truth_msda(v, SHAPES, x, a),
                                      [value.double(), loc.double(), attn.double()])
    tol = TOL[dtype]
    assert out.dtype == dtype and gv.dtype == dtype and gl.dtype == dtype and ga.dtype == dtype
    for name, got, want in (("out", out, ref_out), ("grad_value", gv, rv), ("grad_locations", gl, rl),
                            ("grad_weights", ga, ra)):
        assert rel_err(got, want) <= tol, f"{name} {dtype}: {rel_err(got, want):.2e}"


def test_msda_views_mixed_dtypes_and_nan_locations():
    """Strided views straight into the kernels (they take strides), float64 locations with float16
    values (never down-cast: float64 arithmetic), and NaN/Inf locations: zero output, zero gradient."""
    k = _kernels()
    gen = torch.Generator().manual_seed(2)
    N, Lq, H, D, P = 2, 2, 2, 4, 2
    shapes, starts, S = _levels(SHAPES[:2])
    L = 2
    big = torch.randn(N, S, H, 2 * D, generator=gen, dtype=torch.float16)
    value = big[..., ::2]  # inner stride 2
    loc = (torch.rand(N, Lq, L, H, P, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.1).transpose(2, 3)
    attn = torch.randn(N, H, Lq, L, P, generator=gen).transpose(1, 2)
    out = k.ms_deform_forward(value, shapes, starts, loc, attn)
    want = truth_msda(value, SHAPES[:2], loc, attn)
    assert rel_err(out, want) <= TOL[torch.float16]
    bad = loc.clone()
    bad[0, 0, 0, 0, 0] = torch.tensor([math.nan, 0.5], dtype=torch.float64)
    bad[1, 1, 1, 1, 1] = torch.tensor([0.5, math.inf], dtype=torch.float64)
    masked = attn.clone()
    masked[0, 0, 0, 0, 0] = 0
    masked[1, 1, 1, 1, 1] = 0
    # A NaN/Inf point contributes exactly what a zero weight does, and has gradient 0.
    assert torch.equal(k.ms_deform_forward(value, shapes, starts, bad, attn),
                       k.ms_deform_forward(value, shapes, starts, loc, masked))
    g = torch.randn(N, Lq, H * D, generator=gen, dtype=torch.float16)
    gv, gl, ga = k.ms_deform_backward(g, value, shapes, starts, bad, attn)
    assert torch.isfinite(gv).all() and torch.isfinite(gl).all() and torch.isfinite(ga).all()
    assert gl[0, 0, 0, 0, 0].abs().sum() == 0 and ga[0, 0, 0, 0, 0] == 0 and ga[1, 1, 1, 1, 1] == 0


# ---------------------------------------------------------------------------------------------- mmfs_attn
def _mmfs_inputs(dtype, N=2, Lq=5, H=2, D=4, M=3, P=2, shapes=((3, 4), (1, 3)), seed=3):
    gen = torch.Generator().manual_seed(seed)
    _, _, S = _levels(shapes)
    L = len(shapes)
    value = torch.randn(N, M, S, H, D, generator=gen).to(dtype)
    ref = torch.rand(N, Lq, 2, generator=gen)
    off = (torch.randn(N, Lq, H, M, P, 2, generator=gen) * 2.0).to(dtype)
    logits = (torch.randn(N, Lq, H, M, L, P, generator=gen) * 2).to(dtype)
    kappa = torch.tensor([[1 / 8, 1 / 6], [1 / 5, 1 / 4]], dtype=torch.float32)[:L]
    # Query ranges: all images, a middle one, none (all invisible), the last one.
    lo = torch.tensor([0, 1, 0, 2, 1])[:Lq].repeat(N, 1)
    hi = torch.tensor([3, 2, 0, 3, 3])[:Lq].repeat(N, 1)
    ranges = torch.stack([lo, hi], -1)
    return value, torch.tensor(shapes), ref, off, logits, ranges, kappa


def _as_mask(ranges, M):
    m = torch.arange(M)
    return (m >= ranges[..., :1]) & (m < ranges[..., 1:])


@pytest.mark.parametrize(("dtype", "sink", "mask_kind"), [
    (torch.float32, 1.0, "ranges"), (torch.float32, 0.0, "mask"), (torch.float16, 1.0, "mask"),
    (torch.bfloat16, 0.5, "ranges"), (torch.float64, 1.0, "ranges")])
def test_mmfs_against_grid_sample(dtype, sink, mask_kind):
    # One batch row for the half dtypes (the interpreter's time; batch indexing is covered by the others).
    N = 1 if dtype in (torch.float16, torch.bfloat16) else 2
    value, shapes, ref, off, logits, ranges, kappa = _mmfs_inputs(dtype, N=N)
    M = value.shape[1]
    visible = ranges if mask_kind == "ranges" else _as_mask(ranges, M)
    mask = _as_mask(ranges, M)
    out, (gv, gr, go, gz) = _grads(
        lambda v, r, o, z: mk.mmfs_attn(v, shapes, r, o, z, visible, kappa, sink, backend="triton"),
        [value, ref, off, logits])
    want, (wv, wr, wo, wz) = _grads(
        lambda v, r, o, z: truth_mmfs(v, shapes.tolist(), r, o, z, mask, kappa, sink),
        [value.double(), ref.double(), off.double(), logits.double()])
    for name, got, exp in (("out", out, want), ("grad_value", gv, wv), ("grad_reference", gr, wr),
                           ("grad_offsets", go, wo), ("grad_logits", gz, wz)):
        # float32 reference points: their gradient is as exact as the half-precision case allows.
        tol = max(TOL[dtype], TOL[got.dtype])
        assert rel_err(got, exp) <= tol, f"{name} {dtype} sink={sink} {mask_kind}: {rel_err(got, exp):.2e}"
    # Query 2 sees nothing: output exactly 0 and no gradient into its offsets/logits.
    assert out[:, 2].abs().max() == 0 and go[:, 2].abs().max() == 0 and gz[:, 2].abs().max() == 0
    assert go.dtype == dtype and gz.dtype == dtype and gr.dtype == ref.dtype and gv.dtype == dtype


def test_mmfs_decode_step_matches_reference_backend():
    """``Lq = 1`` with a bool ``(N, M)`` mask (the decode case), against the reference backend: the
    output, the saved log-sum-exp and every gradient."""
    value, shapes, ref, off, logits, _, kappa = _mmfs_inputs(torch.float32, Lq=1, M=4, seed=4)
    visible = torch.tensor([[True, True, False, True], [False, False, False, False]])
    results = {}
    for name in ("triton", "reference"):
        results[name] = _grads(
            lambda v, r, o, z, name=name: mk.mmfs_attn(v, shapes, r, o, z, visible, kappa, 1.0, backend=name),
            [value, ref, off, logits])
    (ot, gt), (orf, grf) = results["triton"], results["reference"]
    assert rel_err(ot, orf) <= 1e-6
    for a, b in zip(gt, grf):
        assert rel_err(a, b) <= 1e-5
    k = _kernels()
    expand = visible[:, None, :]
    _, lse_t = k.mmfs_forward(value, shapes, ref, off, logits, expand, kappa, 1.0)
    from moss_kernels import deform_reference

    _, lse_r = deform_reference.mmfs_forward(value, shapes, ref, off, logits, expand, kappa, 1.0)
    assert torch.allclose(lse_t, lse_r, atol=1e-6, rtol=0)
    assert torch.equal(lse_t[1], torch.zeros_like(lse_t[1]))  # sink 1, nothing visible: log(1)


def test_mmfs_empty_denominator_gives_minus_inf_lse_and_zeros():
    k = _kernels()
    value, shapes, ref, off, logits, ranges, kappa = _mmfs_inputs(torch.float32, Lq=3, M=2, seed=6)
    ranges = torch.tensor([[0, 0], [1, 2], [0, 0]]).repeat(2, 1, 1)
    out, lse = k.mmfs_forward(value, shapes, ref, off, logits, ranges, kappa, 0.0)
    assert torch.isinf(lse[:, 0]).all() and (lse[:, 0] < 0).all() and torch.isfinite(lse[:, 1]).all()
    assert out[:, 0].abs().max() == 0 and torch.isfinite(out).all()
    g = torch.ones_like(out)
    grads = k.mmfs_backward(g, value, shapes, ref, off, logits, ranges, kappa, 0.0, lse)
    assert all(torch.isfinite(t).all() for t in grads)
    assert grads[2][:, 0].abs().max() == 0 and grads[3][:, 0].abs().max() == 0


# ---------------------------------------------------------------------------------------------- determinism
def test_grad_value_is_bitwise_reproducible_across_launch_orders_and_threads():
    """Fixed-point ``grad_value``: identical bits whether programs run ``(n, h, q)`` or ``(n, q, h)``
    (different accumulation orders; the interpreter runs programs in launch order) and for two thread
    counts. Many points share pixels here (small maps, P = 4) so the order matters for float sums; the
    float-atomic mode must still agree to float32 rounding."""
    k = _kernels()
    value, shapes, ref, off, logits, ranges, kappa = _mmfs_inputs(torch.float32, Lq=5, M=2, P=4,
                                                                  shapes=((2, 2), (1, 2)), seed=7)
    ranges = ranges.clamp(max=2)
    out, lse = k.mmfs_forward(value, shapes, ref, off, logits, ranges, kappa, 1.0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    threads = torch.get_num_threads()
    runs = []
    try:
        for head_major, nthreads in ((True, 1), (False, 2), (True, 2)):
            torch.set_num_threads(nthreads)
            runs.append(k.mmfs_backward(g, value, shapes, ref, off, logits, ranges, kappa, 1.0, lse,
                                        head_major=head_major))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    fast = k.mmfs_backward(g, value, shapes, ref, off, logits, ranges, kappa, 1.0, lse, deterministic=False)
    assert rel_err(fast[0], runs[0][0]) <= 1e-6
    # ms_deform_attn: the same for its scatter.
    shapes2, starts2, S = _levels([(2, 3), (1, 1)])
    gen = torch.Generator().manual_seed(9)
    v = torch.randn(1, S, 2, 3, generator=gen)
    loc = torch.rand(1, 6, 2, 2, 4, 2, generator=gen)
    a = torch.randn(1, 6, 2, 2, 4, generator=gen)
    gout = torch.randn(1, 6, 6, generator=gen)
    g1 = k.ms_deform_backward(gout, v, shapes2, starts2, loc, a, head_major=True)
    g2 = k.ms_deform_backward(gout, v, shapes2, starts2, loc, a, head_major=False)
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))
    assert rel_err(k.ms_deform_backward(gout, v, shapes2, starts2, loc, a, deterministic=False)[0], g1[0]) <= 1e-6


def test_fixed_point_scale_bounds_every_partial_sum():
    """``2^F * B < 2^62`` (no int64 overflow) and ``2^F * B >= 2^60`` (no needless precision loss)."""
    k = _kernels()
    for gmax, bound in ((1.0, 3.0), (1e-20, 1e-3), (1e6, 5e4), (0.0, 1.0)):
        scale = k._fixed_scale(torch.tensor(gmax), torch.tensor(bound), torch.float32)
        b = gmax * bound
        assert torch.isfinite(scale).all()
        if b > 2 ** -60:
            assert 2 ** 60 <= float(scale) * b < 2 ** 62
    for gmax in (math.inf, math.nan):  # non-finite gradients: NaN scale -> NaN grad_value, never garbage
        assert torch.isnan(k._fixed_scale(torch.tensor(gmax), torch.tensor(1.0), torch.float32)).all()
    buf = torch.tensor([3, -5], dtype=torch.int64)
    assert torch.isnan(k._finish_grad_value(buf, torch.tensor([math.nan]), torch.float32)).all()


def test_cost_model_counts():
    c = _kernels().cost_model(N=2, Lq=2048, H=16, D=64, levels=[(32, 32), (16, 16), (8, 8)], P=8, M=30)
    assert c["samples"] == 2 * 2048 * 16 * 30 * 3 * 8
    # value (fp16) 2*30*1344*16*64*2 bytes = 157.5 MiB, as MMFS.md §e derives.
    assert abs(2 * 30 * 1344 * 16 * 64 * 2 / 2 ** 20 - 157.5) < 0.01 and c["floor_bytes"] > 157.5 * 2 ** 20


def test_opcheck_on_the_triton_backend():
    """The custom ops' schema, fake kernels and autograd registration hold with the Triton kernels."""
    value, shapes, ref, off, logits, ranges, kappa = _mmfs_inputs(torch.float32, N=1, Lq=2, H=1, D=2, M=2, P=1,
                                                                  shapes=((2, 2),), seed=12)
    leaves = [t.clone().requires_grad_(True) for t in (value, ref, off, logits)]
    torch.library.opcheck(torch.ops.moss.mmfs_attn, (leaves[0], shapes, *leaves[1:], ranges[:, :2].clamp(max=2),
                                                     kappa[:1], 1.0, "triton"))
    sizes, starts, _ = _levels([(2, 2)])
    loc = torch.rand(1, 2, 1, 1, 1, 2).requires_grad_(True)
    att = torch.randn(1, 2, 1, 1, 1).requires_grad_(True)
    single = value[:, 0].clone().requires_grad_(True)  # (N, S, H, D): the first image's pyramid
    torch.library.opcheck(torch.ops.moss.ms_deform_attn, (single, sizes, starts, loc, att, "triton"))


def test_kernels_write_every_output_element(monkeypatch):
    """Outputs the kernels write in full start as NaN: nothing of it may survive."""
    k = _kernels()
    value, shapes, ref, off, logits, ranges, kappa = _mmfs_inputs(torch.float32, N=1, Lq=3, D=3, M=2, seed=13)
    ranges = ranges.clamp(max=2)
    clean = k.mmfs_forward(value, shapes, ref, off, logits, ranges, kappa, 1.0)
    sizes, starts, _ = _levels([(3, 4), (1, 3)])
    flat = value[:, 0]
    loc = torch.rand(1, 3, 2, 2, 2, 2)
    att = torch.randn(1, 3, 2, 2, 2)
    g = torch.randn(1, 3, 6)
    def msda_all():
        return (k.ms_deform_forward(flat, sizes, starts, loc, att),
                *k.ms_deform_backward(g, flat, sizes, starts, loc, att))

    msda = msda_all()
    monkeypatch.setattr(k, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                            device=device))
    for a, b in zip(clean, k.mmfs_forward(value, shapes, ref, off, logits, ranges, kappa, 1.0)):
        assert torch.equal(a, b)
    for a, b in zip(msda, msda_all()):
        assert torch.equal(a, b)
