"""pytest-benchmark setup for ``pytest benchmarks/``.

Environment: ``MOSS_BENCH_DEVICE`` (default: cuda when present, else cpu), ``MOSS_BENCH_DTYPE``
(default: bfloat16 on a GPU, float32 on a CPU), ``MOSS_BENCH_FULL=1`` for the real model widths
(default: the ``--quick`` cases), ``MOSS_BENCH_ALL=1`` for every rank and token mix (default: the
``mix75`` cases of the larger rank), ``MOSS_BENCH_THREADS`` (CPU threads), ``MOSS_BENCH_ROUNDS``
(timed rounds per benchmark, default 3).
The cases and implementations are those of ``python -m moss_kernels.bench`` (``moss_kernels.bench.cases``).
"""

import os

import pytest
import torch

from moss_kernels.bench.cost import measure_ceilings
from moss_kernels.bench.timing import Timer

DEVICE = torch.device(os.environ.get("MOSS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = os.environ.get("MOSS_BENCH_DTYPE") or ("bfloat16" if DEVICE.type == "cuda" else "float32")
FULL = os.environ.get("MOSS_BENCH_FULL", "0") == "1"
ALL = os.environ.get("MOSS_BENCH_ALL", "0") == "1"
ROUNDS = int(os.environ.get("MOSS_BENCH_ROUNDS", "3"))
if os.environ.get("MOSS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MOSS_BENCH_THREADS"]))


@pytest.fixture(scope="session")
def ceilings():
    """The device's copy bandwidth and matmul peak in the run's dtype, measured once per session."""
    from moss_kernels.bench.cases import DTYPES

    return measure_ceilings(DEVICE, DTYPES[DTYPE], Timer(DEVICE, budget_s=0.3, min_runs=3, warmup=1))


def pytest_report_header(config):
    return (f"moss_kernels benchmarks: device {DEVICE}, dtype {DTYPE}, {'full' if FULL else 'quick'} cases, "
            f"{'all' if ALL else 'top-rank'} cases, {torch.get_num_threads()} CPU threads, {ROUNDS} rounds")
