"""Each rank's slice of the flat per-dtype buffers that ZeRO stage 1 shards.

Every dtype's parameters form one flat buffer (leaves back to back, in tree order). Rank
``r`` of ``N`` owns about the elements ``[total * r // N, total * (r + 1) // N)`` of it,
cut at the nearest 256-element block boundary of a leaf (a slice may cut through leaves,
but not through the blocks of 8-bit state). Used by :func:`shard_optimizer` and
:class:`ZeroRedundancyOptimizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._packing import Block, Layout, layout
from ..fusion import BLOCK_8BIT, TREE_SUMS_BLOCK, walk
from ._comm import by_dtype, in_place, packed_run, raw


def shard_bounds(
    total: int, size: int, leaf_sizes: Sequence[int] | None = None, block: int = BLOCK_8BIT
) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each rank's slice of ``total`` elements: contiguous, sizes differing
    by at most one; or, given the sizes of the leaves laid end to end (summing to
    ``total``), each bound moved to the nearest start of a ``block``-element block of a leaf
    (the lower one at a tie; a leaf's blocks count from its own start): 256, so that no
    rank's slice cuts a block of 8-bit state, or for a rule with sums over the tree
    (:func:`shard_block`) the chunks of its partial sums. Device: none."""
    even = [total * r // size for r in range(size + 1)]
    if leaf_sizes is not None:
        sizes = np.asarray(leaf_sizes, np.int64)
        if int(sizes.sum()) != total:
            raise ValueError(f"leaf_sizes sum to {int(sizes.sum())}, not {total}")
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        blocks = -(-sizes // block)
        cuts = np.repeat(starts, blocks) + block * (
            np.arange(int(blocks.sum())) - np.repeat(np.cumsum(blocks) - blocks, blocks)
        )
        cuts = np.unique(np.concatenate([cuts, [0, total]]))
        above = np.minimum(np.searchsorted(cuts, even), len(cuts) - 1)
        below = np.maximum(above - 1, 0)
        pick = np.where(cuts[above] - even < even - cuts[below], cuts[above], cuts[below])
        even = [int(c) for c in pick]
    return [(even[r], even[r + 1]) for r in range(size)]


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


WHOLE_LEAVES = 1 << 62  # a block no leaf reaches: shards are cut at leaf starts only


def shard_block(tx: Any) -> int:
    """The block :func:`shard_bounds` cuts ``tx``'s shards at: :data:`WHOLE_LEAVES` where a
    stage needs whole leaves (Muon orthogonalises whole matrices), the chunks of the partial
    sums where a fragment sums over the whole tree (``TreeSums``: Prodigy, D-Adaptation, DoG,
    DoWG; 8192, a multiple of 256), else 8-bit state's 256-element blocks."""
    if tx is None:
        return BLOCK_8BIT
    if any(getattr(t.plan, "whole_leaves", False) for t in walk(tx)):
        return WHOLE_LEAVES
    sums = any(getattr(t.plan, "tree_sums", None) is not None for t in walk(tx))
    return TREE_SUMS_BLOCK if sums else BLOCK_8BIT


def plan_shards(leaves: list[Any], comm: Any, block: int = BLOCK_8BIT) -> tuple[DtypeShard, ...]:
    """One :class:`DtypeShard` per dtype of ``leaves``: its leaves, layout and the slice
    of rank ``comm.Get_rank()`` (cut at ``block``-element blocks of the leaves)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    shards = []
    for dtype, idx in by_dtype(leaves).items():
        lay = layout(tuple(leaves[i].shape for i in idx), dtype)
        bounds = shard_bounds(lay.total, size, lay.sizes, block)
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
            cl.enqueue_copy(  # pyright: ignore[reportCallIssue]
                queue,
                view.base_data,  # pyright: ignore[reportArgumentType]
                x.base_data,  # pyright: ignore[reportArgumentType]
                byte_count=(b - a) * item,
                src_offset=x.offset + (a - o) * item,
                dst_offset=view.offset + (a - sh.lo) * item,
            )
    return view


def combine_ranks(comm: Any, queue: cl.CommandQueue) -> Any:
    """The ``combine`` of ``fusion.combine_partials`` over ``comm``: each rank's partial
    sums of its own chunks, zero elsewhere, added by one in-place Allreduce (each chunk is
    one rank's, so the sum is exact and the same on every rank)."""

    def combine(partials: cla.Array, width: int, ranges: list[tuple[int, int]]) -> None:
        host = partials.get(queue)
        keep = np.zeros(host.shape, bool)
        for c0, c1 in ranges:
            keep[c0 * width : c1 * width] = True
        host[~keep] = 0.0
        if comm.Get_size() > 1:
            comm.Allreduce(in_place(), host)
        partials.set(host, queue)

    return combine


def allgatherv(
    comm: Any, host: np.ndarray, counts: tuple[int, ...], displs: tuple[int, ...]
) -> None:
    """In-place ``Allgatherv`` of a host buffer: rank ``r`` contributes
    ``host[displs[r] : displs[r] + counts[r]]``."""
    from mpi4py.util.dtlib import from_numpy_dtype

    data = raw(host)
    comm.Allgatherv(in_place(), [data, list(counts), list(displs), from_numpy_dtype(data.dtype)])
