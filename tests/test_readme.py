"""Every ```python block of README.md runs as written, each in a fresh namespace, on the CPU.

The convention (README writers follow it): a block runs on tiny models built from configs, with a
comment naming the line a user replaces with ``from_pretrained(...)``; a block that cannot run here
(it needs a GPU, say) is preceded on the line above by ``<!-- readme-test: skip (reason) -->``.
Shell commands go in ```bash blocks, which are not executed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")


class Block(NamedTuple):
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    skip: Optional[str]  # the reason, when the line above asks to skip it


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, in order. An unclosed fence is an error."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, indent = i, len(m.group("indent"))
        i += 1
        body = []
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md:{start + 1}: a ``` fence that is never closed")
        above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(above)
        found.append(Block(start + 1, m.group("lang"), "\n".join(body) + "\n", skip and skip.group("reason")))
        i += 1
    return found


PYTHON = [b for b in blocks(README.read_text()) if b.lang in ("python", "py", "python3")]


def test_blocks_are_found_and_skips_give_a_reason():
    assert len(PYTHON) >= 2  # the parser sees the README's examples (a broken parser would pass vacuously)
    text = README.read_text()
    markers = len(re.findall(r"readme-test", text))
    assert markers == len(SKIP.findall(text)), "a readme-test marker without the form 'skip (reason)'"
    assert markers == sum(b.skip is not None for b in blocks(text)), "a skip marker not directly above a block"


def test_parser_reads_fences_skips_and_languages():
    text = ("intro\n```bash\nmake test\n```\n<!-- readme-test: skip (needs a CUDA GPU) -->\n"
            "```python\nimport torch\n```\n\n```python\nx = 1\n```\n")
    got = blocks(text)
    assert [(b.line, b.lang, b.source, b.skip) for b in got] == [
        (2, "bash", "make test\n", None), (6, "python", "import torch\n", "needs a CUDA GPU"),
        (10, "python", "x = 1\n", None)]
    with pytest.raises(ValueError, match="never closed"):
        blocks("```python\nx = 1\n")


@pytest.mark.parametrize("block", PYTHON, ids=[f"README.md:{b.line}" for b in PYTHON])
def test_readme_python_block_runs_as_written(block: Block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    monkeypatch.chdir(tmp_path)  # a block may write files (a saved adapter, a plot)
    code = compile(block.source, f"README.md:{block.line}", "exec")
    exec(code, {"__name__": "__readme__"})
