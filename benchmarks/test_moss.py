"""Every case and implementation of ``python -m moss_kernels.bench`` as a pytest-benchmark.

``pytest benchmarks/`` (quick cases by default; see ``conftest.py`` for the environment variables).
Benchmarks are grouped by case, so pytest-benchmark's table puts the implementations of one case
side by side. ``extra_info`` carries the cost model: FLOPs, bytes, the floor and the multiple of it.
Timing here is pytest-benchmark's wall clock (on a GPU each call ends with a synchronisation); the
device-side figures come from ``python -m moss_kernels.bench``. Nothing is asserted about speed.
"""

import pytest
import torch
from conftest import ALL, DEVICE, DTYPE, FULL, ROUNDS

from moss_kernels.bench.cases import impls_for, prepare, suite
from moss_kernels.bench.cost import cost, floor_s
from moss_kernels.bench.timing import synchronize



def _params() -> list:
    """The CLI's cases; unless ``MOSS_BENCH_ALL=1``, only the interleaved (``mix75``) ones of the
    larger rank, so that the default run stays within a few minutes on a 2-core CPU."""
    cases = suite(quick=not FULL, dtype=DTYPE)
    if not ALL:
        top = max(c.rank for c in cases)
        cases = [c for c in cases if c.rank == top and c.mix == "mix75"]
    return [pytest.param(case, impl, id=f"{case.id}-{impl}".replace(" ", "-"))
            for case in cases for impl in impls_for(case, DEVICE)]


PARAMS = _params()


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_moss(benchmark, ceilings, case, impl):
    benchmark.group = case.id
    prep = prepare(case, impl, DEVICE)
    try:
        first = prep.fn()  # compiles, for compile_literal
    except Exception as e:  # a torch.compile failure is a finding, not a crash of the suite
        if impl == "compile_literal":
            pytest.skip(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise
    assert all(torch.isfinite(t).all() for t in first), f"{case.id} {impl}: non-finite output"
    del first

    def call():
        prep.fn()
        synchronize(DEVICE)

    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    c = cost(case, impl)
    floor = floor_s(c, ceilings)
    benchmark.extra_info.update(op=case.op, impl=impl, backend=prep.backend, flops=c.flops, bytes=c.bytes,
                                floor_s=floor)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        benchmark.extra_info["x_floor"] = stats.stats.median / floor
