"""Model-level generation benchmark: what an image costs to generate with each adapter.

A transformers Llama built from a config (no download), the same frozen base weights for every
variant: the frozen base, PEFT LoRA (``peft``), and this package's ``adapter="lora"``,
``"moe_lora"`` and ``"moss"`` at the same rank, every adapter's ``B`` randomised (a zero ``B``
would let nothing be skipped anyway, but keeps the outputs honest). A batch whose prompts end inside
a ``H x W`` image (at different image positions), then ``new_tokens`` greedy tokens through
``model.generate`` (every one an image token). Measured, interleaved round by round (variant after
variant, so a shared machine's load hits all alike), medians over rounds:

* ``generate_s``: a whole ``generate(max_new_tokens=n)``; ``tokens_per_s = batch * n / generate_s``;
* ``step_s``: per decoding step, ``(generate(n) - generate(1)) / (n - 1)`` (prefill excluded);
* ``adapter_step_s``: ``step_s`` minus the base's — what the adapter adds per generated token;
* ``prefill_s``: one cached forward over the prompt; ``train_step_s``: forward + backward with labels
  over ``train_seq`` tokens per row (adapters trainable; the base without adapters is not trained);
* ``adapter_bytes``: the adapter weight bytes one decoding step must read (every generated token is
  an image token: the image adapter of ``moss``/``moe_lora``, the one LoRA of the others), and
  ``floor_step_s``: those bytes at the stream bandwidth measured in the same run (one thread reading
  a tensor far larger than the caches), the time no kernel can beat when weights come from memory.

``python -m moss_kernels.bench --generation`` (or ``python -m moss_kernels.bench.generation``).
A benchmark, never a test: the numbers depend on the machine and its load (``loadavg`` is recorded).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Optional

import torch

__all__ = ["GenerationConfig", "format_table", "run_generation"]

VARIANTS = ("base", "peft_lora", "lora", "moe_lora", "moss")


@dataclasses.dataclass
class GenerationConfig:
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_layers: int = 4
    num_heads: int = 16
    vocab_size: int = 16384
    rank: int = 64
    batch: int = 2
    grid: tuple = (32, 32)
    prompt_text: int = 16  # text tokens before <boi>
    image_offsets: tuple = (100, 37)  # image tokens already in each row's prompt (rows at different positions)
    new_tokens: int = 64
    train_seq: int = 256
    rounds: int = 5
    threads: Optional[int] = 1
    variants: tuple = VARIANTS
    moss_backends: tuple = (None,)  # None: the default backend; e.g. ("native", "reference")
    clock: str = "process"  # "process": CPU seconds of this process (robust to a shared machine's load); "wall"
    seed: int = 0

    @classmethod
    def quick(cls) -> GenerationConfig:
        """Tiny sizes: a smoke run of a few seconds (for tests; the numbers mean nothing)."""
        return cls(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=512, rank=8,
                   grid=(4, 4), prompt_text=3, image_offsets=(5, 2), new_tokens=4, train_seq=16, rounds=1)


def _llama(cfg: GenerationConfig):
    import transformers

    torch.manual_seed(cfg.seed)
    lc = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                                  max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return transformers.LlamaForCausalLM(lc).eval()


def _randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _variant(base, name: str, cfg: GenerationConfig, backend: Optional[str]):
    import moss_kernels as mk

    model = copy.deepcopy(base)
    if name == "base":
        return model
    if name == "peft_lora":
        import peft

        lc = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, lora_dropout=0.0, target_modules="all-linear")
        model = peft.get_peft_model(model, lc)
        for n, p in model.named_parameters():  # PEFT's B starts at zero: give it values like the others
            p.requires_grad_("lora_" in n)
    else:
        mk.inject_moss(model, mk.MossConfig(rank=cfg.rank, alpha=cfg.rank, dropout=0.0, adapter=name,
                                            boi_token_id=cfg.vocab_size - 1, grid=cfg.grid, backend=backend))
    _randomize(model, cfg.seed + 1)
    return model.eval()


def _prompt(cfg: GenerationConfig) -> torch.Tensor:
    """Rows ending ``image_offsets[b]`` tokens into a ``grid`` image (the same length: padded with
    leading text), image codes drawn from the upper half of the vocabulary."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    boi = cfg.vocab_size - 1
    longest = max(cfg.image_offsets[: cfg.batch])
    rows = []
    for b in range(cfg.batch):
        off = cfg.image_offsets[b % len(cfg.image_offsets)]
        text = torch.randint(2, cfg.vocab_size // 2, (cfg.prompt_text + longest - off,), generator=g)
        codes = torch.randint(cfg.vocab_size // 2, boi, (off,), generator=g)
        rows.append(torch.cat([text, torch.tensor([boi]), codes]))
    return torch.stack(rows)


def _timer(clock: str):
    if clock not in ("process", "wall"):
        raise ValueError(f"clock must be 'process' or 'wall', got {clock!r}")
    now = time.process_time if clock == "process" else time.perf_counter

    def timed(fn) -> float:
        t0 = now()
        fn()
        return now() - t0

    return timed


def run_generation(cfg: Optional[GenerationConfig] = None, verbose: bool = True) -> dict:
    """Measure every variant (see the module docstring); returns ``{"meta": ..., "results": [...]}``."""
    cfg = cfg or GenerationConfig()
    if cfg.new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (the step time is a difference), got {cfg.new_tokens}")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, verbose)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: GenerationConfig, verbose: bool) -> dict:
    base = _llama(cfg)
    names = []
    models = {}
    for v in cfg.variants:
        for be in (cfg.moss_backends if v == "moss" else (None,)):
            key = v if be is None else f"{v}/{be}"
            models[key] = _variant(base, v, cfg, be)
            names.append(key)
    prompt = _prompt(cfg)
    mask = torch.ones_like(prompt)
    bandwidth = _stream_bandwidth(_timer(cfg.clock))
    # Training rows: some text, <boi>, then image codes (the image cut by the end of the row).
    g = torch.Generator().manual_seed(3)
    train_ids = torch.randint(cfg.vocab_size // 2, cfg.vocab_size - 1, (cfg.batch, cfg.train_seq), generator=g)
    text = max(1, cfg.train_seq // 8)
    train_ids[:, :text] = torch.randint(2, cfg.vocab_size // 2, (cfg.batch, text), generator=g)
    train_ids[:, text] = cfg.vocab_size - 1
    gen_kw = dict(do_sample=False, pad_token_id=0, attention_mask=mask)

    def gen(model, n):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **gen_kw)

    def prefill(model):
        with torch.no_grad():
            model(prompt, attention_mask=mask, use_cache=True)

    def train(model):
        model.train()
        try:
            out = model(train_ids, labels=train_ids)
            out.loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.eval()

    _timed = _timer(cfg.clock)
    samples = {k: {"generate": [], "generate1": [], "prefill": [], "train": []} for k in names}
    for k in names:  # warm-up (and a check that every variant generates the whole image)
        seq = gen(models[k], 2)
        assert seq.shape[1] == prompt.shape[1] + 2
        prefill(models[k])
    for r in range(cfg.rounds):
        for k in names:
            m = models[k]
            samples[k]["generate"].append(_timed(lambda: gen(m, cfg.new_tokens)))
            samples[k]["generate1"].append(_timed(lambda: gen(m, 1)))
            samples[k]["prefill"].append(_timed(lambda: prefill(m)))
            if k != "base":
                samples[k]["train"].append(_timed(lambda: train(m)))
        if verbose:
            print(f"round {r + 1}/{cfg.rounds} done", file=sys.stderr, flush=True)
    med = {k: {n: statistics.median(v) if v else None for n, v in s.items()} for k, s in samples.items()}
    results = []
    base_step = None
    for k in names:
        m = med[k]
        step = (m["generate"] - m["generate1"]) / (cfg.new_tokens - 1)
        if k == "base":
            base_step = step
        nbytes = _adapter_bytes(models[k])
        results.append(dict(variant=k, generate_s=m["generate"], adapter_bytes=nbytes,
                            floor_step_s=nbytes / bandwidth if nbytes else None,
                            tokens_per_s=cfg.batch * cfg.new_tokens / m["generate"], step_s=step,
                            prefill_s=m["prefill"], train_step_s=m["train"], samples=samples[k]))
    for rec in results:
        rec["adapter_step_s"] = rec["step_s"] - base_step if base_step is not None else None
    meta = dict(config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
                stream_bandwidth_gb_s=bandwidth / 1e9, threads=torch.get_num_threads(), torch=torch.__version__,
                loadavg=_loadavg(),
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        from .run import _device_name, _git

        meta["machine"] = _device_name(torch.device("cpu"))
        meta["commit"] = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
        meta["dirty"] = bool(status) if status is not None else None
    except Exception:  # pragma: no cover - git missing
        meta["commit"] = None
    return {"meta": meta, "results": results}


def _adapter_bytes(model) -> int:
    """Adapter weight bytes a step of image tokens reads (see the module docstring)."""
    import moss_kernels as mk

    total = 0
    for name, p in model.named_parameters():
        if "lora_" in name:  # PEFT's lora_A / lora_B
            total += p.numel() * p.element_size()
    for mod in model.modules():
        if isinstance(mod, mk.MossLinear):
            pair = (mod.image_A, mod.image_B) if mod.image_A is not None else (mod.text_A, mod.text_B)
            total += sum(t.numel() * t.element_size() for t in pair)
    return total


def _stream_bandwidth(timed, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second one thread reads from memory (a sum over a tensor far larger than the caches)."""
    x = torch.ones(nbytes // 4)
    x.sum()
    return nbytes / statistics.median(timed(x.sum) for _ in range(repeats))


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def format_table(report: dict) -> str:
    """The Markdown table of a ``run_generation`` report, with MoSS against PEFT LoRA."""
    rows = {r["variant"]: r for r in report["results"]}
    cfg = report["meta"]["config"]
    bw = report["meta"].get("stream_bandwidth_gb_s")
    lines = [f"Llama hidden {cfg['hidden_size']}, {cfg['num_layers']} layers, rank {cfg['rank']}, "
             f"batch {cfg['batch']}, "
             f"prompts ending inside a {cfg['grid'][0]}x{cfg['grid'][1]} image, {cfg['new_tokens']} greedy tokens, "
             f"{report['meta']['threads']} thread(s), {cfg.get('clock', 'wall')} clock, medians of {cfg['rounds']} "
             "interleaved rounds "
             f"(load average {report['meta']['loadavg']}); stream bandwidth "
             f"{'-' if bw is None else f'{bw:.1f}'} GB/s (one thread).",
             f"Machine: {report['meta'].get('machine')}; commit {report['meta'].get('commit')}"
             f"{' (dirty tree)' if report['meta'].get('dirty') else ''}; {report['meta'].get('date')}.", "",
             "| variant | tokens/s | step (ms) | adapter cost / step (ms) | adapter weights / step (MB) | "
             "their bytes floor (ms) | prefill (ms) | train step (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"
    for k, r in rows.items():
        mb = "-" if not r.get("adapter_bytes") else f"{r['adapter_bytes'] / 1e6:.1f}"
        lines.append(f"| {k} | {r['tokens_per_s']:.1f} | {ms(r['step_s'])} | "
                     f"{'-' if k == 'base' else ms(r['adapter_step_s'])} | {mb} | {ms(r.get('floor_step_s'))} | "
                     f"{ms(r['prefill_s'])} | {ms(r['train_step_s'])} |")
    peft = rows.get("peft_lora")
    if peft is not None and peft["adapter_step_s"]:
        lines.append("")
        for k, r in rows.items():
            if k.startswith(("moss", "lora", "moe_lora")):
                cost = r["adapter_step_s"] / peft["adapter_step_s"]
                speed = r["tokens_per_s"] / peft["tokens_per_s"]
                line = (f"- {k}: adapter cost per step {cost:.2f}x PEFT LoRA's (target for moss: <= 1.3x), "
                        f"throughput {speed:.2f}x (target: >= 0.9x), train step "
                        f"{r['train_step_s'] / peft['train_step_s']:.2f}x")
                if r.get("adapter_bytes") and peft.get("adapter_bytes"):
                    # What the cost would be with PEFT's own per-step overhead and this variant's bytes at
                    # the stream bandwidth: no kernel does better when the weights come from memory.
                    best = peft["adapter_step_s"] - peft["floor_step_s"] + r["floor_step_s"]
                    line += (f"; reads {r['adapter_bytes'] / peft['adapter_bytes']:.2f}x PEFT's adapter bytes, so at "
                             f"best {best / peft['adapter_step_s']:.2f}x its cost and "
                             f"{peft['step_s'] / (peft['step_s'] - peft['adapter_step_s'] + best):.2f}x its "
                             "throughput here")
                lines.append(line)
    return "\n".join(lines)


def write(report: dict, out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "generation.json"), "markdown": os.path.join(out, "generation.md")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(format_table(report) + "\n")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moss_kernels.bench.generation", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("process", "wall"), default="process",
                   help="process CPU time (default: robust to other processes' load) or wall time")
    p.add_argument("--moss-backends", nargs="+", default=None, help="e.g. native reference (default: the default)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu-generation"))
    a = p.parse_args(argv)
    cfg = GenerationConfig.quick() if a.quick else GenerationConfig()
    if a.rounds:
        cfg.rounds = a.rounds
    if a.new_tokens:
        cfg.new_tokens = a.new_tokens
    cfg.threads = a.threads
    cfg.clock = a.clock
    if a.moss_backends:
        cfg.moss_backends = tuple(None if b == "default" else b for b in a.moss_backends)
    report = run_generation(cfg)
    paths = write(report, a.out)
    print(format_table(report))
    print(f"\nwrote {paths['json']}, {paths['markdown']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
