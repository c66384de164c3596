"""Packed layouts: many leaves as views into one contiguous buffer, so one launch serves a model."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from ._device import allocator, check_float_dtype, queue_of

# Large packed buffers start at a rotating offset inside their pool allocation. The pool
# rounds sizes up to round bins, so same-sized buffers (params, grads, each state slot) lie a
# round distance apart; a kernel streaming several of them then ran 10-35% slower at 50M
# params on PoCL (measured: benchmarks/README.md, "Staggered buffers").
STAGGER_FROM_BYTES = 1 << 20
_STAGGER_STEP = 1088  # bytes: a multiple of 64 (alignment of any vector load), 4096 / 64 phases
_stagger_counter = itertools.count()


def stagger_bytes(nbytes: int) -> int:
    """The byte offset at which a fresh buffer of ``nbytes`` starts its data."""
    if nbytes < STAGGER_FROM_BYTES:
        return 0
    return next(_stagger_counter) * _STAGGER_STEP % 4096


class Block(NamedTuple):
    """A fresh pool buffer holding a packed layout from byte ``offset`` on, and its views."""

    buffer: Any
    offset: int
    nbytes: int
    views: list[cla.Array]

    def fill(self, queue: cl.CommandQueue, value: Any) -> None:
        """Set every element to ``value`` (one fill command)."""
        if self.nbytes:
            pattern = np.array(value, dtype=self.views[0].dtype)
            cl.enqueue_fill_buffer(queue, self.buffer, pattern, self.offset, self.nbytes)

    def upload(self, queue: cl.CommandQueue, host: np.ndarray) -> None:
        """Copy the packed ``host`` array in (blocking)."""
        if self.nbytes:
            cl.enqueue_copy(queue, self.buffer, host, dst_offset=self.offset, is_blocking=True)


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
        return self.views_of(flat.queue, flat.base_data, flat.offset)  # pyright: ignore[reportArgumentType]

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

    def allocate(self, queue: cl.CommandQueue) -> Block:
        """A fresh buffer from ``queue``'s pool (contents undefined) and its per-leaf views."""
        nbytes = self.total * self.dtype.itemsize
        shift = stagger_bytes(nbytes)
        buffer = allocator(queue)(max(nbytes, 1) + shift)
        return Block(buffer, shift, nbytes, self.views_of(queue, buffer, shift))


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
        block = layout(tuple(leaves[i].shape for i in idx), dtype_of(dtype)).allocate(queue)
        if fill is not None:
            block.fill(queue, fill)
        for i, view in zip(idx, block.views, strict=True):
            out[i] = view
    return out


def pack(tree: Any, queue: cl.CommandQueue | None = None) -> Any:
    """Copy the device-array leaves of ``tree`` into one buffer per dtype; return the views.

    The result has ``tree``'s structure. A packed tree (params, grads, or optimizer state
    from ``init``) lets a whole-model step run as one kernel launch. Each leaf is a view at
    an offset into its buffer (a large buffer's first leaf too, see ``stagger_bytes``): a
    custom kernel takes ``leaf.base_data`` and ``leaf.offset``, since pyopencl's
    ``Array.data`` refuses a view with an offset.
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
            cl.enqueue_copy(  # pyright: ignore[reportCallIssue]
                queue,
                view.base_data,  # pyright: ignore[reportArgumentType]
                src.base_data,
                byte_count=src.nbytes,
                src_offset=src.offset,
                dst_offset=view.offset,
            )
    return optree.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------- shared memory


def byte_span(a: cla.Array) -> tuple[int, int]:
    """``[start, end)``: the bytes of ``a.base_data`` that ``a`` touches (any strides)."""
    lo = hi = a.offset
    for n, stride in zip(a.shape, a.strides, strict=True):
        if stride < 0:
            lo += (n - 1) * stride
        else:
            hi += (n - 1) * stride
    return lo, hi + a.dtype.itemsize


def first_shared(
    roles: Sequence[tuple[Sequence[cla.Array], bool]],
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Two arrays that share memory, one of them in a role marked written, as
    ``((role, index), (role, index))``; ``None`` if there are none. ``roles`` are
    ``(arrays, written)``; arrays of read-only roles may share memory with each other (a tree
    holding one array twice), and arrays with no elements share nothing."""
    bases = [id(a.base_data) for arrays, _ in roles for a in arrays if a.size]
    if len(set(bases)) == len(bases):  # every array in its own buffer
        return None
    spans = sorted(
        (id(a.base_data), *byte_span(a), written, r, i)
        for r, (arrays, written) in enumerate(roles)
        for i, a in enumerate(arrays)
        if a.size
    )
    base = None
    end_any = end_written = 0
    owner_any = owner_written = (-1, -1)
    for b, start, end, written, r, i in spans:
        if b != base:
            base, end_any, end_written = b, 0, 0
        if written and start < end_any:
            return owner_any, (r, i)
        if start < end_written:
            return owner_written, (r, i)
        if end > end_any:
            end_any, owner_any = end, (r, i)
        if written and end > end_written:
            end_written, owner_written = end, (r, i)
    return None


def same_memory(a: cla.Array, b: cla.Array) -> bool:
    """Whether ``a`` and ``b`` are the same bytes of one buffer (e.g. one array twice)."""
    return a.base_data is b.base_data and byte_span(a) == byte_span(b) and a.size == b.size


# ---------------------------------------------------------------------------- donation

DONATED = (
    "was donated to no.step(..., donate=True) and can no longer be used; use the returned "
    "params/state"
)


class DonatedArrayError(RuntimeError):
    """Use of a device array whose buffer was donated to ``no.step(..., donate=True)``."""


class DonatedArray(cla.Array):
    """A ``pyopencl.array.Array`` whose memory a donated step took over: it keeps no
    attribute, so any use (``get()``, ``.shape``, a kernel argument, arithmetic) raises
    :class:`DonatedArrayError`. The step returned a new array over the same memory."""

    def __getattr__(self, name: str) -> Any:
        raise DonatedArrayError(f"this array {DONATED}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise DonatedArrayError(f"this array {DONATED}")

    def __repr__(self) -> str:
        return "<pyopencl Array donated to no.step(..., donate=True)>"

    __str__ = __repr__


_new_array = cla.Array.__new__
_NO_ATTRIBUTES: dict[str, Any] = {}  # every DonatedArray's (read and written by none)


def hand_over(arrays: list[cla.Array]) -> list[cla.Array]:
    """New array objects over the memory of ``arrays``, which become :class:`DonatedArray`:
    after a donated step, its inputs are unusable and its outputs are new objects. The new
    objects take over the old ones' attributes (no copy, one allocation an array)."""
    fresh: list[cla.Array] = []
    for a in arrays:
        if type(a) is DonatedArray:  # an empty array that came twice: already handed over
            fresh.append(fresh[next(i for i, b in enumerate(arrays) if b is a)])
            continue
        new = _new_array(type(a))
        new.__dict__ = a.__dict__
        a.__dict__ = _NO_ATTRIBUTES
        a.__class__ = DonatedArray
        fresh.append(new)
    return fresh
