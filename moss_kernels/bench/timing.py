"""Timing and memory measurement.

CPU: wall-clock ``time.perf_counter`` around each call after warm-up calls, medians over many runs,
the implementations of a case interleaved call by call (a shared machine's load then hits all of
them alike), the thread count fixed by the caller (and stated in the report). GPU: device-side timing —
``triton.testing.do_bench`` (CUDA events, L2 flushed between calls) when Triton is importable, else
CUDA events around each call — with the caller rotating input sets so that no call finds the
previous call's inputs in L2.

Memory of a forward+backward call: the bytes autograd saves for backward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (unique storages; those of inputs, weights and index
tables are not new memory and are reported apart), and the peak: on a GPU measured
(``torch.cuda.max_memory_allocated`` above what was allocated before the call); on a CPU, where
PyTorch keeps no allocator statistics, an *estimate*: new saved bytes + the bytes of the call's
outputs and gradients (labelled as such in every report).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Container
from typing import Callable, Optional

import torch

__all__ = ["Memory", "Timer", "Timing", "measure_memory", "synchronize"]


@dataclasses.dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    min_s: float
    runs: int
    method: str


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(sorted_values: list, q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Timer:
    """``timer(fn) -> Timing``: ``fn`` is called ``warmup`` times, then until ``budget_s`` of timed
    calls have run (at least ``min_runs``, at most ``max_runs``)."""

    def __init__(self, device, budget_s: float = 0.3, min_runs: int = 5, max_runs: int = 200, warmup: int = 2,
                 clock: str = "wall"):
        if clock not in ("wall", "process"):
            raise ValueError(f"clock must be 'wall' or 'process', got {clock!r}")
        self.device = torch.device(device)
        self.budget_s, self.min_runs, self.max_runs, self.warmup = budget_s, min_runs, max_runs, warmup
        # CPU only. "process": CPU seconds of all the process's threads (time.process_time), which
        # other processes' load does not inflate; with one thread it is the compute time itself
        # (with more, threads waiting for each other count too).
        self.clock = time.perf_counter if clock == "wall" else time.process_time
        self.method = self._method(clock)

    def _method(self, clock: str) -> str:
        if self.device.type != "cuda":
            name = "perf_counter (wall clock)" if clock == "wall" else "process_time (CPU time of the process)"
            return f"{name}, {torch.get_num_threads()} threads"
        try:
            import triton.testing  # noqa: F401

            return "triton.testing.do_bench (CUDA events, L2 flushed)"
        except ImportError:
            return "CUDA events"

    def __call__(self, fn: Callable) -> Timing:
        return self.many({"fn": fn})["fn"]

    def many(self, fns: dict) -> dict:
        """Time each of ``fns`` (name -> zero-argument callable); returns name -> ``Timing`` or the
        exception the callable raised. On a CPU the calls are interleaved round-robin, so that load
        from other processes that comes and goes hits every implementation alike; on a GPU each is
        timed in turn on the device."""
        if self.device.type == "cuda":
            out = {}
            for name, fn in fns.items():
                try:
                    out[name] = self._cuda(fn)
                except Exception as e:
                    out[name] = e
            return out
        return self._cpu_interleaved(fns)

    def _summary(self, times: list) -> Timing:
        times = sorted(times)
        return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), times[0], len(times),
                      self.method)

    def _cpu_interleaved(self, fns: dict) -> dict:
        failed, times = {}, {name: [] for name in fns}
        for name, fn in fns.items():
            try:
                for _ in range(self.warmup):
                    fn()
            except Exception as e:
                failed[name] = e
        live = [n for n in fns if n not in failed]
        spent = dict.fromkeys(live, 0.0)
        while live:
            for name in list(live):
                t0 = self.clock()
                try:
                    fns[name]()
                except Exception as e:
                    failed[name] = e
                    live.remove(name)
                    continue
                dt = self.clock() - t0
                times[name].append(dt)
                spent[name] += dt
                n = len(times[name])
                if n >= self.max_runs or (n >= self.min_runs and spent[name] >= self.budget_s):
                    live.remove(name)
        return {name: failed.get(name) or self._summary(times[name]) for name in fns}

    def _cuda(self, fn: Callable) -> Timing:
        if self.method.startswith("triton"):
            import triton.testing

            warmup_ms, rep_ms = max(25, int(self.budget_s * 250)), max(100, int(self.budget_s * 1000))
            try:  # every run's time (Triton >= 3.2); older Triton only gives quantiles
                runs = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
                return self._summary([v / 1e3 for v in runs])
            except (AssertionError, TypeError):
                med, p20, p80, mn = (v / 1e3 for v in triton.testing.do_bench(
                    fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8, 0.0]))
                return Timing(med, p20, p80, mn, -1, self.method)
        for _ in range(max(self.warmup, 10)):
            fn()
        torch.cuda.synchronize(self.device)
        events = []
        t0 = time.perf_counter()
        while len(events) < self.min_runs or (time.perf_counter() - t0 < self.budget_s and len(events) < self.max_runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return self._summary([s.elapsed_time(e) / 1e3 for s, e in events])


@dataclasses.dataclass
class Memory:
    saved_bytes: int  # unique storages autograd saved, all of them
    saved_new_bytes: int  # of which not inputs, weights or index tables: memory the graph adds
    output_bytes: int  # forward output and gradients the call returns
    peak_bytes: Optional[int]  # above what was allocated before the call
    peak_kind: str


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def measure_memory(fn: Callable, persistent: Container, device) -> Memory:
    """Run ``fn`` (a forward+backward call returning its tensors) once and measure its memory."""
    device = torch.device(device)
    saved: dict = {}

    def pack(t: torch.Tensor):
        saved[t.untyped_storage().data_ptr()] = _nbytes(t)
        return t

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = fn()
    synchronize(device)
    outputs = [t for t in outputs if isinstance(t, torch.Tensor)]
    out_bytes = sum(t.numel() * t.element_size() for t in outputs)
    new = sum(n for ptr, n in saved.items() if ptr not in persistent)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) - before, "measured: torch.cuda.max_memory_allocated"
    else:
        peak, kind = new + out_bytes, "estimate: new saved bytes + outputs + gradients (no CPU allocator statistics)"
    return Memory(sum(saved.values()), new, out_bytes, peak, kind)
