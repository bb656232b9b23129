"""Incremental decoding: one full forward == chunked prefill == token by token (SPEC §1)."""

import random

import pytest
import torch

import moss_kernels as mk
from moss_kernels.layout import ImageSpan, ring_size
from moss_kernels.testing import TOLERANCE, assert_close_rel, ground_truth, random_adapters, random_layout


def _chunked(x, layout, adapters, scale, bounds, rank, k, backend="reference"):
    """Run ``layout`` window by window through one state; returns the concatenated outputs."""
    st = mk.ConvLoRAState(layout.batch_size, rank, k)
    outs = []
    with torch.no_grad():
        for lo, hi in zip(bounds, bounds[1:]):
            outs.append(mk.moss_lora(x[:, lo:hi], layout.window(lo, hi), *adapters, scale, state=st, backend=backend))
    return torch.cat(outs, dim=1), st


def _stepwise(x, layout, adapters, scale, rank, k, backend="reference"):
    """Token by token through the graph-capturable step, positions from the layout."""
    B, S, _ = x.shape
    st = mk.ConvLoRAState(B, rank, k, max_width=max(layout.max_width, 1))
    pos, height, width = layout.step_positions()
    outs = []
    with torch.no_grad():
        for t in range(S):
            outs.append(mk.moss_lora_step(x[:, t], *adapters, scale, st, pos[t], height[t], width[t],
                                          backend=backend))
    return torch.stack(outs, dim=1), st


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("seed", range(8))
def test_full_equals_chunked_equals_stepwise(seed, k):
    rng = random.Random(100 + seed)
    torch.manual_seed(seed)
    lay = random_layout(rng, max_side=6)
    d_in, d_out, r = rng.randint(2, 9), rng.randint(2, 7), rng.randint(1, 4)
    adapters = random_adapters(d_in, d_out, r, k)
    x = torch.randn(lay.batch_size, lay.seq_len, d_in)
    truth = ground_truth(x, lay, *adapters, scale=0.8)
    full = mk.moss_lora(x, lay, *adapters, 0.8)
    assert_close_rel(full, truth, TOLERANCE[torch.float32], "full")
    cuts = sorted(rng.sample(range(1, lay.seq_len), k=min(rng.randint(1, 5), lay.seq_len - 1)))
    chunked, _ = _chunked(x, lay, adapters, 0.8, [0, *cuts, lay.seq_len], r, k)
    assert_close_rel(chunked, truth, TOLERANCE[torch.float32], f"chunked at {cuts}")
    ones, _ = _chunked(x, lay, adapters, 0.8, list(range(lay.seq_len + 1)), r, k)
    assert_close_rel(ones, truth, TOLERANCE[torch.float32], "one-token chunks")
    steps, _ = _stepwise(x, lay, adapters, 0.8, r, k)
    assert_close_rel(steps, truth, TOLERANCE[torch.float32], "decode steps")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_low_precision(dtype):
    rng = random.Random(5)
    torch.manual_seed(5)
    lay = random_layout(rng, batch_size=2, seq_len=40)
    adapters = random_adapters(16, 8, 4, 2, dtype=dtype)
    x = torch.randn(2, 40, 16).to(dtype)
    truth = ground_truth(x, lay, *adapters, scale=1.0)
    chunked, _ = _chunked(x, lay, adapters, 1.0, [0, 7, 8, 23, 40], 4, 2)
    assert chunked.dtype == dtype
    assert_close_rel(chunked, truth, TOLERANCE[dtype])
    steps, _ = _stepwise(x, lay, adapters, 1.0, 4, 2)
    assert_close_rel(steps, truth, TOLERANCE[dtype])


def test_chunked_and_stepwise_leave_the_same_state():
    """Prefill that ends inside an image leaves exactly what the decode step needs."""
    torch.manual_seed(0)
    lay = mk.ImageLayout.from_spans(2, 15, [(0, 2, 4, 5), (1, 0, 3, 3), (1, 10, 2, 6)])
    adapters = random_adapters(6, 5, 3, 2)
    x = torch.randn(2, 15, 6)
    _, st_chunk = _chunked(x, lay, adapters, 1.0, [0, 6, 15], 3, 2)
    _, st_step = _stepwise(x, lay, adapters, 1.0, 3, 2)
    for b, W in ((0, 5), (1, 6)):
        L = ring_size(2, W)
        assert torch.allclose(st_chunk.pending[b, :L], st_step.pending[b, :L], atol=1e-6)


def test_state_memory_is_rank_wide_not_input_wide():
    """O(batch * (W+1) * r): a 32x32 image at d_in 4096 keeps 33 r-wide sums per sequence."""
    B, W, r = 3, 32, 8
    lay = mk.ImageLayout.from_spans(B, 100, [(b, 0, 32, W) for b in range(B)])
    st = mk.ConvLoRAState(B, r, 2)
    x = torch.randn(B, 100, 4096)
    adapters = random_adapters(4096, 4, r, 2)
    with torch.no_grad():
        mk.moss_lora(x, lay, *adapters, state=st)
    assert st.pending.shape == (B, W + 1, r)
    assert st.nbytes() == B * (W + 1) * r * 4


def test_state_checks_continuations():
    adapters = random_adapters(4, 3, 2, 2)
    st = mk.ConvLoRAState(1, 2, 2)
    first = mk.ImageLayout.from_spans(1, 5, [(0, 1, 3, 3)])  # image tokens 0..3 of a 3x3 image
    with torch.no_grad():
        mk.moss_lora(torch.randn(1, 5, 4), first, *adapters, state=st)
        wrong_offset = mk.ImageLayout.from_spans(1, 3, [ImageSpan(0, 0, 3, 3, 5, 3)])
        with pytest.raises(ValueError, match="expects token 4 of a 3x3 image"):
            mk.moss_lora(torch.randn(1, 3, 4), wrong_offset, *adapters, state=st)
        wrong_shape = mk.ImageLayout.from_spans(1, 3, [ImageSpan(0, 0, 2, 8, 4, 3)])
        with pytest.raises(ValueError, match="expects token 4 of a 3x3 image"):
            mk.moss_lora(torch.randn(1, 3, 4), wrong_shape, *adapters, state=st)
        fresh = mk.ConvLoRAState(1, 2, 2)
        with pytest.raises(ValueError, match="expects no image"):
            mk.moss_lora(torch.randn(1, 3, 4), wrong_offset, *adapters, state=fresh)
        with pytest.raises(ValueError, match="rank 3 does not match"):
            mk.moss_lora(torch.randn(1, 5, 4), first, *adapters, state=mk.ConvLoRAState(1, 3, 2))
        with pytest.raises(ValueError, match="batch_size 2 does not match"):
            mk.moss_lora(torch.randn(1, 5, 4), first, *adapters, state=mk.ConvLoRAState(2, 2, 2))
        with pytest.raises(ValueError, match="needs a conv adapter"):
            mk.moss_lora(torch.randn(1, 5, 4), first, *adapters[:2], None, None, state=st)
    x = torch.randn(1, 5, 4, requires_grad=True)
    with pytest.raises(ValueError, match="state= is for inference"):
        mk.moss_lora(x, first, *adapters, state=mk.ConvLoRAState(1, 2, 2))


def test_continuation_without_state_is_refused_by_the_literal_reference():
    lay = mk.ImageLayout.from_spans(1, 3, [ImageSpan(0, 0, 3, 3, 5, 3)])
    with pytest.raises(ValueError, match="continuing from a state"):
        ground_truth(torch.randn(1, 3, 4), lay, *random_adapters(4, 3, 2, 2))


def test_reorder_follows_beams():
    torch.manual_seed(1)
    lay = mk.ImageLayout.from_spans(3, 6, [(0, 1, 3, 3), (1, 0, 2, 4), (2, 3, 3, 2)])
    adapters = random_adapters(4, 3, 2, 2)
    st = mk.ConvLoRAState(3, 2, 2)
    with torch.no_grad():
        mk.moss_lora(torch.randn(3, 6, 4), lay, *adapters, state=st)
    before = st.pending.clone()
    st.reorder([2, 2, 0])
    assert torch.equal(st.pending[0], before[2]) and torch.equal(st.pending[2], before[0])
    # the host record moved too: row 2 now continues the 3x3 image at token 5
    nxt = mk.ImageLayout.from_spans(3, 1, [ImageSpan(2, 0, 3, 3, 5, 1)])
    with torch.no_grad():
        mk.moss_lora(torch.randn(3, 1, 4), nxt, *adapters, state=st)
    with pytest.raises(ValueError, match="reorder: indices must lie"):
        st.reorder([0, 1, 3])
    st.reorder([1, 1, 0, 2])  # beam search may grow or shrink the batch
    assert st.batch_size == 4 and st.pending.shape[0] == 4
    with pytest.raises(ValueError, match="non-empty"):
        st.reorder([])


def test_state_constructor_checks():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        mk.ConvLoRAState(1, 0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        mk.ConvLoRAState(1.5, 2)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        mk.ConvLoRAState(1, 2, dtype=torch.int32)
