"""Every ```python block of the docs runs (docs/**/*.md).

The blocks of one page run in order, in one fresh namespace per page, in a temporary working
directory (so the files a page writes, checkpoints say, go nowhere). Comment lines just above a
block steer it:

* ``<!-- no-run -->``: the block is not run (an MPI launch, a sketch that needs your model);
* ``<!-- needs: torch, optax -->``: the page's test skips unless these modules import
  (``pytest.importorskip``, checked before the page's first block runs).

Only ``python`` fences run; ``bash``, ``text`` and the rest are shown, never executed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)[^`]*$")
_NO_RUN = re.compile(r"^\s*<!--\s*no-run\s*-->\s*$")
_NEEDS = re.compile(r"^\s*<!--\s*needs:\s*(?P<modules>[\w., ]+?)\s*-->\s*$")
_COMMENT = re.compile(r"^\s*<!--.*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced ```python block: its source, its first line in the page, its markers."""

    source: str
    line: int
    run: bool
    needs: tuple[str, ...]


def _markers(lines: list[str], fence_index: int) -> tuple[bool, tuple[str, ...]]:
    """The comment lines right above a fence (blank lines between them allowed)."""
    run, needs = True, []
    i = fence_index - 1
    while i >= 0 and (not lines[i].strip() or _COMMENT.match(lines[i])):
        if _NO_RUN.match(lines[i]):
            run = False
        elif m := _NEEDS.match(lines[i]):
            needs += [name.strip() for name in m["modules"].split(",") if name.strip()]
        i -= 1
    return run, tuple(needs)


def _dedent(body: list[str], indent: str) -> str:
    return "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in body)


def python_blocks(text: str) -> list[Block]:
    """The page's ```python blocks, in order (other fences skipped whole)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start = m["fence"], i
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence) and set(lines[j].strip()) == {fence[0]}
        ):
            j += 1
        if m["info"].lower() in ("python", "py", "python3"):
            run, needs = _markers(lines, start)
            source = _dedent(lines[start + 1 : j], m["indent"])
            blocks.append(Block(source, start + 2, run, needs))
        i = j + 1
    return blocks


def _pages() -> list[Path]:
    if not DOCS.is_dir():
        return []
    return sorted(p for p in DOCS.rglob("*.md") if any(b.run for b in python_blocks(_read(p))))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


PAGES = _pages()


def test_the_parser_finds_blocks_and_markers():
    """The runner's own parsing (so that a page's blocks cannot silently go missing)."""
    page = "\n".join(
        [
            "text",
            "```python",
            "a = 1",
            "```",
            "<!-- no-run -->",
            "```python",
            "raise SystemExit",
            "```",
            "```bash",
            "echo no",
            "```",
            "<!-- needs: torch, optax -->",
            "",
            "````python",
            "```",
            "b = a",
            "````",
            "    ```python",
            "    c = 2",
            "    ```",
        ]
    )
    blocks = python_blocks(page)
    assert [(b.source, b.run, b.needs, b.line) for b in blocks] == [
        ("a = 1", True, (), 3),
        ("raise SystemExit", False, (), 7),
        ("```\nb = a", True, ("torch", "optax"), 15),
        ("c = 2", True, (), 19),
    ]


@pytest.mark.parametrize(
    "page", PAGES or [None], ids=[str(p.relative_to(DOCS)) for p in PAGES] or ["no-docs"]
)
def test_page_examples_run(page, tmp_path, monkeypatch):
    if page is None:
        pytest.skip("no docs page with a python block")
    blocks = [b for b in python_blocks(_read(page)) if b.run]
    for module in sorted({m for b in blocks for m in b.needs}):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    rel = page.relative_to(DOCS.parent)
    for block in blocks:
        padded = "\n" * (block.line - 1) + block.source  # tracebacks give the page's lines
        code = compile(padded, str(rel), "exec")
        exec(code, namespace)
