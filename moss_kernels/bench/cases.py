"""The benchmark's cases and implementations: one definition shared by the CLI and ``pytest benchmarks/``.

A ``Case`` is one op on one shape: a model's adapted linear (``d_in = d_model``, ``d_out = d_ffn``,
the up/gate projection), a rank, a token mix, a batch and a sequence length. ``prepare(case, impl,
device)`` builds what one timed call runs, for every implementation that computes that op:

* ``eager_literal`` — ``reference.literal_moss_lora``, the way a user writes MoSS in PyTorch (gather
  an image's tokens, pad, ``conv2d``, scatter); for decoding, a cache of the last ``(k-1)(W+1)+1``
  ``d_in``-wide inputs and a ``conv2d`` over the gathered ``k x k`` patch.
* ``compile_literal`` — ``torch.compile`` of ``eager_literal`` (forward and forward+backward only).
* every backend of ``moss_kernels.available_backends(device)`` (``reference``, ``native``,
  ``triton``) through ``moss_lora`` / ``moss_lora_step`` / ``MossLinear``; Triton's CPU interpreter is
  never benchmarked.
* ``lora`` and ``moe_lora`` — the paper's Table 2 baselines through the same op and layer (one
  shared linear LoRA; separate linear LoRAs per modality, i.e. a 1x1 image kernel), default backend.
* ``base`` — the frozen ``nn.Linear`` alone (layer ops): the cost the adapter adds to.

Adapter weights are float32 (``MossLinear``'s default, whatever the activations' dtype); ``B``s are
random rather than zero so that every implementation computes a non-trivial result. Dropout is 0:
it is an element-wise op outside the adapter kernels, the same for every implementation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends as _backends
from ..conv_lora import moss_lora, moss_lora_step
from ..layers import MossLinear
from ..layout import ImageLayout, ImageSpan, ring_size
from ..reference import literal_moss_lora
from ..state import ConvLoRAState

__all__ = [
    "DTYPES",
    "IMPL_ORDER",
    "MIXES",
    "MODELS",
    "OPS",
    "QUICK_MODELS",
    "Case",
    "Model",
    "Prepared",
    "impls_for",
    "literal_decode_step",
    "mix_layout",
    "prepare",
    "suite",
]

KERNEL_SIZE = 2
OPS = ("forward", "fwd_bwd", "prefill", "decode", "layer_fwd", "layer_fwd_bwd")
MIXES = {"text": 0.0, "mix75": 0.75, "image": 1.0}  # fraction of image tokens
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKEND_IMPLS = ("reference", "native", "triton")
# How reports order implementations: the base, the baselines users write, backends, Table 2 baselines.
IMPL_ORDER = ("base", "eager_literal", "compile_literal", *BACKEND_IMPLS, "lora", "moe_lora")


@dataclasses.dataclass(frozen=True)
class Model:
    """The adapted linear of one model: ``d_model -> d_ffn`` (the FFN up/gate projection)."""

    name: str
    d_model: int
    d_ffn: int
    grid: tuple  # (H, W) image-token grid
    source: str


MODELS = {
    "anole-7b": Model("anole-7b", 4096, 11008, (32, 32), "Chameleon/Anole-7B"),
    "emu2-33b": Model("emu2-33b", 6656, 17920, (8, 8), "Emu2-33B (LLaMA-33B decoder)"),
    "janus-1.3b": Model("janus-1.3b", 2048, 5632, (24, 24), "Janus-1.3B"),
}
# Same grids and d_ffn/d_model ratios, widths cut so the whole --quick run fits a 2-core CPU.
QUICK_MODELS = {
    "anole-7b/8": Model("anole-7b/8", 512, 1376, (32, 32), "Chameleon/Anole-7B, widths / 8"),
    "emu2-33b/16": Model("emu2-33b/16", 416, 1120, (8, 8), "Emu2-33B, widths / 16"),
    "janus-1.3b/8": Model("janus-1.3b/8", 256, 704, (24, 24), "Janus-1.3B, widths / 8"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One op on one shape. ``batch`` sequences of ``seq`` tokens (decode: ``batch`` tokens, one per
    sequence); ``chunk`` is the prefill chunk length; ``compile`` says whether ``compile_literal``
    runs on this case (compiling costs seconds per case on a CPU, so suites pick a few)."""

    op: str
    model: Model
    rank: int
    mix: str
    batch: int
    seq: int
    dtype: str = "float32"
    chunk: int = 0
    compile: bool = False

    @property
    def d_in(self) -> int:
        return self.model.d_model

    @property
    def d_out(self) -> int:
        return self.model.d_ffn

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape_id(self) -> str:
        """The case without the op, e.g. ``anole-7b r256 mix75 1x4096 bfloat16``."""
        tokens = f"b{self.batch}" if self.op == "decode" else f"{self.batch}x{self.seq}"
        chunk = f" c{self.chunk}" if self.op == "prefill" else ""
        return f"{self.model.name} r{self.rank} {self.mix} {tokens}{chunk} {self.dtype}"

    @property
    def id(self) -> str:
        return f"{self.op} {self.shape_id}"


# ============================================================================ suites
def suite(quick: bool, dtype: str = "float32", ops=OPS) -> list:
    """The cases of a run. ``quick``: scaled-down widths, sized for a 2-core CPU in about two minutes;
    otherwise the real models (meant for a GPU)."""
    cases = []
    models = QUICK_MODELS if quick else MODELS
    ranks = (16, 64) if quick else (64, 256)
    for model in models.values():
        hw = model.grid[0] * model.grid[1]
        if quick:
            # At least one whole image plus a cut one; one sequence shape per model.
            shapes = [(1, 3 * hw // 2 if hw >= 1024 else 512)]
            decode_batches, chunk = (1, 8, 64), 256
        else:
            shapes = [(1, 4096), (8, 2048)]
            decode_batches, chunk = (1, 8, 64), 1024
        for rank in ranks:
            main_rank = rank == ranks[-1]
            for mix in MIXES:
                for b, s in shapes:
                    # torch.compile of the literal code costs seconds per case: the quick run compiles
                    # the first model's mixed sequences at one rank, the full run the mixed and
                    # image-only ones of every model.
                    first_model = model is next(iter(models.values()))
                    compiles = main_rank and (mix == "mix75" and first_model if quick else mix != "text")
                    for op in ("forward", "fwd_bwd"):
                        cases.append(Case(op, model, rank, mix, b, s, dtype, compile=compiles))
                    if quick and not main_rank:
                        continue  # the quick run times the inference and layer ops at one rank
                    if mix != "text":  # text-only prefill has nothing to carry between chunks
                        cases.append(Case("prefill", model, rank, mix, b, s, dtype, chunk=chunk))
                    for op in ("layer_fwd", "layer_fwd_bwd"):
                        cases.append(Case(op, model, rank, mix, b, s, dtype))
                if quick and not main_rank:
                    continue
                for nb in decode_batches:
                    cases.append(Case("decode", model, rank, mix, nb, 1, dtype))
    return [c for c in cases if c.op in ops]


def impls_for(case: Case, device: torch.device, compile: bool = True) -> list:
    """The implementations run on ``case``, baselines first, then backends, then LoRA baselines."""
    names = [b for b in _backends.available_backends(device)
             if not (b == "triton" and device.type == "cpu")]  # never time Triton's interpreter
    op = case.op
    head = []
    if op in ("layer_fwd", "layer_fwd_bwd"):
        head = ["base", "eager_literal"]
    elif op in ("forward", "fwd_bwd"):
        head = ["eager_literal"] + (["compile_literal"] if compile and case.compile else [])
    elif op == "decode":
        head = ["eager_literal"]
    return head + names + ["lora", "moe_lora"]


# ============================================================================ inputs
def mix_layout(batch: int, seq: int, grid: tuple, image_fraction: float) -> ImageLayout:
    """Every sequence: ``round(image_fraction * seq)`` image tokens in whole ``H x W`` images (the
    last one cut by the end of the sequence, as truncated training data is), the text spread evenly
    in gaps before each image (a prompt, then captions between images)."""
    H, W = grid
    n_image = round(image_fraction * seq)
    if n_image == 0:
        return ImageLayout.text_only(batch, seq)
    n_images = math.ceil(n_image / (H * W))
    gap = (seq - n_image) // n_images
    spans, pos, left = [], 0, n_image
    for i in range(n_images):
        pos += gap if i < n_images - 1 else seq - n_image - gap * (n_images - 1)
        length = min(H * W, left)
        spans += [ImageSpan(b, pos, H, W, 0, length) for b in range(batch)]
        pos += length
        left -= length
    return ImageLayout.from_spans(batch, seq, spans)


def _weights(case: Case, device, gen: torch.Generator, grad: bool) -> dict:
    """Adapter weights (float32) of the three adapter kinds, scaled so outputs stay O(1)."""
    r, d_in, d_out, k = case.rank, case.d_in, case.d_out, KERNEL_SIZE

    def rnd(*shape, fan_in):
        t = torch.randn(*shape, generator=gen, device=device) / math.sqrt(fan_in)
        return t.requires_grad_(grad)

    return dict(ta=rnd(r, d_in, fan_in=d_in), tb=rnd(d_out, r, fan_in=r), K=rnd(r, d_in, k, k, fan_in=d_in * k * k),
                ib=rnd(d_out, r, fan_in=r), K1=rnd(r, d_in, 1, 1, fan_in=d_in))


@dataclasses.dataclass
class Prepared:
    """What one timed call runs. ``fn()`` runs one call on the next input set (sets rotate so that a
    GPU's L2 does not keep inputs of the previous call) and returns its outputs (forward output,
    then gradients, where the op has them). ``persistent`` are the storages of inputs, weights and
    index tables, by data pointer, holding each storage so that its address cannot be reused by a
tensor the call allocates: saved tensors on them are no new memory. ``backend``: the backend the call runs
    on (``None`` for the literal PyTorch code and the base linear)."""

    case: Case
    impl: str
    calls: list  # one zero-argument callable per input set
    persistent: dict  # data pointer -> the storage, kept alive
    backend: Optional[str] = None
    _next: int = 0

    def fn(self):
        call = self.calls[self._next]
        self._next = (self._next + 1) % len(self.calls)
        return call()


def _storages(objs, device: torch.device) -> dict:
    """Every tensor storage in ``objs`` (layouts: their index tables on ``device``) by data pointer.
    The storages are kept, not just their addresses: an index table the layout does not cache would
    otherwise be freed, and a tensor the timed call allocates at its address would count as old."""
    ptrs = {}
    for o in objs:
        if isinstance(o, torch.Tensor):
            ptrs[o.untyped_storage().data_ptr()] = o.untyped_storage()
        elif isinstance(o, nn.Module):
            ptrs |= _storages(list(o.parameters()) + list(o.buffers()), device)
        elif isinstance(o, (list, tuple)):
            ptrs |= _storages(o, device)
        elif isinstance(o, dict):
            ptrs |= _storages(list(o.values()), device)
        elif isinstance(o, ImageLayout):
            for k in (1, KERNEL_SIZE):
                ptrs |= _storages(list(o.index(device, k)), device)
    return ptrs


# ============================================================================ literal decode
def literal_decode_step(x, cache, image_pos, width, ta, tb, K, ib, scale):
    """One decoding step the way a user writes it without the rank-space state: keep the last
    ``(k-1)(W+1)+1`` inputs (``d_in`` wide) of every sequence, gather the ``k x k`` causal patch
    around the new token and ``conv2d`` it.

    ``x``: ``(B, d_in)``; ``cache``: ``(B, R, d_in)`` in ``x``'s dtype, updated in place;
    ``image_pos``: ``(B,)`` raster index in the image or ``-1`` (text); ``width``: ``(B,)``.
    Returns the delta ``(B, d_out)``.
    """
    B, d_in = x.shape
    k, R = K.shape[-1], cache.shape[1]
    rows = torch.arange(B, device=x.device)
    is_image = image_pos >= 0
    p, W = image_pos.clamp(min=0), width.clamp(min=1)
    slot = p % R
    cache[rows, slot] = torch.where(is_image.unsqueeze(1), x, cache[rows, slot])
    i, j = p // W, p % W
    taps = []
    for a in range(k):
        for b in range(k):
            di, dj = k - 1 - a, k - 1 - b
            ok = is_image & (i >= di) & (j >= dj)
            taps.append(cache[rows, (p - di * W - dj) % R] * ok.unsqueeze(1))
    patch = torch.stack(taps, dim=-1).view(B, d_in, k, k)
    z = F.conv2d(patch, K.to(x.dtype)).view(B, -1)
    image_delta = z @ ib.to(x.dtype).t()
    text_delta = (x @ ta.to(x.dtype).t()) @ tb.to(x.dtype).t()
    return scale * torch.where(is_image.unsqueeze(1), image_delta, text_delta)


# ============================================================================ builders
class _LiteralLayer(nn.Module):
    """A frozen linear plus ``literal_moss_lora``: the layer a user writes without the package."""

    def __init__(self, base: nn.Linear, ta, tb, K, ib, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.ta, self.tb, self.K, self.ib = (nn.Parameter(t.detach().clone()) for t in (ta, tb, K, ib))

    def forward(self, x, layout):
        return self.base(x) + literal_moss_lora(x, layout, self.ta, self.tb, self.K, self.ib, self.scale)


def _adapter_call(impl: str, case: Case, x, w: dict, layout: ImageLayout, text_layout: ImageLayout,
                  scale: float, compiled: Optional[Callable]):
    """The forward of an adapter-level impl as a closure over one input set."""
    if impl == "eager_literal":
        return lambda: literal_moss_lora(x, layout, w["ta"], w["tb"], w["K"], w["ib"], scale)
    if impl == "compile_literal":
        return lambda: compiled(x, layout, w["ta"], w["tb"], w["K"], w["ib"], scale)
    if impl == "lora":
        return lambda: moss_lora(x, text_layout, w["ta"], w["tb"], None, None, scale)
    if impl == "moe_lora":
        return lambda: moss_lora(x, layout, w["ta"], w["tb"], w["K1"], w["ib"], scale)
    return lambda: moss_lora(x, layout, w["ta"], w["tb"], w["K"], w["ib"], scale, backend=impl)


def _grad_leaves(impl: str, x, w: dict) -> list:
    if impl == "lora":
        return [x, w["ta"], w["tb"]]
    return [x, w["ta"], w["tb"], w["K1" if impl == "moe_lora" else "K"], w["ib"]]


def _decode_positions(case: Case, gen: torch.Generator, device) -> list:
    """Per step, ``(batch,)`` image positions: image rows walk their image in raster order from
    staggered starts (a real decoder's progress), text rows stay ``-1``. One tensor per step of one
    whole image, built before timing so that a step costs no host work."""
    H, W = case.model.grid
    n_image = round(MIXES[case.mix] * case.batch)
    starts = torch.randint(0, H * W, (case.batch,), generator=gen)  # a CPU generator
    is_image = torch.arange(case.batch) < n_image
    steps = []
    for t in range(H * W):
        pos = torch.where(is_image, (starts + t) % (H * W), torch.full_like(starts, -1))
        steps.append(pos.to(device))
    return steps


def prepare(case: Case, impl: str, device, n_sets: int = 1, seed: int = 0) -> Prepared:
    """Build ``impl`` on ``case`` with ``n_sets`` independent input sets (see ``Prepared``).

    Raises ``ValueError`` for an impl that does not compute ``case.op``.
    """
    device = torch.device(device)
    known = impls_for(dataclasses.replace(case, compile=True), device)
    if impl not in known:
        raise ValueError(f"impl {impl!r} does not run {case.op} on {device}; known: {known}")
    # Inputs are drawn on the device (drawing GPU-sized inputs on the host would dominate a run).
    gen = torch.Generator(device=device).manual_seed(seed)
    host_gen = torch.Generator().manual_seed(seed)
    dt, B, S = case.torch_dtype, case.batch, case.seq
    H, W = case.model.grid
    scale = 1.0
    backend = impl if impl in BACKEND_IMPLS else None
    if impl in ("lora", "moe_lora"):  # what MossLinear(adapter=...) runs on by default
        backend = _backends.default_backend(device, dt, 1)
    compiled = None
    if impl == "compile_literal":
        from torch import _dynamo

        # A fresh cache per case: otherwise the recompile limit would silently fall back to eager.
        _dynamo.reset()
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
        compiled = torch.compile(literal_moss_lora, dynamic=False, fullgraph=False)

    layout = mix_layout(B, S, case.model.grid, MIXES[case.mix]) if case.op != "decode" else None
    text_layout = ImageLayout.text_only(B, S) if case.op != "decode" else None
    calls, persistent = [], {}
    for _ in range(n_sets):
        grad = case.op in ("fwd_bwd",)
        w = _weights(case, device, gen, grad)
        objs: list = [w]
        op = case.op
        if op == "decode":
            x = torch.randn(B, case.d_in, generator=gen, device=device).to(dt)
            steps = _decode_positions(case, host_gen, device)
            height = torch.full((B,), H, dtype=torch.int64, device=device)
            width = torch.full((B,), W, dtype=torch.int64, device=device)
            objs += [x, steps, height, width]
            calls.append(_decode_call(impl, case, x, w, steps, height, width, scale, device, objs))
        elif op in ("forward", "fwd_bwd", "prefill"):
            x = torch.randn(B, S, case.d_in, generator=gen, device=device).to(dt).requires_grad_(grad)
            objs += [x, layout, text_layout]
            if op == "prefill":
                calls.append(_prefill_call(impl, case, x, w, layout, text_layout, scale, device, objs))
            else:
                fwd = _adapter_call(impl, case, x, w, layout, text_layout, scale, compiled)
                if op == "forward":
                    calls.append(_no_grad(fwd))
                else:
                    g = torch.randn(B, S, case.d_out, generator=gen, device=device).to(dt)
                    objs.append(g)
                    leaves = _grad_leaves(impl, x, w)
                    calls.append(_fwd_bwd(fwd, leaves, g))
        else:
            layer, x, g = _layer(impl, case, w, gen, device, scale)
            objs += [layer, x, g, layout, text_layout]
            if op == "layer_fwd":
                calls.append(_no_grad(lambda layer=layer, x=x: layer(x, layout)))
            else:
                leaves = [x] + [p for p in layer.parameters() if p.requires_grad]
                calls.append(_fwd_bwd(lambda layer=layer, x=x: layer(x, layout), leaves, g))
        persistent |= _storages(objs, device)
    return Prepared(case, impl, calls, persistent, backend=backend)


def _no_grad(fwd):
    def call():
        with torch.no_grad():
            return (fwd(),)
    return call


def _fwd_bwd(fwd, leaves, g):
    def call():
        out = fwd()
        # A text-only batch leaves the image weights out of the literal graph: their gradient is zero.
        return (out, *torch.autograd.grad(out, leaves, g, allow_unused=True, materialize_grads=True))
    return call


def _layer(impl: str, case: Case, w: dict, gen, device, scale):
    """The layer ``impl`` runs (frozen ``nn.Linear`` + adapter), its input and an output gradient."""
    dt, B, S = case.torch_dtype, case.batch, case.seq
    grad = case.op == "layer_fwd_bwd"
    base = nn.Linear(case.d_in, case.d_out, bias=False, device="meta")
    weight = torch.randn(case.d_out, case.d_in, generator=gen, device=device) / math.sqrt(case.d_in)
    base.weight = nn.Parameter(weight.to(dt), requires_grad=False)
    if impl == "base":
        layer = _Base(base)
    elif impl == "eager_literal":
        layer = _LiteralLayer(base, w["ta"], w["tb"], w["K"], w["ib"], scale)
    else:
        adapter = impl if impl in ("lora", "moe_lora") else "moss"
        layer = MossLinear(base, rank=case.rank, alpha=case.rank * scale, dropout=0.0, kernel_size=KERNEL_SIZE,
                           adapter=adapter, backend=impl if impl in BACKEND_IMPLS else None)
        with torch.no_grad():
            layer.text_A.copy_(w["ta"])
            layer.text_B.copy_(w["tb"])
            if adapter != "lora":
                layer.image_A.copy_(w["K1"] if adapter == "moe_lora" else w["K"])
                layer.image_B.copy_(w["ib"])
    layer.requires_grad_(grad)
    base.requires_grad_(False)
    x = torch.randn(B, S, case.d_in, generator=gen, device=device).to(dt).requires_grad_(grad)
    g = torch.randn(B, S, case.d_out, generator=gen, device=device).to(dt)
    return layer, x, g


class _Base(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base

    def forward(self, x, layout):
        return self.base(x)


def _prefill_call(impl, case, x, w, layout, text_layout, scale, device, objs):
    """Chunked prefill: the sequence in ``case.chunk``-token windows, images carried across windows
    by a ``ConvLoRAState`` (conv impls); the outputs of every window."""
    S, c = case.seq, case.chunk
    bounds = [(a, min(a + c, S)) for a in range(0, S, c)]
    windows = [layout.window(a, b) for a, b in bounds]
    text_windows = [text_layout.window(a, b) for a, b in bounds]
    state = ConvLoRAState(case.batch, case.rank, KERNEL_SIZE, device=device, max_width=case.model.grid[1])
    objs += [state.pending, windows, text_windows]
    chunks = [x[:, a:b] for a, b in bounds]

    def call():
        outs = []
        with torch.no_grad():
            if impl == "lora":
                for xc, win in zip(chunks, text_windows):
                    outs.append(moss_lora(xc, win, w["ta"], w["tb"], None, None, scale))
            elif impl == "moe_lora":  # a 1x1 kernel leaves nothing pending between windows
                for xc, win in zip(chunks, windows):
                    outs.append(moss_lora(xc, win, w["ta"], w["tb"], w["K1"], w["ib"], scale))
            else:
                state.reset()
                for xc, win in zip(chunks, windows):
                    outs.append(moss_lora(xc, win, w["ta"], w["tb"], w["K"], w["ib"], scale, state=state,
                                          backend=impl))
        return (torch.cat(outs, dim=1),)
    return call


def _decode_call(impl, case, x, w, steps, height, width, scale, device, objs):
    """One decoding step per call; calls walk ``steps`` (consecutive image positions)."""
    B, W = case.batch, case.model.grid[1]
    counter = [0]
    if impl == "eager_literal":
        cache = torch.zeros(B, ring_size(KERNEL_SIZE, W) + 1, case.d_in, dtype=x.dtype, device=device)
        objs.append(cache)
    elif impl == "moe_lora":
        state = ConvLoRAState(B, case.rank, 1, device=device)
    elif impl != "lora":
        state = ConvLoRAState(B, case.rank, KERNEL_SIZE, device=device, max_width=W)
        objs.append(state.pending)
    text_pos = torch.full((B,), -1, dtype=torch.int64, device=device)

    def call():
        pos = steps[counter[0] % len(steps)]
        counter[0] += 1
        with torch.no_grad():
            if impl == "eager_literal":
                out = literal_decode_step(x, cache, pos, width, w["ta"], w["tb"], w["K"], w["ib"], scale)
            elif impl == "lora":
                out = moss_lora_step(x, w["ta"], w["tb"], None, None, scale, None, text_pos, height, width)
            elif impl == "moe_lora":
                out = moss_lora_step(x, w["ta"], w["tb"], w["K1"], w["ib"], scale, state, pos, height, width)
            else:
                out = moss_lora_step(x, w["ta"], w["tb"], w["K"], w["ib"], scale, state, pos, height, width,
                                     backend=impl)
        return (out,)
    return call
