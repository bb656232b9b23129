"""The end-to-end demo: pretrain, freeze, tune MoSS, generate interleaved text and images, time the adapter."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import numpy as np
import torch

from ..layout import ImageLayout
from ..model import adapted_layers, moss_summary
from ..model.decoder import MossDecoder, generate
from . import plots
from .data import GRID, NUMBER_WORDS, TRANSFORMS, DigitsData, TaskBatch
from .speed import time_adapter
from .train import DemoSettings, evaluate, pretrain_base, tune_adapter

__all__ = ["decode_consistency", "generate_completions", "pick_one_per_class", "run_demo"]


def pick_one_per_class(task: TaskBatch, n: int) -> TaskBatch:
    """Examples of the digits 0, 1, ..., 9, then the next of each again, ``n`` in all (fewer if ``task`` is small)."""
    labels = task.labels.tolist()
    per_class = [[i for i, y in enumerate(labels) if y == cls] for cls in range(10)]
    rounds = max(len(c) for c in per_class)
    order = [c[r] for r in range(rounds) for c in per_class if r < len(c)]
    return task.subset(order[:n])


def _image_after(ids: torch.Tensor, boi_pos: int, image_start: int) -> np.ndarray:
    """``(n, 8, 8)`` levels of the image whose ``<boi>`` is at ``boi_pos`` (``-1`` where no image token is)."""
    n = GRID[0] * GRID[1]
    tokens = torch.full((ids.shape[0], n), -1, dtype=torch.int64)
    got = ids[:, boi_pos + 1: boi_pos + 1 + n] - image_start
    tokens[:, :got.shape[1]] = torch.where(got >= 0, got, -1)
    return tokens.reshape(-1, *GRID).numpy()


def generate_completions(model: MossDecoder, task: TaskBatch, data: DigitsData, sample: bool = False,
                         seed: int = 0):
    """Prompt with the task's prefix (ending inside the image), let ``generate`` finish image and text.

    Returns ``(generation output, images (n, 8, 8), answers: list of str)``: the drawn image (given rows
    included) and the text generated after it.
    """
    prompts = task.ids[:, :task.prompt_len]
    gen = torch.Generator().manual_seed(seed)
    out = generate(model, prompts, task.seq_len - task.prompt_len, do_sample=sample, generator=gen)
    boi_pos = int((task.ids[0] == data.vocab.boi_id).nonzero()[0])
    images = _image_after(out.sequences, boi_pos, data.vocab.image_start)
    tail = boi_pos + 1 + GRID[0] * GRID[1]
    answers = [data.vocab.decode(row[tail:]) for row in out.sequences]
    return out, images, answers


@torch.no_grad()
def decode_consistency(model: MossDecoder, gen_sequences: torch.Tensor, gen_logits: torch.Tensor) -> float:
    """Largest ``|logit|`` difference between incremental decoding and one full forward over its output."""
    model.eval()
    n = gen_logits.shape[1]
    full = model(gen_sequences).logits[:, -n - 1:-1]
    return (full - gen_logits).abs().max().item()


def _captions_of(answers, task: TaskBatch) -> list:
    """``"seven ok"``-style captions: the number word the model named, and whether it is right (``x``: wrong)."""
    out = []
    for text, y in zip(answers, task.labels.tolist()):
        named = next((w for w in text.split() if w in NUMBER_WORDS), "?")
        out.append(f"{named} {'ok' if named == NUMBER_WORDS[y] else 'x'}")
    return out


def run_demo(settings: DemoSettings, out_dir: str, n_show: int = 10, sample: bool = False,
             speed_repeats: int = 5, log=print) -> dict:
    """The whole demo; writes ``loss_curve.png``, ``digits.png`` and ``demo_metrics.json`` into ``out_dir``.

    Returns the metrics dictionary (also written as JSON), with the paths of the files.
    """
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    data = settings.data()
    v = data.vocab
    pre_train, tune_train = data.pretrain("train"), data.complete("train")
    log(f"data: {len(data.train_index)} training digits, {len(data.test_index)} held out; vocabulary "
        f"{v.size} tokens ({v.text_size} text, <boi>, <eoi>, {v.levels} image levels), 8x8 images")
    log(f"  pretraining sequence: {v.decode(pre_train.ids[0])}")
    prompt = v.decode(tune_train.ids[0, :tune_train.prompt_len])
    log(f"  instruction sequence: {v.decode(tune_train.ids[0])}  (prompt: {prompt})")

    base, pre_losses = pretrain_base(settings, data)
    base_state = {k: t.clone() for k, t in base.state_dict().items()}
    held_pre = evaluate(base, data.pretrain("test"), v)
    held_base = evaluate(base, data.complete("test"), v)
    log(f"base, held-out captioned digits: loss {held_pre['loss']:.3f}, image-token acc {held_pre['image_acc']:.3f}")
    log(f"base (frozen, no adapter), held-out instruction task: image-token loss {held_base['image_loss']:.3f}, "
        f"acc {held_base['image_acc']:.3f}, answer acc {held_base['answer_acc']:.3f}")

    model, tune_losses = tune_adapter(settings, data, base_state, "moss")
    log(str(moss_summary(model)))
    held_moss = evaluate(model, data.complete("test"), v)
    log(f"MoSS-tuned, held-out instruction task: image-token loss {held_moss['image_loss']:.3f}, "
        f"acc {held_moss['image_acc']:.3f}, answer acc {held_moss['answer_acc']:.3f}")

    # Interleaved generation with the KV + conv-state cache: the prompt ends inside the image.
    show = pick_one_per_class(data.complete("test"), n_show)
    out, moss_images, answers = generate_completions(model, show, data, sample, settings.seed)
    _, base_images, _ = generate_completions(base, show, data, sample, settings.seed)
    gap = decode_consistency(model, out.sequences, out.logits)
    for text in (v.decode(row) for row in out.sequences[:3]):
        log(f"  generated: {text}")
    log(f"incremental decoding (KV cache + ConvLoRAStates) vs one full forward: max |logit diff| {gap:.2e}")
    # The base also draws from text alone (its pretraining task), plain digits 0..9; sampled (seeded), since
    # greedy decoding of a whole image from a tiny model collapses to the most common strokes.
    draw_prompts = torch.tensor([[v.bos_id, *v.text(f"a handwritten {w}"), v.boi_id] for w in NUMBER_WORDS[:n_show]])
    drawn = generate(base, draw_prompts, GRID[0] * GRID[1] + 2, do_sample=True,
                     generator=torch.Generator().manual_seed(settings.seed)).sequences
    drawn_images = _image_after(drawn, draw_prompts.shape[1] - 1, v.image_start)

    # Fused vs eager on this run's shapes, with the trained weights of the first adapted layer.
    name, layer = next(iter(adapted_layers(model).items()))
    ids = tune_train.ids[: settings.batch_size]
    layout = ImageLayout.from_token_ids(ids, v.boi_id, GRID)
    speed = time_adapter(ids, layout, layer.in_features, layer.out_features, layer.rank, layer.kernel_size,
                         layer.scale, repeats=speed_repeats,
                         weights=(layer.text_A, layer.text_B, layer.image_A, layer.image_B))
    log(f"{speed.line()} [{name}]")

    prompt_images = _image_after(show.ids[:, :show.prompt_len], show.prompt_len - 1 - data.given_rows * GRID[1],
                                 v.image_start)
    truth = show.images.numpy()
    loss_png = plots.plot_losses({"1. pretrain base (all weights)": pre_losses,
                                  "2. tune MoSS on the instruction task (base frozen)": tune_losses},
                                 os.path.join(out_dir, "loss_curve.png"), title="moss_kernels demo: training loss")
    grid_png = plots.plot_digits(
        [("base draws\n'a handwritten k'\n(sampled)", drawn_images),
         (f"prompt: top {data.given_rows}\nrows, {TRANSFORMS[data.transform][0]}", prompt_images),
         ("base completes\n(no adapter)", base_images),
         ("MoSS completes\n+ names it", moss_images),
         ("held-out truth", truth)],
        os.path.join(out_dir, "digits.png"), levels=v.levels,
        captions=[list(NUMBER_WORDS[:n_show]), [], [], _captions_of(answers, show), []])
    metrics = dict(
        settings=dataclasses.asdict(settings), wall_s=time.perf_counter() - t0,
        base_heldout_pretrain=held_pre, base_heldout_task=held_base, moss_heldout_task=held_moss,
        decode_max_logit_diff=gap, speed=dict(backend=speed.backend, fused_ms=speed.fused_ms, eager_ms=speed.eager_ms,
                                               shape=speed.shape, layer=name),
        pretrain_final_loss=pre_losses[-1], tune_final_loss=tune_losses[-1],
        files=dict(loss_curve=loss_png, digits=grid_png),
    )
    metrics["files"]["metrics"] = _write_json(metrics, os.path.join(out_dir, "demo_metrics.json"))
    log(f"wrote {loss_png}, {grid_png}, {metrics['files']['metrics']} in {metrics['wall_s']:.0f} s")
    return metrics


def _write_json(obj, path: str) -> str:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    return path
