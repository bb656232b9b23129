"""The cost model: the work a case must do, the device's ceilings, the floor time.

For each case and adapter kind, ``cost`` gives the FLOPs of the rank-space computation (README, "How it is
built": ``P = x K_all^T`` over image rows, ``x A_t^T`` over text rows, then ``B``) and the fewest bytes that
must cross the memory bus: every input read once, every output written once, per call; nothing
intermediate (the rank-``r`` rows stay on chip, backward recomputes rather than saves). Weights are
float32 (the adapter's default), activations in the case's dtype.

``measure_ceilings`` times one large copy (bandwidth: bytes read + written per second) and one large
square matmul (FLOP/s), both in the case's dtype, at the start of a run; a ceiling is the best run.
The floor of a case is ``max(flops / peak_flops, bytes / bandwidth)``; every measured time is
reported as a multiple of it.
"""

from __future__ import annotations

import dataclasses

import torch

from .cases import KERNEL_SIZE, MIXES, Case, mix_layout

__all__ = ["Ceilings", "Cost", "adapter_kind", "cost", "floor_s", "measure_ceilings", "tokens"]

WEIGHT_BYTES = 4  # adapter weights are float32
STATE_BYTES = 4  # ConvLoRAState.pending is float32


@dataclasses.dataclass
class Cost:
    flops: float
    bytes: float


@dataclasses.dataclass
class Ceilings:
    dtype: str
    bandwidth: float  # bytes per second (read + write)
    flops: float  # per second
    copy_bytes: int
    matmul_n: int


def adapter_kind(impl: str) -> str:
    """Which function ``impl`` computes: ``moss``, ``lora``, ``moe_lora`` or ``none`` (base alone)."""
    return {"base": "none", "lora": "lora", "moe_lora": "moe_lora"}.get(impl, "moss")


def tokens(case: Case) -> tuple:
    """``(n_text, n_image)`` rows of one call."""
    if case.op == "decode":
        n_image = round(MIXES[case.mix] * case.batch)
        return case.batch - n_image, n_image
    layout = mix_layout(case.batch, case.seq, case.model.grid, MIXES[case.mix])
    return layout.num_text_tokens, layout.num_image_tokens


def cost(case: Case, impl: str) -> Cost:
    """FLOPs and fewest bytes moved of one call of ``case`` computed as ``impl`` computes it."""
    kind = adapter_kind(impl)
    e = torch.empty(0, dtype=case.torch_dtype).element_size()
    r, d_in, d_out = case.rank, case.d_in, case.d_out
    nt, ni = tokens(case)
    n = nt + ni
    if kind == "lora":
        nt, ni = n, 0
    taps = {"moss": KERNEL_SIZE * KERNEL_SIZE, "moe_lora": 1}.get(kind, 0)
    if kind == "none":
        nt = ni = 0
    flops = 2.0 * nt * r * (d_in + d_out) + 2.0 * ni * r * (taps * d_in + d_out)
    weights = (nt > 0) * (r * d_in + d_out * r) + (ni > 0) * (taps * r * d_in + d_out * r)
    w_bytes = weights * WEIGHT_BYTES
    x_bytes, y_bytes = n * d_in * e, n * d_out * e
    op = case.op
    if op == "forward":
        return Cost(flops, x_bytes + y_bytes + w_bytes)
    if op == "fwd_bwd":
        # backward: d(B) and d(rank rows) from the gradient, then d(A or K) and dx: twice the forward
        return Cost(3 * flops, 2 * (x_bytes + y_bytes + w_bytes) + x_bytes + w_bytes)
    if op == "prefill":
        chunks = -(-case.seq // case.chunk)
        width = case.model.grid[1]
        state = (kind == "moss") * chunks * case.batch * 2 * (KERNEL_SIZE - 1) * (width + 1) * r * STATE_BYTES
        return Cost(flops, x_bytes + y_bytes + chunks * w_bytes + state)
    if op == "decode":
        state = (kind == "moss") * ni * taps * r * STATE_BYTES  # read own slot, leave the other taps
        return Cost(flops, x_bytes + y_bytes + w_bytes + state)
    base_flops, base_w = 2.0 * n * d_in * d_out, d_in * d_out * e
    if op == "layer_fwd":
        return Cost(base_flops + flops, x_bytes + base_w + y_bytes + w_bytes)
    if op == "layer_fwd_bwd":
        # the base is frozen: its backward is dx = g W only; the adapter's as in fwd_bwd
        fwd = x_bytes + base_w + y_bytes + w_bytes
        bwd = y_bytes + base_w + x_bytes + (x_bytes if kind != "none" else 0) + 2 * w_bytes
        return Cost(2 * base_flops + 3 * flops, fwd + bwd)
    raise ValueError(f"unknown op {op!r}")


def floor_s(c: Cost, ceil: Ceilings) -> float:
    return max(c.flops / ceil.flops, c.bytes / ceil.bandwidth)


def measure_ceilings(device, dtype: torch.dtype, timer) -> Ceilings:
    """One large copy and one large square matmul in ``dtype`` on ``device``, timed by ``timer``."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    copy_bytes = (1 << 30) if gpu else (128 << 20)  # well past any cache
    e = torch.empty(0, dtype=dtype).element_size()
    bufs = [torch.empty(copy_bytes // e, dtype=dtype, device=device).uniform_() for _ in range(2)]
    bw = 2 * copy_bytes / timer(lambda: bufs[1].copy_(bufs[0])).min_s  # a ceiling: the best run
    bufs.clear()
    n = 8192 if gpu else 2048
    mats = [torch.randn(n, n, device=device).to(dtype) for _ in range(3)]
    fl = 2.0 * n ** 3 / timer(lambda: torch.mm(mats[0], mats[1], out=mats[2])).min_s
    return Ceilings(str(dtype).replace("torch.", ""), bw, fl, copy_bytes, n)
