"""Run one segment of fused parts over pytrees: one kernel launch per dtype where every
array role is packed, else one per leaf, with the arguments bound by the names codegen gives
them; in place, the launches are cached by the arrays' identity (``_cache``)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, cast

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._base import PARAMS, Part, SegmentReduction
from .._device import state_dtype
from .._packing import (
    Layout,
    allocate_like,
    contiguous_run,
    element_offset,
    hand_over,
    layout,
)
from . import _cache
from ._checks import (
    Role,
    all_valid,
    check_init_leaves,
    check_leaves,
    check_unshared,
    flatten,
    flatten_like,
    group_by_dtype,
    queue_of_leaves,
    same_dtype,
    slot_dtype,
)
from ._codegen import (
    CHUNKS,
    INDEX,
    OUT,
    P_IN,
    PARTIALS,
    TILE_ARG,
    U_IN,
    Arg,
    KernelSpec,
    reduction_arg,
    scalar_arg,
    segment_arg,
    slot_arg,
    storage_of,
)
from ._launch import Launch, launch_all, leaves_disjoint
from ._per_segment import copy_array, segment_values
from ._programs import fused_kernel
from ._quantized import copy_params, init_quantized, is_eight_bit, run_quantized, state_arrays
from ._reductions import acc_ctype, reduce_parts
from ._segments import chunk_launches, segmentation, tiled_launches, workspace
from ._slices import slice_of, window
from ._slices import slices_active as _slices_active
from ._storage import EightBit, slot_dtype_of, slot_rule
from ._tree_sums import TreeStep, combiner, tree_chunk_launches, tree_part
from ._tree_sums import prepare as prepare_tree


class Binding(NamedTuple):
    """How a fused kernel's arguments (codegen's list) are filled, found by their names:
    ``arrays``, the array roles in argument order (each passed as buffer and offset), then
    the per-step values; ``step_order`` puts those in argument order, as indices into
    ``[each reduction's buffer..., each part's scalars...]`` (``None``: already so)."""

    arrays: tuple[str, ...]
    step_order: tuple[int, ...] | None


_bindings: dict[KernelSpec, Binding] = {}

# Per dtype, the element index (see ``Fragment.element_index``) of the first element of the
# trees being stepped: 0, except where they are a slice of a larger flat buffer (ZeRO).
_ORIGIN: contextvars.ContextVar[Mapping[np.dtype, int] | None] = contextvars.ContextVar(
    "element_origin", default=None
)


@contextlib.contextmanager
def element_origin(origins: Mapping[np.dtype, int]) -> Iterator[None]:
    """Steps run inside see, per dtype, their updates' first element as element index
    ``origins[dtype]`` (ZeRO's shards: their slice's start in the flat buffer), so that
    element-indexed noise is the same bits as the whole tree's."""
    token = _ORIGIN.set({np.dtype(d): int(o) for d, o in origins.items()})
    try:
        yield
    finally:
        _ORIGIN.reset(token)


def _binding(spec: KernelSpec, fragments: Sequence[Any], args: list[Arg]) -> Binding:
    """The :class:`Binding` of the kernel of ``spec`` (``args``: its codegen argument list)."""
    binding = _bindings.get(spec)
    if binding is None:
        offsets = {a.name for a in args if a.kind == "offset"}
        arrays = tuple(a.name for a in args if a.kind == "buffer" and a.name + "_off" in offsets)
        step = [a.name for a in args if a.kind != "offset" and a.name not in arrays]
        if [a.name for a in args[: 2 * len(arrays)] if a.kind == "buffer"] != list(arrays):
            raise AssertionError("a fused kernel takes its arrays before its per-step values")
        natural = [reduction_arg(k) for k, f in enumerate(fragments) if f.reduction is not None]
        natural += [scalar_arg(s, k) for k, f in enumerate(fragments) for s in f.scalars]
        order = tuple(natural.index(name) for name in step)
        binding = Binding(arrays, None if order == tuple(range(len(natural))) else order)
        _bindings[spec] = binding
    return binding


def _step_values(parts: Sequence[Part], reductions: list[Any], order: tuple | None) -> list:
    """This step's values of the per-step arguments, in argument order (see :class:`Binding`)."""
    values = reductions
    for part in parts:
        values.extend(part.scalars)
    return values if order is None else [values[i] for i in order]


def run_parts(
    parts: Sequence[Part],
    updates: Any,
    params: Any,
    *,
    apply: bool,
    inplace: bool,
    donate: bool = False,
    u_role: str = "updates",
    sums: SegmentReduction | None = None,
    summed: bool = False,
) -> tuple[Any, list[tuple[Any, ...]]]:
    """Run ``parts`` (fused) over ``updates``; return the output tree and new slot trees.

    ``sums``: the next parts' segment reduction, summed per chunk by this kernel over its
    output (see :func:`can_sum`), into its workspace; ``summed``: this part's reduction was
    so summed (only its finish runs).

    The output is the new updates, or, with ``apply``, the new params (``p + u``). Pure mode
    writes every output to fresh packed buffers; in place, slots and params are updated
    where they are (the stateful layer's ``step_``). ``donate`` (in place, for
    ``no.step(..., donate=True)``): the arrays written must share no memory with any other
    (checked before the launch); afterwards they are :class:`DonatedArray` and the returned
    trees hold new array objects over the same memory. ``u_role`` names ``updates`` in errors.
    """
    if not parts and not apply:
        return updates, []
    u_leaves, treedef = flatten(updates)
    queue = queue_of_leaves(u_leaves)
    needs_params = apply or any(p.fragment.needs_params for p in parts)
    needs_params = needs_params or (sums is not None and sums.needs_params)
    others: list[Role] = []
    p_leaves: list[Any] = []
    if needs_params:
        if params is None:
            names = [p.fragment.name for p in parts if p.fragment.needs_params] or ["apply"]
            raise ValueError(f"{names[0]} needs params: call update(updates, state, params)")
        p_leaves = flatten_like(params, treedef, "params", u_role)
        others.append(("params", p_leaves, same_dtype))
    slot_leaves: list[list[list[Any]]] = []
    quantized = False
    for part in parts:
        per_part = []
        for name, tree in zip(part.fragment.slots, part.slots, strict=True):
            leaves, other = flatten(tree)
            if other != treedef:  # 8-bit state (a QuantizedState per leaf), or an error
                leaves = flatten_like(tree, treedef, f"state.{name}", u_role, is_eight_bit)
                quantized = True
            others.append((f"state.{name} of {part.fragment.name}", leaves, slot_dtype))
            per_part.append(leaves)
        slot_leaves.append(per_part)
    tk = tree_part(parts)
    if quantized and tk is not None:
        raise ValueError(
            f"{parts[tk].fragment.name}: 8-bit state serves element-wise rules (its step "
            "sums over the whole tree)"
        )
    if quantized:
        return _run_quantized(parts, u_leaves, p_leaves, slot_leaves, treedef, queue, others,
                              apply=apply, inplace=inplace, donate=donate, sums=sums)  # fmt: skip
    fragments = [p.fragment for p in parts]
    keys = tuple(f.key for f in fragments)
    if any(f.element_index for f in fragments):  # the launches hold the index origin
        keys = (*keys, tuple(sorted((_ORIGIN.get() or {}).items(), key=str)))
    cache_key = None
    tree_leaves = [optree.tree_leaves(t) for t in parts[tk].segment_state] if tk is not None else []
    cached = inplace and apply and not (tk is not None and combiner() is not None)
    if cached:
        cache_key = _cache.key(queue, keys, u_leaves, p_leaves, [*slot_leaves, tree_leaves])
        found = _cache.lookup(cache_key, donate)
        if found is not None:
            hit, objs = found
            segment_values(queue, parts, u_leaves, p_leaves, treedef, inplace, u_role, summed)
            values = _step_values(parts, reduce_parts(parts, u_leaves, queue), hit.step_order)
            launch_all(queue, _cache.bind(hit, objs, values), hit.independent)
            if not donate:
                return params, [(*part.slots, *part.segment_state) for part in parts]
            p_leaves, slot_leaves = _hand_over(p_leaves, slot_leaves, True)
            # (the tree state is not donated: the same arrays, after the written ones)
            written = [*_written(p_leaves, slot_leaves), *(x for xs in tree_leaves for x in xs)]
            new_key = _cache.key(queue, keys, u_leaves, p_leaves, [*slot_leaves, tree_leaves])
            _cache.move(cache_key, new_key, hit, len(u_leaves), written)
            trees = _slot_trees(treedef, slot_leaves)
            trees = [(*t, *part.segment_state) for t, part in zip(trees, parts, strict=True)]
            return optree.tree_unflatten(treedef, p_leaves), trees
    if not all_valid(u_leaves, others, queue):
        check_leaves(u_leaves, others, updates, queue, u_role)

    inplace_params = inplace and apply
    seg_values, seg_state = segment_values(
        queue, parts, u_leaves, p_leaves, treedef, inplace, u_role, summed
    )
    tree = None
    if tk is not None:
        if sums is not None or (parts[0].fragment.segment_reduction is not None and tk):
            raise ValueError(f"{parts[tk].fragment.name}: tree sums cannot fuse with a value "
                             "per leaf or row in one kernel")  # fmt: skip
        tree = prepare_tree(queue, parts, tk, u_leaves, p_leaves, slot_leaves, treedef,
                            inplace, u_role)  # fmt: skip
    launches, binding, out_leaves, new_slot_leaves, packed_bases = _plan_launches(
        queue, fragments, u_leaves, p_leaves, slot_leaves, apply, inplace, needs_params,
        seg_values, sums, tree,
    )  # fmt: skip
    if donate and (packed_bases is None or len(set(packed_bases)) != len(packed_bases)):
        # no array written may share memory with another (sure already if every role is
        # packed in a buffer of its own)
        roles_w = [(u_role, u_leaves, False)]
        if needs_params:
            roles_w.append(("params", p_leaves, inplace_params))
        roles_w.extend(
            (what, leaves, True) for what, leaves, dtype_of in others if dtype_of is slot_dtype
        )
        check_unshared([(role, updates, leaves, w) for role, leaves, w in roles_w])
    values = _step_values(parts, reduce_parts(parts, u_leaves, queue), binding.step_order)
    if tree is not None:
        launches = _tree_order(tree, launches, queue, values)
        if tree.post:  # scattered in-place state: copied back after the launches
            cache_key = None
    # Pure, every output is fresh; in place, the tree's leaves must not share memory.
    independent = (
        tree is None
        and len(launches) > 1
        and (
            not inplace
            or (
                cache_key is not None
                and leaves_disjoint(
                    [u_leaves, p_leaves, *(ls for per in slot_leaves for ls in per)]
                )
            )
        )
    )
    launch_all(queue, [(kernel, n, args + values) for kernel, n, args in launches], independent)
    if tree is not None:
        for packed, group in tree.post:
            for src, dst in zip(packed, group, strict=True):
                copy_array(queue, dst, src)
    if donate:
        p_leaves, slot_leaves = _hand_over(p_leaves, slot_leaves, inplace_params)
        if inplace_params:
            out_leaves = p_leaves
        new_slot_leaves = slot_leaves
    if cache_key is not None:
        if donate:  # keyed by the new arrays
            _cache.discard(cache_key)
            cache_key = _cache.key(queue, keys, u_leaves, p_leaves, [*slot_leaves, tree_leaves])
        leaves = [
            *u_leaves,
            *_written(p_leaves, slot_leaves),
            *(x for xs in tree_leaves for x in xs),
        ]
        _cache.store(cache_key, leaves, launches, independent, donate, binding.step_order)
    trees = _slot_trees(treedef, new_slot_leaves)
    if seg_state:
        trees[0] = (*trees[0], *seg_state)
    if tree is not None:
        trees[tree.k] = (*trees[tree.k], *tree.new_state)
    elif tk is not None:  # (no leaves)
        trees[tk] = (*trees[tk], *parts[tk].segment_state)
    return optree.tree_unflatten(treedef, out_leaves), trees


def _tree_order(
    tree: TreeStep, fused: list[Launch], queue: cl.CommandQueue, values: list[Any]
) -> list[Launch]:
    """The step's launches in order with its tree sums': pre-pass, finish, fused kernel
    (``after=False``) or fused kernel, finish. On a ZeRO slice the launches before the
    finish run now, then every rank's partials are added (``combine_partials``), and the
    rest is returned."""
    before = [*tree.pre] if not tree.tree.after else [*fused]
    rest = [tree.finish, *fused] if not tree.tree.after else [tree.finish]
    combine = combiner()
    if combine is None:
        return before + rest
    launch_all(queue, [(kernel, n, args + values) for kernel, n, args in before], False)
    combine(tree.partials, len(tree.tree.terms), tree.chunk_ranges)
    return rest


def _plan_launches(
    queue: cl.CommandQueue,
    fragments: list[Any],
    u_leaves: list[Any],
    p_leaves: list[Any],
    slot_leaves: list[list[list[Any]]],
    apply: bool,
    inplace: bool,
    needs_params: bool,
    seg_values: dict[np.dtype, cla.Array],
    sums: SegmentReduction | None = None,
    tree: TreeStep | None = None,
) -> tuple[list[Launch], Binding, list[Any], list[list[list[Any]]], list[int] | None]:
    """The fused kernel's launches (array arguments only, bound by name; one per dtype where
    every role is packed, else one per leaf; tiled where a segment reduction starts the
    fragments: see ``_segments``), with fresh outputs allocated: ``(launches, binding,
    output leaves, new slot leaves, every role's buffer id while all are packed)``."""
    acc = acc_ctype(queue)
    ctx = queue.context
    by_dtype = group_by_dtype(u_leaves)
    single = len(by_dtype) == 1
    n_leaves = len(u_leaves)
    out_leaves: list[Any] = [None] * n_leaves
    new_slot_leaves = [[[None] * n_leaves for _ in per] for per in slot_leaves]
    inplace_params = inplace and apply
    mode = "inplace" if inplace else "pure"
    keys = tuple(f.key for f in fragments)
    origins = _ORIGIN.get() or {}

    def pick(leaves: list[Any], idx: list[int]) -> list[Any]:
        return leaves if single else [leaves[i] for i in idx]

    def place(dst: list[Any], idx: list[int], src: list[Any]) -> None:
        if single:
            dst[:] = src
        else:
            for i, o in zip(idx, src, strict=True):
                dst[i] = o

    launches: list[Launch] = []
    binding = Binding((), None)
    arrays: dict[str, list[cla.Array]] = {}  # per dtype group: each array role's leaves
    runs: dict[str, tuple[Any, int] | None] = {}  # their (buffer, element offset) if packed
    packed_bases: list[int] | None = []

    def add_input(name: str, leaves: list[cla.Array], lay_: Layout) -> None:
        arrays[name] = leaves
        runs[name] = contiguous_run(leaves, lay_)

    def add_fresh(name: str, lay_: Layout) -> list[cla.Array]:
        block = lay_.allocate(queue)
        arrays[name] = block.views
        runs[name] = (block.buffer, block.offset // lay_.dtype.itemsize)
        return block.views

    red = fragments[0].segment_reduction if fragments else None
    for dtype, idx in by_dtype.items():
        tiling = ""
        if red is not None:  # groups stepping across segments need the per-lane form
            sl = slice_of(dtype) if len(idx) == 1 else None
            if sl is not None and u_leaves[idx[0]].shape == (sl.hi - sl.lo,):
                seg = window(segmentation(sl.shapes, red.segments), sl.lo, sl.hi)
            else:
                seg = segmentation(tuple(u_leaves[i].shape for i in idx), red.segments)
            tiling = "full_stepped" if seg.stepped else "full"
        slot_dtypes = _slot_storage(slot_leaves, idx, dtype)
        storage = tuple(storage_of(d) for d in slot_dtypes) if slot_dtypes else ()
        chunk_sums: Any = sums
        tree_ctype = ""
        if tree is not None and tree.tree.after:
            chunk_sums, tree_ctype = tree.tree, tree.ctype
        spec = KernelSpec(keys, dtype, mode, apply, needs_params, acc, tiling, chunk_sums, storage,
                          tree_ctype)  # fmt: skip
        kernel, args = fused_kernel(ctx, fragments, spec)
        binding = _binding(spec, fragments, args)
        group_u = pick(u_leaves, idx)
        lay = layout(tuple([x.shape for x in group_u]), dtype)
        slot_lays = iter([layout(lay.shapes, d) for d in slot_dtypes] or [])
        default_lay = layout(lay.shapes, state_dtype(dtype))
        arrays.clear()
        runs.clear()
        add_input(U_IN, group_u, lay)
        if needs_params:
            add_input(P_IN, pick(p_leaves, idx), lay)
        outs = arrays[P_IN] if inplace_params else add_fresh(OUT, lay)
        place(out_leaves, idx, outs)
        for k, per in enumerate(slot_leaves):
            for s, (slot, leaves) in enumerate(zip(fragments[k].slots, per, strict=True)):
                ins = pick(leaves, idx)
                slot_lay = next(slot_lays, default_lay)
                if mode == "pure":
                    add_input(slot_arg(slot, k, "in"), ins, slot_lay)
                    news = add_fresh(slot_arg(slot, k, "out"), slot_lay)
                else:
                    add_input(slot_arg(slot, k), ins, slot_lay)
                    news = ins
                place(new_slot_leaves[k][s], idx, news)
        origin = origins.get(dtype, 0)
        tree_group = tree.groups[dtype] if tree is not None else None
        tree_fixed = tree_group.fixed if tree_group is not None else {}
        if tree is not None and tree.tree.after:  # a work-item per chunk of the tree's leaves
            assert tree_group is not None
            fixed = {
                CHUNKS: (tree_group.seg.tables(queue)["chunks"].base_data, 0),
                PARTIALS: (tree.partials.base_data, tree_group.base * len(tree.tree.terms)),
                **tree_fixed,
            }
            if INDEX in binding.arrays:
                fixed[INDEX] = (arrays[U_IN][0].base_data, origin)
            columns = [
                (name, None if name in fixed else arrays.get(name), fixed.get(name, runs.get(name)))
                for name in binding.arrays
            ]
            launches.extend(
                tree_chunk_launches(tree_group.seg, kernel, columns, lay.offsets, dtype)
            )
            packed_bases = None
            continue
        if sums is not None:  # a work-item per chunk of the next part's segments
            sum_seg = segmentation(tuple(x.shape for x in group_u), sums.segments)
            acc_dtype = np.dtype(np.float64 if acc == "double" else np.float32)
            partials, _ = workspace(queue, sum_seg, sums, dtype, acc_dtype)
            fixed = {
                CHUNKS: (sum_seg.tables(queue)["chunks"].base_data, 0),
                PARTIALS: (partials.base_data, 0),
            }
            if INDEX in binding.arrays:
                fixed[INDEX] = (arrays[U_IN][0].base_data, origin)
            columns = [
                (name, None if name in fixed else arrays.get(name), fixed.get(name, runs.get(name)))
                for name in binding.arrays
            ]
            launches.extend(chunk_launches(sum_seg, kernel, columns, lay.offsets, CHUNKS))
            packed_bases = None  # (a step with sums is never the donated, final one)
            continue
        if red is not None:
            partial_tiling = tiling.replace("full", "partial")
            partial, _ = fused_kernel(ctx, fragments, spec._replace(tiling=partial_tiling))
            groups = seg.tables(queue)["groups"].base_data
            fixed = {segment_arg(0): (seg_values[dtype].base_data, 0), **tree_fixed}
            if INDEX in binding.arrays:  # elements are indexed by their place in the layout
                fixed[INDEX] = (arrays[U_IN][0].base_data, origin)
            columns = [
                (name, None if name in fixed else arrays.get(name), fixed.get(name, runs.get(name)))
                for name in binding.arrays
            ]
            tiled = tiled_launches(seg, (kernel, partial), groups, columns, lay.offsets, TILE_ARG)
            launches.extend(tiled)
            if packed_bases is not None and all(
                run is not None for name, _, run in columns if name != TILE_ARG
            ):
                packed_bases.extend(
                    id(run[0]) for name, _, run in columns if name not in fixed and name != TILE_ARG
                )
            else:
                packed_bases = None
            continue
        if INDEX in binding.arrays:  # the updates' buffer (not read), the first index
            u_run = cast("tuple[Any, int]", runs[U_IN])  # (when not None)
            runs[INDEX] = None if runs[U_IN] is None else (u_run[0], origin)
            arrays[INDEX] = arrays[U_IN]
        runs.update(tree_fixed)
        bound = [runs[name] for name in binding.arrays]
        if None not in bound:
            if packed_bases is not None:
                written = [run for n, run in zip(binding.arrays, bound, strict=True) if n != INDEX]
                packed_bases.extend(id(base) for base, _ in cast("list[tuple[Any, int]]", written))
            if lay.total:
                runs_bound = cast("list[tuple[Any, int]]", bound)  # (no None)
                launches.append((kernel, lay.total, [v for run in runs_bound for v in run]))
        else:
            packed_bases = None
            columns = [arrays.get(name, []) for name in binding.arrays]
            for j, size in enumerate(lay.sizes):
                if size:
                    leaf_args = []
                    for name, column in zip(binding.arrays, columns, strict=True):
                        if name in tree_fixed:
                            leaf_args += list(tree_fixed[name])
                            continue
                        a = column[j]
                        off = origin + lay.offsets[j] if name == INDEX else element_offset(a)
                        leaf_args += [a.base_data, off]
                    launches.append((kernel, size, leaf_args))
    return launches, binding, out_leaves, new_slot_leaves, packed_bases


def _run_quantized(
    parts: Sequence[Part],
    u_leaves: list[Any],
    p_leaves: list[Any],
    slot_leaves: list[list[list[Any]]],
    treedef: optree.PyTreeSpec,
    queue: cl.CommandQueue,
    others: list[Role],
    *,
    apply: bool,
    inplace: bool,
    donate: bool,
    sums: SegmentReduction | None,
) -> tuple[Any, list[tuple[Any, ...]]]:
    """``run_parts`` where a slot holds 8-bit state (see ``_quantized``)."""
    if donate:
        raise ValueError("donate=True is not supported with 8-bit state: step without it")
    if sums is not None:
        raise ValueError("8-bit state serves element-wise rules (not values per leaf or row)")
    params_role = [r for r in others if r[0] == "params"]
    if params_role and not all_valid(u_leaves, params_role, queue):
        check_leaves(u_leaves, params_role, optree.tree_unflatten(treedef, u_leaves), queue,
                     "updates")  # fmt: skip
    elif not params_role:
        check_leaves(u_leaves, [], optree.tree_unflatten(treedef, u_leaves), queue, "updates")
    names = [[f"state.{s} of {p.fragment.name}" for s in p.fragment.slots] for p in parts]
    cache_key = None
    if inplace and apply:  # the same arrays every step: the launches are kept (see _cache)
        arrays = state_arrays(slot_leaves)
        keys = tuple(p.fragment.key for p in parts)
        if any(p.fragment.element_index for p in parts):  # the launches hold the origin
            keys = (*keys, tuple(sorted((_ORIGIN.get() or {}).items(), key=str)))
        cache_key = _cache.key(queue, keys, u_leaves, p_leaves, [arrays])
        found = _cache.lookup(cache_key, False)
        if found is not None:
            hit, objs = found
            values = reduce_parts(parts, u_leaves, queue)
            for part in parts:
                values.extend(part.scalars)
            launch_all(queue, _cache.bind(hit, objs, values), False)
            return optree.tree_unflatten(treedef, p_leaves), [tuple(p.slots) for p in parts]
    launched: list[Any] = []
    out_leaves, new_slot_leaves = run_quantized(
        parts, u_leaves, p_leaves, slot_leaves, treedef, queue,
        apply=apply, inplace=inplace, names=names, launched=launched, origins=_ORIGIN.get(),
    )  # fmt: skip
    if cache_key is not None:
        written = [x for role in arrays for x in role]
        _cache.store(cache_key, [*u_leaves, *p_leaves, *written], launched, False, False, None)
    return optree.tree_unflatten(treedef, out_leaves), _slot_trees(treedef, new_slot_leaves)


def _slot_storage(
    slot_leaves: list[list[list[Any]]], idx: list[int], dtype: np.dtype
) -> tuple[np.dtype, ...]:
    """The storage dtype of each slot (parts' slots in order) over the leaves ``idx`` of an
    updates dtype group, ``()`` where all are the state dtype; raises ValueError for a slot
    whose leaves there are stored in two dtypes (one kernel loads each slot one way)."""
    default = state_dtype(dtype)
    found = []
    for per in slot_leaves:
        for leaves in per:
            kinds = {leaves[i].dtype for i in idx}
            if len(kinds) != 1:
                raise ValueError(
                    f"a state slot's leaves for {dtype} updates are stored in several dtypes "
                    f"({', '.join(sorted(map(str, kinds)))}): one dtype per slot and dtype group"
                )
            found.append(kinds.pop())
    return () if all(d == default for d in found) else tuple(found)


def _written(p_leaves: list[Any], slot_leaves: list[list[list[Any]]]) -> list[Any]:
    """The params' leaves, then every part's slot leaves: what an in-place step writes."""
    written = list(p_leaves)
    for per in slot_leaves:
        for ls in per:
            written += ls
    return written


def _slot_trees(treedef: optree.PyTreeSpec, slot_leaves: list[list[list[Any]]]) -> list[tuple]:
    return [tuple(optree.tree_unflatten(treedef, ls) for ls in per) for per in slot_leaves]


def _hand_over(
    p_leaves: list[Any], slot_leaves: list[list[list[Any]]], with_params: bool
) -> tuple[list[Any], list[list[list[Any]]]]:
    """After a donated launch: the arrays it wrote (the params' if ``with_params``, and the
    slots') become :class:`DonatedArray`; returns the params' and slots' leaves with the new
    array objects in their place."""
    fresh = hand_over(_written(p_leaves if with_params else [], slot_leaves))
    k = len(p_leaves) if with_params else 0
    new_p = fresh[:k] if with_params else p_leaves
    new_slots = []
    for per in slot_leaves:
        new_per = []
        for ls in per:
            new_per.append(fresh[k : k + len(ls)])
            k += len(ls)
        new_slots.append(new_per)
    return new_p, new_slots


def init_slots(
    params: Any,
    count: int | Sequence[Any],
    names: Sequence[str] = (),
    nonnegative: Sequence[str] = (),
) -> list[Any]:
    """State trees shaped like ``params``, each packed in one buffer per dtype: ``count``
    zeroed ones, or one per value of a sequence, filled with that value (``_base.PARAMS``:
    a copy of the params' values). Slots given
    ``names`` (a fragment's) are stored as the active ``slot_storage`` rule says (see
    ``_storage``: a dtype, or 8 bits with the unsigned map for the ``nonnegative`` ones);
    the others in the state dtype."""
    starts = (0.0,) * count if isinstance(count, int) else tuple(count)
    leaves, treedef = optree.tree_flatten(params)
    if not leaves:
        return [optree.tree_unflatten(treedef, []) for _ in starts]
    queue = queue_of_leaves(leaves)
    check_init_leaves(leaves, params, queue)
    trees = []
    for s, start in enumerate(starts):
        rule = slot_rule(names[s]) if names else None
        fill = 0.0 if start is PARAMS else start
        if isinstance(rule, EightBit):
            signed = rule.signed or names[s] not in nonnegative
            new = init_quantized(leaves, queue, fill, signed, rule.min_size)
        else:
            dtype_of = slot_dtype_of(names[s]) if names else state_dtype
            new = allocate_like(leaves, queue, dtype_of, fill=fill)
        if start is PARAMS:
            copy_params(new, leaves, queue)
        trees.append(optree.tree_unflatten(treedef, new))
    return trees


def can_sum(parts: Sequence[Part], red: SegmentReduction, updates: Any, params: Any) -> bool:
    """Whether ``parts`` (not the step's last: their output is written) can sum the next
    parts' segment reduction ``red`` over their output in their own kernel (see
    ``_codegen.sums_body``), one pass fewer than a reduce launch: when they start no
    segment reduction of their own (their kernel is not tiled), every segment of ``red`` is
    contiguous (no columns), the params are given where ``red`` reads them, and the step is
    not on a ZeRO slice (whose sums run over the whole leaves)."""
    if not parts or parts[0].fragment.segment_reduction is not None:
        return False
    if any(p.fragment.tree_sums is not None for p in parts):  # (its kernel sums those)
        return False
    if red.needs_params and params is None:
        return False
    if _slices_active():
        return False
    leaves, _ = flatten(updates)
    if not leaves:
        return False
    for idx in group_by_dtype(leaves).values():
        shapes = tuple(leaves[i].shape for i in idx)
        seg = segmentation(shapes, red.segments)
        # every element in a chunk (rows leave vectors out), none in columns
        if len(seg.strided) or int(seg.chunks[:, 1].sum()) != layout(shapes, np.float32).total:
            return False
    return True
