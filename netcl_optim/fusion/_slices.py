"""Steps on a slice of a packed tree (ZeRO's shards, ``distributed/_shard.py``) whose rules
need a value per leaf: the segment reductions run over the whole leaves, the fused launches
over the slice.

A sharded step runs the optimizer on ``{dtype: 1-D slice}`` trees. Inside :func:`sliced`,
each dtype's slice knows the whole tree it was cut from (:class:`Slice`): a part's segment
reduction then sums over the whole leaves (the incoming updates and the params are whole on
every rank; an intermediate, such as LAMB's Adam output, is gathered from every rank's
slice first), so its values are the unsharded ones, bit for bit; its per-leaf state holds
one value per whole leaf (the same on every rank); and the tiled launches take the whole
tree's work-groups cut to the slice (:class:`Window`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._packing import layout
from ._launch import TILE


class Slice(NamedTuple):
    """One dtype's slice ``[lo, hi)`` of a packed layout of leaves with ``shapes``:
    ``updates`` is the slice of the incoming updates (an array object) and ``whole`` their
    whole leaves; ``params`` the whole params' leaves (or ``None``); ``gather(part)``
    returns the whole leaves of which ``part`` (another slice array) is this rank's slice
    (a collective: every rank calls it at the same point of the step)."""

    shapes: tuple[tuple[int, ...], ...]
    lo: int
    hi: int
    updates: Any
    whole: list[Any] | None
    params: list[Any] | None
    gather: Callable[[cla.Array], list[cla.Array]] | None


_SLICES: contextvars.ContextVar[Mapping[np.dtype, Slice] | None] = contextvars.ContextVar(
    "slices", default=None
)


@contextlib.contextmanager
def sliced(slices: Mapping[Any, Slice]) -> Iterator[None]:
    """Steps and inits inside see each dtype's 1-D leaf as the slice ``slices[dtype]``."""
    token = _SLICES.set({np.dtype(d): s for d, s in slices.items()})
    try:
        yield
    finally:
        _SLICES.reset(token)


def slices_active() -> bool:
    """Whether steps run inside :func:`sliced` now."""
    return _SLICES.get() is not None


def slice_of(dtype: Any) -> Slice | None:
    """The slice that a 1-D leaf of ``dtype`` is, inside :func:`sliced`; else ``None``."""
    slices = _SLICES.get()
    return None if slices is None else slices.get(np.dtype(dtype))


def slice_for(leaves: list[Any], idx: list[int]) -> Slice | None:
    """The slice that the dtype group ``idx`` of ``leaves`` is (its one 1-D leaf, inside
    :func:`sliced`), or ``None``."""
    if len(idx) != 1:
        return None
    x = leaves[idx[0]]
    s = slice_of(x.dtype)
    return s if s is not None and x.shape == (s.hi - s.lo,) else None


def whole_view(part: cla.Array, start: int, n: int) -> cla.Array:
    """The 1-D view of ``n`` elements of ``part``'s buffer from ``part``'s element
    ``start`` on."""
    item = part.dtype.itemsize
    return layout(((n,),), part.dtype).views_of(part.queue, part.base_data,  # pyright: ignore[reportArgumentType]
                                                part.offset + start * item)[0]  # fmt: skip


def whole_updates(s: Slice, part: cla.Array) -> list[cla.Array]:
    """The whole leaves that ``part`` (an updates array of the slice) was cut from: the
    incoming updates' own, else gathered from every rank."""
    if part is s.updates and s.whole is not None:
        return s.whole
    if s.gather is None:
        raise ValueError("a per-leaf reduction of a sliced step needs its updates gathered")
    return s.gather(part)


class Window:
    """A segmentation's tiled work-groups cut to the elements ``[lo, hi)``, numbered from
    ``lo`` (what ``_segments.tiled_launches`` reads: ``groups``, ``full``, ``leaf_full``,
    ``leaf_tail`` and ``tables``): a group the slice cuts becomes a partial one."""

    def __init__(self, groups: np.ndarray, stepped: bool, lo: int, hi: int) -> None:
        full, tail = [], []
        for start, seg, count, step in groups.tolist():
            a, b = max(start, lo), min(start + count, hi)
            if a < b:
                row = (a - lo, seg + step * (a - start), b - a, step)
                (full if b - a == TILE else tail).append(row)
        self.groups = np.array(full + tail, np.int64).reshape(-1, 4)
        self.full = len(full)
        self.stepped = stepped
        self.leaf_full = [(0, len(full))]
        self.leaf_tail = [(0, len(tail))]
        self._device: dict[cl.Context, dict[str, cla.Array]] = {}

    def tables(self, queue: cl.CommandQueue) -> dict[str, cla.Array]:
        tables = self._device.get(queue.context)
        if tables is None:
            host = self.groups if self.groups.size else np.zeros(4, np.int64)
            tables = {"groups": cla.to_device(queue, host)}
            queue.finish()
            self._device[queue.context] = tables
        return tables


@lru_cache(maxsize=64)
def window(seg: Any, lo: int, hi: int) -> Window:
    return Window(seg.groups, seg.stepped, lo, hi)


__all__ = [
    "Slice",
    "Window",
    "slice_for",
    "slice_of",
    "sliced",
    "slices_active",
    "whole_updates",
    "whole_view",
    "window",
]
