"""Native CPU backend vs the reference backend: forward, forward+backward, decode step.

    python benchmarks/native_cpu_speed.py [--size mid|small|large] [--dtype float32] [--repeat 10]

Prints the best-of-N milliseconds (robust to other processes on a shared machine; runs of the two
backends are interleaved) and the speedup of native over reference. The issue's targets (float32,
mid size): forward+backward >= 1.5x, decode step >= 3x. Timing only; nothing here asserts.
"""

from __future__ import annotations

import argparse
import time

import torch

import moss_kernels as mk
from moss_kernels import backends

# name -> (batch, seq, d_in, d_out, rank, image grid (H, W), images per row, decode batch)
SIZES = {
    "small": (2, 256, 256, 256, 16, (8, 8), 2, 4),
    "mid": (2, 1024, 1024, 1024, 64, (24, 24), 1, 8),
    "large": (2, 2048, 2048, 2048, 256, (32, 32), 1, 16),
}


def make(size: str, dtype: torch.dtype):
    B, S, d_in, d_out, r, (H, W), n_img, _ = SIZES[size]
    spans = []
    for b in range(B):
        start = 8
        for _ in range(n_img):
            spans.append((b, start, H, W))
            start += H * W + 8
    layout = mk.ImageLayout.from_spans(B, S, spans)
    x = torch.randn(B, S, d_in, dtype=dtype)
    weights = [torch.randn(r, d_in, dtype=dtype) / d_in**0.5, torch.randn(d_out, r, dtype=dtype) / r**0.5,
               torch.randn(r, d_in, 2, 2, dtype=dtype) / (2 * d_in**0.5), torch.randn(d_out, r, dtype=dtype) / r**0.5]
    return layout, x, weights


def best_ms(fns: dict, repeat: int) -> dict:
    """Best wall time of each function over ``repeat`` interleaved runs (load from other processes
    only ever adds time, so the minimum is the most repeatable statistic)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * min(t) for name, t in times.items()}


def bench(size: str, dtype: torch.dtype, repeat: int) -> dict:
    layout, x, weights = make(size, dtype)
    _, _, d_in, d_out, r, (H, W), _, db = SIZES[size]
    jobs = {"forward": {}, "forward+backward": {}, "decode step": {}, "decode (backend)": {}}
    for backend in ("reference", "native"):
        def fwd(backend=backend):
            with torch.no_grad():
                mk.moss_lora(x, layout, *weights, 1.0, backend=backend)

        def fwd_bwd(backend=backend):
            xs = x.detach().requires_grad_()
            ws = [w.detach().requires_grad_() for w in weights]
            mk.moss_lora(xs, layout, *ws, 1.0, backend=backend).sum().backward()

        state = mk.ConvLoRAState(db, r, 2, max_width=W)
        xd = torch.randn(db, d_in, dtype=dtype)
        out = torch.zeros(db, d_out, dtype=dtype)
        # half the rows inside an image, half text: both adapters run
        pos = torch.tensor([(W + 3) if b % 2 == 0 else -1 for b in range(db)])
        hh, ww = torch.full((db,), H), torch.full((db,), W)

        def decode(backend=backend, state=state, out=out):
            with torch.no_grad():
                mk.moss_lora_step(xd, *weights, 1.0, state, pos, hh, ww, out=out, backend=backend)

        # the backend alone, without the op's Python checks and dispatch (shared by both backends)
        impl = backends.get_backend(backend)

        def decode_backend(impl=impl, state=state, out=out):
            with torch.no_grad():
                impl.decode_step(xd, out, *weights, 1.0, state.pending, pos, hh, ww)

        jobs["forward"][backend], jobs["forward+backward"][backend] = fwd, fwd_bwd
        jobs["decode step"][backend], jobs["decode (backend)"][backend] = decode, decode_backend
    return {job: best_ms(fns, repeat * (10 if job.startswith("decode") else 1)) for job, fns in jobs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rank", type=int, default=None, help="override the size's adapter rank")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.rank:
        size = list(SIZES[args.size])
        size[4] = args.rank
        SIZES[args.size] = tuple(size)
    res = bench(args.size, dtype, args.repeat)
    print(f"size={args.size} {SIZES[args.size]} dtype={args.dtype} threads={torch.get_num_threads()}")
    for job in res:
        ref, nat = res[job]["reference"], res[job]["native"]
        print(f"{job:>17}: reference {ref:9.3f} ms  native {nat:9.3f} ms  speedup {ref / nat:5.2f}x")


if __name__ == "__main__":
    main()
