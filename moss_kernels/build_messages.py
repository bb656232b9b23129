"""What a native build says: the notice before a JIT build, the one-line cause of a failed one.

Kept apart from ``moss_kernels.native`` (which loads or builds the extension on import) so that the
messages can be used and tested without building anything.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["build_notice", "failure_cause"]

# Wall time of a JIT build on this project's 2-core development machine, idle (CPU kernels: 5
# translation units, about 90 s of CPU; the CUDA kernels add many minutes of nvcc per arch).
_BUILD_ESTIMATE = {False: "about 2 min on 2 idle cores", True: "10 min or more (CUDA kernels)"}


def build_notice(why: str, build_dir: Path, n_sources: int, with_cuda: bool) -> str:
    """The one line printed to stderr when a JIT build starts: what, why, how long, where, how to skip."""
    what = f"{n_sources} C++{'/CUDA' if with_cuda else ''} files"
    return (f"moss_kernels: compiling the native extension ({what}; {why}): {_BUILD_ESTIMATE[with_cuda]}, "
            f"once per torch version and csrc/ change, cached in {build_dir}. MOSS_KERNELS_NATIVE=0 skips it "
            "(the reference backend runs instead); MOSS_KERNELS_VERBOSE_BUILD=1 shows the compiler's lines.")


# Lines of a build log that state a cause, most telling first.
_CAUSES = (re.compile(r"not found|command not found|No such file or directory"),
           re.compile(r"\bfatal error\b|\berror:"),
           re.compile(r"undefined (reference|symbol)|cannot find -l"))


def failure_cause(log: str) -> str:
    """The one line of a failed build's log that says why (e.g. ``/bin/sh: 1: c++: not found``)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for pattern in _CAUSES:
        for line in lines:
            if pattern.search(line) and not line.startswith(("FAILED:", "ninja: build stopped")):
                return line if len(line) <= 300 else line[:297] + "..."
    failed = [line[len("FAILED:"):].strip() for line in lines if line.startswith("FAILED:")]
    if failed:
        return f"compiling {failed[0]} failed without a message from the compiler"
    tail = [line for line in lines if not line.startswith("ninja: build stopped")]
    return (tail[-1] if tail else "no output")[:300]
