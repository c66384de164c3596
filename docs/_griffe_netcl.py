"""A griffe extension for netcl_optim's docstrings (mkdocstrings loads it, see mkdocs.yml).

* The docstrings are written for Sphinx-like reading: ``x`` literals (Markdown reads them as
  code too), ``name::`` before an indented block, and roles such as :func:`adam`. Markdown
  has neither, so ``::`` becomes ``:`` and a role becomes a code span.
* The stateful optimizer classes build their ``__init__`` from a declaration at import time
  (``inspect.signature(Adam)`` is torch's signature); static analysis sees only the base
  class's. This sets each declared class's ``__init__`` parameters from the runtime signature.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc|const|py:\w+):`~?([^`]+)`")
_LITERAL_BLOCK = re.compile(r"(\S)::(\s*\n)")  # "rule::" -> "rule:"
_BARE_LITERAL = re.compile(r"\s+::(\s*\n)")  # a lone " ::" -> nothing


def markdown_docstring(text: str) -> str:
    """``text`` with Sphinx roles as code spans and ``::`` markers as colons."""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    text = _BARE_LITERAL.sub(r"\1", text)
    return _LITERAL_BLOCK.sub(r"\1:\2", text + "\n")[:-1]


_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


def _annotation(value: Any) -> str | None:
    if value is inspect.Parameter.empty:
        return None
    if isinstance(value, type):
        return value.__name__
    return str(value).replace("typing.", "")


def _runtime_parameters(cls: type) -> griffe.Parameters:
    params = [griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)]
    for p in inspect.signature(cls).parameters.values():
        default = None if p.default is inspect.Parameter.empty else repr(p.default)
        params.append(
            griffe.Parameter(
                p.name, annotation=_annotation(p.annotation), kind=_KINDS[p.kind], default=default
            )
        )
    return griffe.Parameters(*params)


class NetclOptimDocstrings(griffe.Extension):
    """Markdown-friendly docstrings and the declared classes' signatures."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "netcl_optim":
            return
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = markdown_docstring(obj.docstring.value)
            if obj.is_class:
                _set_declared_init(obj)


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _set_declared_init(cls: Any) -> None:
    """A class with ``_declaration`` of its own (a declared optimizer): ``__init__`` as at
    runtime."""
    try:
        runtime = getattr(importlib.import_module(cls.module.path), cls.name)
    except (ImportError, AttributeError):
        return
    if "_declaration" not in vars(runtime):
        return
    init = griffe.Function("__init__", parameters=_runtime_parameters(runtime), parent=cls)
    init.docstring = None
    cls.set_member("__init__", init)
