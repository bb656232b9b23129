"""Layout plumbing: one layout per forward, found by every adapted layer of the model.

``inject_moss`` sets each ``MossLinear.routing`` to the model's ``MossRouter`` and installs hooks:

* **entry hooks** (forward pre-hooks with kwargs) on the model and on each module between it and
  its decoder layers (``model.model`` in Hugging Face models), so a call at any of those levels
  works. The outermost builds a ``RouteContext`` — the layout (explicit, or derived from
  ``input_ids``) and, when a KV cache is passed, its ``MossStates`` — and pushes it on a per-thread
  stack; inner entries reuse it; a forward hook (``always_call``) pops it, so nothing leaks into the
  next call or another thread.
* **block hooks** on the decoder layers (the ``nn.ModuleList`` elements that hold adapted layers),
  so that gradient checkpointing recomputes a block with the layout of its own forward, even in
  backward (maybe in another thread, after the forward popped its context, after later forwards):
  - Hugging Face layers checkpoint their ``forward`` (hooks stay outside) through
    ``_gradient_checkpointing_func``; the block hook wraps it so the checkpointed function
    carries its context into the recomputation.
  - For checkpoints around the module call (``checkpoint(layer, x, ...)``, as ``MossDecoder``
    does, reentrant or not), the hook remembers the context under the identity of the block's input
    storage during a training forward and finds it again when the recomputation calls the block with
    that same input. The entry is dropped when the input tensor is freed, i.e. with the graph.
  Checkpointing a bare ``forward`` method from outside runs no hook at recomputation: unsupported.

``moss_layout(model, layout)`` gives the layout explicitly (``inputs_embeds``, custom layouts).

Where the layout comes from is the config's layout provider (``moss_kernels.model.providers``), the
same for training forwards, prefill and decoding. A **decoding step** (a cached forward of one token
per row) builds no layout: the provider advances the cache's per-row tracker (``(batch,)`` device
tensors in ``cache.moss_states``) from the new ids with tensor ops, and every adapted layer calls the
graph-capturable ``moss_lora_step`` with the resulting ``image_pos``/``height``/``width`` tensors — no
host synchronisation, one graph for every step under ``torch.compile``. A layer finds its context in
O(1) (the top of this thread's stack) and its conv state by a dict lookup. Routing holds tensors and
plain objects only: the router pickles and deep-copies with the model (its per-thread stacks start
empty in a copy).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from typing import NamedTuple, Optional
from collections.abc import Iterator

import torch

from ..layout import ImageLayout
from .cache import MossStates, attach_states
from .config import MossConfig
from .providers import StepRoute, make_provider

__all__ = ["MossRouter", "RouteContext", "current_layout", "moss_layout"]


class RouteContext(NamedTuple):
    layout: Optional[ImageLayout]  # None: all text (or a decoding step)
    states: Optional[MossStates]  # None: no KV cache (training or a plain full forward)
    step: Optional[StepRoute] = None  # a decoding step (one token per row): device tensors for moss_lora_step


class MossRouter:
    """Per model: the ``RouteContext`` of the forward running in this thread (``current()``).

    Picklable and deep-copyable (the per-thread stacks, the lock and the checkpoint records are
    per process and start empty in a copy), so ``copy.deepcopy(model)`` and ``torch.save(model)``
    work on injected models.
    """

    def __init__(self, config: MossConfig):
        self.config = config
        # One LoRA for every token routes nothing: no layout work at all for adapter="lora".
        self.provider = make_provider(config) if config.adapter != "lora" else None
        self.pop_layout_kwarg: set = set()  # ids of entry modules whose forward has no `layout` parameter
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._local = threading.local()
        self._saved: dict = {}  # block-input key -> RouteContext, for recomputation in backward
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_local", "_saved", "_lock")}
        state["pop_layout_kwarg"] = set()  # ids of modules: meaningless in a copy (see _drops_layout)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------ per-thread stacks
    def _stack(self) -> list:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _explicit(self) -> list:
        ex = getattr(self._local, "explicit", None)
        if ex is None:
            ex = self._local.explicit = []
        return ex

    def current(self) -> Optional[RouteContext]:
        stack = self._stack()
        return stack[-1] if stack else None

    def lookup(self, layer) -> tuple:
        """``(layout, state)`` for ``layer`` in the current forward (``(None, None)`` outside one)."""
        ctx = self.current()
        if ctx is None:
            return None, None
        state = ctx.states.state_for(layer) if ctx.states is not None else None
        return ctx.layout, state

    # ------------------------------------------------------------------ entry hooks
    def build_context(self, input_ids, inputs_embeds, layout, cache) -> RouteContext:
        """The context of one forward: see the module docstring."""
        if inputs_embeds is not None:
            input_ids = None  # the embeddings are what flows (generate() may pass empty ids beside them)
        ref = input_ids if input_ids is not None else inputs_embeds
        explicit = self._explicit()
        if layout is None and explicit and ref is not None:
            cand = explicit[-1]
            if (cand.batch_size, cand.seq_len) == tuple(ref.shape[:2]):
                layout = cand
        states = None
        if cache is not None and ref is not None:
            states = attach_states(cache, self.config, int(ref.shape[0]), self.provider, ref.device)
        provider = self.provider
        if layout is not None:
            if ref is not None and (layout.batch_size, layout.seq_len) != tuple(ref.shape[:2]):
                raise ValueError(f"layout is for (batch={layout.batch_size}, seq={layout.seq_len}), the input has "
                                 f"shape {tuple(ref.shape[:2])}")
            if states is not None:
                states.advance_from_layout(layout)
            return RouteContext(layout, states)
        if states is not None and ref.shape[1] == 1:
            # A decoding step: routing advanced on the device from the tracker and the new ids.
            return RouteContext(None, states, states.step(input_ids))
        if provider is None:
            return RouteContext(None, states)  # layouts only explicit: all text
        if input_ids is None:
            lay = provider.embeds_prefill(states.tracker if states is not None else None,
                                          *(int(n) for n in ref.shape[:2])) if ref is not None else None
            if lay is None:
                raise ValueError("MoSS: this forward has no input_ids to derive the image layout from "
                                 "(inputs_embeds?); give it with `with moss_kernels.moss_layout(model, layout): ...`")
            return RouteContext(lay, states)
        if states is not None:
            return RouteContext(states.layout_for(input_ids), states)
        lay = provider.layout(input_ids)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            provider.warn_no_images(lay)
        return RouteContext(lay, None)

    def entry_pre_hook(self, module, args, kwargs):
        stack = self._stack()
        outer = stack[-1] if stack else None
        stack.append(None)  # popped by the always-called forward hook, even if what follows raises
        layout = kwargs.get("layout")
        if layout is not None and not isinstance(layout, ImageLayout):
            raise TypeError(f"layout must be an ImageLayout, got {type(layout).__name__}")
        if outer is not None:  # an inner entry of a forward already routed (e.g. model.model inside model)
            stack[-1] = outer if layout is None else outer._replace(layout=layout)
        else:
            input_ids = kwargs.get("input_ids")
            if input_ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
                input_ids = args[0]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is None and kwargs.get("use_cache") is True and "past_key_values" in _parameters(module):
                # `model(prompt, use_cache=True)` then decoding from `out.past_key_values`: the cache the
                # model would create inside is made here, so the prefill's conv states ride in it.
                from .hf import MossCache

                cache = MossCache()
                kwargs = {**kwargs, "past_key_values": cache}
                stack[-1] = self.build_context(input_ids, kwargs.get("inputs_embeds"), layout, cache)
                if "layout" in kwargs and _drops_layout(module):
                    kwargs.pop("layout")
                return args, kwargs
            stack[-1] = self.build_context(input_ids, kwargs.get("inputs_embeds"), layout, cache)
        if "layout" in kwargs and _drops_layout(module):  # e.g. Hugging Face forwards
            return args, {k: v for k, v in kwargs.items() if k != "layout"}
        return None

    def entry_post_hook(self, module, args, output):
        stack = self._stack()
        if stack:
            stack.pop()
        return None

    # ------------------------------------------------------------------ block hooks
    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        return (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()))

    def block_pre_hook(self, module, args, kwargs):
        ctx = self.current()
        if torch.compiler.is_compiling():
            # Traced checkpoints recompute inside the graph, with this same context: no records (their
            # storage keys and lock would break the graph).
            self._stack().append(ctx)
            return None
        if getattr(module, "_gradient_checkpointing_func", None) is not None:
            self._bind_checkpoint_func(module)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        if ctx is not None:
            # Reentrant checkpointing runs the first forward under no_grad, hence `training` too.
            if (torch.is_grad_enabled() or module.training) and isinstance(x, torch.Tensor):
                self._remember(x, ctx)
        elif type(x) is torch.Tensor:
            with self._lock:
                ctx = self._saved.get(self._key(x))  # recomputation under gradient checkpointing
        self._stack().append(ctx)
        return None

    def block_post_hook(self, module, args, output):
        stack = self._stack()
        if stack:
            stack.pop()
        return None

    def _bind_checkpoint_func(self, module) -> None:
        """Hugging Face layers checkpoint their ``forward`` (hooks stay outside the checkpoint) through
        ``module._gradient_checkpointing_func``: wrap it so the checkpointed function carries the
        context of its forward into the recomputation."""
        orig = module._gradient_checkpointing_func
        if getattr(orig, "_moss_router", None) is self:
            return

        def checkpoint_with_context(fn, *args, **kwargs):
            ctx = self.current()

            def run(*a, **k):
                stack = self._stack()
                stack.append(ctx)
                try:
                    return fn(*a, **k)
                finally:
                    stack.pop()

            return orig(run, *args, **kwargs)

        checkpoint_with_context._moss_router = self
        module._gradient_checkpointing_func = checkpoint_with_context

    def _remember(self, x: torch.Tensor, ctx: RouteContext) -> None:
        if type(x) is not torch.Tensor:  # tensor subclasses (traced, distributed) may have no storage to key on
            return
        key = self._key(x)
        with self._lock:
            known = key in self._saved
            self._saved[key] = ctx
        if not known:
            weakref.finalize(x, self._forget, key)

    def _forget(self, key) -> None:
        with self._lock:
            self._saved.pop(key, None)


_TAKES_LAYOUT: dict = {}  # module type -> the parameter names of its forward


def _parameters(module) -> frozenset:
    """Names of the parameters of the module's forward (per type, so copies need no per-instance record)."""
    names = _TAKES_LAYOUT.get(type(module))
    if names is None:
        names = _TAKES_LAYOUT[type(module)] = frozenset(inspect.signature(module.forward).parameters)
    return names


def _drops_layout(module) -> bool:
    """Whether the entry hook must keep ``layout=`` out of this module's own forward."""
    return "layout" not in _parameters(module)


def _router(model) -> MossRouter:
    router = getattr(model, "_moss_router", None)
    if router is None:
        raise ValueError(f"{type(model).__name__} has no MoSS adapters: call moss_kernels.inject_moss(model, config)")
    return router


@contextlib.contextmanager
def moss_layout(model, layout: ImageLayout) -> Iterator[None]:
    """Use ``layout`` for the model's forwards in this block whose ``(batch, seq)`` matches it.

    For inputs the layout cannot be derived from (``inputs_embeds``, Emu2-style continuous image
    tokens) or custom layouts (grids that skip end-of-row tokens). With a cache, the tracker then
    continues an image the layout leaves unfinished; other forwards in the block (decoding steps of
    another length) derive their own layouts. Thread-local: other threads are unaffected.
    """
    if not isinstance(layout, ImageLayout):
        raise TypeError(f"layout must be an ImageLayout, got {type(layout).__name__}")
    explicit = _router(model)._explicit()
    explicit.append(layout)
    try:
        yield
    finally:
        explicit.pop()


def current_layout(model) -> Optional[ImageLayout]:
    """The layout of the forward running in this thread (``None`` outside a forward or for all text)."""
    ctx = _router(model).current()
    return None if ctx is None else ctx.layout
