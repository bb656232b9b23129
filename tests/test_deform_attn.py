"""ms_deform_attn and mmfs_attn on the reference and native backends, against a float64 ground truth
built only from ``F.grid_sample`` (MMFS.md §c.1, §c.2), independent of the code under test.

Covered: random shapes with non-square and 1 x W levels, locations outside the map, NaN/Inf
locations (zero contribution and gradient), partly and wholly invisible queries, ``Lq = 1``,
sinks 1 and 0, ranges and masks, mixed input dtypes (never down-cast), views, gradcheck in float64
away from the bilinear kinks, bitwise determinism (two runs, two thread counts), NaN-prefilled
kernel outputs, opcheck, torch.compile(fullgraph=True), and every bad input naming its argument.
The Triton backend is tested against the same truth in tests/test_deform_triton.py.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import moss_kernels as mk
from moss_kernels import backends

BACKENDS = [b for b in ("reference", "native")
            if b in backends.available_backends("cpu") and backends.get_backend(b).supports_deform(
                torch.device("cpu"), torch.float32)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}
native_only = pytest.mark.skipif("native" not in BACKENDS, reason="native extension not built")


# ============================================================================ ground truth
def truth_msda(value, shapes, loc, att):
    """float64 ``F.grid_sample`` per level, accumulated level by level (MMFS.md §c.1)."""
    N, _, H, D = value.shape
    _, Lq, _, _, P, _ = loc.shape
    out = torch.zeros(N * H, D, Lq, dtype=torch.float64)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].double().permute(0, 2, 3, 1).reshape(N * H, D, h, w)
        grid = (2 * loc[:, :, :, lvl].double() - 1).transpose(1, 2).reshape(N * H, Lq, P, 2)
        s = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (s * att[:, :, :, lvl].double().transpose(1, 2).reshape(N * H, 1, Lq, P)).sum(-1)
        start += h * w
    return out.view(N, H, D, Lq).permute(0, 3, 1, 2).reshape(N, Lq, H * D)


def truth_mask(visible, M):
    if visible.dtype == torch.bool:
        return visible
    m = torch.arange(M)
    return (m >= visible[..., :1]) & (m < visible[..., 1:])


def truth_mmfs(value, shapes, ref, off, logits, visible, kappa, sink):
    """MMFS.md §c.2's recipe: tile the levels M times, X = r + offsets * kappa, masked logits at
    -inf plus one log(sink) column, softmax, then ``truth_msda`` on the flat value."""
    N, M, S, H, D = value.shape
    _, Lq, _, _, L, P = logits.shape
    kappa = torch.as_tensor(kappa, dtype=torch.float64).expand(L, 2)
    loc = ref.double()[:, :, None, None, None, None, :] + off.double()[:, :, :, :, None] * kappa[:, None, :]
    mask = truth_mask(visible, M)
    z = logits.double().masked_fill(~mask[:, :, None, :, None, None], -math.inf).reshape(N, Lq, H, M * L * P)
    if sink > 0:
        z = torch.cat([z, torch.full_like(z[..., :1], math.log(sink))], -1)
    a = torch.softmax(z, -1).nan_to_num(0.0)[..., :M * L * P].reshape(N, Lq, H, M * L, P)
    return truth_msda(value.reshape(N, M * S, H, D), list(shapes) * M, loc.reshape(N, Lq, H, M * L, P, 2), a)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    d = b.norm().item()
    return (a - b).norm().item() / d if d > 0 else (a - b).norm().item()


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


# ============================================================================ cases
def random_shapes(rng):
    """1-3 levels mixing square, non-square and 1 x W / H x 1 maps."""
    pool = [(3, 5), (1, 7), (4, 4), (2, 1), (5, 3), (1, 1), (6, 2)]
    return rng.sample(pool, rng.randint(1, 3))


def msda_case(seed, dtype=torch.float32, loc_dtype=None, att_dtype=None, Lq=None, views=False):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    shapes = random_shapes(rng)
    N, H, D, P = rng.randint(1, 2), rng.randint(1, 3), rng.choice([1, 4, 5]), rng.randint(1, 3)
    Lq = Lq if Lq is not None else rng.randint(1, 6)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(N, S, H, D + (2 if views else 0)).to(dtype)
    loc = (torch.rand(N, Lq, H, L, P, 2, dtype=torch.float64) * 1.6 - 0.3).to(loc_dtype or dtype)
    att = torch.rand(N, Lq, H, L, P, dtype=torch.float64).to(att_dtype or dtype)
    if views:  # a channel slice of value, locations and weights through a transpose
        value = value[..., 1:D + 1]
        loc = loc.transpose(1, 2).contiguous().transpose(1, 2)
        att = att.transpose(0, 1).contiguous().transpose(0, 1)
        assert not value.is_contiguous() and not loc.is_contiguous()
    return shapes, value, loc, att


def mmfs_case(seed, dtype=torch.float32, visible_kind="ranges", Lq=None, other_dtype=None):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    shapes = random_shapes(rng)
    N, H, D, P, M = rng.randint(1, 2), rng.randint(1, 3), rng.choice([1, 4]), rng.randint(1, 3), rng.randint(1, 3)
    Lq = Lq if Lq is not None else rng.randint(1, 6)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    odt = other_dtype or dtype
    value = torch.randn(N, M, S, H, D).to(dtype)
    ref = torch.rand(N, Lq, 2, dtype=torch.float64).to(odt)
    off = (torch.randn(N, Lq, H, M, P, 2, dtype=torch.float64) * 2).to(odt)
    logits = (torch.randn(N, Lq, H, M, L, P, dtype=torch.float64) * 2).to(odt)
    kappa = torch.tensor([[0.3 / (i + 1), 0.2 * (i + 1)] for i in range(L)], dtype=odt)
    lo, hi = torch.randint(0, M + 1, (N, Lq)), torch.randint(0, M + 1, (N, Lq))
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    lo[0, 0] = hi[0, 0] = min(1, M)  # an all-invisible query in every case
    visible = torch.stack([lo, hi], -1)
    if visible_kind == "mask":
        visible = truth_mask(visible, M)
        if N * Lq > 1:
            visible[-1, -1] = torch.rand(M) < 0.6  # a non-contiguous set of images
    return shapes, value, ref, off, logits, visible, kappa


def leaf(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# ============================================================================ ms_deform_attn
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ms_deform_attn_matches_grid_sample(backend, dtype, seed):
    shapes, value, loc, att = msda_case(seed, dtype, views=seed == 2)
    v, x, a = leaf(value, loc, att)
    out = mk.ms_deform_attn(v, shapes, None, x, a, backend=backend)
    assert out.dtype == dtype and out.shape == (v.shape[0], x.shape[1], v.shape[2] * v.shape[3])
    tv, tx, ta = leaf(value, loc, att)
    truth = truth_msda(tv, shapes, tx, ta)
    assert rel(out, truth) <= TOL[dtype]
    g = torch.randn(truth.shape, dtype=torch.float64)
    got = grads(out, (v, x, a), g.to(dtype))
    want = grads(truth, (tv, tx, ta), g.to(dtype).double())
    for name, gg, ww, t in zip(("value", "locations", "weights"), got, want, (v, x, a)):
        assert gg.dtype == t.dtype and gg.shape == t.shape, name
        assert rel(gg, ww) <= TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_ms_deform_attn_mixed_dtypes_are_never_downcast(backend):
    # bf16 values, float64 locations and weights: all arithmetic runs in float64, so the location
    # and weight gradients match the truth (from the same rounded inputs) far below bf16 precision.
    shapes, value, loc, att = msda_case(3, torch.bfloat16, loc_dtype=torch.float64, att_dtype=torch.float64)
    v, x, a = leaf(value, loc, att)
    out = mk.ms_deform_attn(v, torch.tensor(shapes), None, x, a, backend=backend)
    assert out.dtype == torch.bfloat16
    tv, tx, ta = leaf(value, loc, att)
    truth = truth_msda(tv, shapes, tx, ta)
    g = torch.randn(truth.shape, dtype=torch.float64).to(torch.bfloat16)
    gv, gx, ga = grads(out, (v, x, a), g)
    wv, wx, wa = grads(truth, (tv, tx, ta), g.double())
    assert (gv.dtype, gx.dtype, ga.dtype) == (torch.bfloat16, torch.float64, torch.float64)
    assert rel(gx, wx) <= 1e-12 and rel(ga, wa) <= 1e-12 and rel(gv, wv) <= 1e-2
    # float32 locations with float16 values: computed in float32, not float16
    shapes, value, loc, att = msda_case(4, torch.float16, loc_dtype=torch.float32, att_dtype=torch.float32)
    v, x, a = leaf(value, loc, att)
    out = mk.ms_deform_attn(v, shapes, None, x, a, backend=backend)
    gx = grads(out, (x,), torch.ones_like(out))[0]
    tv, tx, ta = leaf(value, loc, att)
    wx = grads(truth_msda(tv, shapes, tx, ta), (tx,), torch.ones(out.shape, dtype=torch.float64))[0]
    assert gx.dtype == torch.float32 and rel(gx, wx) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_locations_contribute_nothing_and_get_zero_gradient(backend):
    shapes, value, loc, att = msda_case(5, torch.float32, Lq=4)
    bad = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    bad.view(-1)[::3] = True
    poison = torch.tensor([math.nan, math.inf, -math.inf, 1e38])
    loc = loc.clone()
    loc[..., 0][bad] = poison.repeat(int(bad.sum()) // 4 + 1)[: int(bad.sum())]
    loc[..., 1][bad] = 0.5
    v, x, a = leaf(value, loc, att)
    out = mk.ms_deform_attn(v, shapes, None, x, a, backend=backend)
    # the truth: those points far outside every map (grid_sample leaves NaN undefined)
    clean = torch.where(bad[..., None], torch.full_like(loc, -5.0), loc)
    tv, tx, ta = leaf(value, clean, att)
    truth = truth_msda(tv, shapes, tx, ta)
    assert rel(out, truth) <= 1e-5
    gv, gx, ga = grads(out, (v, x, a), torch.ones_like(out))
    wv, _, wa = grads(truth, (tv, tx, ta), torch.ones(out.shape, dtype=torch.float64))
    assert torch.isfinite(gx).all() and (gx[bad] == 0).all() and (ga[bad] == 0).all()
    assert rel(gv, wv) <= 1e-5 and rel(ga, wa) <= 1e-5


# ============================================================================ mmfs_attn
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("visible_kind,sink,seed", [("ranges", 1.0, 0), ("mask", 1.0, 1), ("ranges", 0.0, 2),
                                                    ("mask", 0.0, 3), ("ranges", 2.5, 4)])
def test_mmfs_attn_matches_grid_sample(backend, dtype, visible_kind, sink, seed):
    shapes, value, ref, off, logits, visible, kappa = mmfs_case(seed, dtype, visible_kind)
    v, r, o, z = leaf(value, ref, off, logits)
    out = mk.mmfs_attn(v, shapes, r, o, z, visible, kappa, sink, backend=backend)
    assert out.dtype == dtype
    tv, tr, to, tz = leaf(value, ref, off, logits)
    truth = truth_mmfs(tv, shapes, tr, to, tz, visible, kappa, sink)
    assert rel(out, truth) <= TOL[dtype]
    nothing = ~truth_mask(visible, value.shape[1]).any(-1)  # queries that see no image
    assert nothing.any() and (out[nothing] == 0).all()
    g = torch.randn(truth.shape, dtype=torch.float64).to(dtype)
    got = grads(out, (v, r, o, z), g)
    want = grads(truth, (tv, tr, to, tz), g.double())
    for name, gg, ww, t in zip(("value", "reference_points", "offsets", "logits"), got, want, (v, r, o, z)):
        assert gg.dtype == t.dtype and gg.shape == t.shape, name
        assert rel(gg, ww) <= TOL[dtype], name
    assert (got[3][nothing] == 0).all() and (got[2][nothing] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("visible_kind", ["ranges", "mask"])
def test_mmfs_decode_single_query(backend, visible_kind):
    shapes, value, ref, off, logits, visible, kappa = mmfs_case(6, torch.float32, visible_kind, Lq=1)
    visible = visible.clone()
    if visible_kind == "ranges":
        visible[:, 0] = torch.tensor([0, value.shape[1]])  # decode: the last mask row sees every image
    out = mk.mmfs_attn(value, torch.tensor(shapes), ref[:1].expand_as(ref) if ref.shape[0] == 1 else ref, off,
                       logits, visible, kappa, backend=backend)
    assert rel(out, truth_mmfs(value, shapes, ref, off, logits, visible, kappa, 1.0)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_mmfs_flat_value_scalar_scale_broadcast_reference_and_nxm_mask(backend):
    shapes, value, ref, off, logits, visible, _ = mmfs_case(7, torch.float32, "mask")
    N, M, S, H, D = value.shape
    ref1 = ref[:1]
    mask2 = visible[:, 0]  # (N, M), broadcast over the queries
    out = mk.mmfs_attn(value.reshape(N, M * S, H, D), shapes, ref1, off, logits, mask2, 0.125, backend=backend)
    truth = truth_mmfs(value, shapes, ref1.expand(N, -1, -1), off, logits,
                       mask2[:, None].expand(N, off.shape[1], M), 0.125, 1.0)
    assert rel(out, truth) <= 1e-5
    r = ref1.detach().clone().requires_grad_()
    out = mk.mmfs_attn(value, shapes, r, off, logits, mask2, 0.125, backend=backend)
    tr = ref1.detach().clone().requires_grad_()
    truth = truth_mmfs(value, shapes, tr.expand(N, -1, -1), off, logits, mask2[:, None].expand(N, off.shape[1], M),
                       0.125, 1.0)
    g = torch.randn(truth.shape, dtype=torch.float64)
    assert rel(grads(out, (r,), g.float())[0], grads(truth, (tr,), g)[0]) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_mmfs_skips_invisible_images_holding_nan(backend):
    # Invisible images are skipped, not masked: NaN in their values or offsets never leaks.
    shapes, value, ref, off, logits, _, kappa = mmfs_case(8, torch.float32)
    N, M = value.shape[:2]
    value, off = value.clone(), off.clone()
    value[:, -1] = math.nan
    off[:, :, :, -1] = math.nan
    visible = torch.zeros(N, off.shape[1], 2, dtype=torch.int64)
    visible[..., 1] = M - 1
    v, o, z = leaf(value, off, logits)
    out = mk.mmfs_attn(v, shapes, ref, o, z, visible, kappa, backend=backend)
    gv, go, gz = grads(out, (v, o, z), torch.ones_like(out))
    assert all(torch.isfinite(t).all() for t in (out, gv, go, gz))
    if M > 1:
        truth = truth_mmfs(value[:, :-1], shapes, ref, off[:, :, :, :-1], logits[:, :, :, :-1], visible, kappa, 1.0)
        assert rel(out, truth) <= 1e-5


# ============================================================================ gradcheck
def _away_from_kinks(u):
    """Nudge ``u = x * W - 1/2`` values within 0.01 of an integer (a bilinear kink) by 0.03."""
    return torch.where((u - u.round()).abs() < 0.01, u + 0.03, u)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    # ms_deform_attn: one level at a time puts each location's u, v away from integers.
    shapes, value, loc, att = msda_case(9, torch.float64, Lq=3)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)[:, None, :]  # (L, 1, 2) as (W, H)
    loc = (_away_from_kinks(loc * size - 0.5) + 0.5) / size
    u = loc * size - 0.5
    assert ((u - u.round()).abs() >= 0.005).all()
    fn = lambda v, x, a: mk.ms_deform_attn(v, shapes, None, x, a, backend=backend)
    assert torch.autograd.gradcheck(fn, leaf(value, loc, att), eps=1e-6, atol=1e-7)
    # mmfs_attn, sink 1 and 0 (a location is shared by the levels: two levels, 4 x 8 and 2 x 4,
    # with u on the finer one kept in (k + 0.6, k + 0.9) are away from kinks on both)
    for sink in (1.0, 0.0):
        torch.manual_seed(10)
        N, Lq, H, M, P, D = 1, 3, 2, 2, 2, 3
        shapes = [(4, 8), (2, 4)]
        value = torch.randn(N, M, 40, H, D, dtype=torch.float64)
        ref = torch.rand(N, Lq, 2, dtype=torch.float64)
        target = (torch.randint(-1, 8, (N, Lq, H, M, P, 2)) + 0.6 + 0.3 * torch.rand(N, Lq, H, M, P, 2)
                  + 0.5) / torch.tensor([8.0, 4.0], dtype=torch.float64)
        kappa = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        off = target - ref[:, :, None, None, None, :]
        logits = torch.randn(N, Lq, H, M, 2, P, dtype=torch.float64)
        visible = torch.tensor([[[0, 2], [1, 2], [0, 1]]])
        fn = lambda v, r, o, z: mk.mmfs_attn(v, shapes, r, o, z, visible, kappa, sink,
                                             backend=backend)
        # the reference in fast mode (random projections of the Jacobian; the full one costs ~30 s)
        assert torch.autograd.gradcheck(fn, leaf(value, ref, off, logits), eps=1e-7, atol=1e-7,
                                        fast_mode=backend == "reference")


# ============================================================================ determinism
def _collision_case():
    """Many queries sampling a tiny map: every grad_value element sums hundreds of contributions."""
    torch.manual_seed(11)
    N, Lq, H, M, P, D = 2, 96, 4, 3, 4, 16
    shapes = [(3, 4), (1, 2)]
    value = torch.randn(N, M, 14, H, D)
    ref = torch.rand(N, Lq, 2)
    off = torch.randn(N, Lq, H, M, P, 2)
    logits = torch.randn(N, Lq, H, M, 2, P)
    visible = torch.randint(0, M + 1, (N, Lq, 1)).expand(N, Lq, 2) * torch.tensor([0, 1])
    return shapes, value, ref, off, logits, visible


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_bitwise_reproducible_across_runs_and_thread_counts(backend):
    shapes, value, ref, off, logits, visible = _collision_case()
    g = torch.randn(value.shape[0], off.shape[1], value.shape[3] * value.shape[4])
    threads = torch.get_num_threads()
    results = []
    try:
        for nt in (1, 2, 2, 1):
            torch.set_num_threads(nt)
            v, r, o, z = leaf(value, ref, off, logits)
            out = mk.mmfs_attn(v, shapes, r, o, z, visible, 0.5, backend=backend)
            mv, = leaf(value.flatten(1, 2))
            loc = (ref[:, :, None, None, None, None, :] + 0.5 * off[:, :, :, :, None]).expand(-1, -1, -1, -1, 2, -1, -1)
            att = torch.rand(loc.shape[:-1], generator=torch.Generator().manual_seed(0)).flatten(3, 4)
            out2 = mk.ms_deform_attn(mv, shapes * value.shape[1], None, loc.flatten(3, 4), att, backend=backend)
            results.append([out, *grads(out, (v, r, o, z), g), out2, *grads(out2, (mv,), g)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@native_only
def test_native_kernels_write_every_output_element():
    from moss_kernels.native import extension

    shapes, value, ref, off, logits, visible = _collision_case()
    ss = torch.tensor(shapes)
    starts = torch.tensor([0, 12])
    nan = lambda *shape: torch.full(shape, math.nan)
    N, M, S, H, D = value.shape
    Lq, L, P = off.shape[1], 2, off.shape[4]
    kappa = torch.full((L, 2), 0.5)
    loc, att = torch.rand(N, Lq, H, L, P, 2), torch.rand(N, Lq, H, L, P)
    runs = []
    for fill in (torch.zeros, nan):
        out, lse = fill(N, Lq, H * D), fill(N, Lq, H)
        extension.mmfs_forward(value, ss, starts, ref, off, logits, visible, kappa, 1.0, out, lse)
        bufs = [fill(N, M, S, H, D), fill(N, Lq, H, 2), fill(*off.shape), fill(*logits.shape)]
        extension.mmfs_backward(out.contiguous(), value, ss, starts, ref, off, logits, visible, kappa, 1.0, lse, *bufs)
        out2 = fill(N, Lq, H * D)
        v0 = value[:, 0].contiguous()
        extension.ms_deform_forward(v0, ss, starts, loc, att, out2)
        bufs2 = [fill(N, S, H, D), fill(*loc.shape), fill(*att.shape)]
        extension.ms_deform_backward(out2, v0, ss, starts, loc, att, *bufs2)
        runs.append([out, lse, *bufs, out2, *bufs2])
    for a, b in zip(*runs):
        assert torch.isfinite(b).all() and torch.equal(a, b)


# ============================================================================ registration
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    shapes, value, loc, att = msda_case(12, torch.float32)
    ss = torch.tensor(shapes)
    starts = torch.cumsum(ss.prod(1), 0) - ss.prod(1)
    torch.library.opcheck(torch.ops.moss.ms_deform_attn, (*leaf(value), ss, starts, *leaf(loc, att), backend))
    shapes, value, ref, off, logits, visible, kappa = mmfs_case(12, torch.float32)
    torch.library.opcheck(torch.ops.moss.mmfs_attn,
                          (*leaf(value), torch.tensor(shapes), *leaf(ref, off, logits), visible, kappa, 1.0, backend))


def test_torch_compile_fullgraph_traces_both_ops():
    shapes, value, ref, off, logits, visible, kappa = mmfs_case(13, torch.float32)
    fn = lambda v, r, o, z: mk.mmfs_attn(v, torch.tensor(shapes), r, o, z, visible, kappa)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    v, r, o, z = leaf(value, ref, off, logits)
    out = compiled(v, r, o, z)
    assert torch.allclose(out, fn(value, ref, off, logits), rtol=0, atol=0)
    out.sum().backward()
    assert v.grad is not None and z.grad is not None
    shapes, value, loc, att = msda_case(13, torch.float32)
    fn2 = lambda v, x, a: mk.ms_deform_attn(v, shapes, None, x, a)
    assert torch.equal(torch.compile(fn2, fullgraph=True, backend="aot_eager")(value, loc, att), fn2(value, loc, att))


def test_default_backend_is_native_on_cpu():
    if "native" in BACKENDS:
        assert backends.resolve_deform(None, torch.device("cpu"), torch.float16) == "native"
        assert backends.resolve_deform(None, torch.device("cpu"), torch.float64) == "native"
    assert backends.resolve_deform("reference", torch.device("cpu"), torch.float64) == "reference"


# ============================================================================ bad input
def _msda_args():
    shapes, value, loc, att = msda_case(14, torch.float32)
    return dict(value=value, spatial_shapes=torch.tensor(shapes), level_start_index=None, sampling_locations=loc,
                attention_weights=att)


MSDA_BAD = [
    (lambda a: a.update(value=a["value"].numpy()), TypeError, "value must be a torch.Tensor"),
    (lambda a: a.update(value=a["value"].long()), TypeError, "value must be float"),
    (lambda a: a.update(value=a["value"][0]), ValueError, "value must have 4 dimensions"),
    (lambda a: a.update(spatial_shapes=a["spatial_shapes"].float()), TypeError, "spatial_shapes must be an int64"),
    (lambda a: a.update(spatial_shapes=a["spatial_shapes"][:, :1]), ValueError, "spatial_shapes must have shape"),
    (lambda a: a.update(spatial_shapes=a["spatial_shapes"] * 2), ValueError, "spatial_shapes .* sum to"),
    (lambda a: a.update(spatial_shapes=torch.cat([a["spatial_shapes"], torch.tensor([[0, 3]])])), ValueError,
     r"spatial_shapes rows \(H_l, W_l\) must be >= 1"),
    (lambda a: a.update(spatial_shapes="3x5"), TypeError, "spatial_shapes must be"),
    (lambda a: a.update(level_start_index=torch.arange(a["spatial_shapes"].shape[0]) + 1), ValueError,
     "level_start_index must be the exclusive cumulative sum"),
    (lambda a: a.update(level_start_index=torch.zeros(7, dtype=torch.int64)), ValueError,
     "level_start_index must have shape"),
    (lambda a: a.update(level_start_index=torch.zeros(a["spatial_shapes"].shape[0])), TypeError,
     "level_start_index must be an int64"),
    (lambda a: a.update(sampling_locations=a["sampling_locations"][..., :1]), ValueError,
     "sampling_locations must have shape"),
    (lambda a: a.update(sampling_locations=a["sampling_locations"].int()), TypeError, "sampling_locations must be"),
    (lambda a: a.update(sampling_locations=a["sampling_locations"][0]), ValueError,
     "sampling_locations must have 6 dimensions"),
    (lambda a: a.update(attention_weights=a["attention_weights"][..., :0]), ValueError,
     "attention_weights must have shape"),
    (lambda a: a.update(attention_weights=a["attention_weights"].to("meta")), ValueError, "attention_weights is on"),
]


@pytest.mark.parametrize("i", range(len(MSDA_BAD)))
def test_ms_deform_attn_rejects_bad_input_naming_the_argument(i):
    change, exc, msg = MSDA_BAD[i]
    args = _msda_args()
    change(args)
    with pytest.raises(exc, match=msg):
        mk.ms_deform_attn(**args)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend 'nope'"):
        mk.ms_deform_attn(**_msda_args(), backend="nope")


def _mmfs_args():
    shapes, value, ref, off, logits, visible, kappa = mmfs_case(15, torch.float32)
    return dict(value=value, spatial_shapes=shapes, reference_points=ref, sampling_offsets=off,
                attention_logits=logits, visible=visible, offset_scale=kappa, sink=1.0)


MMFS_BAD = [
    (lambda a: a.update(value=a["value"].int()), TypeError, "value must be float"),
    (lambda a: a.update(value=a["value"][:, :, :-1]), ValueError, "spatial_shapes .* sum to"),
    (lambda a: a.update(value=a["value"][..., :0, :]), ValueError, "value must have shape"),
    (lambda a: a.update(reference_points=a["reference_points"][..., :1]), ValueError,
     "reference_points must have shape"),
    (lambda a: a.update(sampling_offsets=a["sampling_offsets"][:, :, :, :, :, :1]), ValueError,
     "sampling_offsets must have shape"),
    (lambda a: a.update(attention_logits=a["attention_logits"][:, :, :, :, :0]), ValueError,
     "attention_logits must have shape"),
    (lambda a: a.update(visible=a["visible"].clone().fill_(a["value"].shape[1] + 1)), ValueError,
     r"visible\[0, 0\] = .* 0 <= lo <= hi <= M"),
    (lambda a: a.update(visible=a["visible"].flip(-1) + torch.tensor([1, 0])), ValueError, "visible"),
    (lambda a: a.update(visible=-a["visible"] - 1), ValueError, "visible"),
    (lambda a: a.update(visible=a["visible"].float()), TypeError, "visible must be int64 ranges"),
    (lambda a: a.update(visible=a["visible"][..., :1]), ValueError, r"visible \(int64 ranges"),
    (lambda a: a.update(visible=torch.ones(1, 1, 9, dtype=torch.bool)), ValueError, r"visible \(a bool mask\)"),
    (lambda a: a.update(visible=[0, 1]), TypeError, "visible must be a torch.Tensor"),
    (lambda a: a.update(offset_scale=torch.ones(7, 2)), ValueError, "offset_scale must have shape"),
    (lambda a: a.update(offset_scale="x"), TypeError, "offset_scale must be"),
    (lambda a: a.update(offset_scale=torch.ones(len(a["spatial_shapes"]), 2, requires_grad=True)), ValueError,
     "offset_scale gets no gradient"),
    (lambda a: a.update(offset_scale=math.nan), ValueError, "offset_scale must be finite"),
    (lambda a: a.update(sink=-1.0), ValueError, "sink must be a finite number >= 0"),
    (lambda a: a.update(sink=math.inf), ValueError, "sink must be a finite number >= 0"),
    (lambda a: a.update(sink="1"), TypeError, "sink must be a float"),
    (lambda a: a.update(spatial_shapes=[(1, 2, 3)]), ValueError, r"spatial_shapes must hold L >= 1 pairs"),
]


@pytest.mark.parametrize("i", range(len(MMFS_BAD)))
def test_mmfs_attn_rejects_bad_input_naming_the_argument(i):
    change, exc, msg = MMFS_BAD[i]
    args = _mmfs_args()
    change(args)
    with pytest.raises(exc, match=msg):
        mk.mmfs_attn(**args)


@native_only
def test_native_binding_names_the_argument():
    from moss_kernels.native import extension

    value = torch.randn(1, 6, 2, 3)
    ss, starts = torch.tensor([[2, 3]]), torch.tensor([0])
    loc, att, out = torch.rand(1, 4, 2, 1, 2, 2), torch.rand(1, 4, 2, 1, 2), torch.empty(1, 4, 6)
    with pytest.raises(TypeError, match="'sampling_locations' must be Float"):
        extension.ms_deform_forward(value, ss, starts, loc.double(), att, out)
    with pytest.raises(ValueError, match="'attention_weights' must have shape"):
        extension.ms_deform_forward(value, ss, starts, loc, att[..., :1], out)
    with pytest.raises(ValueError, match="'level_start_index'"):
        extension.ms_deform_forward(value, ss, starts + 1, loc, att, out)
    with pytest.raises(ValueError, match="'spatial_shapes' sums to 4"):
        extension.ms_deform_forward(value, torch.tensor([[2, 2]]), starts, loc, att, out)
    with pytest.raises(ValueError, match="'out' must be contiguous"):
        extension.ms_deform_forward(value, ss, starts, loc, att, torch.empty(1, 6, 4).transpose(1, 2))
    with pytest.raises(ValueError, match="'visible' holds the range"):
        extension.mmfs_forward(value[:, None], ss, starts, torch.rand(1, 4, 2), torch.rand(1, 4, 2, 1, 2, 2),
                               torch.rand(1, 4, 2, 1, 1, 2), torch.tensor([[[0, 2]] * 4]), torch.ones(1, 2), 1.0,
                               out, torch.empty(1, 4, 2))
