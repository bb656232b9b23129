"""The benchmark suite: ``python -m moss_kernels.bench [--quick] [--device D] [--out DIR]``.

* ``cases`` — the cases (real model shapes, or scaled down with ``--quick``) and every
  implementation compared on them; ``benchmarks/test_*.py`` (pytest-benchmark) use the same.
* ``cost`` — FLOPs, fewest bytes moved, the device's measured ceilings, the floor time.
* ``timing`` — medians after warm-up (CPU wall clock; GPU device-side), memory of forward+backward.
* ``run`` — one record per case and implementation; ``report`` — table, JSON, PNG plots.
"""

from .cases import Case, impls_for, prepare, suite
from .run import RunConfig, run_suite

__all__ = ["Case", "RunConfig", "impls_for", "prepare", "run_suite", "suite"]
