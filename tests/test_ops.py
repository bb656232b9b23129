"""The custom ops: registration, in-place accumulation, dispatch, torch.compile, bad input."""

import random

import pytest
import torch

import moss_kernels as mk
from moss_kernels import backends
from moss_kernels.reference import literal_moss_lora
from moss_kernels.testing import assert_close_rel, ground_truth, random_adapters, random_layout


def _case(seed=0, dtype=torch.float32, k=2, B=2, S=20, d_in=6, d_out=5, r=3):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lay = random_layout(rng, batch_size=B, seq_len=S)
    x = torch.randn(B, S, d_in, dtype=dtype)
    return lay, x, random_adapters(d_in, d_out, r, k, dtype=dtype)


# --------------------------------------------------------------------------- registration
def test_ops_live_in_the_moss_namespace():
    for name in ("lora_forward", "lora_backward", "lora_accumulate_", "lora_step_"):
        assert hasattr(torch.ops.moss, name)


def test_opcheck_forward_and_accumulate():
    lay, x, (ta, tb, w, ib) = _case()
    idx = lay.index("cpu", 2)
    x.requires_grad_()
    ws = [t.requires_grad_() for t in (ta, tb, w, ib)]
    torch.library.opcheck(torch.ops.moss.lora_forward,
                          (x, idx.text_rows, idx.image_rows, idx.conv_sources, idx.conv_targets, *ws, 0.5, "reference"))
    out = torch.randn(2, 20, 5)
    torch.library.opcheck(torch.ops.moss.lora_accumulate_,
                          (out, x.detach(), idx.text_rows, idx.image_rows, idx.conv_sources,
                           *[t.detach() for t in ws], 0.5, "reference", None, None, None, None, None, None))


def test_opcheck_accumulate_with_state_and_step():
    lay = mk.ImageLayout.from_spans(2, 6, [(0, 1, 3, 3), (1, 0, 2, 4, 2)])
    _, _, (ta, tb, w, ib) = _case()
    x = torch.randn(2, 6, 6)
    st = mk.ConvLoRAState(2, 3, max_width=4)
    si = lay.state_index("cpu", 2, st.capacity)
    idx = lay.index("cpu", 2)
    torch.library.opcheck(torch.ops.moss.lora_accumulate_,
                          (torch.randn(2, 6, 5), x, idx.text_rows, idx.image_rows, idx.conv_sources, ta, tb, w, ib,
                           0.5, "reference", st.pending.view(-1, 3).clone(), *si))
    pos, h, wd = torch.tensor([4, -1]), torch.tensor([3, 1]), torch.tensor([3, 1])
    torch.library.opcheck(torch.ops.moss.lora_step_,
                          (torch.randn(2, 5), torch.randn(2, 6), ta, tb, w, ib, 0.5, st.pending.clone(), pos, h, wd,
                           "reference"))


# --------------------------------------------------------------------------- out= and dispatch
def test_out_accumulates_in_place_without_grad():
    lay, x, adapters = _case(1)
    base = torch.randn(2, 20, 5)
    y = base.clone()
    ptr = y.data_ptr()
    with torch.no_grad():
        got = mk.moss_lora(x, lay, *adapters, scale=0.3, out=y)
    assert got is y and y.data_ptr() == ptr
    assert_close_rel(y - base, ground_truth(x, lay, *adapters, scale=0.3), 1e-5)


def test_out_with_grad_flows_to_everything():
    lay, x, adapters = _case(2)
    x.requires_grad_()
    ws = [t.requires_grad_() for t in adapters]
    lin = torch.nn.Linear(6, 5)
    y = lin(x)
    y = mk.moss_lora(x, lay, *ws, scale=0.3, out=y)
    y.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, *ws, lin.weight))


def test_out_non_contiguous_is_updated():
    lay, x, adapters = _case(3)
    big = torch.randn(2, 20, 9)
    view = big[:, :, 2:7]
    before = view.clone()
    with torch.no_grad():
        mk.moss_lora(x, lay, *adapters, out=view)
    assert_close_rel(big[:, :, 2:7] - before, ground_truth(x, lay, *adapters), 1e-5)


def test_strided_x_rows():
    lay, x, adapters = _case(4)
    wide = torch.randn(2, 20, 11)
    wide[:, :, 3:9] = x
    xs = wide[:, :, 3:9]
    assert not xs.is_contiguous()
    assert_close_rel(mk.moss_lora(xs, lay, *adapters), ground_truth(x, lay, *adapters), 1e-5)


def test_available_backends_and_selection():
    names = mk.available_backends("cpu")
    assert "reference" in names
    assert names == mk.available_backends(torch.device("cpu"))
    lay, x, adapters = _case(5)
    for name in names:
        if name == "triton" and not backends.interpreting_triton():
            continue
        assert_close_rel(mk.moss_lora(x, lay, *adapters, backend=name), ground_truth(x, lay, *adapters), 1e-5)
    with pytest.raises(ValueError, match="backend 'nope' is not available"):
        mk.moss_lora(x, lay, *adapters, backend="nope")
    # float64 only runs on the reference backend; the default picks it
    assert backends.default_backend(torch.device("cpu"), torch.float64, 2) == "reference"


def test_unavailable_backend_reports_why():
    problems = backends.backend_problems()
    for name, why in problems.items():
        with pytest.raises(ValueError, match="not available"):
            backends.get_backend(name)
        assert why  # a reason is recorded


# --------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_moss_linear_forward_and_backward():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    layer = mk.MossLinear(base, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.text_B.normal_()
        layer.image_B.normal_()
    lay = mk.ImageLayout.from_spans(2, 12, [(0, 1, 2, 3), (1, 5, 3, 3)])
    x = torch.randn(2, 12, 8, requires_grad=True)
    eager = layer(x, lay)
    eager.sum().backward()
    grads = [p.grad.clone() for p in (x, layer.text_A, layer.image_A, layer.image_B)]
    for p in (x, layer.text_A, layer.image_A, layer.image_B, layer.text_B):
        p.grad = None
    compiled = torch.compile(lambda inp: layer(inp, lay), fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, eager, atol=1e-6)
    for a, b in zip(grads, (x.grad, layer.text_A.grad, layer.image_A.grad, layer.image_B.grad)):
        assert torch.allclose(a, b, atol=1e-5)


def test_compile_fullgraph_inductor():
    torch.manual_seed(0)
    lay = mk.ImageLayout.from_spans(1, 10, [(0, 2, 2, 4)])
    adapters = [t.requires_grad_() for t in random_adapters(5, 3, 2, 2)]
    f = torch.compile(lambda x: mk.moss_lora(x, lay, *adapters, 0.5).square().sum(), fullgraph=True)
    x = torch.randn(1, 10, 5, requires_grad=True)
    f(x).backward()
    x64 = x.detach().double().requires_grad_()
    ws64 = [t.detach().double() for t in adapters]
    literal_moss_lora(x64, lay, *ws64, 0.5).square().sum().backward()
    assert_close_rel(x.grad, x64.grad, 1e-5, "grad x")


def test_compile_does_not_recompile_for_every_layout():
    """A fresh layout per batch: one recompile for dynamic shapes, then none."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = mk.MossLinear(torch.nn.Linear(8, 6), rank=4, alpha=8, dropout=0.0)
    f = torch.compile(lambda x, lay: layer(x, lay), fullgraph=True, backend="aot_eager")
    rng = random.Random(0)
    for _ in range(5):
        lay = random_layout(rng, batch_size=2, seq_len=24)
        f(torch.randn(2, 24, 8, requires_grad=True), lay).sum().backward()
    assert counters["stats"]["unique_graphs"] <= 2


# --------------------------------------------------------------------------- bad input names the argument
@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(x="not a tensor"), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.ones(2, 20, 6, dtype=torch.int64)), TypeError, "x must be float32"),
        (dict(x=torch.ones(20, 6)), ValueError, "x must have 3 dimensions"),
        (dict(x=torch.ones(2, 19, 6)), ValueError, "but the layout is for"),
        (dict(layout="spans"), TypeError, "layout must be an ImageLayout"),
        (dict(text_a=torch.ones(3, 7)), ValueError, r"text_a must have shape \(rank, 6\)"),
        (dict(text_b=torch.ones(5, 4)), ValueError, r"text_b must have shape \(d_out, 3\)"),
        (dict(text_b=None), ValueError, "text_a and text_b must be given together"),
        (dict(image_weight=torch.ones(3, 6, 2, 3)), ValueError, "image_weight must have shape"),
        (dict(image_weight=torch.ones(3, 6, 2)), ValueError, "image_weight must have 4 dimensions"),
        (dict(image_b=torch.ones(5, 2)), ValueError, r"image_b must have shape \(d_out, 3\)"),
        (dict(image_b=torch.ones(4, 3)), ValueError, "image_b has d_out 4 but text_b has 5"),
        (dict(text_a=None, text_b=None, image_weight=None, image_b=None), ValueError, "at least one adapter"),
        (dict(scale=float("nan")), TypeError, "scale must be a finite real number"),
        (dict(scale="2"), TypeError, "scale must be a finite real number"),
        (dict(out=torch.ones(2, 20, 4)), ValueError, r"out must have shape \(2, 20, 5\)"),
        (dict(out=torch.ones(2, 20, 5, dtype=torch.int32)), TypeError, "out must be float32"),
        (dict(state="state"), TypeError, "state must be a ConvLoRAState"),
        (dict(image_weight=torch.ones(3, 6, 2, 2, device="meta")), ValueError, "image_weight is on meta"),
    ],
)
def test_bad_input_raises_naming_the_argument(change, error, message):
    lay, x, (ta, tb, w, ib) = _case()
    args = dict(x=x, layout=lay, text_a=ta, text_b=tb, image_weight=w, image_b=ib, scale=1.0, out=None, state=None)
    args.update(change)
    with torch.no_grad(), pytest.raises(error, match=message):
        mk.moss_lora(args.pop("x"), args.pop("layout"), args.pop("text_a"), args.pop("text_b"),
                     args.pop("image_weight"), args.pop("image_b"), args.pop("scale"), **args)


def test_step_bad_input():
    _, _, (ta, tb, w, ib) = _case()
    st = mk.ConvLoRAState(2, 3, max_width=4)
    x = torch.randn(2, 6)
    good = dict(image_pos=torch.tensor([0, -1]), height=torch.tensor([2, 1]), width=torch.tensor([2, 1]))
    for key, bad, message in [
        ("image_pos", torch.tensor([0, -1], dtype=torch.int32), "image_pos must be int64"),
        ("height", torch.tensor([2]), r"height must be int64 of shape \(2,\)"),
        ("width", [2, 1], "width must be a torch.Tensor"),
    ]:
        kw = dict(good, **{key: bad})
        with pytest.raises((ValueError, TypeError), match=message):
            mk.moss_lora_step(x, ta, tb, w, ib, 1.0, st, **kw)
    with pytest.raises(TypeError, match="state must be a ConvLoRAState"):
        mk.moss_lora_step(x, ta, tb, w, ib, 1.0, None, **good)
    with pytest.raises(ValueError, match="does not fit"):
        mk.moss_lora_step(x, ta, tb, w, ib, 1.0, mk.ConvLoRAState(3, 3), **good)
    with pytest.raises(ValueError, match=r"width\[0\] = 3: the state's capacity 2 is below"):
        mk.moss_lora_step(x, ta, tb, w, ib, 1.0, mk.ConvLoRAState(2, 3, max_width=1),
                          image_pos=torch.tensor([0, -1]), height=torch.tensor([2, 1]), width=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=r"image_pos\[0\] = 4 is beyond the 2x2 image"):
        mk.moss_lora_step(x, ta, tb, w, ib, 1.0, st, image_pos=torch.tensor([4, -1]), height=torch.tensor([2, 1]),
                          width=torch.tensor([2, 1]))
