"""Running a suite: every case, every implementation, one record each.

A record holds the case, the implementation and the backend it ran on, the median time (and 20th /
80th percentiles, minimum, runs), the cost model's FLOPs, bytes and floor, the time as a multiple
of the floor, the speedup over ``eager_literal`` and (layer ops) the time over the base linear,
the relative error against the ``reference`` backend's output (the same function computed two ways:
a benchmark that compared different functions would be worthless), the compile time of
``compile_literal``, and for forward+backward ops the memory (``timing.measure_memory``).
A failing implementation (a compile error, an out-of-memory) becomes a record with its error;
the run goes on.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import os
import platform
import subprocess
import sys
import time
from typing import Optional
from collections.abc import Sequence

import torch

from .. import backends as _backends
from .cases import DTYPES, OPS, Case, impls_for, prepare, suite
from .cost import adapter_kind, cost, floor_s, measure_ceilings, tokens
from .timing import Timer, measure_memory, synchronize

__all__ = ["RunConfig", "environment", "run_suite"]


@dataclasses.dataclass
class RunConfig:
    quick: bool = False
    device: str = "auto"
    dtype: Optional[str] = None  # default: float32 on a CPU, bfloat16 on a GPU
    threads: Optional[int] = None
    ops: Sequence[str] = OPS
    models: Optional[Sequence[str]] = None
    ranks: Optional[Sequence[int]] = None
    mixes: Optional[Sequence[str]] = None
    impls: Optional[Sequence[str]] = None
    compile: bool = True
    check: bool = True
    budget_s: Optional[float] = None  # timed seconds per measurement
    clock: str = "wall"  # CPU: "wall" or "process" (see timing.Timer)
    seed: int = 0
    verbose: bool = True
    mmfs: Optional[bool] = None  # the MMFS section (bench/mmfs.py); None: when no op/model filter is set

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            if self.dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
            return self.dtype
        return "bfloat16" if self.resolved_device().type == "cuda" else "float32"


def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def environment(device: torch.device, cfg: RunConfig) -> dict:
    """Where and with what a run happened."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    problems = _backends.backend_problems()
    return {
        "device": str(device),
        "device_name": _device_name(device),
        "commit": commit or "unknown",
        "dirty": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "quick": cfg.quick,
        "dtype": cfg.resolved_dtype(),
        "backends": [b for b in _backends.available_backends(device) if not (b == "triton" and device.type == "cpu")],
        "backend_problems": problems,
        "triton_interpreter_skipped": device.type == "cpu" and _backends.interpreting_triton(),
        "argv": sys.argv,
    }


def _loadavg() -> Optional[list]:
    """1/5/15-minute load averages: how busy the machine was (other processes skew CPU timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _rel_err(outs, ref) -> float:
    """Largest ``||a - b|| / ||b||`` over the outputs (float64)."""
    worst = 0.0
    for a, b in zip(outs, ref):
        a, b = a.detach().double(), b.detach().double()
        denom = b.norm().item()
        err = (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()
        worst = max(worst, err if math.isfinite(err) else float("inf"))
    return worst


def _n_sets(case: Case, impl: str, device: torch.device) -> int:
    """Input sets to rotate through so that together they overflow the GPU's L2 four times."""
    if device.type != "cuda":
        return 1
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    per_set = max(cost(case, impl).bytes, 1.0)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(8, math.ceil(4 * l2 / per_set), free // (4 * per_set))))


def _record(case: Case, impl: str) -> dict:
    nt, ni = tokens(case)
    return {
        "op": case.op, "model": case.model.name, "model_source": case.model.source, "d_in": case.d_in,
        "d_out": case.d_out, "grid": f"{case.model.grid[0]}x{case.model.grid[1]}", "rank": case.rank,
        "mix": case.mix, "batch": case.batch, "seq": case.seq if case.op != "decode" else 1,
        "chunk": case.chunk or None, "dtype": case.dtype, "shape_id": case.shape_id, "n_text": nt, "n_image": ni,
        "impl": impl, "adapter": adapter_kind(impl), "status": "ok",
    }


def _error(rec: dict, e: BaseException) -> None:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        rec.update(status="oom", error=str(e).splitlines()[0][:300] if str(e) else "")
    else:
        rec.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])


def _prepare_one(case, impl, device, ceil, cfg, ref_holder):
    """Build ``impl``, make its first call (the compile, for ``compile_literal``) and check its output
    against the reference's. Returns ``(record, Prepared or None)``."""
    rec = _record(case, impl)
    c = cost(case, impl)
    rec.update(flops=c.flops, bytes=c.bytes, floor_s=floor_s(c, ceil),
               floor_moss_s=floor_s(cost(case, "reference"), ceil))
    try:
        n_sets = _n_sets(case, impl, device)
        prep = prepare(case, impl, device, n_sets=n_sets, seed=cfg.seed)
        rec.update(backend=prep.backend, n_sets=n_sets)
        t0 = time.perf_counter()
        outs = prep.fn()
        synchronize(device)
        first = time.perf_counter() - t0
        if impl == "compile_literal":
            rec["compile_s"] = first
            try:
                from torch._dynamo.utils import counters

                rec["compiled_graphs"] = counters["stats"]["unique_graphs"]
            except (ImportError, KeyError):
                pass
        if cfg.check and rec["adapter"] == "moss":
            if impl == "reference":
                ref_holder[:] = [[t.detach().clone() for t in outs]]
            elif ref_holder:
                rec["rel_err_vs_reference"] = _rel_err(outs, ref_holder[0])
        return rec, prep
    except Exception as e:
        _error(rec, e)
        return rec, None


def _run_case(case, impls, device, timer, ceil, cfg) -> dict:
    """Records of every impl on ``case``: built and checked one by one, then timed together."""
    recs, preps, ref_holder = {}, {}, []
    for impl in sorted(impls, key=lambda i: i != "reference"):  # the others are checked against it
        recs[impl], prep = _prepare_one(case, impl, device, ceil, cfg, ref_holder)
        if prep is not None:
            preps[impl] = prep
    ref_holder.clear()
    timings = timer.many({impl: prep.fn for impl, prep in preps.items()})
    for impl, prep in preps.items():
        rec, t = recs[impl], timings[impl]
        if isinstance(t, BaseException):
            _error(rec, t)
            continue
        rec.update(median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, min_s=t.min_s, runs=t.runs,
                   x_floor=t.median_s / rec["floor_s"] if rec["floor_s"] > 0 else None,
                   gflops=rec["flops"] / t.median_s / 1e9, gbytes_s=rec["bytes"] / t.median_s / 1e9)
        if case.op in ("fwd_bwd", "layer_fwd_bwd"):
            try:
                rec.update(dataclasses.asdict(measure_memory(prep.fn, prep.persistent, device)))
            except Exception as e:
                _error(rec, e)
    preps.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    eager, base = recs.get("eager_literal"), recs.get("base")
    for rec in recs.values():
        if rec["status"] != "ok":
            continue
        if eager is not None and eager["status"] == "ok":
            rec["speedup_vs_eager_literal"] = eager["median_s"] / rec["median_s"]
        if base is not None and base["status"] == "ok":
            rec["time_over_base"] = rec["median_s"] / base["median_s"]
    return recs


def run_suite(cfg: RunConfig) -> dict:
    """Run every selected case and implementation; return the report (meta, ceilings, records).
    ``cfg.threads`` holds for the run only (the caller's thread count is restored)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_suite(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_suite(cfg: RunConfig) -> dict:
    t_start = time.perf_counter()
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype()
    budget = cfg.budget_s if cfg.budget_s is not None else (0.1 if cfg.quick else 0.25)
    timer = Timer(device, budget_s=budget, clock=cfg.clock)
    meta = environment(device, cfg)
    meta["timer"] = timer.method
    meta["loadavg_start"] = _loadavg()
    meta["budget_s"] = budget
    unknown = set(cfg.ops) - set(OPS)
    if unknown:
        raise ValueError(f"ops must be among {OPS}, got {sorted(unknown)}")
    cases = [c for c in suite(cfg.quick, dtype, tuple(cfg.ops))
             if (not cfg.models or c.model.name in cfg.models)
             and (not cfg.ranks or c.rank in cfg.ranks)
             and (not cfg.mixes or c.mix in cfg.mixes)]
    if not cases:
        raise ValueError("no case matches the selection (check --models/--ranks/--mixes/--ops)")
    ceil = measure_ceilings(device, DTYPES[dtype], Timer(device, budget_s=0.3, min_runs=3, warmup=1, clock=cfg.clock))
    records = []
    for n, case in enumerate(cases):
        impls = impls_for(case, device, compile=cfg.compile)
        if cfg.impls:
            impls = [i for i in impls if i in cfg.impls]
        recs = _run_case(case, impls, device, timer, ceil, cfg)
        for impl in impls:
            rec = recs[impl]
            records.append(rec)
            if cfg.verbose:
                tail = (f"{rec['median_s'] * 1e3:9.3f} ms  x{rec['x_floor']:.1f} floor"
                        if rec["status"] == "ok" else f"{rec['status']}: {rec.get('error', '')}")
                print(f"[{n + 1}/{len(cases)}] {case.id:55s} {impl:16s} {tail}", file=sys.stderr, flush=True)
    mmfs = None
    if cfg.mmfs or (cfg.mmfs is None and set(cfg.ops) == set(OPS) and not (cfg.models or cfg.ranks or cfg.mixes)):
        from .mmfs import run_mmfs  # one thread on a CPU, float32 there (the setting)

        mmfs = run_mmfs(device, quick=cfg.quick or device.type == "cpu", budget_s=budget, clock=cfg.clock,
                        verbose=cfg.verbose, dtype=torch.float32 if device.type == "cpu" else DTYPES[dtype])
    meta["wall_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = _loadavg()
    return {"meta": meta, "ceilings": {dtype: dataclasses.asdict(ceil)}, "results": records, "mmfs": mmfs}
