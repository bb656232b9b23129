"""Instructions per matrix op in compiled SASS, read statically from ``cuobjdump -sass``.

For every kernel of the given object files (or of a saved ``cuobjdump -sass`` listing) and every
arch in them, counts the SASS instructions (the trailing NOP padding excluded), the tensor-core MMAs
(``HMMA``) and the fp32 FMAs (``FFMA``), and the same inside the kernel's hot loops: the innermost
loops (a backward branch and its target) that hold an MMA, each counted once with everything
nested in it. A kernel's "op" is its HMMA, or its FFMA where it has no HMMA (the exact-fp32 path);
``per_op`` is instructions per op over the whole kernel, ``loop_per_op`` the same in its hot loops.
Both are static counts: a loop body counts once whatever its trip count, so they rank the code a
thread runs per MMA, not time. csrc/check_cuda.sh prints this for every kernel it compiles;
tests/test_cuda_compile.py holds the numbers against a recorded baseline.

Usage: python3 csrc/sass_report.py [--json] [--cuobjdump PATH] FILE.o|FILE.sass ...
Standard library only (no torch): cuobjdump from $CUOBJDUMP, PATH, next to nvcc, CUDA_HOME, or the
copy Triton bundles (triton/backends/nvidia/bin) on this interpreter's path.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_ARCH = re.compile(r"^\s*arch\s*=\s*(sm_\w+)")
_BRA = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\()?\s*(0x[0-9a-f]+)")


@dataclass
class KernelSass:
    arch: str
    kernel: str
    instrs: int
    hmma: int
    ffma: int
    loop_instrs: int
    loop_ops: int

    @property
    def ops(self) -> int:
        return self.hmma if self.hmma else self.ffma

    @property
    def op(self) -> str:
        return "HMMA" if self.hmma else "FFMA"

    @property
    def per_op(self) -> float:
        return self.instrs / self.ops if self.ops else float("inf")

    @property
    def loop_per_op(self) -> float:
        return self.loop_instrs / self.loop_ops if self.loop_ops else float("inf")


def find_cuobjdump() -> str | None:
    """cuobjdump from $CUOBJDUMP, PATH, nvcc's directory, CUDA_HOME, or Triton's bundled copy."""
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent / "cuobjdump"))
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    for entry in sys.path:
        candidates += glob.glob(os.path.join(entry, "triton", "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(names):
        return {n: n for n in names}
    pretty = {}
    for name, dem in zip(names, out):
        dem = re.sub(r"\(anonymous namespace\)::|moss::cuda::|moss::", "", dem)
        pretty[name] = re.sub(r"^void |\(.*$", "", dem)
    return pretty


def _analyse(arch: str, kernel: str, body: list[tuple[int, str]]) -> KernelSass:
    # Drop the NOP padding after the last real instruction (the function is padded to an alignment).
    while body and body[-1][1].strip() == "NOP":
        body.pop()
    opcodes = [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] if text.split() else "" for _, text in body]
    hmma = [op == "HMMA" for op in opcodes]
    ffma = [op == "FFMA" for op in opcodes]
    mma = hmma if any(hmma) else ffma
    index = {addr: i for i, (addr, _) in enumerate(body)}
    loops = []  # (first, last) instruction indices of each backward branch's region holding an op
    for i, (addr, text) in enumerate(body):
        m = _BRA.match(text.strip())
        if m:
            target = int(m.group(1), 16)
            if target <= addr and target in index and any(mma[index[target]:i + 1]):
                loops.append((index[target], i))
    innermost = [(a, b) for a, b in loops
                 if not any((c, d) != (a, b) and a <= c and d <= b and any(mma[c:d + 1]) for c, d in loops)]
    inside = [False] * len(body)
    for a, b in innermost:
        for i in range(a, b + 1):
            inside[i] = True
    return KernelSass(arch=arch, kernel=kernel, instrs=len(body), hmma=sum(hmma), ffma=sum(ffma),
                      loop_instrs=sum(inside), loop_ops=sum(1 for i, v in enumerate(mma) if v and inside[i]))


def parse(listing: str) -> list[KernelSass]:
    """Kernels of a ``cuobjdump -sass`` listing."""
    found: list[tuple[str, str, list[tuple[int, str]]]] = []
    arch = "?"
    for line in listing.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _FUNC.match(line):
            found.append((arch, m.group(1), []))
        elif found and (m := _INSN.match(line)):
            found[-1][2].append((int(m.group(1), 16), m.group(2)))
    names = _demangle(sorted({name for _, name, _ in found}))
    return [_analyse(a, names[name], body) for a, name, body in found]


def report(path: str, cuobjdump: str | None = None) -> list[KernelSass]:
    if path.endswith(".sass"):
        return parse(Path(path).read_text())
    tool = cuobjdump or find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (set CUOBJDUMP)")
    proc = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {path} failed:\n{proc.stderr}")
    return parse(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel and arch")
    ap.add_argument("--cuobjdump")
    args = ap.parse_args(argv)
    for path in args.files:
        name = Path(path).name.removesuffix(".o").removesuffix(".sass")
        for k in report(path, args.cuobjdump):
            if args.json:
                print(json.dumps({"file": name, **asdict(k), "op": k.op, "per_op": round(k.per_op, 2),
                                  "loop_per_op": round(k.loop_per_op, 2)}))
            else:
                print(f"sass {name:<16} {k.arch:<7} {k.instrs:6d} instrs {k.ops:5d} {k.op} {k.per_op:8.2f}/op  "
                      f"loop {k.loop_instrs:5d} / {k.loop_ops:4d} = {k.loop_per_op:7.2f}/op  {k.kernel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
