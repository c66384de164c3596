"""Packed layouts: many leaves as views into one contiguous buffer, so one launch serves a model."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from ._device import allocator, check_float_dtype, queue_of


@lru_cache(maxsize=65536)
def c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Byte strides of a C-contiguous array (as pyopencl computes them)."""
    strides, acc = [], itemsize
    for dim in reversed(shape):
        strides.append(acc)
        acc *= max(dim, 1)
    return tuple(reversed(strides))


class Layout:
    """Element offsets of leaves with ``shapes`` packed back to back, for one dtype.

    ``views(buffer)`` makes the per-leaf arrays from precomputed templates: building a
    ``pyopencl.array.Array`` the usual way costs ~12 us, which on a 160-leaf model is more
    than the step itself.
    """

    def __init__(self, shapes: tuple[tuple[int, ...], ...], dtype: np.dtype) -> None:
        self.shapes = shapes
        self.dtype = np.dtype(dtype)
        self.sizes = tuple(math.prod(s) for s in shapes)
        offsets, acc = [], 0
        for n in self.sizes:
            offsets.append(acc)
            acc += n
        self.offsets = tuple(offsets)
        self.total = acc
        self.strides = [c_strides(s, self.dtype.itemsize) for s in shapes]
        self._templates: dict[cl.CommandQueue, list[dict[str, Any]]] = {}

    def _templates_for(self, queue: cl.CommandQueue) -> list[dict[str, Any]]:
        templates = self._templates.get(queue)
        if templates is None:
            item = self.dtype.itemsize
            templates = [
                {
                    "queue": queue,
                    "context": queue.context,
                    "shape": shape,
                    "dtype": self.dtype,
                    "strides": c_strides(shape, item),
                    "nbytes": size * item,
                    "size": size,
                    "allocator": allocator(queue),
                    "offset": off * item,
                    "_flags": None,
                }
                for shape, size, off in zip(self.shapes, self.sizes, self.offsets, strict=True)
            ]
            self._templates[queue] = templates
        return templates

    def views(self, flat: cla.Array) -> list[cla.Array]:
        """Per-leaf views of ``flat`` (a 1-D array of ``total`` elements)."""
        return self.views_of(flat.queue, flat.base_data, flat.offset)

    def views_of(self, queue: cl.CommandQueue, base: Any, shift: int = 0) -> list[cla.Array]:
        """Per-leaf views of the buffer ``base`` from byte ``shift`` on."""
        out = []
        for template in self._templates_for(queue):
            a = cla.Array.__new__(cla.Array)
            d = dict(template)
            d["base_data"] = base
            d["events"] = []
            if shift:
                d["offset"] += shift
            a.__dict__ = d
            out.append(a)
        return out

    def allocate(self, queue: cl.CommandQueue) -> tuple[Any, list[cla.Array]]:
        """A fresh buffer from ``queue``'s pool and its per-leaf views."""
        buffer = allocator(queue)(max(self.total, 1) * self.dtype.itemsize)
        return buffer, self.views_of(queue, buffer)


@lru_cache(maxsize=4096)
def layout(shapes: tuple[tuple[int, ...], ...], dtype: np.dtype) -> Layout:
    return Layout(shapes, np.dtype(dtype))


def element_offset(a: cla.Array) -> int:
    item = a.dtype.itemsize
    if a.offset % item:
        raise ValueError(f"array offset {a.offset} is not a multiple of its itemsize {item}")
    return a.offset // item


def contiguous_run(arrays: list[cla.Array], lay: Layout | None = None) -> tuple[Any, int] | None:
    """``(base buffer, element offset)`` if ``arrays`` lie back to back in one buffer (in the
    order of ``lay``, whose shapes they have), else ``None``."""
    first = arrays[0]
    base = first.base_data
    item = first.dtype.itemsize
    start = first.offset
    if start % item or [a.base_data for a in arrays].count(base) != len(arrays):
        return None
    if lay is None:
        lay = layout(tuple(a.shape for a in arrays), first.dtype)
    if [a.offset for a in arrays] != [start + o * item for o in lay.offsets]:
        return None
    return base, start // item


def is_c_contiguous(a: cla.Array) -> bool:
    return a.flags.c_contiguous


def allocate_like(
    leaves: list[cla.Array],
    queue: cl.CommandQueue,
    dtype_of: Callable[[np.dtype], np.dtype] = lambda dtype: dtype,
    fill: float | None = None,
) -> list[cla.Array]:
    """Fresh arrays shaped like ``leaves`` (dtype ``dtype_of(leaf.dtype)``), packed back to
    back in one pool buffer per dtype; filled with ``fill`` (one fill command per buffer)."""
    groups: dict[np.dtype, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault(x.dtype, []).append(i)
    out: list[Any] = [None] * len(leaves)
    for dtype, idx in groups.items():
        lay = layout(tuple(leaves[i].shape for i in idx), dtype_of(dtype))
        buffer, views = lay.allocate(queue)
        if fill is not None and lay.total:
            pattern = np.array(fill, dtype=lay.dtype)
            cl.enqueue_fill_buffer(queue, buffer, pattern, 0, lay.total * lay.dtype.itemsize)
        for i, view in zip(idx, views, strict=True):
            out[i] = view
    return out


def pack(tree: Any, queue: cl.CommandQueue | None = None) -> Any:
    """Copy the device-array leaves of ``tree`` into one buffer per dtype; return the views.

    The result has ``tree``'s structure. A packed tree (params, grads, or optimizer state
    from ``init``) lets a whole-model step run as one kernel launch.
    """
    queue = queue or queue_of(tree)
    leaves, treedef = optree.tree_flatten(tree)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, cla.Array):
            raise TypeError(f"pack: leaf {i} is a {type(leaf).__name__}, not a device array")
        check_float_dtype(leaf.dtype, queue, "pack")
        if not is_c_contiguous(leaf):
            raise ValueError(f"pack: leaf {i} is not C-contiguous")
    out = allocate_like(leaves, queue)
    for src, view in zip(leaves, out, strict=True):
        if src.size:
            cl.enqueue_copy(
                queue,
                view.base_data,
                src.base_data,
                byte_count=src.nbytes,
                src_offset=src.offset,
                dst_offset=view.offset,
            )
    return optree.tree_unflatten(treedef, out)
