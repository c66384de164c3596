"""The in-place plan cache: a step's launches, kept by the identity of its arrays.

In place (the stateful layer), the same arrays come back every step: their validation and
launches are cached, keyed by identity. An entry holds weak references: an id is only
trusted while its array is alive, and a stale entry keeps no memory alive (a buffer
argument is kept as the index of a leaf that uses it).
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple, cast

import pyopencl as cl
import pyopencl.array as cla

from .._packing import DonatedArray
from ._launch import Launch

MAX_ENTRIES = 64


class Leaf(int):
    """In a cached launch: the buffer of the i-th leaf."""


class Entry(NamedTuple):
    refs: list[weakref.ref]  # the step's leaves: updates, params, then each part's slots
    launches: list[Launch]  # array arguments only, buffers as Leaf indices
    independent: bool  # see launch_all
    donated: bool  # a donated step made it (and checked the memory unshared)
    step_order: tuple[int, ...] | None  # see Binding


_entries: dict[tuple, Entry] = {}
_NONE_TYPE = type(None)


def key(
    queue: cl.CommandQueue,
    keys: tuple,
    u_leaves: list[Any],
    p_leaves: list[Any],
    slot_leaves: list[list[list[Any]]],
) -> tuple:
    """An entry's key: the queue, the fragments and the identities of the step's arrays."""
    roles_ids = [tuple(map(id, u_leaves)), tuple(map(id, p_leaves))]
    for per in slot_leaves:
        for leaves in per:
            roles_ids.append(tuple(map(id, leaves)))
    return (queue, keys, tuple(roles_ids))


def lookup(entry_key: tuple, donate: bool) -> tuple[Entry, list[cla.Array]] | None:
    """The entry for ``entry_key`` and its leaves, while they are all alive and not donated
    (a donated step needs an entry made by one)."""
    hit = _entries.get(entry_key)
    if hit is None or (donate and not hit.donated):
        return None
    objs = [r() for r in hit.refs]
    types = set(map(type, objs))
    if _NONE_TYPE in types or DonatedArray in types:  # (`None in` calls __eq__)
        return None
    return hit, cast("list[cla.Array]", objs)  # (all alive: none is None)


def bind(hit: Entry, objs: list[cla.Array], step_values: list[Any]) -> list[Launch]:
    """``hit``'s launches over the leaves ``objs``, each followed by ``step_values``."""
    planned = [
        (kernel, n, [objs[a].base_data if type(a) is Leaf else a for a in template])
        for kernel, n, template in hit.launches
    ]
    for _, _, args in planned:
        args += step_values
    return planned


def store(
    entry_key: tuple,
    leaves: list[cla.Array],
    launches: list[Launch],
    independent: bool,
    donated: bool,
    step_order: tuple[int, ...] | None,
) -> None:
    """Keep ``launches`` (array arguments as ``buffer, offset`` pairs) over ``leaves``; a
    buffer that is no leaf's (a table, a segment workspace: kept for the program's life)
    is kept as it is."""
    if len(_entries) >= MAX_ENTRIES:
        _entries.clear()
    index: dict[int, int] = {}
    for i, x in enumerate(leaves):
        index.setdefault(id(x.base_data), i)
    templates = [(kernel, n, [_template(a, i, index) for i, a in enumerate(args)])
                 for kernel, n, args in launches]  # fmt: skip
    refs = [weakref.ref(x) for x in leaves]
    _entries[entry_key] = Entry(refs, templates, independent, donated, step_order)


def _template(arg: Any, position: int, index: dict[int, int]) -> Any:
    """A launch argument as cached: a leaf's buffer as its :class:`Leaf` index."""
    return Leaf(index[id(arg)]) if position % 2 == 0 and id(arg) in index else arg


def discard(entry_key: tuple) -> None:
    _entries.pop(entry_key, None)


def move(old_key: tuple, new_key: tuple, hit: Entry, kept: int, written: list[Any]) -> None:
    """After a donated step: ``hit`` keyed by the arrays that replaced the donated ones (its
    first ``kept`` leaves stay, the others are ``written``)."""
    del _entries[old_key]
    _entries[new_key] = hit._replace(refs=[*hit.refs[:kept], *map(weakref.ref, written)])
