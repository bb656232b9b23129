"""MMFS benchmark cases: ``mmfs_attn`` / ``ms_deform_attn`` against the pure-PyTorch ``grid_sample`` path.

Part of ``python -m moss_kernels.bench`` (the full suite adds a section "MMFS"), or alone:
``python -m moss_kernels.bench.mmfs [--quick] [--device D] [--threads T] [--out DIR]``.

The baseline is the path MM-Interleaved falls back to without its CUDA op: the module materializes
the locations of every (image, level) and the masked softmax weights (the official ``-10000`` mask
plus the sink), then Deformable-DETR's ``ms_deform_attn_core_pytorch`` samples every level with
``F.grid_sample``, stacks all levels and sums (MMFS.md §b). Each case reports, per implementation:
forward time, forward+backward time (gradients for value, offsets and logits), the peak memory of
forward+backward, the relative error against the float64 ground truth (the same path in float64),
and the speedups and memory ratio against the baseline. The shapes follow MMFS.md §e; ``--quick``
scales them down for a CPU. The issue's bar on a CPU (float32, one thread): native >= 4x the
baseline in forward, >= 3x in forward+backward, at most 1/4 of its peak memory.

CPU peak memory is measured, not estimated: the process's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs``) during one call, minus the resident set before it. On a GPU:
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import sys
from typing import Callable, Optional

import torch

from .. import backends
from ..deform_attn import mmfs_attn, ms_deform_attn
from ..mmfs import ms_deform_attn_core_pytorch
from .timing import Timer, synchronize

__all__ = ["MMFSCase", "cases", "grid_sample_path", "markdown", "run_mmfs"]


@dataclasses.dataclass(frozen=True)
class MMFSCase:
    name: str  # MMFS.md §e id, with the scaling
    op: str  # "mmfs" or "msda"
    N: int
    Lq: int
    H: int
    D: int
    M: int  # images (1 for msda)
    levels: tuple
    P: int
    mask: str  # "causal" ranges, "image" (N, M) mask with an all-masked sample, "all", "none"

    @property
    def S(self) -> int:
        return sum(h * w for h, w in self.levels)

    def samples(self) -> int:
        """Bilinear samples per forward (every image, as the baseline computes them)."""
        return self.N * self.Lq * self.H * self.M * len(self.levels) * self.P


L3 = ((32, 32), (16, 16), (8, 8))
L4 = ((64, 64), (32, 32), (16, 16), (8, 8))


def cases(quick: bool) -> list:
    """MMFS.md §e; ``quick`` scales the query count and images down for a CPU (tens of ms a call)."""
    if quick:
        return [
            MMFSCase("LLM-pairs (Lq 128, M 8)", "mmfs", 1, 128, 16, 64, 8, L3, 8, "causal"),
            MMFSCase("UNet-64 (16x16 queries)", "mmfs", 2, 256, 16, 64, 1, L4, 8, "image"),
            MMFSCase("LLM-decode (M 8)", "mmfs", 2, 1, 16, 64, 8, L3, 8, "all"),
            MMFSCase("ViT-Adapter injector", "msda", 2, 256, 16, 32, 1, L3, 4, "none"),
        ]
    return [
        MMFSCase("LLM-pairs", "mmfs", 2, 2048, 16, 64, 30, L3, 8, "causal"),
        MMFSCase("LLM-mmc4", "mmfs", 4, 2048, 16, 64, 15, L3, 8, "causal"),
        MMFSCase("LLM-decode (N 8, M 8)", "mmfs", 8, 1, 16, 64, 8, L3, 8, "all"),
        MMFSCase("UNet-64 (N 8)", "mmfs", 8, 4096, 16, 64, 1, L4, 8, "image"),
        MMFSCase("UNet-32 (N 8)", "mmfs", 8, 1024, 16, 64, 1, L4, 8, "image"),
        MMFSCase("ViT-Adapter injector (12 images)", "msda", 12, 256, 16, 32, 1, L3, 4, "none"),
        MMFSCase("Detection canonical", "msda", 1, 15200, 8, 32, 1, ((100, 152), (50, 76), (25, 38), (13, 19)), 8,
                 "none"),
    ]


# ============================================================================ the baseline
def grid_sample_path(value, shapes, reference_points, sampling_offsets, attention_logits, visible, offset_scale,
                     sink=1.0):
    """MM-Interleaved's fallback for ``mmfs_attn`` (same arguments; ``visible`` a bool mask
    ``(N, Lq, M)``): locations of every (image, level) materialized, the ``-10000`` mask, a softmax
    with the sink column, then ``ms_deform_attn_core_pytorch`` over the ``M * L`` pseudo-levels."""
    N, M, S, H, D = value.shape
    _, Lq, _, _, L, P = attention_logits.shape
    loc = (reference_points[:, :, None, None, None, None, :]
           + sampling_offsets[:, :, :, :, None] * offset_scale[:, None, :])  # (N, Lq, H, M, L, P, 2)
    z = attention_logits + (-10000.0) * (~visible)[:, :, None, :, None, None].to(attention_logits.dtype)
    z = z.reshape(N, Lq, H, M * L * P)
    z = torch.cat([z, torch.full_like(z[..., :1], math.log(sink))], -1)
    weights = torch.softmax(z, -1)[..., :-1].reshape(N, Lq, H, M * L, P)
    return ms_deform_attn_core_pytorch(value.reshape(N, M * S, H, D), list(shapes) * M,
                                       loc.reshape(N, Lq, H, M * L, P, 2), weights)


# ============================================================================ inputs
def _inputs(case: MMFSCase, device, dtype, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    N, Lq, H, D, M, L, P = case.N, case.Lq, case.H, case.D, case.M, len(case.levels), case.P
    rnd = lambda *s: torch.rand(*s, generator=g)
    if case.op == "msda":
        return dict(value=torch.randn(N, case.S, H, D, generator=g).to(device, dtype),
                    loc=rnd(N, Lq, H, L, P, 2).to(device, dtype), att=rnd(N, Lq, H, L, P).to(device, dtype))
    # LLM: reference (0.5, 0.5) and offsets U(-3, 3) / 16 (the init); U-Net: pixel-centre references
    if case.name.startswith("UNet"):
        side = math.isqrt(Lq)
        ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        ref = ((ij.flip(-1) + 0.5) / side)[None].expand(N, Lq, 2).contiguous()
        scale = 1.0 / side
    else:
        ref = torch.full((N, Lq, 2), 0.5)
        scale = 1.0 / 16
    off = (rnd(N, Lq, H, M, P, 2) * 6 - 3)
    logits = torch.randn(N, Lq, H, M, L, P, generator=g)
    if case.mask == "causal":  # tokens spread over the sequence; image m starts at m * Lq / M
        first = torch.arange(M) * Lq // M
        hi = (torch.arange(Lq)[:, None] >= first).sum(-1)
        visible = torch.stack([torch.zeros_like(hi), hi], -1)[None].expand(N, Lq, 2).contiguous()
    elif case.mask == "image":  # (N, M) mask; the first sample sees no image
        visible = torch.ones(N, M, dtype=torch.bool)
        visible[0] = False
    else:
        visible = torch.tensor([0, M]).expand(N, Lq, 2).contiguous()
    return dict(value=torch.randn(N, M, case.S, H, D, generator=g).to(device, dtype), ref=ref.to(device, dtype),
                off=off.to(device, dtype), logits=logits.to(device, dtype), visible=visible.to(device),
                kappa=torch.full((L, 2), scale, device=device, dtype=dtype))


def _mask(visible: torch.Tensor, N: int, Lq: int, M: int) -> torch.Tensor:
    if visible.dtype == torch.bool:
        return visible[:, None, :].expand(N, Lq, M) if visible.dim() == 2 else visible
    m = torch.arange(M, device=visible.device)
    return (m >= visible[..., :1]) & (m < visible[..., 1:])


def _call(case: MMFSCase, impl: str, x: dict) -> Callable[[dict], torch.Tensor]:
    """The forward of ``impl`` on the inputs dict (whose tensors may require grad)."""
    shapes = case.levels
    if case.op == "msda":
        if impl == "grid_sample_path":
            return lambda t: ms_deform_attn_core_pytorch(t["value"], shapes, t["loc"], t["att"])
        return lambda t: ms_deform_attn(t["value"], shapes, None, t["loc"], t["att"], backend=impl)
    if impl == "grid_sample_path":
        mask = _mask(x["visible"], case.N, case.Lq, case.M)
        return lambda t: grid_sample_path(t["value"], shapes, t["ref"], t["off"], t["logits"], mask, t["kappa"])
    return lambda t: mmfs_attn(t["value"], shapes, t["ref"], t["off"], t["logits"], t["visible"], t["kappa"],
                               backend=impl)


def _grad_keys(case: MMFSCase) -> tuple:
    return ("value", "loc", "att") if case.op == "msda" else ("value", "off", "logits")


# ============================================================================ memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


_MALLOC_SET = False


def _return_freed_memory() -> None:
    """Make glibc map every block of 128 KiB or more on its own and unmap it when freed (no dynamic
    threshold), and give back what is free now: the resident set then follows the live tensors."""
    global _MALLOC_SET
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not _MALLOC_SET:
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (setting it also fixes it)
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
            _MALLOC_SET = True
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable, device: torch.device) -> tuple[Optional[int], str]:
    """Peak bytes one call of ``fn`` adds above what was in use before it."""
    gc.collect()
    if device.type == "cpu":
        _return_freed_memory()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    try:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        out = fn()
        peak = _status_kib("VmHWM")
        del out
        return (peak - before) * 1024, "VmHWM - VmRSS (process resident set, /proc/self/clear_refs)"
    except OSError as e:
        return None, f"unavailable ({e})"


# ============================================================================ running
def _impls(device: torch.device) -> list:
    names = [b for b in backends.available_backends(device)
             if backends.get_backend(b).supports_deform(device, torch.float32)
             and not (b == "triton" and device.type == "cpu")]  # the interpreter is not a speed
    return ["grid_sample_path", *names]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    d = b.norm().item()
    err = (a - b).norm().item() / d if d > 0 else (a - b).norm().item()
    return err if math.isfinite(err) else float("inf")


def _run_case(case: MMFSCase, device, dtype, timer: Timer, verbose: bool) -> list:
    x = _inputs(case, device, dtype)
    keys = _grad_keys(case)
    truth_in = {k: (v.double() if v.is_floating_point() else v) for k, v in x.items()}
    try:
        with torch.no_grad():
            truth = _call(case, "grid_sample_path", truth_in)(truth_in)
    except Exception:  # e.g. out of memory at a full GPU shape: no error column, the timings go on
        truth = None
    del truth_in
    out_shape = (case.N, case.Lq, case.H * case.D)
    g = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    leaves = {k: v.detach().clone().requires_grad_(k in keys) for k, v in x.items()}
    fwd, both, recs = {}, {}, {}
    for impl in _impls(device):
        fn = _call(case, impl, x)
        rec = dict(case=case.name, op=case.op, impl=impl, N=case.N, Lq=case.Lq, H=case.H, D=case.D, M=case.M,
                   levels="+".join(f"{h}x{w}" for h, w in case.levels), P=case.P, mask=case.mask,
                   samples=case.samples(), dtype=str(dtype).replace("torch.", ""), status="ok")
        try:
            with torch.no_grad():
                rec["rel_err_vs_float64"] = None if truth is None else _rel(fn(x), truth)

            def fb(fn=fn):
                out = fn(leaves)
                return torch.autograd.grad(out, [leaves[k] for k in keys], g)

            fwd[impl] = lambda fn=fn: fn(x)
            both[impl] = fb
            rec["peak_fwd_bwd_bytes"], rec["peak_kind"] = peak_memory(fb, device)
        except Exception as e:  # one failing implementation does not stop the run
            rec.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        recs[impl] = rec
    with torch.no_grad():
        t_fwd = timer.many(fwd)
    t_both = timer.many(both)
    for impl, rec in recs.items():
        for key, t in (("fwd_s", t_fwd.get(impl)), ("fwd_bwd_s", t_both.get(impl))):
            if isinstance(t, BaseException):
                rec.update(status="error", error=f"{type(t).__name__}: {t}"[:300])
            elif t is not None:
                rec[key] = t.median_s
    base = recs["grid_sample_path"]
    for rec in recs.values():
        if rec["status"] == "ok" and base["status"] == "ok":
            rec["fwd_speedup"] = base["fwd_s"] / rec["fwd_s"]
            rec["fwd_bwd_speedup"] = base["fwd_bwd_s"] / rec["fwd_bwd_s"]
            if rec.get("peak_fwd_bwd_bytes") is not None and base.get("peak_fwd_bwd_bytes"):
                rec["peak_ratio"] = rec["peak_fwd_bwd_bytes"] / base["peak_fwd_bwd_bytes"]
        if verbose:
            tail = (f"fwd {rec['fwd_s'] * 1e3:8.2f} ms  fwd+bwd {rec['fwd_bwd_s'] * 1e3:8.2f} ms  "
                    f"x{rec.get('fwd_speedup', 0):.1f}/x{rec.get('fwd_bwd_speedup', 0):.1f}"
                    if rec["status"] == "ok" else rec["error"])
            print(f"[mmfs] {case.name:32s} {rec['impl']:17s} {tail}", file=sys.stderr, flush=True)
    return list(recs.values())


def projection_flops(C: int = 5120, H: int = 16, L: int = 3, P: int = 8, M: int = 30, tokens: int = 2 * 2048) -> dict:
    """The query projections of one MMFS layer (derived, MMFS.md §c.3): as coded, the C x C
    ``dynamic_offset_mask`` and the offset/logit heads run on the query repeated per image; the
    factorized module runs them once per token and adds per-image table rows."""
    per_query = 2 * C * (C + H * P * 2 + H * L * (P + 1))
    return {"shape": f"C {C}, H {H}, L {L}, P {P}, M {M}, {tokens} tokens", "as_coded_flops": tokens * M * per_query,
            "factorized_flops": tokens * per_query, "saving": float(M)}


def run_mmfs(device="cpu", quick: bool = True, threads: Optional[int] = 1, budget_s: float = 0.25,
             clock: str = "wall", verbose: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    """Every case and implementation; returns ``{"meta", "results", "projection"}``. On a CPU the run
    uses ``threads`` threads (default 1, the issue's setting; the caller's count is restored)."""
    device = torch.device(device)
    previous = torch.get_num_threads()
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        timer = Timer(device, budget_s=budget_s, clock=clock)
        results = []
        for case in cases(quick):
            try:
                results += _run_case(case, device, dtype, timer, verbose)
            except Exception as e:  # a case that cannot even be set up (memory) is recorded, the run goes on
                results.append(dict(case=case.name, op=case.op, impl="*", status="error",
                                    error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]))
            gc.collect()
        meta = {"device": str(device), "threads": torch.get_num_threads(), "timer": timer.method, "quick": quick,
                "dtype": str(dtype).replace("torch.", ""),
                "loadavg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
        return {"meta": meta, "results": results, "projection": projection_flops()}
    finally:
        torch.set_num_threads(previous)


def _fmt_err(e: Optional[float]) -> str:
    return "" if e is None else f"{e:.1e}"


def markdown(report: dict) -> list:
    """The "MMFS" section of the benchmark report, as lines."""
    meta = report["meta"]
    lines = ["## MMFS (deformable attention)", "",
             f"{meta['dtype']}, timing {meta['timer']}; baseline "
             "`grid_sample_path` = MM-Interleaved's pure-PyTorch fallback. Speedup and memory relative to it; "
             "error relative to the float64 baseline. CPU bar: native >= 4x fwd, >= 3x fwd+bwd, <= 0.25x memory.",
             "", "| case | impl | fwd | fwd+bwd | fwd x | fwd+bwd x | peak fwd+bwd | memory ratio | rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['impl']} | {r['status']}: {r.get('error', '')} | | | | | | |")
            continue
        peak, ratio = r.get("peak_fwd_bwd_bytes"), r.get("peak_ratio")
        lines.append(f"| {r['case']} | {r['impl']} | {r['fwd_s'] * 1e3:.2f} ms | {r['fwd_bwd_s'] * 1e3:.2f} ms | "
                     f"{r.get('fwd_speedup', 0):.1f} | {r.get('fwd_bwd_speedup', 0):.1f} | "
                     f"{'' if peak is None else f'{peak / 2**20:.1f} MiB'} | "
                     f"{'' if ratio is None else f'{ratio:.3f}'} | {_fmt_err(r.get('rel_err_vs_float64'))} |")
    p = report["projection"]
    lines += ["", f"Module query projections per MMFS layer ({p['shape']}; derived, MMFS.md §c.3): "
              f"{p['as_coded_flops'] / 1e12:.2f} TFLOP as coded (query repeated per image) vs "
              f"{p['factorized_flops'] / 1e12:.2f} TFLOP factorized ({p['saving']:.0f}x fewer).", ""]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moss_kernels.bench.mmfs", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized shapes")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, the issue's setting)")
    p.add_argument("--budget", type=float, default=0.25, help="timed seconds per measurement")
    p.add_argument("--out", default=None, help="write mmfs.json and mmfs.md into this folder")
    a = p.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    report = run_mmfs(device, quick=a.quick, threads=a.threads, budget_s=a.budget)
    text = "\n".join(markdown(report))
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "mmfs.json"), "w") as f:
            json.dump(report, f, indent=1, default=lambda o: None)
        with open(os.path.join(a.out, "mmfs.md"), "w") as f:
            f.write(text + "\n")
    return 0 if all(r["status"] == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
