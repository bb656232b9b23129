"""The model wrapper: inject MoSS into a decoder, route layouts, decode incrementally, save and load.

* ``config``: ``MossConfig``; ``inject``: ``inject_moss``, ``moss_summary``;
* ``routing``: one layout per forward (``moss_layout`` for explicit ones), device-side decoding steps;
* ``providers``: where a model family's image tokens are (Chameleon/Anole, Emu3, Janus, a callable);
* ``cache``: ``MossStates``, the conv states next to a KV cache;
* ``decoder``: the built-in LLaMA-style reference decoder and its interleaved generation loop;
* ``io``: ``save_moss`` / ``load_moss``; ``controls``: ``disable_moss``, ``merge_text_adapter``;
* ``peft_interop``: ``from_peft_lora``; ``hf``: Hugging Face glue and ``MossTrainer`` (needs ``transformers``).
"""

from .cache import MossStates
from .config import MossConfig
from .inject import adapted_layers, inject_moss, moss_summary
from .controls import disable_moss, merge_text_adapter
from .io import load_moss, save_moss
from .peft_interop import from_peft_lora
from .providers import BoiGridProvider, CallableProvider, Emu3Provider, JanusProvider, LayoutProvider
from .routing import current_layout, moss_layout

__all__ = [
           "BoiGridProvider",
           "CallableProvider",
           "Emu3Provider",
           "JanusProvider",
           "LayoutProvider",
           "MossConfig",
           "MossStates",
           "adapted_layers",
           "current_layout",
           "disable_moss",
           "from_peft_lora",
           "inject_moss",
           "load_moss",
           "merge_text_adapter",
           "moss_layout",
           "moss_summary",
           "save_moss",
]

# Submodules not imported above load on first attribute access, so ``mk.model.hf.MossCache``
# works as written without importing transformers at ``import moss_kernels``.
_LAZY_SUBMODULES = ("decoder", "hf")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
