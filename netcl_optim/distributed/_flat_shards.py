"""Each rank's slice of the flat per-dtype buffers that ZeRO stage 1 shards.

Every dtype's parameters form one flat buffer (leaves back to back, in tree order). Rank
``r`` of ``N`` owns the elements ``[total * r // N, total * (r + 1) // N)`` of it (balanced
by element count; a slice may cut through leaves). Used by :func:`shard_optimizer` and
:class:`ZeroRedundancyOptimizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._packing import Block, Layout, layout
from ._comm import by_dtype, in_place, packed_run, raw


def shard_bounds(total: int, size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each rank's slice of ``total`` elements: contiguous, sizes differing
    by at most one. Device: none."""
    return [(total * r // size, total * (r + 1) // size) for r in range(size)]


@dataclass(frozen=True)
class DtypeShard:
    """One dtype's flat buffer: its leaves, layout and this rank's slice."""

    name: str
    idx: tuple[int, ...]
    lay: Layout
    lo: int
    hi: int
    counts: tuple[int, ...]
    displs: tuple[int, ...]

    @property
    def n(self) -> int:
        return self.hi - self.lo

    def slice_layout(self) -> Layout:
        return layout(((self.n,),), self.lay.dtype)


def plan_shards(leaves: list[Any], comm: Any) -> tuple[DtypeShard, ...]:
    """One :class:`DtypeShard` per dtype of ``leaves``: its leaves, layout and the slice
    of rank ``comm.Get_rank()``."""
    size, rank = comm.Get_size(), comm.Get_rank()
    shards = []
    for dtype, idx in by_dtype(leaves).items():
        lay = layout(tuple(leaves[i].shape for i in idx), dtype)
        bounds = shard_bounds(lay.total, size)
        lo, hi = bounds[rank]
        shards.append(
            DtypeShard(
                dtype.name,
                tuple(idx),
                lay,
                lo,
                hi,
                tuple(b - a for a, b in bounds),
                tuple(a for a, _ in bounds),
            )
        )
    return tuple(shards)


def _slice_view(queue: cl.CommandQueue, sh: DtypeShard, base: Any, elem_off: int) -> cla.Array:
    """The 1-D view of elements ``[lo, hi)`` of a flat buffer starting at ``elem_off``."""
    item = sh.lay.dtype.itemsize
    return sh.slice_layout().views_of(queue, base, (elem_off + sh.lo) * item)[0]


def flat_slice(
    queue: cl.CommandQueue, xs: list[cla.Array], sh: DtypeShard, into: Block | None = None
) -> cla.Array:
    """This rank's slice of the leaves ``xs`` as a 1-D array: a view if they are packed,
    else a copy of the overlapping parts (into the buffer ``into``, or a fresh one; ``None``
    leaves are skipped)."""
    run = packed_run(xs) if all(x is not None for x in xs) else None
    if run is not None:
        return _slice_view(queue, sh, run[0], run[1])
    item = sh.lay.dtype.itemsize
    (view,) = (into if into is not None else sh.slice_layout().allocate(queue)).views
    for x, o, n in zip(xs, sh.lay.offsets, sh.lay.sizes, strict=True):
        a, b = max(o, sh.lo), min(o + n, sh.hi)
        if x is not None and a < b:
            cl.enqueue_copy(
                queue,
                view.base_data,
                x.base_data,
                byte_count=(b - a) * item,
                src_offset=x.offset + (a - o) * item,
                dst_offset=view.offset + (a - sh.lo) * item,
            )
    return view


def allgatherv(
    comm: Any, host: np.ndarray, counts: tuple[int, ...], displs: tuple[int, ...]
) -> None:
    """In-place ``Allgatherv`` of a host buffer: rank ``r`` contributes
    ``host[displs[r] : displs[r] + counts[r]]``."""
    from mpi4py.util.dtlib import from_numpy_dtype

    data = raw(host)
    comm.Allgatherv(in_place(), [data, list(counts), list(displs), from_numpy_dtype(data.dtype)])
