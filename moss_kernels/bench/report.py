"""The report: a Markdown table (also printed), a JSON file with every figure, PNG plots.

Everything here reads the list of records ``run.run_suite`` produced; nothing is measured here.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict

__all__ = ["markdown", "plot", "summary", "write_report"]

from .cases import IMPL_ORDER

MIB = float(1 << 20)


def _fmt_time(s) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _geomean(values) -> float:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _by_op(records):
    ops = OrderedDict()
    for r in records:
        ops.setdefault(r["op"], []).append(r)
    return ops


def _impl_order(records) -> list:
    seen = list(OrderedDict((r["impl"], None) for r in records))
    return sorted(seen, key=lambda i: IMPL_ORDER.index(i) if i in IMPL_ORDER else len(IMPL_ORDER))


def summary(records) -> dict:
    """Per op and impl: the geometric mean over cases of the speedup over ``eager_literal``, of the
    multiple of the floor, and (layer ops) of the time over the base linear alone."""
    out = {}
    for op, recs in _by_op(records).items():
        ok = [r for r in recs if r["status"] == "ok"]
        out[op] = {}
        for impl in _impl_order(ok):
            mine = [r for r in ok if r["impl"] == impl]
            out[op][impl] = {
                "cases": len(mine),
                "speedup_vs_eager_literal": _geomean([r.get("speedup_vs_eager_literal") for r in mine]),
                "x_floor": _geomean([r["x_floor"] for r in mine]),
                "time_over_base": _geomean([r.get("time_over_base") for r in mine]),
            }
    return out


def markdown(report: dict) -> str:
    meta, records = report["meta"], report["results"]
    lines = [f"# moss_kernels benchmark — {meta['device_name']}", ""]
    lines += [
        f"- date {meta['date']}, commit `{meta['commit']}`{' (uncommitted changes)' if meta.get('dirty') else ''}, "
        f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}",
        f"- device `{meta['device']}`, {meta['threads']} CPU threads (torch.get_num_threads), "
        f"timing: {meta['timer']}",
        f"- suite: {'quick (scaled-down widths)' if meta['quick'] else 'full (real model widths)'}, "
        f"dtype {meta['dtype']}, backends {meta['backends']}"
        + (f", unavailable: {meta['backend_problems']}" if meta.get("backend_problems") else ""),
        f"- run took {meta['wall_s']:.0f} s; load average (1/5/15 min) {meta.get('loadavg_start')} at the start, "
        f"{meta.get('loadavg_end')} at the end (other processes' load skews CPU timings)",
    ]
    for c in report["ceilings"].values():
        lines.append(f"- ceilings ({c['dtype']}): copy {c['bandwidth'] / 1e9:.1f} GB/s (read+write, "
                     f"{c['copy_bytes'] >> 20} MiB), matmul {c['flops'] / 1e9:.1f} GFLOP/s ({c['matmul_n']}^3)")
    lines += ["", "Cells: median time, then `x` = the time as a multiple of the floor "
              "`max(flops/peak, bytes/bandwidth)` (1.0 = at a ceiling).", ""]
    for op, recs in _by_op(records).items():
        impls = _impl_order(recs)
        lines += [f"## {op}", "", "| case | floor | " + " | ".join(impls) + " |",
                  "|---|---|" + "---|" * len(impls)]
        cases = OrderedDict()
        for r in recs:
            cases.setdefault(r["shape_id"], {})[r["impl"]] = r
        for shape, row in cases.items():
            floor = next(iter(row.values())).get("floor_moss_s")
            cells = []
            for impl in impls:
                r = row.get(impl)
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append(r["status"])
                else:
                    cells.append(f"{_fmt_time(r['median_s'])} x{r['x_floor']:.1f}")
            lines.append(f"| {shape} | {_fmt_time(floor)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Summary (geometric means over cases)", "",
              "| op | impl | cases | speedup vs eager_literal | x floor | time / base linear |",
              "|---|---|---|---|---|---|"]
    for op, per in report["summary"].items():
        for impl, s in per.items():
            sp, tob = s["speedup_vs_eager_literal"], s["time_over_base"]
            lines.append(f"| {op} | {impl} | {s['cases']} | {'' if math.isnan(sp) else f'{sp:.2f}'} | "
                         f"{s['x_floor']:.1f} | {'' if math.isnan(tob) else f'{tob:.2f}'} |")
    mem = [r for r in records if r.get("saved_bytes") is not None]
    if mem:
        kinds = sorted({r["peak_kind"] for r in mem})
        lines += ["", "## Memory of forward+backward", "",
                  "Cells: new saved-activation MiB (autograd's saved tensors that are not inputs, weights or "
                  "index tables) / peak MiB. Peak: " + "; ".join(kinds) + ".", ""]
        for op in ("fwd_bwd", "layer_fwd_bwd"):
            recs = [r for r in mem if r["op"] == op]
            if not recs:
                continue
            impls = _impl_order(recs)
            lines += [f"### {op}", "", "| case | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
            cases = OrderedDict()
            for r in recs:
                cases.setdefault(r["shape_id"], {})[r["impl"]] = r
            for shape, row in cases.items():
                cells = [f"{row[i]['saved_new_bytes'] / MIB:.2f} / {row[i]['peak_bytes'] / MIB:.2f}" if i in row else ""
                         for i in impls]
                lines.append(f"| {shape} | " + " | ".join(cells) + " |")
            lines.append("")
    if report.get("mmfs"):  # the MMFS section (bench/mmfs.py)
        from .mmfs import markdown as mmfs_markdown

        lines += ["", *mmfs_markdown(report["mmfs"])]
    errors = [r for r in records if r["status"] != "ok"]
    if errors:
        lines += ["", "## Failures", ""]
        lines += [f"- {r['op']} {r['shape_id']} {r['impl']}: {r['status']}: {r.get('error', '')}" for r in errors]
    return "\n".join(lines) + "\n"


def plot(report: dict, out_dir: str) -> list:
    """PNG plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in report["results"] if r["status"] == "ok"]
    ops = _by_op(records)
    title = f"{report['meta']['device_name']}, {report['meta']['dtype']}"
    paths = []

    def per_case_plot(name, value, ylabel, select=lambda op: True, hline=None):
        chosen = [(op, recs) for op, recs in ops.items()
                  if select(op) and any(value(r) is not None for r in recs)]
        if not chosen:
            return
        cols = min(3, len(chosen))
        rows = -(-len(chosen) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
        for ax, (op, recs) in zip(axes.flat, chosen):
            shapes = list(OrderedDict((r["shape_id"], None) for r in recs))
            impls = _impl_order(recs)
            for n, impl in enumerate(impls):
                dodge = (n - (len(impls) - 1) / 2) * 0.08  # side by side, not on top of each other
                pts = [(shapes.index(r["shape_id"]) + dodge, value(r)) for r in recs if r["impl"] == impl
                       and value(r) is not None]
                if pts:
                    color = f"C{IMPL_ORDER.index(impl) if impl in IMPL_ORDER else 9}"  # one colour per impl
                    ax.plot(*zip(*pts), marker="o", linestyle="", label=impl, color=color)
            ax.set_yscale("log")
            if hline is not None:
                ax.axhline(hline, color="grey", linewidth=0.8)
            ax.set_title(op)
            ax.set_ylabel(ylabel)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([sh.rsplit(" ", 1)[0] for sh in shapes], rotation=75, fontsize=6)  # less the dtype
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(chosen):]:
            ax.axis("off")
        fig.suptitle(f"{ylabel} — {title}")
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    per_case_plot("time_vs_floor.png", lambda r: r["x_floor"], "time / floor (log)", hline=1.0)
    per_case_plot("speedup_vs_eager.png", lambda r: r.get("speedup_vs_eager_literal"),
                  "speedup over eager_literal (log)", hline=1.0)
    per_case_plot("layer_time_over_base.png", lambda r: r.get("time_over_base"), "layer time / base linear (log)",
                  select=lambda op: op.startswith("layer"), hline=1.0)
    per_case_plot("memory_saved.png", lambda r: (r["saved_new_bytes"] / MIB) if r.get("saved_new_bytes") else None,
                  "new saved-activation MiB (log)", select=lambda op: op.endswith("fwd_bwd"))
    return paths


def write_report(report: dict, out_dir: str) -> dict:
    """Write ``results.json``, ``results.md`` and the PNGs into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md")}
    report["summary"] = summary(report["results"])
    with open(paths["json"], "w") as f:
        json.dump(_clean(report), f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(markdown(report))
    paths["png"] = plot(report, out_dir)
    return paths


def _clean(o):
    """JSON has no NaN: undefined figures become ``null``."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
