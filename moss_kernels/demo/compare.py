"""The paper's Table 2 in miniature: LoRA vs MoE-LoRA vs MoSS on one frozen base, held-out image generation.

One base is pretrained (``settings.seed``) and frozen; each adapter (``MossConfig.adapter`` = ``"lora"``,
``"moe_lora"``, ``"moss"``, all at ``settings.rank``) is tuned on the instruction task from that same base
once per seed (the seed sets the adapter's initialisation, dropout and minibatch order), then scored
teacher-forced on the held-out digits: image-token loss and accuracy over the image rows the model must
draw, and digit-name accuracy. The table gives mean and sample standard deviation over the seeds.

At one rank the three adapters differ in size (MoE-LoRA has two linear LoRAs, MoSS's image ``A`` has
``k*k`` taps), so ``param_matched=True`` adds LoRA and MoE-LoRA rows at the ranks whose trainable
parameter counts come closest to MoSS's, with the same ``alpha / rank`` scale: a control for size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Sequence

import numpy as np

from ..model import inject_moss, moss_summary
from ..model.decoder import MossDecoder
from . import plots
from .data import TRANSFORMS, Vocab
from .train import DemoSettings, build_decoder, evaluate, pretrain_base, tune_adapter

__all__ = ["ADAPTER_ROWS", "Row", "markdown_table", "matched_rank", "run_compare"]

# Table rows: adapter value of MossConfig -> the name the table prints.
ADAPTER_ROWS = {"lora": "LoRA (one adapter, all tokens)", "moe_lora": "MoE-LoRA (linear LoRA per modality)",
                "moss": "MoSS (text LoRA + 2x2 conv LoRA on images)"}
METRICS = (("image_loss", "held-out image-token loss (nats) ↓", 3), ("image_acc", "image-token accuracy ↑", 3),
           ("answer_acc", "digit-name accuracy ↑", 3))


def _mean_spread(values: Sequence[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: an adapter at a rank (``alpha`` keeps ``settings.alpha / settings.rank``)."""

    key: str
    adapter: str
    rank: int
    label: str

    def settings(self, base: DemoSettings) -> DemoSettings:
        return dataclasses.replace(base, rank=self.rank, alpha=base.alpha * self.rank / base.rank)


def _trainable(settings: DemoSettings, vocab: Vocab, adapter: str) -> int:
    model: MossDecoder = build_decoder(settings, vocab)
    return moss_summary(inject_moss(model, settings.moss_config(vocab, adapter))).trainable


def matched_rank(settings: DemoSettings, vocab: Vocab, adapter: str, target: int) -> int:
    """The rank at which ``adapter`` has the trainable-parameter count closest to ``target``."""
    ranks = range(1, 8 * settings.rank + 1)
    counts = {r: _trainable(dataclasses.replace(settings, rank=r), vocab, adapter) for r in ranks}
    return min(counts, key=lambda r: (abs(counts[r] - target), r))


def _rows(settings: DemoSettings, vocab: Vocab, adapters: Sequence[str], param_matched: bool) -> list:
    k = settings.kernel_size
    rows = [Row(a, a, settings.rank, ADAPTER_ROWS[a].replace("2x2", f"{k}x{k}")) for a in adapters]
    if param_matched:
        target = _trainable(settings, vocab, "moss")
        for a in ("lora", "moe_lora"):
            r = matched_rank(settings, vocab, a, target)
            rows.append(Row(f"{a}@{r}", a, r, f"{ADAPTER_ROWS[a]}, params matched to MoSS"))
    return rows


def markdown_table(results: dict, base_metrics: dict, settings: DemoSettings, seeds: Sequence[int]) -> str:
    """The comparison as a markdown table.

    ``results[key] = {"label", "rank", "params", "runs": [metrics per seed]}`` in row order.
    """
    header = "| adapter | rank | trainable params | " + " | ".join(title for _, title, _ in METRICS) + " |"
    lines = [header, "|" + "---|" * (3 + len(METRICS))]
    lines.append("| frozen base, no adapter | - | 0 | " + " | ".join(
        f"{base_metrics[key]:.{d}f}" for key, _, d in METRICS) + " |")
    for row in results.values():
        cells = [_mean_spread([run[key] for run in row["runs"]], d) for key, _, d in METRICS]
        lines.append(f"| {row['label']} | {row['rank']} | {row['params']:,} | " + " | ".join(cells) + " |")
    word = TRANSFORMS[settings.transform][0]
    note = (f"\nMean ± sample standard deviation over seeds {list(seeds)} (adapter init, dropout, batch order); "
            f"one base pretrained with seed {settings.seed}. Task: complete a {word} held-out digit "
            f"from its top {settings.given_rows} rows ({8 - settings.given_rows} rows = "
            f"{(8 - settings.given_rows) * 8} image tokens scored per digit, {settings.levels} intensity levels), "
            f"then name it; {settings.tune_steps} tuning steps of batch {settings.batch_size}, lr {settings.tune_lr}, "
            f"alpha/rank {settings.alpha / settings.rank:g}, dropout {settings.dropout}. Image metrics use the "
            "image-vocabulary logits.")
    return "\n".join(lines) + "\n" + note + "\n"


def run_compare(settings: DemoSettings, seeds: Sequence[int], out_dir: str,
                adapters: Sequence[str] = tuple(ADAPTER_ROWS), param_matched: bool = False, log=print) -> dict:
    """Run the comparison; writes ``compare.md``, ``compare.json`` and ``compare_losses.png`` into ``out_dir``.

    Returns ``{"table": markdown, "results": ..., "base": ..., "files": ...}``.
    """
    for a in adapters:
        if a not in ADAPTER_ROWS:
            raise ValueError(f"adapters: {a!r} is not one of {sorted(ADAPTER_ROWS)}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    data = settings.data()
    held_out = data.complete("test")
    rows = _rows(settings, data.vocab, adapters, param_matched)
    base, _ = pretrain_base(settings, data)
    base_state = {k: t.clone() for k, t in base.state_dict().items()}
    base_metrics = evaluate(base, held_out, data.vocab)
    log(f"frozen base on the held-out task: {base_metrics}")
    results, curves = {}, {}
    for row in rows:
        res = results[row.key] = {"label": row.label, "adapter": row.adapter, "rank": row.rank, "params": 0,
                                  "runs": [], "seeds": list(seeds)}
        runs_losses = []
        for seed in seeds:
            model, losses = tune_adapter(row.settings(settings), data, base_state, row.adapter, seed)
            res["params"] = moss_summary(model).trainable
            metrics = evaluate(model, held_out, data.vocab)
            res["runs"].append(metrics)
            runs_losses.append(losses)
            log(f"{row.key} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        curves[f"{row.adapter}, rank {row.rank}"] = np.mean(np.asarray(runs_losses), axis=0).tolist()
    table = markdown_table(results, base_metrics, settings, seeds)
    wall = time.perf_counter() - t0
    files = dict(table=os.path.join(out_dir, "compare.md"), json=os.path.join(out_dir, "compare.json"))
    with open(files["table"], "w") as f:
        f.write(table)
    with open(files["json"], "w") as f:
        json.dump(dict(settings=dataclasses.asdict(settings), seeds=list(seeds), base=base_metrics, results=results,
                       wall_s=wall), f, indent=2)
    files["losses"] = plots.plot_overlaid(curves, os.path.join(out_dir, "compare_losses.png"),
                                          title=f"tuning loss on the instruction task (mean of {len(seeds)} seeds)")
    log(table)
    log(f"wrote {', '.join(files.values())} in {wall:.0f} s")
    return dict(table=table, results=results, base=base_metrics, files=files, wall_s=wall)
