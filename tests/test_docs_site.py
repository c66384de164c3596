"""The documentation site in a real browser: ``mkdocs build --strict`` into a temporary
directory, served on 127.0.0.1, and the home page, an optimizer page and the performance
page loaded in headless Chromium: each has its title and a known heading, and is not the 404
page. Skips when mkdocs or Chromium is not installed."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE_NAME = "netcl_optim"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless browser: none of {', '.join(BROWSERS)} is on PATH")


def _first_heading(markdown: Path) -> str:
    """The page's first ``# `` heading (the guides' authors choose it)."""
    for line in markdown.read_text().splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    raise AssertionError(f"{markdown} has no '# ' heading")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if (
        importlib.util.find_spec("mkdocs") is None
        or importlib.util.find_spec("mkdocstrings") is None
    ):
        pytest.skip("mkdocs / mkdocstrings are not installed (pip install -e '.[docs]')")
    browser = _browser()
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", browser
    finally:
        server.shutdown()
        server.server_close()


def _dom(browser: str, url: str) -> str:
    """The page's DOM after Chromium rendered it (scripts run)."""
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


PAGES = [
    # (path, page title, a heading on the page: its text, or the markdown file it starts)
    ("", SITE_NAME, "netcl_optim"),
    ("reference/optimizers/adam/", "Adam and AdamW", "Adam"),
    ("guides/performance/", "Performance", ROOT / "docs" / "guides" / "performance.md"),
]


@pytest.mark.parametrize(("path", "title", "heading"), PAGES, ids=["home", "adam", "performance"])
def test_page_renders_in_chromium(site, path, title, heading):
    base, browser = site
    if isinstance(heading, Path):
        heading = _first_heading(heading)
    url = f"{base}/{path}"
    with urllib.request.urlopen(url, timeout=30) as response:  # not a 404
        assert response.status == 200
    dom = _dom(browser, url)
    expected_title = SITE_NAME if title == SITE_NAME else f"{title} - {SITE_NAME}"
    found = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert found and found.group(1).strip() == expected_title, dom[:500]
    headings = [
        re.sub(r"<[^>]+>|¶", "", h).strip()
        for h in re.findall(r"<h[1-4][^>]*>(.*?)</h[1-4]>", dom, re.S)
    ]
    assert heading in headings, headings[:20]
    assert "404 - Not found" not in dom
    assert 'class="md-content"' in dom  # Material rendered the page body


def test_a_missing_page_is_a_404(site):
    base, _ = site
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/no/such/page/", timeout=30)
    err.value.close()  # (the error holds the response's socket)
    assert err.value.code == 404
