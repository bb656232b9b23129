"""``python -m moss_kernels.bench``: run the suite, print the table, write JSON, Markdown and PNGs."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cases import DTYPES, MIXES, OPS
from .report import write_report
from .run import RunConfig, run_suite


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moss_kernels.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="scaled-down widths: a few minutes on a small CPU")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<device>-<quick|full>)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="activation dtype (default: float32 on a CPU, bfloat16 on a GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--models", nargs="+", default=None, help="model names as in the table (e.g. anole-7b/8)")
    p.add_argument("--ranks", nargs="+", type=int, default=None)
    p.add_argument("--mixes", nargs="+", choices=sorted(MIXES), default=None)
    p.add_argument("--impls", nargs="+", default=None, help="only these implementations")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-check", action="store_true", help="skip the check against the reference backend")
    p.add_argument("--budget", type=float, default=None, help="timed seconds per measurement")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="CPU timing clock: wall (default) or process CPU time (robust to other processes' load)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="measure nothing: rewrite the table and plots of an earlier results.json")
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            report = json.load(f)
        paths = write_report(report, a.out or os.path.dirname(os.path.abspath(a.from_json)))
        with open(paths["markdown"]) as f:
            sys.stdout.write(f.read())
        return 0
    cfg = RunConfig(quick=a.quick, device=a.device, dtype=a.dtype, threads=a.threads, ops=a.ops, models=a.models,
                    ranks=a.ranks, mixes=a.mixes, impls=a.impls, compile=not a.no_compile, check=not a.no_check,
                    budget_s=a.budget, clock=a.clock, verbose=not a.quiet)
    report = run_suite(cfg)
    out = a.out or os.path.join("benchmarks", "results",
                                f"{cfg.resolved_device().type}-{'quick' if a.quick else 'full'}")
    paths = write_report(report, out)
    with open(paths["markdown"]) as f:
        sys.stdout.write(f.read())
    print(f"\nwrote {paths['json']}, {paths['markdown']}, " + ", ".join(paths["png"]), file=sys.stderr)
    bad = [r for r in report["results"] if r["status"] != "ok"]
    return 0 if not bad or all(r["impl"] == "compile_literal" for r in bad) else 1


if __name__ == "__main__":
    sys.exit(main())
