"""Check an optimizer state against the structure its transform's ``init`` makes.

The library's transforms register a :class:`Spec` of their state when they are built:
NamedTuple types, how many states a chain holds, dict keys; never array contents or tree
shapes (the executor checks those against the updates). ``update`` and the fused executor
check the state first, so another optimizer's state is refused with a ``ValueError`` that
names the mismatch, before anything runs or changes. The spec is built once per transform;
checking a state walks only its containers (a few microseconds for a chain).
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from ._base import EmptyState, Fragment, GradientTransformation, as_transform

# where (outermost first, e.g. ("[0]", ".inner_state")), what was expected, what was found
Mismatch = tuple[tuple[str, ...], str, str]


def _describe(state: Any) -> str:
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state).__name__
    if isinstance(state, (tuple, list)):
        return f"a {type(state).__name__} of {len(state)}"
    if isinstance(state, Mapping):
        return f"a dict with keys {_keys(state)}"
    return "None" if state is None else f"a {type(state).__name__}"


def _keys(keys: Any) -> str:
    return ", ".join(sorted(map(repr, keys))) or "(none)"


def _within(step: str, found: Mismatch | None) -> Mismatch | None:
    return None if found is None else ((step, *found[0]), found[1], found[2])


class Spec(abc.ABC):
    """The structure of a state; :meth:`find` returns its first mismatch, or ``None``."""

    __slots__ = ()

    @abc.abstractmethod
    def find(self, state: Any) -> Mismatch | None:
        """The first place where ``state`` differs from this structure, or ``None``."""


class NamedTupleSpec(Spec):
    """An instance of ``cls``, whose ``fields`` hold states of the given specs."""

    __slots__ = ("cls", "fields")

    def __init__(self, cls: type, fields: Mapping[str, Spec | None] | None = None) -> None:
        self.cls = cls
        self.fields = tuple((k, s) for k, s in (fields or {}).items() if s is not None)

    def find(self, state: Any) -> Mismatch | None:
        if not isinstance(state, self.cls):
            return (), self.cls.__name__, _describe(state)
        for name, spec in self.fields:
            found = spec.find(getattr(state, name))
            if found is not None:
                return _within(f".{name}", found)
        return None


class TupleSpec(Spec):
    """A chain's state: a tuple (not a NamedTuple) of one state per child."""

    __slots__ = ("children", "count")

    def __init__(self, children: Sequence[Spec | None]) -> None:
        self.count = len(children)
        self.children = tuple((i, s) for i, s in enumerate(children) if s is not None)

    def find(self, state: Any) -> Mismatch | None:
        if (
            not isinstance(state, (tuple, list))
            or hasattr(state, "_fields")
            or len(state) != self.count
        ):
            want = f"a tuple of {self.count} states (one per chained transform)"
            return (), want, _describe(state)
        for i, spec in self.children:
            found = spec.find(state[i])
            if found is not None:
                return _within(f"[{i}]", found)
        return None


class DictSpec(Spec):
    """A dict with exactly the given keys (``exact``), or at least them, whose values are
    states of the given specs."""

    __slots__ = ("exact", "items", "keys")

    def __init__(self, items: Mapping[Any, Spec | None], *, exact: bool = True) -> None:
        self.keys = frozenset(items)
        self.items = tuple((k, s) for k, s in items.items() if s is not None)
        self.exact = exact

    def find(self, state: Any) -> Mismatch | None:
        if not isinstance(state, Mapping) or not (
            self.keys == state.keys() if self.exact else self.keys <= state.keys()
        ):
            want = f"a dict with {'' if self.exact else 'at least the '}keys {_keys(self.keys)}"
            return (), want, _describe(state)
        for key, spec in self.items:
            found = spec.find(state[key])
            if found is not None:
                return _within(f"[{key!r}]", found)
        return None


class FieldsSpec(Spec):
    """Any object with the given attributes (a fragment's slots, for a user-written
    ``init`` whose state type is not known)."""

    __slots__ = ("names",)

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)

    def find(self, state: Any) -> Mismatch | None:
        if all(hasattr(state, n) for n in self.names):
            return None
        return (), f"a state with fields {', '.join(self.names)}", _describe(state)


class _Lazy:
    """A spec built on first use (a transform's children are registered before it)."""

    __slots__ = ("build", "spec")

    def __init__(self, build: Callable[[], Spec | None]) -> None:
        self.build: Callable[[], Spec | None] | None = build
        self.spec: Spec | None = None

    def get(self) -> Spec | None:
        if self.build is not None:
            self.spec, self.build = self.build(), None
        return self.spec


# keyed by the transform's update function (closures and bound methods are unique per
# transform and weakly referenceable); a builder must not refer to the transform itself
_specs: weakref.WeakKeyDictionary[Callable, _Lazy] = weakref.WeakKeyDictionary()


def register(
    tx: GradientTransformation, build: Callable[[], Spec | None]
) -> GradientTransformation:
    """Record how to build the spec of ``tx``'s state (``build`` is called once, on first
    use, and must not refer to ``tx``); returns ``tx``."""
    _specs[tx.update] = _Lazy(build)
    return tx


def spec_of(tx: GradientTransformation) -> Spec | None:
    """The spec of ``tx``'s state, or ``None`` for a transform that registered none (a
    user-written one): its state is not checked."""
    try:
        lazy = _specs.get(tx.update)
    except TypeError:  # an update that cannot be weakly referenced: never registered
        return None
    return None if lazy is None else lazy.get()


def wrapper_spec(cls: type, field: str, inner: GradientTransformation) -> Spec:
    """A wrapper's state: a ``cls`` whose ``field`` holds ``inner``'s state."""
    return NamedTupleSpec(cls, {field: spec_of(inner)})


def wrapper(cls: type, field: str, inner: GradientTransformation) -> Callable[[], Spec]:
    """A builder for :func:`register`: see :func:`wrapper_spec`."""
    return partial(wrapper_spec, cls, field, inner)


def fragment_spec(fragment: Fragment, init: Callable[..., Any] | None) -> Spec | None:
    """The state of ``elementwise(fragment, init)``: the type ``init`` returns (called with
    ``None`` for each slot tree), ``EmptyState`` without ``init``."""
    if init is None:
        return NamedTupleSpec(EmptyState)
    try:
        probe = init(*[None] * (len(fragment.slots) + len(fragment.segment_state)))
    except Exception:  # a user-written init that needs its slot trees: check the slots only
        return FieldsSpec(fragment.slots) if fragment.slots else None
    if isinstance(probe, tuple) and hasattr(probe, "_fields"):
        return NamedTupleSpec(type(probe))
    return None


def check_state(tx: GradientTransformation, state: Any) -> None:
    """Raise ValueError, naming the first mismatch, unless ``state`` has the structure
    ``tx.init`` makes. Reads no array."""
    spec = spec_of(tx)
    if spec is None:
        return
    found = spec.find(state)
    if found is not None:
        where, want, got = found
        raise ValueError(
            f"state does not match this transform: expected {want} at state{''.join(where)}, "
            f"got {got}; pass the state that this optimizer's init returned"
        )


def checked_transform(tx: Any, state: Any) -> GradientTransformation:
    """``tx`` as a GradientTransformation (see :func:`as_transform`), after
    :func:`check_state`: the fused executor's entry check."""
    tx = as_transform(tx)
    check_state(tx, state)
    return tx
