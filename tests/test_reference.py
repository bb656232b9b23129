"""The two reference implementations against each other and against the float64 ground truth."""

import random

import pytest
import torch
import torch.nn.functional as F

import moss_kernels as mk
from moss_kernels.reference import literal_moss_lora
from moss_kernels.testing import TOLERANCE, assert_close_rel, ground_truth, random_adapters, random_layout

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_literal_matches_a_hand_written_conv():
    """The literal reference is itself checked against an explicit per-token sum of four taps."""
    torch.manual_seed(0)
    H, W, d, r = 3, 4, 5, 2
    lay = mk.ImageLayout.from_spans(1, H * W + 2, [(0, 1, H, W)])
    x = torch.randn(1, H * W + 2, d, dtype=torch.float64)
    w = torch.randn(r, d, 2, 2, dtype=torch.float64)
    eye = torch.eye(r, dtype=torch.float64)
    delta = literal_moss_lora(x, lay, None, None, w, eye, 1.0)[0]
    grid = x[0, 1 : 1 + H * W].view(H, W, d)
    for i in range(H):
        for j in range(W):
            want = torch.zeros(r, dtype=torch.float64)
            for a in range(2):
                for b in range(2):
                    si, sj = i - 1 + a, j - 1 + b
                    if si >= 0 and sj >= 0:
                        want += w[:, :, a, b] @ grid[si, sj]
            assert torch.allclose(delta[1 + i * W + j], want)
    assert delta[0].abs().max() == 0 and delta[-1].abs().max() == 0  # text rows, no text adapter


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_rank_space_equals_ground_truth_float32(seed, k):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lay = random_layout(rng)
    d_in, d_out, r = rng.randint(1, 13), rng.randint(1, 11), rng.randint(1, 6)
    x = torch.randn(lay.batch_size, lay.seq_len, d_in)
    adapters = random_adapters(d_in, d_out, r, k)
    ref = ground_truth(x, lay, *adapters, scale=0.7)
    out = mk.moss_lora(x, lay, *adapters, scale=0.7, backend="reference")
    assert_close_rel(out, ref, TOLERANCE[torch.float32])
    conv_only = mk.conv_lora(x, lay, adapters[2], adapters[3], 0.7, backend="reference")
    assert_close_rel(conv_only, ground_truth(x, lay, None, None, *adapters[2:], scale=0.7), TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", [None, torch.float32])
def test_low_precision_within_tolerance(dtype, weight_dtype):
    rng = random.Random(7)
    torch.manual_seed(7)
    for _ in range(4):
        lay = random_layout(rng)
        x = torch.randn(lay.batch_size, lay.seq_len, 24).to(dtype)
        adapters = random_adapters(24, 17, 8, 2, dtype=weight_dtype or dtype)
        out = mk.moss_lora(x, lay, *adapters, scale=2.0)
        assert out.dtype == dtype
        assert_close_rel(out, ground_truth(x, lay, *adapters, scale=2.0), TOLERANCE[dtype])


def test_literal_also_matches_torch_conv_on_the_whole_grid():
    """A full image in one span: the literal path equals F.conv2d on the padded grid directly."""
    torch.manual_seed(1)
    H, W, d, r = 4, 3, 6, 3
    lay = mk.ImageLayout.from_spans(1, H * W, [(0, 0, H, W)])
    x = torch.randn(1, H * W, d, dtype=torch.float64)
    w = torch.randn(r, d, 2, 2, dtype=torch.float64)
    eye = torch.eye(r, dtype=torch.float64)
    z = F.conv2d(F.pad(x[0].t().reshape(1, d, H, W), (1, 0, 1, 0)), w).reshape(r, H * W).t()
    assert torch.allclose(mk.conv_lora(x, lay, w, eye)[0], z)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradients_match_autograd_of_the_literal(k):
    rng = random.Random(11 + k)
    torch.manual_seed(k)
    for _ in range(4):
        lay = random_layout(rng)
        d_in, d_out, r = 7, 5, 3
        x = torch.randn(lay.batch_size, lay.seq_len, d_in, dtype=torch.float64, requires_grad=True)
        ws = [t.requires_grad_() for t in random_adapters(d_in, d_out, r, k, dtype=torch.float64)]
        g = torch.randn(lay.batch_size, lay.seq_len, d_out, dtype=torch.float64)
        want = torch.autograd.grad(literal_moss_lora(x, lay, *ws, 0.5), (x, *ws), g)
        got = torch.autograd.grad(mk.moss_lora(x, lay, *ws, 0.5, backend="reference"), (x, *ws), g)
        for name, a, b in zip(["x", "text_a", "text_b", "image_weight", "image_b"], got, want):
            assert_close_rel(a, b, 1e-12, f"grad {name}")


def test_gradcheck_float64():
    lay = mk.ImageLayout.from_spans(2, 9, [(0, 1, 2, 3), (1, 4, 3, 2)])  # the second cut by the end
    torch.manual_seed(0)
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    ws = [t.requires_grad_() for t in random_adapters(3, 4, 2, 2, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: mk.moss_lora(a[0], lay, *a[1:], 0.9, backend="reference"), (x, *ws))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_low_precision_and_mixed_dtypes(dtype):
    """bf16/fp16 activations with float32 adapters: grads within tolerance, each in its own dtype."""
    rng = random.Random(3)
    torch.manual_seed(3)
    lay = random_layout(rng, batch_size=2, seq_len=30)
    x64 = torch.randn(2, 30, 16, dtype=torch.float64)
    ws64 = random_adapters(16, 12, 4, 2, dtype=torch.float64)
    g64 = torch.randn(2, 30, 12, dtype=torch.float64)
    xr = x64.clone().requires_grad_()
    wr = [t.clone().requires_grad_() for t in ws64]
    want = torch.autograd.grad(literal_moss_lora(xr, lay, *wr, 1.5), (xr, *wr), g64)
    x = x64.to(dtype).requires_grad_()
    ws = [t.float().requires_grad_() for t in ws64]
    got = torch.autograd.grad(mk.moss_lora(x, lay, *ws, 1.5), (x, *ws), g64.to(dtype))
    assert got[0].dtype == dtype and all(g.dtype == torch.float32 for g in got[1:])
    # inputs were rounded to `dtype`: compare with the float64 grads of the rounded inputs
    for name, a, b in zip(["x", "text_a", "text_b", "image_weight", "image_b"], got, want):
        assert_close_rel(a, b, 3 * TOLERANCE[dtype], f"grad {name}")


def test_text_only_and_image_only_layouts():
    torch.manual_seed(5)
    adapters = random_adapters(6, 4, 2, 2)
    text = mk.ImageLayout.text_only(2, 5)
    x = torch.randn(2, 5, 6)
    assert_close_rel(mk.moss_lora(x, text, *adapters), ground_truth(x, text, *adapters), 1e-5)
    image = mk.ImageLayout.from_spans(1, 6, [(0, 0, 2, 3)])
    x = torch.randn(1, 6, 6)
    assert_close_rel(mk.moss_lora(x, image, *adapters), ground_truth(x, image, *adapters), 1e-5)
