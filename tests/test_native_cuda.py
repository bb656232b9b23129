"""The native backend's CUDA path: the one-pass fused forward (csrc/cuda/fused_forward.cu) and the
split path (down-GEMM, shifts, up-GEMM) against the float64 ground truth, the backward and the
decode step, the path switch.

Every test that launches a kernel runs on two targets: ``cuda`` (a GPU and a CUDA build of the
extension; skipped without one) and ``simt`` (everywhere with g++: the same binding.cpp and
cuda_dispatch.cpp launch sequences, and the same kernels, compiled as C++ against the SIMT harness
of tests/simt and executed on the CPU on CPU tensors, registered as the test-only backend
``"simt_cuda"``). The harness checks barriers, shuffles, wmma rules and launch limits and poisons
shared memory; it runs the kernels some 10^4 times slower than a GPU, so the simt target takes a
subset of the sizes (``SIMT_RANKS``; the others say "GPU-only size"). The switch's validation
(``_C.set_cuda_forward_path``) runs everywhere.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

import moss_kernels as mk
from moss_kernels import reference
from moss_kernels.testing import TOLERANCE, assert_close_rel, ground_truth, random_adapters, random_layout, rel_err

if os.environ.get("MOSS_KERNELS_NATIVE", "1") == "0":
    pytest.skip("MOSS_KERNELS_NATIVE=0: the native backend is disabled", allow_module_level=True)

import moss_kernels.native as native  # builds the extension on first use

sys.path.insert(0, str(Path(__file__).resolve().parent / "simt"))
import torch_ext as simt

ext = native.extension
HAVE_CUDA = torch.cuda.is_available() and ext.with_cuda()
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU and a native build with CUDA")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALE = 0.75
D_IN, D_OUT = 72, 100  # neither a multiple of 64: partial k slabs and partial output tiles
SIMT_RANKS = (8, 100)  # ranks the simt target runs (100: two 64-wide rank chunks, the second partial)
FUSED_SMEM_LIMIT = 166912  # moss_cuda.h kFusedSmemLimit (sm_80's opt-in shared memory per block)


@dataclass
class Target:
    """Where the CUDA kernels run: a GPU, or the SIMT harness on the CPU."""

    name: str
    dev: str
    backend: str
    ext: ModuleType

    @property
    def simt(self) -> bool:
        return self.name == "simt"

    def path(self, name: str):
        return simt.forward_path(name) if self.simt else native.cuda_forward_path(name)

    def smem_optin(self) -> int:
        return 232448 if self.simt else torch.cuda.get_device_properties(0).shared_memory_per_block_optin

    def gpu_only(self, rank: int, k: int = 2) -> None:
        """Skips sizes the simt target leaves to a GPU: ranks outside SIMT_RANKS, and the second
        rank chunk at kernel sizes other than 2."""
        if self.simt and (rank not in SIMT_RANKS or (rank > 64 and k != 2)):
            pytest.skip(f"GPU-only size (rank {rank}, k {k}; the simt target runs ranks {SIMT_RANKS}, 100 at k=2)")

    def layouts(self, names, simt_names):
        """The layouts a test loops over: all on a GPU, `simt_names` on the harness (the random
        multi-tile layout "tiles" has tests of its own there)."""
        return [n for n in names if n in simt_names] if self.simt else list(names)


@pytest.fixture(scope="module", params=["cuda", "simt"])
def target(request) -> Target:
    if request.param == "cuda":
        if not HAVE_CUDA:
            pytest.skip("needs a CUDA GPU and a native build with CUDA")
        yield Target("cuda", "cuda", "native", ext)
        return
    if shutil.which("g++") is None:
        pytest.skip("the SIMT harness needs g++")
    with simt.registered() as harness:  # the "simt_cuda" backend exists only inside this block
        yield Target("simt", "cpu", simt.BACKEND, harness)


# name -> (batch, seq, spans); "tiles" is random and long enough for several 64-row tiles per modality
SPANS = {
    # several images per row, text between them, the last image of each row cut by the sequence end
    "mixed": (2, 40, [(0, 3, 3, 4), (0, 17, 1, 5), (0, 30, 4, 3), (1, 0, 5, 5), (1, 30, 3, 7)]),
    "columns": (2, 16, [(0, 2, 6, 1), (1, 5, 4, 1), (1, 10, 5, 1)]),  # H x 1 grids
    "rows": (2, 26, [(0, 0, 1, 9), (1, 10, 1, 13), (0, 12, 1, 3)]),  # 1 x W grids
    "odd": (1, 23, [(0, 4, 3, 5), (0, 20, 2, 2)]),  # odd sizes, second image cut
    "image_only": (2, 20, [(0, 0, 4, 5), (1, 0, 5, 4)]),
    "text_only": (2, 9, []),
}
ALL_LAYOUTS = (*SPANS, "tiles")


def layout_of(name: str) -> mk.ImageLayout:
    if name == "tiles":
        return random_layout(random.Random(7), batch_size=3, seq_len=150, max_side=12)
    B, S, spans = SPANS[name]
    return mk.ImageLayout.from_spans(B, S, spans)


def make_case(tgt, name, dtype, k, rank, seed=0, text=True, image=True, d_in=D_IN, d_out=D_OUT):
    """layout, x (batch, seq, d_in) and the four adapter weights (None where absent), on the target."""
    layout = layout_of(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layout.batch_size, layout.seq_len, d_in, generator=g).to(dtype).to(tgt.dev)
    weights = random_adapters(d_in, d_out, rank, k, generator=g, text=text, image=image)
    return layout, x, [None if w is None else w.to(dtype).to(tgt.dev) for w in weights]


def fused_fits(tgt: Target, dtype: torch.dtype, rank: int) -> bool:
    """Whether the fused kernel takes this call: not float16 (cuda_dispatch.cpp runs fp16 on the
    split path), and the shared memory of fused_forward.cu's smem_bytes (Tiles + 64 row indices + a
    64 x (round_up(r, 64) + 8) z panel in the compute type) within sm_80's 166912 bytes and the
    device's opt-in limit."""
    if dtype == torch.float16:
        return False
    size = 4 if dtype == torch.float32 else 2
    tiles = 36864 if dtype == torch.float32 else 27136
    need = tiles + 64 * 8 + 64 * (-(-rank // 64) * 64 + 8) * size
    return rank <= 512 and need <= min(FUSED_SMEM_LIMIT, tgt.smem_optin())


def forward(tgt, path, x, layout, weights, **kw):
    """moss_lora on the target through CUDA forward `path`, or None after checking that the fused
    path refuses a call it cannot run (with an error saying so)."""
    rank = max(w.shape[0] for w in (weights[0], weights[2]) if w is not None)
    with tgt.path(path):
        if path == "fused" and not fused_fits(tgt, x.dtype, rank):
            with pytest.raises(RuntimeError, match="fused forward path cannot"):
                mk.moss_lora(x, layout, *weights, SCALE, backend=tgt.backend, **kw)
            return None
        return mk.moss_lora(x, layout, *weights, SCALE, backend=tgt.backend, **kw)


# ---------------------------------------------------------------------------- the switch (runs everywhere)
def test_forward_path_switch_validates_and_restores():
    assert ext.cuda_forward_path() == "auto"
    with pytest.raises(ValueError, match=r"argument 'path'.*'bogus'"):
        ext.set_cuda_forward_path("bogus")
    assert ext.cuda_forward_path() == "auto"
    with native.cuda_forward_path("split"):
        assert ext.cuda_forward_path() == "split"
        with native.cuda_forward_path("fused"):
            assert ext.cuda_forward_path() == "fused"
        assert ext.cuda_forward_path() == "split"
    assert ext.cuda_forward_path() == "auto"
    with pytest.raises(ValueError, match="'Fused'"):
        with native.cuda_forward_path("Fused"):
            pass
    assert ext.cuda_forward_path() == "auto"


def test_forward_path_default_is_auto_in_a_fresh_process():
    code = "import moss_kernels.native as n; print('PATH', n.extension.cuda_forward_path())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PATH auto" in proc.stdout


def test_forward_path_from_the_environment():
    code = "import moss_kernels.native as n; print('PATH', n.extension.cuda_forward_path())"
    env = dict(os.environ, MOSS_KERNELS_CUDA_FORWARD="split")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PATH split" in proc.stdout
    env["MOSS_KERNELS_CUDA_FORWARD"] = "fastest"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0
    assert "MOSS_KERNELS_CUDA_FORWARD" in proc.stderr and "'fastest'" in proc.stderr


def test_forward_path_leaves_the_cpu_alone():
    layout = layout_of("mixed")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(layout.batch_size, layout.seq_len, 24, generator=g)
    weights = random_adapters(24, 20, 8, 2, generator=g)
    with torch.no_grad():
        runs = []
        for path in ("fused", "split"):
            with native.cuda_forward_path(path):
                runs.append(mk.moss_lora(x, layout, *weights, SCALE, backend="native"))
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("rank", [8, 64, 100, 256, 448, 512])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_vs_truth(target, dtype, k, rank, path):
    target.gpu_only(rank)
    for i, name in enumerate(target.layouts(ALL_LAYOUTS, SPANS)):
        layout, x, weights = make_case(target, name, dtype, k, rank, seed=i)
        want = ground_truth(x, layout, *weights, SCALE)
        with torch.no_grad():
            got = forward(target, path, x, layout, weights)
        if got is None:
            continue
        assert got.dtype == dtype and got.shape == want.shape
        assert_close_rel(got, want, TOLERANCE[dtype], f"{name} {path}")


@pytest.mark.parametrize("rank", [8, 100, 256, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_equals_split_and_auto_picks_fused(target, dtype, rank):
    """"auto" runs the (deterministic) fused kernel wherever it applies, bit for bit what "fused"
    gives, else the split path; the two paths agree within the tolerance."""
    target.gpu_only(rank)
    layout, x, weights = make_case(target, "tiles", dtype, 2, rank, seed=3)
    runs = {}
    with torch.no_grad():
        for path in ("auto", "fused", "split"):
            runs[path] = forward(target, path, x, layout, weights)
    fits = fused_fits(target, dtype, rank)
    if fits:
        assert rel_err(runs["fused"], runs["split"]) <= TOLERANCE[dtype]
    else:
        assert runs["fused"] is None
    assert torch.equal(runs["auto"], runs["fused" if fits else "split"])


def test_simt_fused_forward_respects_a_smaller_shared_memory_limit(target):
    """On a part with sm_86's 101376 bytes of opt-in shared memory per block, the fp32 fused kernel
    at rank 200 (104960 bytes) cannot launch: "fused" says why, "auto" runs the split path."""
    if not target.simt:
        pytest.skip("the emulated device's limit is set on the harness")
    layout, x, weights = make_case(target, "mixed", torch.float32, 2, 200, seed=8)
    try:
        simt.configure(smem_optin=101376)
        with torch.no_grad(), target.path("fused"), pytest.raises(RuntimeError, match="shared memory"):
            mk.moss_lora(x, layout, *weights, SCALE, backend=target.backend)
        before = simt.launches("fused_forward_kernel")
        with torch.no_grad():
            auto = forward(target, "auto", x, layout, weights)
            split = forward(target, "split", x, layout, weights)
        assert simt.launches("fused_forward_kernel") == before
        assert torch.equal(auto, split)
    finally:
        simt.configure()


def test_simt_runs_the_dispatch_launch_sequences(target):
    """On the harness, count what cuda_dispatch.cpp launched: the fused path is one fused launch, the
    split path two GEMMs per modality and the shift; the backward six GEMMs (image) + the tap fill;
    a decode step three (weight-stationary down-projection, slice reduction + ring, up-projection).
    What ran is the GPU build's dispatch code, not a copy."""
    if not target.simt:
        pytest.skip("launch counts are read from the harness")
    layout, x, weights = make_case(target, "mixed", torch.float32, 2, 8, seed=4)

    def counts():
        return {k: simt.launches(k) for k in ("fused_forward_kernel", "gemm_kernel", "shift_sum_kernel",
                                              "fill_taps_kernel", "decode_")}

    def delta(before):
        return {k: v - before[k] for k, v in counts().items()}

    before = counts()
    with torch.no_grad():
        forward(target, "fused", x, layout, weights)
    assert delta(before) == {"fused_forward_kernel": 1, "gemm_kernel": 0, "shift_sum_kernel": 0,
                             "fill_taps_kernel": 0, "decode_": 0}
    before = counts()
    with torch.no_grad():
        forward(target, "split", x, layout, weights)
    assert delta(before) == {"fused_forward_kernel": 0, "gemm_kernel": 4, "shift_sum_kernel": 1,
                             "fill_taps_kernel": 0, "decode_": 0}
    xg = x.clone().requires_grad_()
    out = forward(target, "split", xg, layout, weights)
    before = counts()
    out.backward(torch.ones_like(out))
    assert delta(before) == {"fused_forward_kernel": 0, "gemm_kernel": 8, "shift_sum_kernel": 0,
                             "fill_taps_kernel": 1, "decode_": 0}
    B = x.shape[0]
    state = mk.ConvLoRAState(B, 8, 2, device=target.dev, max_width=max(layout.max_width, 1))
    pos, hh, ww = (p[0] for p in layout.step_positions(target.dev))
    before = counts()
    kernels = ("decode_down_kernel", "decode_reduce_kernel", "decode_up_kernel")
    each = {k: simt.launches(k) for k in kernels}
    mk.moss_lora_step(x[:, 0], *weights, SCALE, state, pos, hh, ww, backend=target.backend)
    assert delta(before) == {"fused_forward_kernel": 0, "gemm_kernel": 0, "shift_sum_kernel": 0,
                             "fill_taps_kernel": 0, "decode_": 3}
    assert all(simt.launches(k) - each[k] == 1 for k in kernels)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("adapters", ["both", "text", "image"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_accumulates_and_saved_tensors(target, dtype, adapters, path):
    """ext.forward adds into a strided `out` (random base), leaves rows without an adapter and the
    columns past d_out bit-identical, and returns text_h / image_z (fp32) as the split path does."""
    k, rank = 3, 40
    layout, x, weights = make_case(target, "tiles", dtype, k, rank, seed=5, text=adapters != "image",
                                   image=adapters != "text")
    B, S, d_in = x.shape
    N = B * S
    idx = layout.index(target.dev, k)
    xf = x.view(N, d_in)
    big = torch.full((N, D_OUT + 3), float("nan"), dtype=dtype, device=target.dev)
    out = big[:, :D_OUT]
    base = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(6)).to(dtype).to(target.dev)
    out.copy_(base)
    with target.path(path):
        if path == "fused" and not fused_fits(target, dtype, rank):
            with pytest.raises(RuntimeError, match="fused forward path cannot"):
                target.ext.forward(xf, out, idx.text_rows, idx.image_rows, idx.conv_sources, *weights, SCALE)
            return
        text_h, image_z = target.ext.forward(xf, out, idx.text_rows, idx.image_rows, idx.conv_sources, *weights, SCALE)
    assert torch.isnan(big[:, D_OUT:]).all()

    # float64 rank-space forward (the contract): text_h, image_z and the delta
    w64 = [None if w is None else w.double() for w in weights]
    delta = torch.zeros(N, D_OUT, dtype=torch.float64, device=target.dev)
    th64, iz64 = reference.forward(xf.double(), delta, idx.text_rows, idx.image_rows, idx.conv_sources, *w64, SCALE)
    touched = torch.zeros(N, dtype=torch.bool, device=target.dev)
    if weights[0] is not None:
        touched[idx.text_rows] = True
    if weights[2] is not None:
        touched[idx.image_rows] = True
    if adapters == "both":
        assert touched.all()
    else:
        assert touched.any() and (~touched).any()
    assert torch.equal(out[~touched], base[~touched])  # bit for bit
    assert_close_rel(out[touched], base[touched].double() + delta[touched], TOLERANCE[dtype], "out")
    if dtype == torch.float32:  # the delta itself, not hidden behind the base
        assert_close_rel(out[touched].double() - base[touched].double(), delta[touched], 1e-5, "out - base")

    # saved tensors: fp32, exact products of the (rounded) inputs accumulated in fp32
    z_tol = 1e-5 if dtype == torch.float32 else 1e-4
    for label, got, want, present, n in (("text_h", text_h, th64, weights[0] is not None, idx.text_rows.numel()),
                                         ("image_z", image_z, iz64, weights[2] is not None, idx.image_rows.numel())):
        if not present or n == 0:
            assert got is None, label
            continue
        assert got.dtype == torch.float32 and got.shape == (n, rank) and got.is_contiguous(), label
        assert_close_rel(got, want, z_tol, label)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_weights_and_strided_x(target, dtype, path):
    layout, x, weights = make_case(target, "mixed", dtype, 2, 24, seed=9)
    big = torch.randn(*x.shape[:2], D_IN + 5, device=target.dev).to(dtype)
    big[..., :D_IN] = x
    strided = big[..., :D_IN]
    # transposed storage: the dispatch must make row-major copies before the kernel reads them
    t_weights = [w.t().contiguous().t() if w.dim() == 2 else w.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
                 for w in weights]
    assert not any(w.is_contiguous() for w in t_weights)
    with torch.no_grad():
        a = forward(target, path, strided, layout, t_weights)
        b = forward(target, path, x, layout, weights)
    if a is None:  # the fused path refused both (float16)
        assert b is None
        return
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- backward
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("rank", [8, 100, 256])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_vs_truth(target, dtype, k, rank, path):
    target.gpu_only(rank, k)
    names = ("mixed", "odd", "columns", "image_only", "text_only", "tiles")
    for i, name in enumerate(target.layouts(names, ("mixed", "odd", "image_only", "text_only"))):
        layout, x, weights = make_case(target, name, dtype, k, rank, seed=20 + i)
        xn = x.clone().requires_grad_()
        wn = [w.clone().requires_grad_() for w in weights]
        got = forward(target, path, xn, layout, wn)
        if got is None:
            continue
        x64 = x.double().requires_grad_()
        w64 = [w.double().requires_grad_() for w in weights]
        want = reference.literal_moss_lora(x64, layout, *w64, SCALE)
        assert_close_rel(got, want, TOLERANCE[dtype], f"{name} forward")
        grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(i)).to(dtype).to(target.dev)
        got.backward(grad)
        want.backward(grad.double())
        for label, a, b in zip(("x", "text_a", "text_b", "image_weight", "image_b"), [xn, *wn], [x64, *w64]):
            assert a.grad is not None and a.grad.dtype == a.dtype, label
            if b.grad is None or b.grad.abs().max() == 0:  # an adapter without rows of its modality
                assert a.grad.abs().max() == 0, f"{name} {label}"
                continue
            assert_close_rel(a.grad, b.grad, TOLERANCE[dtype], f"{name} d{label}")


# ---------------------------------------------------------------------------- state: chunked prefill, decoding
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_prefill_runs_the_split_path(target, dtype):
    """A pending state needs the per-tap P: "auto" runs the split path for it, "fused" refuses."""
    layout, x, weights = make_case(target, "mixed", dtype, 2, 8, seed=11)
    B, S, _ = x.shape
    with torch.no_grad():
        full = forward(target, "auto", x, layout, weights)
        state = mk.ConvLoRAState(B, 8, 2, device=target.dev)
        cuts = [0, 5, 6, 13, S]
        for c0, c1 in zip(cuts, cuts[1:]):
            got = forward(target, "auto", x[:, c0:c1], layout.window(c0, c1), weights, state=state)
            assert_close_rel(got, full[:, c0:c1], TOLERANCE[dtype], f"chunk {c0}:{c1}")
        with target.path("fused"), pytest.raises(RuntimeError, match=r"pending state|float16"):
            mk.moss_lora(x[:, :5], layout.window(0, 5), *weights, SCALE,
                         state=mk.ConvLoRAState(B, 8, 2, device=target.dev), backend=target.backend)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["mixed", "columns", "rows", "odd"])
def test_decode_steps_equal_fused_forward_and_truth(target, name, dtype, k):
    if target.simt and name not in ("odd", "columns"):
        pytest.skip("GPU-only layout (the simt target steps through 'odd' and 'columns')")
    rank = 64
    layout, x, weights = make_case(target, name, dtype, k, rank, seed=13)
    B, S, _ = x.shape
    width = max(layout.max_width, 1)
    state = mk.ConvLoRAState(B, rank, k, device=target.dev, max_width=width)
    want = ground_truth(x, layout, *weights, SCALE)
    g = torch.Generator().manual_seed(14)
    with torch.no_grad():
        full = forward(target, "auto", x, layout, weights)
        assert_close_rel(full, want, TOLERANCE[dtype], "forward")
        steps = layout.step_positions(target.dev)
        for t in range(S):
            pos, hh, ww = (p[t] for p in steps)
            base = torch.randn(B, D_OUT, generator=g).to(dtype).to(target.dev)
            got = mk.moss_lora_step(x[:, t], *weights, SCALE, state, pos, hh, ww, out=base.clone(),
                                    backend=target.backend)
            # out is accumulated into: base + delta, rounded once
            assert_close_rel(got, base.double() + want[:, t], TOLERANCE[dtype], f"step {t}")
            assert_close_rel(got, base.double() + full[:, t].double(), TOLERANCE[dtype], f"step {t} vs fused")


# ---------------------------------------------------------------------------- hostile inputs (issue 11)
def _step_through(tgt, x, layout, weights, scale=SCALE):
    """Every token of `layout` through moss_lora_step on the target, stacked to (batch, seq, d_out)."""
    B, S, _ = x.shape
    rank = weights[2].shape[0]
    state = mk.ConvLoRAState(B, rank, weights[2].shape[2], device=tgt.dev, max_width=max(layout.max_width, 1))
    steps = layout.step_positions(tgt.dev)
    outs = []
    for t in range(S):
        pos, hh, ww = (p[t] for p in steps)
        outs.append(mk.moss_lora_step(x[:, t], *weights, scale, state, pos, hh, ww, backend=tgt.backend))
    return torch.stack(outs, 1)


def test_float16_rank_space_sums_past_65504_stay_finite(target):
    """Finding 5: all-float16 inputs whose rank-space sums (text h = 96000, image z up to 128000)
    pass fp16's 65504 while the outputs (2400 text, 800..3200 image) do not: the up-GEMM must not
    round them to fp16 (it gave Inf), on both forward paths ("auto" runs split for fp16) and the
    decode step."""
    layout = mk.ImageLayout.from_spans(1, 9, [(0, 3, 2, 3)])  # 3 text tokens, then a 2 x 3 image
    d, f16 = 64, dict(dtype=torch.float16, device=target.dev)
    weights = [torch.full((4, d), 0.75, **f16), torch.full((8, 4), 1 / 160, **f16),
               torch.full((4, d, 2, 2), 0.25, **f16), torch.full((8, 4), 1 / 160, **f16)]
    x = torch.full((1, 9, d), 2000.0, **f16)
    want = ground_truth(x, layout, *weights)
    assert want.abs().max() < 65504 and want.abs().min() > 700  # the outputs themselves fit fp16
    with torch.no_grad():
        for path in ("auto", "split"):
            with target.path(path):
                got = mk.moss_lora(x, layout, *weights, backend=target.backend)
            assert got.dtype == torch.float16 and torch.isfinite(got).all(), path
            assert_close_rel(got, want, TOLERANCE[torch.float16], f"float16 past 65504, {path}")
        got = _step_through(target, x, layout, weights, 1.0)
    assert torch.isfinite(got).all()
    assert_close_rel(got, want, TOLERANCE[torch.float16], "float16 past 65504, decode steps")


def _bf16_rounding_bound(got, want):
    """Elementwise: `got` (bf16) is `want` computed with fp32 operands and rounded once to bf16,
    i.e. within half a bf16 ulp of |got| plus a fp32-sized slack. Rounding a fp32 weight to bf16
    (the old CUDA policy for bf16 x) breaks it on many elements."""
    g = got.detach().double()
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(g.abs().clamp_min(1e-30))))
    excess = (g - want).abs() - (0.5 * ulp + 1e-5 * want.abs().max())
    assert torch.isfinite(g).all() and excess.max() <= 0, f"{(excess > 0).sum().item()} elements beyond bf16 rounding"


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)], ids=str)
def test_mixed_dtypes_compute_with_fp32_operands(target, x_dtype, w_dtype):
    """Finding 10: when x and the weights differ in dtype the MMAs take fp32 operands (values as
    given, nothing rounded): fp32 x matches float64 to 1e-5 (forward, dx, decode steps); bf16 x with
    fp32 weights is the fp32 result rounded once to bf16 (native CUDA used to round the weights)."""
    layout, x, weights = make_case(target, "odd", torch.float32, 2, 100, seed=31)
    x, weights = x.to(x_dtype), [w.to(w_dtype) for w in weights]  # fp32 weights not bf16-representable
    check = ((lambda got, want, what: assert_close_rel(got, want, TOLERANCE[torch.float32], what))
             if x_dtype == torch.float32 else (lambda got, want, what: _bf16_rounding_bound(got, want)))
    x64 = x.double().requires_grad_()
    want = reference.literal_moss_lora(x64, layout, *[w.double() for w in weights], SCALE)
    with torch.no_grad():
        for path in ("split", "fused"):
            if path == "fused" and x_dtype != torch.float32:  # the fused kernel reads x in the compute type
                with target.path(path), pytest.raises(RuntimeError, match="dtypes differ"):
                    mk.moss_lora(x, layout, *weights, SCALE, backend=target.backend)
                continue
            with target.path(path):
                check(mk.moss_lora(x, layout, *weights, SCALE, backend=target.backend), want, f"forward {path}")
    xg = x.clone().requires_grad_()
    got = forward(target, "auto", xg, layout, weights)
    assert got.dtype == x_dtype
    check(got, want, "forward auto")
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(32)).to(x_dtype).to(target.dev)
    got.backward(grad)
    want.backward(grad.double())
    assert xg.grad.dtype == x_dtype
    check(xg.grad, x64.grad, "dx")
    with torch.no_grad():
        check(_step_through(target, x, layout, weights), want.detach(), "decode steps")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_step_writes_a_row_strided_out_at_its_stride(target, dtype):
    """Finding 11: the raw decode step into a column slice of a wider buffer (row stride 12, d_out
    6; NaN outside the slice) adds into exactly its own elements (the kernel addresses row b at
    b * d_out, so a strided out needs the dispatch's contiguous copy); ring as the reference's."""
    from moss_kernels import backends

    g = torch.Generator().manual_seed(41)
    weights = [w.to(dtype).to(target.dev) for w in random_adapters(8, 6, 3, 2, generator=g)]
    w64 = [w.double() for w in weights]
    run = backends.get_backend(target.backend).decode_step
    hh, ww = torch.tensor([2, 1], device=target.dev), torch.tensor([3, 1], device=target.dev)
    ring = torch.zeros(2, 4, 3, device=target.dev)
    ring64 = torch.zeros(2, 4, 3, dtype=torch.float64, device=target.dev)
    for t in range(6):  # sequence 0 walks a 2 x 3 image, sequence 1 stays on text
        pos = torch.tensor([t, -1], device=target.dev)
        xs = torch.randn(2, 8, generator=g).to(dtype).to(target.dev)
        base = torch.randn(2, 6, generator=g).to(dtype).to(target.dev)
        big = torch.full((2, 12), float("nan"), dtype=dtype, device=target.dev)
        out = big[:, :6]
        out.copy_(base)
        assert out.stride() == (12, 1)
        run(xs, out, *weights, 1.0, ring, pos, hh, ww)
        want = base.double()
        reference.decode_step(xs.double(), want, *w64, 1.0, ring64, pos, hh, ww)
        assert torch.isnan(big[:, 6:]).all(), f"step {t}: wrote outside the slice"
        assert_close_rel(out, want, TOLERANCE[dtype], f"step {t}: strided out")
        assert_close_rel(ring, ring64, 1e-5 if dtype == torch.float32 else TOLERANCE[dtype], f"step {t}: ring")


DEV = "cuda"  # the GPU-only tests below


@needs_cuda
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decode_step_is_graph_capturable(weight_dtype):
    """One captured moss_lora_step replayed 40 times (the image walking its first rows, every other
    sequence on text) equals stepping the reference backend; float32 adapters with bf16 activations
    take the kernel's weight conversions inside the graph."""
    B, W, d_in, d_out, rank = 8, 32, 512, 384, 64
    g = torch.Generator().manual_seed(51)
    ad = tuple(t.to(DEV, weight_dtype) for t in random_adapters(d_in, d_out, rank, 2, generator=g))
    state = mk.ConvLoRAState(B, rank, 2, device=DEV, max_width=W)
    ref = mk.ConvLoRAState(B, rank, 2, device=DEV, max_width=W)
    x = torch.randn(B, d_in, device=DEV, dtype=torch.bfloat16)
    pos = torch.zeros(B, dtype=torch.int64, device=DEV)
    hw = torch.full((B,), W, device=DEV), torch.full((B,), W, device=DEV)
    out = torch.zeros(B, d_out, device=DEV, dtype=torch.bfloat16)
    mk.moss_lora_step(x, *ad, 1.0, state, pos, *hw, out=out, backend="native")  # warm up outside
    state.pending.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mk.moss_lora_step(x, *ad, 1.0, state, pos, *hw, out=out, backend="native")
    text_rows = torch.arange(B, device=DEV) % 2 == 1
    for step in range(40):
        x.copy_(torch.randn(B, d_in, device=DEV))
        pos.copy_(torch.where(text_rows, -1, step))
        out.zero_()
        graph.replay()
        want = mk.moss_lora_step(x, *ad, 1.0, ref, pos, *hw, backend="reference")
        assert_close_rel(out, want, TOLERANCE[torch.bfloat16], f"step {step}")
    assert_close_rel(state.pending, ref.pending, TOLERANCE[torch.bfloat16], "ring")


# ---------------------------------------------------------------------------- a large case
@needs_cuda
def test_large_case_fused_and_split():
    """8 x 2048 tokens, d_in = d_out = 4096, rank 256, bf16, images up to 48 x 48: hundreds of row
    tiles per modality, 64 k slabs per tap and 64 output chunks per tile."""
    g = torch.Generator(device=DEV).manual_seed(0)
    layout = random_layout(random.Random(1), batch_size=8, seq_len=2048, max_side=48)
    d, rank = 4096, 256
    x = torch.randn(8, 2048, d, generator=g, device=DEV).to(torch.bfloat16)
    weights = [w.to(torch.bfloat16) for w in random_adapters(d, d, rank, 2, device=DEV, generator=g)]
    want = ground_truth(x, layout, *weights, SCALE)  # float64, on the GPU
    runs = {}
    with torch.no_grad():
        for path in ("fused", "split"):
            runs[path] = forward(Target("cuda", DEV, "native", ext), path, x, layout, weights)
            assert_close_rel(runs[path], want, TOLERANCE[torch.bfloat16], path)
    assert rel_err(runs["fused"], runs["split"]) <= TOLERANCE[torch.bfloat16]
