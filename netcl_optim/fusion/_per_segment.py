"""The executor's side of segment reductions (``_segments``): run a part's reduction
before its fused launches, with its per-leaf state (checked, written in place or fresh), make
that state at ``init``, and compute per-leaf values for measures. No host sync."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._base import Part
from .._device import state_dtype
from .._packing import DonatedArray, contiguous_run, element_offset, layout, pack
from ._checks import (
    all_valid,
    check_leaves,
    flatten,
    flatten_like,
    group_by_dtype,
    path_names,
    queue_of_leaves,
    same_dtype,
)
from ._reductions import acc_ctype
from ._segments import reduce_segments
from ._slices import Slice, slice_for, whole_updates


def segment_values(
    queue: cl.CommandQueue,
    parts: Sequence[Part],
    u_leaves: list[Any],
    p_leaves: list[Any],
    treedef: optree.PyTreeSpec,
    inplace: bool,
    u_role: str,
    summed: bool = False,
) -> tuple[dict[np.dtype, cla.Array], tuple[Any, ...]]:
    """Run the segment reduction that starts ``parts`` (if any) over each dtype group of
    the updates (and params): its values buffer per dtype (see ``_segments``), and the new
    trees of the part's per-segment state (written in place when ``inplace``, else fresh).
    ``summed``: the previous kernel wrote the sums (only the finish runs)."""
    red = parts[0].fragment.segment_reduction if parts else None
    if red is None:
        return {}, ()
    part = parts[0]
    what = part.fragment.name
    groups = group_by_dtype(u_leaves)
    slices = {dtype: slice_for(u_leaves, idx) for dtype, idx in groups.items()}
    per_leaf = [_state_shape(slices[x.dtype]) for x in u_leaves]
    olds = [
        segment_state_leaves(
            tree, treedef, u_leaves, f"state.{name} of {what}", u_role, queue, per_leaf
        )
        for name, tree in zip(red.state, part.segment_state, strict=True)
    ]
    news: list[list[Any]] = [list(leaves) for leaves in olds]
    scalars = tuple(zip(part.fragment.scalars, part.scalars, strict=True))
    acc = acc_ctype(queue)
    out = {}
    for dtype, idx in groups.items():
        us = [u_leaves[i] for i in idx]
        ps = [p_leaves[i] for i in idx] if red.needs_params else []
        s = slices[dtype]
        if s is not None:  # a slice of a tree: the sums over its whole leaves
            us = whole_updates(s, us[0])
            ps = list(s.params or []) if red.needs_params else []
        state, copy_back = [], []
        for f, leaves in enumerate(olds):
            group = [leaves[i] for i in idx]
            old = contiguous_run(group)
            if old is None:  # scattered 0-d arrays: through a packed copy
                packed = pack(group, queue)
                old = (packed[0].base_data, element_offset(packed[0]))
                if inplace:
                    copy_back.append((packed, group))
            if inplace:
                new = old
            else:
                shapes = tuple(per_leaf[i] for i in idx)
                fresh = layout(shapes, state_dtype(dtype)).allocate(queue)
                new = (fresh.buffer, fresh.offset // fresh.views[0].dtype.itemsize)
                for i, view in zip(idx, fresh.views, strict=True):
                    news[f][i] = view
            state.append((old, new))
        out[dtype] = reduce_segments(
            queue, red, us, ps, acc, scalars, tuple(state), sums=not summed
        )
        for packed, group in copy_back:
            for src, dst in zip(packed, group, strict=True):
                copy_array(queue, dst, src)
    new_trees = tuple(optree.tree_unflatten(treedef, leaves) for leaves in news)
    return out, new_trees


def copy_array(queue: cl.CommandQueue, dst: cla.Array, src: cla.Array) -> None:
    """Device-to-device copy of one small array (no host round trip)."""
    cl.enqueue_copy(queue, dst.base_data, src.base_data, byte_count=src.nbytes,  # pyright: ignore[reportCallIssue, reportArgumentType]
                    dst_offset=dst.offset, src_offset=src.offset)  # fmt: skip


def _state_shape(s: Slice | None) -> tuple[int, ...]:
    """A leaf's per-leaf state: one value, or a slice's: one per whole leaf."""
    return () if s is None else (len(s.shapes),)


def segment_state_leaves(
    tree: Any,
    treedef: optree.PyTreeSpec,
    u_leaves: list[Any],
    what: str,
    u_role: str,
    queue: cl.CommandQueue,
    shapes: list[tuple[int, ...]],
) -> list[Any]:
    """The leaves of a per-leaf state tree: like ``u_role``'s, each a device array of the
    state dtype of its leaf and of shape ``shapes[i]`` (``()``; a slice's: one value per
    whole leaf), on ``queue``'s context (raises naming the first that is not)."""
    leaves = flatten_like(tree, treedef, what, u_role)
    base = None  # the context is checked once per buffer (a packed state: once)
    for i, (x, u) in enumerate(zip(leaves, u_leaves, strict=True)):
        want = state_dtype(u.dtype)
        if not isinstance(x, cla.Array) or type(x) is DonatedArray:
            name = path_names(tree)[i]
            raise TypeError(f"{what}: leaf {name} is a {type(x).__name__}, not a device array")
        if x.shape != shapes[i] or x.dtype != want:
            raise ValueError(
                f"{what}: leaf {path_names(tree)[i]} has shape {x.shape} and dtype {x.dtype}; "
                f"expected shape {shapes[i]} and dtype {want} (one value per leaf of {u_role})"
            )
        if x.base_data is not base:
            base = x.base_data
            if x.context != queue.context:
                name = path_names(tree)[i]
                raise ValueError(f"{what}: leaf {name} lives in another OpenCL context")
    return leaves


def init_leaf_values(params: Any, count: int | Sequence[float]) -> list[Any]:
    """``count`` state trees like ``params`` with one zero per leaf (0-d arrays of the state
    dtype, packed in one buffer per dtype): per-leaf state (``SegmentReduction.state``); or
    one tree per value of a sequence, filled with it (``TreeSums.start``)."""
    starts = (0.0,) * count if isinstance(count, int) else tuple(count)
    leaves, treedef = optree.tree_flatten(params)
    if not leaves:
        return [optree.tree_unflatten(treedef, []) for _ in starts]
    queue = queue_of_leaves(leaves)
    groups = group_by_dtype(leaves)
    # a tree's values (TreeSums) are one number in every leaf: in the lowest precision
    lowest = np.float64 if all(state_dtype(d) == np.float64 for d in groups) else np.float32
    trees = []
    for start in starts:
        start = float(lowest(start)) if not isinstance(count, int) else start
        out: list[Any] = [None] * len(leaves)
        for dtype, idx in groups.items():
            s = slice_for(leaves, idx)  # a slice: one value per whole leaf
            shapes = ((len(s.shapes),),) if s is not None else ((),) * len(idx)
            block = layout(shapes, state_dtype(dtype)).allocate(queue)
            block.fill(queue, float(start))
            for i, view in zip(idx, block.views, strict=True):
                out[i] = view
        trees.append(optree.tree_unflatten(treedef, out))
    return trees


def leaf_values(red: Any, tree: Any, params: Any = None) -> Any:
    """``red``'s first output per leaf of ``tree`` (a ``"leaf"`` segment reduction over the
    leaves, and ``params`` when it reads them), as a tree of 0-d arrays of the reduction
    type, packed per dtype; no host sync. Raises for leaves that are not device arrays."""
    leaves, treedef = flatten(tree)
    if not leaves:
        return optree.tree_unflatten(treedef, [])
    queue = queue_of_leaves(leaves)
    p_leaves = flatten_like(params, treedef, "params", "updates") if red.needs_params else []
    others = [("params", p_leaves, same_dtype)] if red.needs_params else []
    if not all_valid(leaves, others, queue):
        check_leaves(leaves, others, tree, queue, "updates")
    acc = acc_ctype(queue)
    acc_dtype = np.dtype(np.float64 if acc == "double" else np.float32)
    if len(red.outputs) != 1:
        raise ValueError("leaf_values: the reduction must have one output")
    out: list[Any] = [None] * len(leaves)
    for idx in group_by_dtype(leaves).values():
        us = [leaves[i] for i in idx]
        ps = [p_leaves[i] for i in idx] if red.needs_params else []
        values = reduce_segments(queue, red, us, ps, acc)  # a workspace: copied out
        block = layout(((),) * len(idx), acc_dtype).allocate(queue)
        nbytes = len(idx) * acc_dtype.itemsize
        cl.enqueue_copy(queue, block.buffer, values.base_data, byte_count=nbytes,  # pyright: ignore[reportCallIssue, reportArgumentType]
                        dst_offset=block.offset)  # fmt: skip
        for i, view in zip(idx, block.views, strict=True):
            out[i] = view
    return optree.tree_unflatten(treedef, out)
