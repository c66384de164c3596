"""The API reference (docs/_hooks.py generates it at build time): every public name of
netcl_optim is on a page, every optimizer family has its state and examples, and every
example runs and prints the state keys its page gives."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "_hooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_hooks"] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()
FAMILIES = hooks.family_modules()


def _directives(text: str) -> list[str]:
    return [line[4:].strip() for line in text.splitlines() if line.startswith("::: ")]


def test_every_public_name_is_documented_once():
    import netcl_optim
    import netcl_optim.distributed as dist

    documented = [d for text in hooks.reference_pages().values() for d in _directives(text)]
    expected = [f"netcl_optim.{n}" for n in netcl_optim.__all__]
    expected += [f"netcl_optim.distributed.{n}" for n in dist.__all__]
    assert len(expected) > 250
    assert sorted(documented) == sorted(expected)


def test_every_family_is_in_the_nav():
    nav = hooks.reference_nav()
    optimizers = next(item["Optimizers"] for item in nav if "Optimizers" in item)
    paths = {path for entry in optimizers for path in entry.values()}
    assert {f"reference/optimizers/{f}.md" for f in FAMILIES} <= paths
    assert len(FAMILIES) >= 38


def test_a_name_of_a_new_module_fails_the_build():
    message = r"no reference page for 'thing' \(defined in netcl_optim\.newmod\)"
    with pytest.raises(ValueError, match=message):
        hooks.place("thing", "netcl_optim.newmod")


def test_state_keys_are_computed():
    rows = {row.variant: row for row in hooks.state_rows("adam")}
    assert rows["adam"].keys == ["exp_avg", "exp_avg_sq", "step"]
    assert rows["adam"].functional_state == "(ScaleByAdamState(count, mu, nu), EmptyState())"
    assert rows["adam-amsgrad"].keys == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_page_has_state_examples_and_api(family):
    text = hooks.family_page(family)
    assert "## Examples" in text, family
    assert "## State" in text, family
    assert "## API" in text, family


@pytest.mark.parametrize("family", FAMILIES)
def test_examples_run_and_print_the_documented_keys(family):
    examples = hooks.examples(family)
    assert examples, family
    for title, code, keys in examples:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"<{family}: {title}>", "exec"), {"__name__": "__example__"})
        printed = out.getvalue().strip().splitlines()
        assert printed, (family, title)
        if keys is not None:
            assert ast.literal_eval(printed[-1]) == sorted(keys), (family, title)
