"""The model wrapper: inject MoSS into a decoder, route layouts, decode incrementally, save and load.

* ``config``: ``MossConfig``; ``inject``: ``inject_moss``, ``moss_summary``;
* ``routing``: one layout per forward (``moss_layout`` for explicit ones);
* ``cache``: ``MossStates``, the conv states next to a KV cache;
* ``decoder``: the built-in LLaMA-style reference decoder and its interleaved generation loop;
* ``io``: ``save_moss`` / ``load_moss``; ``hf``: Hugging Face glue (needs ``transformers``).
"""

from .cache import MossStates
from .config import MossConfig
from .inject import adapted_layers, inject_moss, moss_summary
from .io import load_moss, save_moss
from .routing import current_layout, moss_layout

__all__ = [
           "MossConfig",
           "MossStates",
           "adapted_layers",
           "current_layout",
           "inject_moss",
           "load_moss",
           "moss_layout",
           "moss_summary",
           "save_moss",
]
