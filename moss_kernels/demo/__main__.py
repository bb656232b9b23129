"""``python -m moss_kernels.demo``: the end-to-end demo; ``--compare``: LoRA vs MoE-LoRA vs MoSS."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional
from collections.abc import Sequence

import torch

from ..extras import require_extra
from .compare import run_compare
from .data import TRANSFORMS
from .demo import run_demo
from .train import DemoSettings

DESCRIPTION = """\
MoSS end to end on scikit-learn's handwritten digits (8x8 images, pixel intensities quantised to a few
image tokens, captions as text tokens), with the package's built-in LLaMA-style decoder, on the CPU.

Default run: (1) pretrain a tiny base decoder on interleaved caption+image sequences ("a handwritten
seven <boi> [64 image tokens] <eoi>" and the reverse); (2) freeze it and tune MoSS adapters
(moss_kernels.inject_moss) on a new interleaved instruction task: complete a digit turned a quarter turn
from its top rows, then name it; (3) generate with incremental decoding (KV cache + the adapters'
ConvLoRAStates) from prompts that end inside the image; (4) time the adapter with the default backend
against the literal eager definition on this run's shapes. Writes loss_curve.png, digits.png and
demo_metrics.json into --out.

--compare: the paper's Table 2 in miniature. LoRA vs MoE-LoRA vs MoSS at the same rank on one frozen
base, tuned on the instruction task, scored on held-out digits (image-token loss and accuracy, digit-name
accuracy), one run per --seeds; writes compare.md (markdown table), compare.json and compare_losses.png.
"""


def parser() -> argparse.ArgumentParser:
    d = DemoSettings()
    p = argparse.ArgumentParser(prog="python -m moss_kernels.demo", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", action="store_true", help="run the LoRA / MoE-LoRA / MoSS comparison instead")
    p.add_argument("--out", default="moss_demo_out", help="output folder for PNGs, JSON, tables (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of base pretraining, adapter init, dropout, batch order (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="--compare: adapter seeds, one tuning run each (default: %(default)s)")
    p.add_argument("--param-matched", action="store_true",
                   help="--compare: also LoRA and MoE-LoRA at the ranks that match MoSS's parameter count")
    g = p.add_argument_group("data")
    g.add_argument("--levels", type=int, default=d.levels,
                   help="image vocabulary: intensity 0..16 quantised to this many tokens (default: %(default)s)")
    g.add_argument("--transform", choices=sorted(TRANSFORMS), default=d.transform,
                   help="how the instruction task's digits differ from pretraining (default: %(default)s)")
    g.add_argument("--given-rows", type=int, default=d.given_rows,
                   help="image rows the instruction prompt gives; the model draws the rest (default: %(default)s)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N of the 1797 digits (quick runs)")
    g = p.add_argument_group("model (the built-in reference decoder)")
    g.add_argument("--hidden-size", type=int, default=d.hidden_size, help="(default: %(default)s)")
    g.add_argument("--intermediate-size", type=int, default=d.intermediate_size, help="MLP (default: %(default)s)")
    g.add_argument("--layers", type=int, default=d.num_layers, help="decoder layers (default: %(default)s)")
    g.add_argument("--heads", type=int, default=d.num_heads, help="attention heads (default: %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help="(default: %(default)s)")
    g.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr, help="(default: %(default)s)")
    g.add_argument("--tune-steps", type=int, default=d.tune_steps, help="(default: %(default)s)")
    g.add_argument("--tune-lr", type=float, default=d.tune_lr, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default: %(default)s)")
    g = p.add_argument_group("adapter (MossConfig)")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank of every adapter (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="scale = alpha / rank (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="adapter input dropout (default: %(default)s)")
    g.add_argument("--kernel-size", type=int, default=d.kernel_size, help="MoSS image conv k (default: %(default)s)")
    g = p.add_argument_group("generation and output")
    g.add_argument("--show", type=int, default=10, help="held-out digits shown (default: %(default)s)")
    g.add_argument("--sample", action="store_true", help="sample image tokens instead of greedy decoding")
    g.add_argument("--speed-repeats", type=int, default=5, help="timed repeats per path (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 0: torch's default (default: %(default)s: the model is too small to "
                        "gain much from more, and oversubscribed threads on a busy machine were 10x slower)")
    return p


def settings_from(args: argparse.Namespace) -> DemoSettings:
    return DemoSettings(
        seed=args.seed, levels=args.levels, transform=args.transform, given_rows=args.given_rows,
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size, num_layers=args.layers,
        num_heads=args.heads, pretrain_steps=args.pretrain_steps, pretrain_lr=args.pretrain_lr,
        tune_steps=args.tune_steps, tune_lr=args.tune_lr, batch_size=args.batch_size, rank=args.rank,
        alpha=args.alpha, dropout=args.dropout, kernel_size=args.kernel_size, limit=args.limit,
        progress=not args.no_progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    require_extra("python -m moss_kernels.demo", "demo",
                  {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"})
    if args.threads < 0:
        raise SystemExit(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from(args)
    print("settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items())
          + f", threads={torch.get_num_threads()}", flush=True)
    if args.compare:
        run_compare(settings, args.seeds, args.out, param_matched=args.param_matched)
    else:
        run_demo(settings, args.out, n_show=args.show, sample=args.sample, speed_repeats=args.speed_repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
