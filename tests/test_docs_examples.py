"""Every ```python block of the docs runs (docs/**/*.md).

The blocks of one page run in order, as one script in a fresh Python process per page (as a
reader would run them: nothing imported or configured by other tests, jax's x64 mode say, leaks
in, and a crash in a page's native code is reported with its output), with warnings as errors,
in a temporary working directory (so the files a page writes, checkpoints say, go nowhere).
Comment lines just above a block steer it:

* ``<!-- no-run -->``: the block is not run (an MPI launch, a sketch that needs your model);
* ``<!-- needs: torch, optax -->``: the page's test skips unless these modules are installed
  (checked before the page runs).

Only ``python`` fences run; ``bash``, ``text`` and the rest are shown, never executed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import warnings
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


def run_page(page: Path) -> None:
    """Run a page's blocks in order in one namespace (this process: see :func:`main`), the
    tracebacks giving the page's file and lines."""
    namespace: dict = {"__name__": "__docs__"}
    rel = page.relative_to(DOCS.parent) if page.is_relative_to(DOCS) else page.name
    for block in python_blocks(_read(page)):
        if block.run:
            padded = "\n" * (block.line - 1) + block.source
            exec(compile(padded, str(rel), "exec"), namespace)


def main(page: str) -> None:
    """A page as a script: warnings are errors, as in the test suite (pyproject.toml's
    filterwarnings, less pytest's own entries)."""
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jax\.")
    import pyopencl

    warnings.filterwarnings("ignore", category=pyopencl.CompilerWarning)
    run_page(Path(page))


@pytest.mark.parametrize(
    "page", PAGES or [None], ids=[str(p.relative_to(DOCS)) for p in PAGES] or ["no-docs"]
)
def test_page_examples_run(page, tmp_path):
    if page is None:
        pytest.skip("no docs page with a python block")
    needs = {m for b in python_blocks(_read(page)) if b.run for m in b.needs}
    for module in sorted(needs):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{page.name} needs {module}, which is not installed")
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", __file__, str(page)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"{page.relative_to(DOCS.parent)} failed (exit code {done.returncode}):\n"
        f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    )


def test_a_failing_page_fails(tmp_path):
    """The runner reports a block that raises, and a warning, as a failure with the page's
    line (so that a broken example cannot pass)."""
    cases = (
        ("raise ValueError('boom')", "ValueError: boom"),
        ("import warnings\nwarnings.warn('careful')", "UserWarning: careful"),
    )
    for i, (body, expected) in enumerate(cases):
        page = tmp_path / f"probe{i}.md"
        page.write_text(f"# probe\n\n```python\nx = 1\n{body}\n```\n", encoding="utf-8")
        done = subprocess.run(
            [sys.executable, __file__, str(page)], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode != 0
        assert expected in done.stderr, done.stderr
        assert f'"{page.name}", line {4 + body.count(chr(10)) + 1}' in done.stderr, done.stderr


if __name__ == "__main__":
    main(sys.argv[1])
