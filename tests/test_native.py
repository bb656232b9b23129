"""The native backend (csrc/ CPU kernels) against the float64 ground truth and the reference backend.

Everything goes through the public ops with ``backend="native"`` except the binding's own error
checks, which call the extension directly. The first test to import ``moss_kernels.native``
builds the extension (about a minute on two cores) unless a build is cached.
"""

from __future__ import annotations

import os

import pytest
import torch

import moss_kernels as mk
from moss_kernels import backends
from moss_kernels.reference import literal_moss_lora

if os.environ.get("MOSS_KERNELS_NATIVE", "1") == "0":
    pytest.skip("MOSS_KERNELS_NATIVE=0: the native backend is disabled", allow_module_level=True)

import moss_kernels.native as native  # builds the extension on first use

ext = native.extension
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# name -> (batch, seq, d_in, d_out, r_text, r, spans)
LAYOUTS = {
    # several images per row, text between them, the last image of each row cut by the sequence end
    "mixed": (2, 40, 24, 20, 6, 8, [(0, 3, 3, 4), (0, 17, 1, 5), (0, 30, 4, 3), (1, 0, 5, 5), (1, 30, 3, 7)]),
    "columns": (2, 16, 16, 12, 4, 8, [(0, 2, 6, 1), (1, 5, 4, 1), (1, 10, 5, 1)]),  # H x 1 grids
    "rows": (2, 26, 16, 12, 4, 8, [(0, 0, 1, 9), (1, 10, 1, 13), (0, 12, 1, 3)]),  # 1 x W grids
    "odd": (1, 23, 13, 11, 3, 5, [(0, 4, 3, 5), (0, 20, 2, 2)]),  # odd sizes, second image cut
    "image_only": (2, 20, 16, 8, 4, 6, [(0, 0, 4, 5), (1, 0, 5, 4)]),
    "text_only": (2, 9, 16, 8, 4, 6, []),
    # runs of >= 64 consecutive rows go to BLAS in place (fp32), shorter ones are gathered: text
    # [92, 190) and [200+100, 400), images [5, 77) and [200, 300) are long; the rest short
    "long_runs": (2, 200, 24, 20, 6, 8, [(0, 5, 9, 8), (0, 80, 3, 4), (0, 190, 3, 4), (1, 0, 10, 10)]),
    # a wide batch: a decode step has 12 image rows and 8 text rows (the step's dot loops)
    "wide_batch": (20, 12, 16, 12, 4, 8, [(b, 0, 3, 4) for b in range(12)]),
    # wider: 34 image rows, enough for the step's BLAS path (MOSS_DECODE_BLAS_ROWS, 32)
    "widest_batch": (38, 6, 12, 10, 4, 6, [(b, 0, 2, 3) for b in range(34)]),
}


def make_case(name: str, dtype: torch.dtype, k: int, seed: int = 0, weight_dtype=None):
    B, S, d_in, d_out, rt, r, spans = LAYOUTS[name]
    g = torch.Generator().manual_seed(seed)
    wd = weight_dtype or dtype
    layout = mk.ImageLayout.from_spans(B, S, spans)
    x = torch.randn(B, S, d_in, generator=g).to(dtype)
    weights = (
        (torch.randn(rt, d_in, generator=g) / d_in**0.5).to(wd),
        torch.randn(d_out, rt, generator=g).to(wd),
        (torch.randn(r, d_in, k, k, generator=g) / (d_in * k * k) ** 0.5).to(wd),
        torch.randn(d_out, r, generator=g).to(wd),
    )
    return layout, x, weights


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def truth(layout, x, weights, scale):
    """float64 literal delta and its gradients for output gradient `grad` (closure)."""
    xs = x.double().requires_grad_()
    ws = [w.double().requires_grad_() for w in weights]
    return xs, ws, literal_moss_lora(xs, layout, *ws, scale)


# ---------------------------------------------------------------------------- registry
def test_listed_on_cpu():
    assert "native" in mk.available_backends("cpu")
    assert backends.default_backend(torch.device("cpu"), torch.float32, 2) == "native"
    assert not backends.get_backend("native").supports(torch.device("cpu"), torch.float64, 2)
    info = native.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]


def test_float64_is_refused():
    layout, x, w = make_case("mixed", torch.float64, 2)
    with pytest.raises(ValueError, match="native"):
        mk.moss_lora(x, layout, *w, 1.0, backend="native")


# ---------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_forward_backward_vs_truth(name, dtype, k):
    layout, x, weights = make_case(name, dtype, k)
    scale = 0.75
    xs, ws, want = truth(layout, x, weights, scale)
    xn = x.clone().requires_grad_()
    wn = [w.clone().requires_grad_() for w in weights]
    got = mk.moss_lora(xn, layout, *wn, scale, backend="native")
    assert got.dtype == dtype and got.shape == want.shape
    assert rel(got, want) <= TOL[dtype]
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got.backward(grad)
    want.backward(grad.double())
    for label, a, b in zip(("x", "text_a", "text_b", "image_weight", "image_b"),
                           [xn, *wn], [xs, *ws]):
        assert a.grad.dtype == a.dtype, label
        if b.grad is None or b.grad.abs().max() == 0:  # an adapter without rows of its modality: zeros
            assert a.grad is not None and a.grad.abs().max() == 0, label
            continue
        assert rel(a.grad, b.grad) <= TOL[dtype], label


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["mixed", "odd", "columns", "long_runs"])
def test_matches_reference_backend(name, dtype):
    layout, x, weights = make_case(name, dtype, 2, seed=3)
    outs, grads = [], []
    for backend in ("reference", "native"):
        xs = x.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in weights]
        y = mk.moss_lora(xs, layout, *ws, 0.5, backend=backend)
        y.backward(torch.ones_like(y))
        outs.append(y)
        grads.append([xs.grad] + [w.grad for w in ws])
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(outs[1], outs[0]) <= tol
    for a, b in zip(grads[1], grads[0]):
        assert rel(a, b) <= tol


def test_conv_lora_only_and_mixed_weight_dtypes():
    # conv adapter alone; bf16 activations with fp32 weights (gradients keep the weights' dtype)
    layout, x, weights = make_case("mixed", torch.bfloat16, 2, weight_dtype=torch.float32)
    w, b = (t.clone().requires_grad_() for t in weights[2:])
    xs = x.clone().requires_grad_()
    y = mk.conv_lora(xs, layout, w, b, 2.0, backend="native")
    x64 = x.double().requires_grad_()
    w64, b64 = (t.double().requires_grad_() for t in weights[2:])
    want = literal_moss_lora(x64, layout, None, None, w64, b64, 2.0)
    assert rel(y, want) <= 1e-2
    y.backward(torch.ones_like(y))
    want.backward(torch.ones_like(want))
    assert w.grad.dtype == torch.float32 and xs.grad.dtype == torch.bfloat16
    for a, c in ((xs, x64), (w, w64), (b, b64)):
        assert rel(a.grad, c.grad) <= 1e-2


@pytest.mark.parametrize("name", ["mixed", "long_runs"])
def test_deterministic(name):
    layout, x, weights = make_case(name, torch.float32, 2, seed=5)
    runs = []
    for _ in range(3):
        xs = x.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in weights]
        y = mk.moss_lora(xs, layout, *ws, 1.0, backend="native")
        y.backward(torch.full_like(y, 0.25))
        runs.append([y.detach()] + [t.grad for t in [xs, *ws]])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------- out= and strides
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["mixed", "long_runs"])
def test_out_accumulates_and_leaves_the_rest_alone(name, dtype):
    layout, x, weights = make_case(name, dtype, 2, seed=7)
    B, S, _ = x.shape
    d_out = weights[3].shape[0]
    # out's rows are strided inside a NaN-poisoned buffer; only its d_out columns may change
    big = torch.full((B, S, d_out + 3), float("nan"), dtype=dtype)
    out = big[..., :d_out]
    base = torch.randn(B, S, d_out).to(dtype)
    out.copy_(base)
    with torch.no_grad():
        mk.conv_lora(x, layout, weights[2], weights[3], 0.5, out=out, backend="native")
        delta = mk.conv_lora(x, layout, weights[2], weights[3], 0.5, backend="reference")
    assert torch.isnan(big[..., d_out:]).all()
    text = ~layout.image_mask()
    assert torch.equal(out[text], base[text])  # no text adapter: text rows untouched, bit for bit
    want = (base.float() + delta.float()).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(out[~text], want[~text]) <= tol


@pytest.mark.parametrize("name", ["odd", "long_runs"])
def test_strided_x_rows(name):
    layout, x, weights = make_case(name, torch.float32, 2, seed=8)
    big = torch.randn(*x.shape[:2], x.shape[2] + 5)
    big[..., : x.shape[2]] = x
    strided = big[..., : x.shape[2]]
    assert not strided.is_contiguous()
    with torch.no_grad():
        a = mk.moss_lora(strided, layout, *weights, 1.0, backend="native")
        b = mk.moss_lora(x, layout, *weights, 1.0, backend="native")
    # long runs go to BLAS in place, whose summation order may depend on the leading dimension
    assert torch.equal(a, b) if name == "odd" else rel(a, b) <= 1e-6


# ---------------------------------------------------------------------------- state: chunked prefill, decoding
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ["mixed", "columns", "rows", "odd", "long_runs"])
def test_chunked_prefill_equals_full_forward(name, k):
    layout, x, weights = make_case(name, torch.float32, k, seed=11)
    B, S, _ = x.shape
    r = weights[2].shape[0]
    cuts = [0, 5, 6, 13, S] if S > 13 else [0, 5, 6, S]
    with torch.no_grad():
        full = mk.moss_lora(x, layout, *weights, 0.5, backend="native")
        states = {be: mk.ConvLoRAState(B, r, k) for be in ("native", "reference")}
        for c0, c1 in zip(cuts, cuts[1:]):
            part = layout.window(c0, c1)
            got = {be: mk.moss_lora(x[:, c0:c1], part, *weights, 0.5, state=st, backend=be)
                   for be, st in states.items()}
            assert rel(got["native"], full[:, c0:c1]) <= 1e-5
            assert torch.allclose(got["native"], got["reference"], rtol=1e-5, atol=1e-5)
            assert torch.allclose(states["native"].pending, states["reference"].pending, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["mixed", "columns", "rows", "odd", "wide_batch", "widest_batch"])
def test_decode_steps_equal_full_forward_and_reference(name, dtype, k):
    layout, x, weights = make_case(name, dtype, k, seed=13)
    B, S, _ = x.shape
    r = weights[2].shape[0]
    width = max(layout.max_width, 1)
    states = {be: mk.ConvLoRAState(B, r, k, max_width=width) for be in ("native", "reference")}
    with torch.no_grad():
        full = mk.moss_lora(x, layout, *weights, 0.5, backend="native")
        steps = layout.step_positions()
        for t in range(S):
            pos, hh, ww = (p[t] for p in steps)
            base = torch.randn(B, full.shape[-1]).to(dtype)
            got = {}
            for be, st in states.items():
                got[be] = mk.moss_lora_step(x[:, t], *weights, 0.5, st, pos, hh, ww, out=base.clone(), backend=be)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            # out is accumulated into: compare with base + delta, rounded once like the kernel
            assert rel(got["native"], base.float() + full[:, t].float()) <= tol
            assert rel(got["native"], got["reference"]) <= (1e-6 if dtype == torch.float32 else 1e-2)
            assert torch.allclose(states["native"].pending, states["reference"].pending, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_decode_steps_on_every_vector_isa(isa):
    """The step's dot loops are compiled once per ISA and picked at run time; MOSS_CPU_ISA caps the
    pick, so the decode ground-truth tests above run here on the clones this CPU would not choose."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
                           "test_decode_steps_equal_full_forward_and_reference and not float16",
                           os.path.join(here, "test_native.py")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "MOSS_CPU_ISA": isa})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]


def test_decode_text_rows_leave_the_ring_alone():
    _, x, weights = make_case("mixed", torch.float32, 2, seed=17)
    st = mk.ConvLoRAState(1, weights[2].shape[0], 2, max_width=7)
    st.pending.normal_()
    before = st.pending.clone()
    xs = torch.randn(1, x.shape[-1])
    one = torch.ones(1, dtype=torch.int64)
    with torch.no_grad():
        mk.moss_lora_step(xs, *weights, 1.0, st, torch.tensor([-1]), one, one * 7, backend="native")
    assert torch.equal(st.pending, before)


# ---------------------------------------------------------------------------- binding checks
def _args():
    layout, x, weights = make_case("mixed", torch.float32, 2)
    idx = layout.index("cpu", 2)
    xf = x.view(-1, x.shape[-1])
    out = torch.zeros(xf.shape[0], weights[1].shape[0])
    return dict(x=xf, out=out, text_rows=idx.text_rows, image_rows=idx.image_rows, conv_sources=idx.conv_sources,
                text_a=weights[0], text_b=weights[1], image_weight=weights[2], image_b=weights[3], scale=1.0)


@pytest.mark.parametrize("arg,bad,error", [
    ("x", lambda a: a["x"].double(), TypeError),
    ("x", lambda a: a["x"].t().contiguous().t(), ValueError),  # column-strided
    ("out", lambda a: a["out"][:-1], ValueError),
    ("out", lambda a: a["out"].to(torch.int32), TypeError),
    ("text_rows", lambda a: a["text_rows"].int(), TypeError),
    ("text_rows", lambda a: a["text_rows"] + 10_000, ValueError),
    ("image_rows", lambda a: a["image_rows"].view(-1, 1), ValueError),
    ("conv_sources", lambda a: a["conv_sources"][:, :3].contiguous(), ValueError),
    ("conv_sources", lambda a: a["conv_sources"] + 1000, ValueError),
    ("text_a", lambda a: a["text_a"][:, :-1], ValueError),
    ("text_b", lambda a: a["text_b"][:-1], ValueError),
    ("image_weight", lambda a: a["image_weight"][..., :1], ValueError),
    ("image_b", lambda a: a["image_b"][:, :-1], ValueError),
])
def test_binding_names_the_bad_argument(arg, bad, error):
    args = _args()
    args[arg] = bad(args)
    with pytest.raises(error, match=f"'{arg}'"):
        ext.forward(**args)


def test_binding_checks_state_and_backward_arguments():
    args = _args()
    with pytest.raises(ValueError, match="'pending'"):
        ext.forward(**args, pending=torch.zeros(4, 3), read_tokens=torch.zeros(0, dtype=torch.int64),
                    read_slots=torch.zeros(0, dtype=torch.int64), write_slots=torch.zeros(0, dtype=torch.int64),
                    write_sources=torch.zeros(0, 4, dtype=torch.int64), write_keep=torch.zeros(0, dtype=torch.bool))
    th, iz = ext.forward(**args)
    layout = mk.ImageLayout.from_spans(2, 40, LAYOUTS["mixed"][-1])
    targets = layout.index("cpu", 2).conv_targets
    grad = torch.ones_like(args["out"])
    common = dict(grad_out=grad, x=args["x"], text_rows=args["text_rows"], image_rows=args["image_rows"],
                  conv_targets=targets, text_a=args["text_a"], text_b=args["text_b"],
                  image_weight=args["image_weight"], image_b=args["image_b"], scale=1.0, needs_x=True)
    with pytest.raises(TypeError, match="'image_z'"):
        ext.backward(**common, text_h=th, image_z=iz.double())
    with pytest.raises(ValueError, match="'text_h'"):
        ext.backward(**common, text_h=th[1:], image_z=iz)
    with pytest.raises(ValueError, match="'conv_targets'"):
        ext.backward(**{**common, "conv_targets": targets[:-1]}, text_h=th, image_z=iz)
    with pytest.raises(ValueError, match="'grad_out'"):
        ext.backward(**{**common, "grad_out": grad[:-1]}, text_h=th, image_z=iz)


def test_decode_rejects_a_ring_too_small():
    _, _, weights = make_case("mixed", torch.float32, 2)
    pending = torch.zeros(1, 3, weights[2].shape[0])
    with pytest.raises(ValueError, match="capacity"):
        ext.decode_step(torch.randn(1, 24), torch.zeros(1, 20), *weights, 1.0, pending, torch.tensor([0]),
                        torch.tensor([4]), torch.tensor([5]))


# ---------------------------------------------------------------------------- loading
def _run_python(code: str, **env) -> str:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_disabled_by_environment():
    out = _run_python("import moss_kernels as mk; from moss_kernels import backends;"
                      "print(mk.available_backends('cpu'), backends.backend_problems()['native'])",
                      MOSS_KERNELS_NATIVE="0")
    assert "'native'" not in out.split("]")[0] and "MOSS_KERNELS_NATIVE=0" in out


def test_failed_build_falls_back_with_the_reason(tmp_path):
    # A compiler that always fails: the forced build raises, moss_kernels still imports and runs.
    code = ("import warnings, torch, moss_kernels as mk; from moss_kernels import backends;"
            "print(mk.available_backends('cpu'));"
            "print('WHY', backends.backend_problems()['native']);"
            "lay = mk.ImageLayout.from_spans(1, 4, [(0, 0, 2, 2)]);"
            "w = [torch.randn(2, 3, 2, 2), torch.randn(5, 2)];"
            "warnings.simplefilter('always');"
            "print(mk.conv_lora(torch.randn(1, 4, 3), lay, *w).shape)")
    out = _run_python(code, MOSS_KERNELS_FORCE_BUILD="1", MOSS_KERNELS_CACHE_DIR=str(tmp_path), CXX="false")
    assert "native" not in out.splitlines()[0] and "reference" in out.splitlines()[0]
    assert "WHY ImportError: building the native extension" in out
    assert "the native backend is unavailable" in out  # the one warning, with the reason
    assert "torch.Size([1, 4, 5])" in out
