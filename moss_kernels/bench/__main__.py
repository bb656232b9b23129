"""``python -m moss_kernels.bench``: run the suite, print the table, write JSON, Markdown and PNGs."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from ..extras import require_extra
from .cases import DTYPES, MIXES, OPS
from .report import write_report
from .run import RunConfig, run_suite


def _utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")


def fresh_dir(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ... : a folder that does not exist yet."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def warn_if_loaded(clock: str, threads: int) -> None:
    """Say on stderr when other processes load the CPU: wall-clock times and threads beyond one
    then measure the competition (the README's figures: --threads 1 --clock process)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cores = os.cpu_count() or 1
    if load > 0.5 * cores and (clock == "wall" or threads != 1):
        print(f"warning: the machine is loaded (load average {load:.1f} on {cores} cores) and this run uses "
              f"{'the wall clock' if clock == 'wall' else f'{threads or torch_threads()} threads'}: times include "
              "waiting for other processes; --threads 1 --clock process (the defaults) are robust to that",
              file=sys.stderr)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moss_kernels.bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="scaled-down widths (93 s on a 2-core AMD EPYC at load 1.6: the README's figures)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    p.add_argument("--out", default=None,
                   help="output folder (default: a new folder bench_results/<device>-<quick|full>-<UTC time>; "
                        "the committed benchmarks/results/ is written only when named here)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="activation dtype (default: float32 on a CPU, bfloat16 on a GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default on a CPU: 1, as the README's figures; 0: torch's default)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--models", nargs="+", default=None, help="model names as in the table (e.g. anole-7b/8)")
    p.add_argument("--ranks", nargs="+", type=int, default=None)
    p.add_argument("--mixes", nargs="+", choices=sorted(MIXES), default=None)
    p.add_argument("--impls", nargs="+", default=None, help="only these implementations")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-check", action="store_true", help="skip the check against the reference backend")
    p.add_argument("--budget", type=float, default=None, help="timed seconds per measurement")
    p.add_argument("--clock", choices=("wall", "process"), default=None,
                   help="CPU timing clock: process CPU time (default on a CPU, as the README's figures: robust to "
                        "other processes' load) or wall")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="measure nothing: rewrite the table and plots of an earlier results.json")
    p.add_argument("--generation", action="store_true",
                   help="run the model-level generation benchmark instead (moss_kernels.bench.generation: tokens/s "
                        "and per-step time of base, PEFT LoRA, lora, moe_lora, moss; with --quick a smoke run)")
    a = p.parse_args(argv)
    if a.generation:
        from . import generation

        return generation.main(["--quick"] * a.quick + ["--threads", str(a.threads or 1)]
                               + (["--clock", a.clock] if a.clock else []) + (["--out", a.out] if a.out else []))
    require_extra("python -m moss_kernels.bench", "bench", {"matplotlib": "matplotlib"})
    if a.from_json:
        with open(a.from_json) as f:
            report = json.load(f)
        paths = write_report(report, a.out or os.path.dirname(os.path.abspath(a.from_json)))
        with open(paths["markdown"]) as f:
            sys.stdout.write(f.read())
        return 0
    cpu = RunConfig(device=a.device).resolved_device().type == "cpu"
    threads = a.threads if a.threads is not None else (1 if cpu else 0)
    clock = a.clock or ("process" if cpu else "wall")
    cfg = RunConfig(quick=a.quick, device=a.device, dtype=a.dtype, threads=threads or None, ops=a.ops,
                    models=a.models, ranks=a.ranks, mixes=a.mixes, impls=a.impls, compile=not a.no_compile,
                    check=not a.no_check, budget_s=a.budget, clock=clock, verbose=not a.quiet)
    if cpu:
        warn_if_loaded(clock, threads)
    out = a.out or fresh_dir(os.path.join("bench_results", f"{cfg.resolved_device().type}-"
                                          f"{'quick' if a.quick else 'full'}-{_utc_stamp()}"))
    report = run_suite(cfg)
    paths = write_report(report, out)
    with open(paths["markdown"]) as f:
        sys.stdout.write(f.read())
    print(f"\nwrote {paths['json']}, {paths['markdown']}, " + ", ".join(paths["png"]), file=sys.stderr)
    bad = [r for r in report["results"] if r["status"] != "ok"]
    return 0 if not bad or all(r["impl"] == "compile_literal" for r in bad) else 1


if __name__ == "__main__":
    sys.exit(main())
