"""Optional dependencies of the command-line programs, checked before any work starts.

``python -m moss_kernels.demo`` and ``python -m moss_kernels.bench`` need packages the library itself
does not (``setup.py``'s extras); a missing one must stop the program at once with the ``pip``
command that installs it, not with a traceback after minutes of training or measuring.
"""

from __future__ import annotations

import importlib.util

__all__ = ["require_extra"]


def require_extra(program: str, extra: str, modules: dict[str, str]) -> None:
    """``SystemExit`` naming the missing packages and ``pip install 'moss_kernels[extra]'`` unless
    every module of ``modules`` (import name -> package name) can be imported."""
    missing = [package for module, package in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"{program} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         f"not installed: pip install 'moss_kernels[{extra}]'")
