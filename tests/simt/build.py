"""Builds the SIMT harness programs with g++ (no torch): the stand-alone kernel driver, plain, with
ThreadSanitizer or with AddressSanitizer + UndefinedBehaviorSanitizer, and mutants of the kernels.

Objects are cached under ``$MOSS_SIMT_CACHE`` (default ``~/.cache/moss_kernels/simt``), keyed by a
hash of the flags, the source and every header it can include, so only what changed is compiled
again (a mutant recompiles one ``.cu`` file and relinks).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

SIMT = Path(__file__).resolve().parent
ROOT = SIMT.parent.parent
CSRC = ROOT / "csrc"
KERNELS = ("gemm", "fused_forward", "shift", "decode")

MODES = {
    "plain": ["-O2"],
    "tsan": ["-O1", "-fsanitize=thread"],
    "asan": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}
COMMON = ["-std=c++17", "-g", "-fno-omit-frame-pointer", "-Wall", "-Wno-unknown-pragmas", "-pthread"]


def cache_dir() -> Path:
    if os.environ.get("MOSS_SIMT_CACHE"):
        return Path(os.environ["MOSS_SIMT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moss_kernels" / "simt"


_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)


def _headers(src: Path, csrc: Path) -> bytes:
    """The headers `src` includes, transitively (found next to the including file or on the -I
    path, as g++ resolves them; system headers are not followed), each with its path and bytes:
    a change to a header recompiles only the sources that include it (a mutant of tile_gemm.cuh
    leaves the decode step's object alone)."""
    h = hashlib.sha256()
    seen: set[Path] = set()
    todo = [src]
    while todo:
        cur = todo.pop()
        for name in _INCLUDE.findall(cur.read_text()):
            for base in (cur.parent, SIMT / "include", csrc):
                p = (base / name).resolve()
                if p.is_file():
                    if p not in seen:
                        seen.add(p)
                        todo.append(p)
                    break
    for p in sorted(seen):
        h.update(str(p.relative_to(csrc.resolve()) if p.is_relative_to(csrc.resolve()) else p).encode())
        h.update(p.read_bytes())
    return h.digest()


def _compile(src: Path, flags: list[str], csrc: Path, headers: bytes) -> Path:
    key = hashlib.sha256(b"\0".join([src.name.encode(), src.read_bytes(), headers, *(f.encode() for f in flags)]))
    obj = cache_dir() / "obj" / f"{src.stem}-{key.hexdigest()[:20]}.o"
    if obj.exists():
        return obj
    obj.parent.mkdir(parents=True, exist_ok=True)
    tmp = obj.with_suffix(f".{os.getpid()}.tmp")
    cmd = ["g++", *flags, "-I", str(SIMT / "include"), "-I", str(csrc)]
    if src.suffix == ".cu":
        cmd += ["-x", "c++"]
    cmd += ["-c", str(src), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {src} failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
    os.replace(tmp, obj)
    return obj


def build_driver(mode: str = "plain", mutant: Optional[tuple[str, str, str]] = None, jobs: int = 2) -> Path:
    """The driver for `mode`, optionally with ``mutant = (file under csrc/cuda, old, new)`` applied
    (``old`` must occur exactly once). Returns the executable's path."""
    flags = [*COMMON, *MODES[mode]]
    csrc = CSRC
    tmpdir = None
    if mutant is not None:
        name, old, new = mutant
        text = (CSRC / "cuda" / name).read_text()
        if text.count(old) != 1:
            raise ValueError(f"mutant of {name}: the text to replace occurs {text.count(old)} times, not once")
        tmpdir = Path(tempfile.mkdtemp(prefix="simt-mutant-"))
        shutil.copytree(CSRC / "include", tmpdir / "include")
        shutil.copytree(CSRC / "cuda", tmpdir / "cuda")
        (tmpdir / "cuda" / name).write_text(text.replace(old, new))
        csrc = tmpdir
    try:
        sources = [csrc / "cuda" / f"{k}.cu" for k in KERNELS] + [SIMT / "simt.cpp", SIMT / "driver.cpp"]
        with ThreadPoolExecutor(jobs) as pool:
            objs = list(pool.map(lambda s: _compile(s, flags, csrc, _headers(s, csrc)), sources))
        key = hashlib.sha256("".join(str(o) for o in objs).encode() + " ".join(flags).encode()).hexdigest()[:20]
        exe = cache_dir() / "bin" / f"driver-{mode}-{key}"
        if not exe.exists():
            exe.parent.mkdir(parents=True, exist_ok=True)
            tmp = exe.with_suffix(f".{os.getpid()}.tmp")
            cmd = ["g++", *flags, *map(str, objs), "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"linking the driver failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
            os.replace(tmp, exe)
        return exe
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def run(exe: Path, *args: str, timeout: float = 600, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Runs a driver; sanitizer reports fail the process (TSan's exit code 66, ASan's abort)."""
    full = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0",
                ASAN_OPTIONS="detect_leaks=0 abort_on_error=0", UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1",
                **(env or {}))
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=full)
