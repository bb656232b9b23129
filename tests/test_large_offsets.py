"""64-bit offsets: rows whose element offset in ``x`` passes 2^31, on every CPU backend."""

import pytest
import torch

import moss_kernels as mk
from moss_kernels.testing import TOLERANCE, assert_close_rel, ground_truth, random_adapters


def test_rows_past_2_to_the_31_elements():
    d_in, d_out, r = 4096, 3, 2
    seq = (1 << 31) // d_in + 64  # the last image's rows start past 2^31 elements into x
    try:
        x = torch.zeros(1, seq, d_in, dtype=torch.bfloat16)  # 4.3 GB
    except RuntimeError:
        pytest.skip("not enough memory for a 4.3 GB tensor")
    H, W = 3, 5
    start = seq - H * W - 2
    assert start * d_in > 2**31
    torch.manual_seed(0)
    x[0, start - 2 :] = torch.randn(H * W + 4, d_in).to(torch.bfloat16)
    layout = mk.ImageLayout.from_spans(1, seq, [(0, start, H, W)])
    _, _, w, b = random_adapters(d_in, d_out, r, 2, text=False)
    near = slice(start - 2, seq)
    # The ground truth on the tail alone (the image sits there entirely, text rows get nothing).
    tail = mk.ImageLayout.from_spans(1, seq - start + 2, [(0, 2, H, W)])
    want = ground_truth(x[:, near], tail, None, None, w, b)
    for backend in [n for n in mk.available_backends("cpu") if n != "triton"]:
        delta = torch.zeros(1, seq, d_out, dtype=torch.bfloat16)
        with torch.no_grad():
            mk.conv_lora(x, layout, w, b, out=delta, backend=backend)
        assert_close_rel(delta[:, near], want, TOLERANCE[torch.bfloat16], f"{backend} near the end")
        assert delta[:, : start - 2].abs().max() == 0, f"{backend} wrote text rows"
