"""Scalars fed by sums over the whole tree (``TreeSums``: the step size of Prodigy,
D-Adaptation, DoG, DoWG), kept on the device: no host sync.

A step of a fragment with tree sums runs, whatever the tree's leaves (per dtype group where
the tree mixes dtypes, one finish for all):

- ``after=True`` (D-Adaptation: the sums feed the next step): the fused kernel itself, in
  its chunk form (a work-item per chunk of at most ``CHUNK`` elements of one leaf, see
  ``_codegen.sums_body``), sums the variables the source assigns into one partial per
  chunk and term; then a **finish** launch (one work-item) adds the partials in chunk order
  and runs the statements, which write the state fields. 2 launches (one fused kernel per
  leaf where the tree is not packed).
- ``after=False`` (DoG, DoWG, Prodigy: the sums feed this step): a **pre-pass** kernel in
  the same chunk form sums the terms over the updates, params and slots before the step,
  the finish writes the state fields and the outputs, then the fused kernel reads the
  outputs. 3 launches.

Chunks start at each leaf's first element, and the finish adds the partials in the tree's
order, so a packed tree and the same tree as separate arrays give the same bits. The state
fields are trees of 0-d arrays like the params, all holding the tree's value (the finish
writes every leaf's), so the stateful layer keeps them as a per-parameter key and ZeRO as
per-leaf state. In a tree that mixes dtypes the finish computes in the lowest precision and
every fused kernel reads the first group's values: one number for the whole tree.

On a ZeRO shard (a slice of the flat parameters cut at chunk boundaries,
``distributed.shard_block``), each rank sums its own chunks, the ``combine`` hook set by the
sharded step adds every rank's partials (zero where a rank has no chunk, so the sum is
exact), and every rank's finish sees the same partials: the same bits as unsharded.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._base import Fragment, TreeSums
from .._device import state_dtype
from .._packing import contiguous_run, element_offset, layout, pack
from ._checks import group_by_dtype
from ._codegen import (
    CHUNKS,
    P_IN,
    PARTIALS,
    U_IN,
    Arg,
    KernelSpec,
    kernel_preamble,
    kernel_text,
    load,
    part_lines,
    scalar_arg,
    slot_arg,
    state_ctype,
    step_arguments,
    storage_of,
    sums_body,
    tree_outputs_arg,
    tree_state_arg,
)
from ._launch import Launch, Single
from ._per_segment import segment_state_leaves
from ._programs import arg_dtypes, build
from ._reductions import acc_ctype
from ._segments import CHUNK, chunk_launches, segmentation
from ._slices import slice_of

# ZeRO cuts the shards of a rule with tree sums at these blocks of each leaf (the chunks)
TREE_SUMS_BLOCK = CHUNK

# Set by a ZeRO step: adds every rank's partials (see combine_partials).
_COMBINE: contextvars.ContextVar[Callable[..., None] | None] = contextvars.ContextVar(
    "tree_sums_combine", default=None
)


@contextlib.contextmanager
def combine_partials(combine: Callable[..., None]) -> Iterator[None]:
    """Steps run inside add every rank's partial sums with ``combine(partials, width,
    (c0, c1))`` before their finish (ZeRO): ``partials`` (a device array, ``width`` values
    per chunk) holds this rank's sums of the chunks ``c0 <= c < c1``; ``combine`` replaces
    it, in place, by every rank's (each rank's own chunks, added in rank order: as each
    chunk is one rank's, the sum is exact)."""
    token = _COMBINE.set(combine)
    try:
        yield
    finally:
        _COMBINE.reset(token)


def combiner() -> Callable[..., None] | None:
    return _COMBINE.get()


def tree_part(parts: Sequence[Any]) -> int | None:
    """The index of the part with tree sums among ``parts`` (at most one), if any."""
    found = [k for k, p in enumerate(parts) if p.fragment.tree_sums is not None]
    if len(found) > 1:
        names = ", ".join(parts[k].fragment.name for k in found)
        raise ValueError(f"one step fuses at most one rule with tree sums ({names}): chain "
                         "them in separate steps")  # fmt: skip
    return found[0] if found else None


def _scalars(frag: Fragment, k: int) -> list[str]:
    return [f"    const real {s} = {scalar_arg(s, k)};" for s in frag.scalars]


def prepass_source(
    fragments: Sequence[Fragment],
    k: int,
    dtype: np.dtype,
    slot_storage: Sequence[str],
    acc: str,
    tree_ctype: str = "",
) -> tuple[str, str, list[Arg]]:
    """The pre-pass of part ``k``'s ``TreeSums(after=False)``: one partial per chunk and
    term, in the chunk form of a fused kernel that sums. The element-wise parts before it
    run first (their slots read, not written: the fused kernel writes them), then the terms
    over ``u``, ``p``, part ``k``'s slots, the state fields and the scalars. It takes the
    step's per-step arguments (those of every part of the fused kernel), so one list of
    values binds both. ``slot_storage``: parts ``0..k``'s slots' storage, in order."""
    frag = fragments[k]
    tree = frag.tree_sums
    assert tree is not None and not tree.after
    storage = storage_of(dtype)
    real = "double" if storage == "double" else "float"
    text = repr(("prepass", k, [f.key for f in fragments], storage, tuple(slot_storage),
                 tree_ctype))  # fmt: skip
    name = "netcl_treesum_" + hashlib.sha1(text.encode()).hexdigest()[:10]
    params: list[str] = []
    args: list[Arg] = []
    buffer = _buffers(params, args)

    buffer(U_IN, _pointer(storage), True)
    buffer(P_IN, _pointer(storage), True)
    storages = iter(slot_storage)
    slot_of: dict[tuple[int, str], str] = {}
    for j, f in enumerate(fragments[: k + 1]):
        for slot in f.slots:
            slot_of[j, slot] = next(storages)
            buffer(slot_arg(slot, j, "in"), _pointer(slot_of[j, slot]), True)
    for f in tree.state:  # (the first dtype group's: ``tree_ctype``)
        buffer(tree_state_arg(f, k), tree_ctype or state_ctype(real), True)
    buffer(CHUNKS, "long", True)
    buffer(PARTIALS, acc, False)
    step_arguments(fragments, acc, params, args)

    def load_slot(j: int, slot: str) -> str:
        src = slot_arg(slot, j, "in")
        return load(slot_of[j, slot], src, src + "_off + i")

    terms = tuple(f"t{j}" for j in range(len(tree.terms)))
    element = [
        f"    real u = {load(storage, U_IN, U_IN + '_off + i')};",
        f"    const real p = {load(storage, P_IN, P_IN + '_off + i')};",
        f"    real {', '.join(terms)};",
    ]
    for j, f in enumerate(fragments[:k]):  # (no stores: the fused kernel writes the slots)
        element += part_lines(f, j, load_slot, lambda j, slot: "")
    element += [
        "    {",
        *("    " + line for line in _scalars(frag, k)),
        *(f"        const real {f} = (real){tree_state_arg(f, k)}[{tree_state_arg(f, k)}_off];"
          for f in tree.state),
        *(f"        const real {slot} = {load_slot(k, slot)};" for slot in frag.slots),
        *(f"        {t} = {expr};" for t, expr in zip(terms, tree.terms, strict=True)),
        "    }",
    ]  # fmt: skip
    spec = KernelSpec((), np.dtype(dtype), "pure", False, True, acc, sums=TreeSums(
        tree.state, terms, tree.statements, tree.outputs, tree.after))  # fmt: skip
    body = sums_body(element, spec, storage, real)
    head = f"//CL// {name}: sums of {frag.name}\n" + _head(real, acc, storage, slot_storage)
    return kernel_text(head, name, params, body), name, args


def finish_source(
    fragments: Sequence[Fragment], k: int, real: str, acc: str, groups: tuple[str, ...]
) -> tuple[str, str, list[Arg]]:
    """The finish of part ``k``'s tree sums: one work-item adds the partials in order (in
    the reduction type), runs the statements in ``real`` (the tree's lowest precision; the
    sums cast to it) from the state as the first dtype group holds it, writes each state
    field to every leaf's value in every group (``groups``: each one's state C type) and
    the outputs to their buffer. It takes the step's per-step arguments, as the pre-pass."""
    frag = fragments[k]
    tree = frag.tree_sums
    assert tree is not None
    text = repr(("finish", frag.key, k, [f.key for f in fragments], real, acc, groups))
    name = "netcl_treefinish_" + hashlib.sha1(text.encode()).hexdigest()[:10]
    params: list[str] = []
    args: list[Arg] = []
    buffer = _buffers(params, args)

    buffer(PARTIALS, acc, True)
    buffer("n_chunks", "uchar", True)  # (the count as the offset of an unread buffer)
    for g, st in enumerate(groups):
        for f in tree.state:
            buffer(f"{f}_in_{g}", st, True)
            buffer(f"{f}_out_{g}", st, False)
        buffer(f"n_leaves_{g}", "uchar", True)
    buffer(tree_outputs_arg(k), acc, False)
    step_arguments(fragments, acc, params, args)
    width = len(tree.terms)
    state = set(tree.state)
    body = [
        *(f"    {acc} sum{t} = 0;" for t in range(width)),
        "    for (long c = 0; c < n_chunks_off; c++) {",
        *(f"        sum{t} = sum{t} + {PARTIALS}[{PARTIALS}_off + {width} * c + {t}];"
          for t in range(width)),
        "    }",
        *(f"    const real s{t} = (real)sum{t};" for t in range(width)),
        *_scalars(frag, k),
        *(f"    real {f} = (real){f}_in_0[{f}_in_0_off];" for f in tree.state),
        *_statements(tree.statements, state),
    ]  # fmt: skip
    for g in range(len(groups)):
        body += [
            f"    for (long j = 0; j < n_leaves_{g}_off; j++) {{",
            *(f"        {f}_out_{g}[{f}_out_{g}_off + j] = {f};" for f in tree.state),
            "    }",
        ]
    body += [f"    {tree_outputs_arg(k)}[{tree_outputs_arg(k)}_off + {j}] = {out};"
             for j, out in enumerate(tree.outputs)]  # fmt: skip
    head = f"//CL// {name}: finish of {frag.name}\n" + _head(real, acc, real, ())
    return kernel_text(head, name, params, body), name, args


def _buffers(params: list[str], args: list[Arg]) -> Callable[[str, str, bool], None]:
    """``buffer(name, ctype, const)``: a buffer-and-offset argument, appended to a kernel's
    declarations ``params`` and its ``args``."""

    def buffer(arg: str, ctype: str, const: bool) -> None:
        q = "const " if const else ""
        params.append(f"__global {q}{ctype} *restrict {arg}, const long {arg}_off")
        args.extend([Arg(arg, "buffer"), Arg(arg + "_off", "offset")])

    return buffer


def _statements(statements: Sequence[tuple[str, str]], state: set[str]) -> list[str]:
    """The finish's statements: a state field or a local assigned again is assigned, a new
    local declared (``real``)."""
    known = set(state)
    lines = []
    for name, expr in statements:
        lines.append(f"    {name} = {expr};" if name in known else f"    real {name} = {expr};")
        known.add(name)
    return lines


def _pointer(storage: str) -> str:
    return "ushort" if storage == "bf16" else storage


def _head(real: str, acc: str, storage: str, slot_storage: Sequence[str]) -> str:
    spec = KernelSpec((), np.dtype(np.float64 if real == "double" else np.float32), "pure",
                      False, True, acc, slot_storage=tuple(slot_storage))  # fmt: skip
    return kernel_preamble(real, spec, storage, False)


_kernels: dict[tuple, tuple[cl.Kernel, list[Arg]]] = {}


def tree_kernel(
    context: cl.Context, which: str, fragments: Sequence[Fragment], k: int, dtype: np.dtype,
    slot_storage: Sequence[str], acc: str, groups: tuple[str, ...] = (),
) -> tuple[cl.Kernel, list[Arg]]:  # fmt: skip
    """The pre-pass (``which="prepass"``, of part ``k``, over ``dtype`` leaves) or the finish of
    part ``k`` (in ``dtype``'s compute type, over ``groups``), built once per context."""
    key = (context, which, tuple(f.key for f in fragments), k, np.dtype(dtype),
           tuple(slot_storage), acc, groups)  # fmt: skip
    hit = _kernels.get(key)
    if hit is None:
        real = "double" if np.dtype(dtype) == np.float64 else "float"
        if which == "prepass":
            source, name, args = prepass_source(fragments, k, dtype, slot_storage, acc, *groups)
        else:
            source, name, args = finish_source(fragments, k, real, acc, groups)
        real_dtype = np.dtype(np.float64 if real == "double" else np.float32)
        hit = _kernels[key] = (build(context, source, name, arg_dtypes(args, real_dtype)), args)
    return hit


class Group(NamedTuple):
    """One dtype group's part of a tree-sum step: its chunks (``seg``), where its partials
    start (``base``, in chunks), the chunks this step sums (``c0 <= c < c1``: a ZeRO rank's,
    else all) and the fused kernel's extra arguments (``fixed``: name -> (buffer, offset))."""

    seg: Any
    base: int
    c0: int
    c1: int
    fixed: dict[str, tuple[Any, int]]


class TreeStep(NamedTuple):
    """One step's tree-sum work for the part ``k``: the launches before the fused kernel
    (``pre``: the pre-pass, ``after=False``), the ``finish`` launch, per dtype its
    :class:`Group`, the partials, the new state trees, the copies back into scattered
    in-place state (``post``: ``(packed, leaves)`` pairs, after the finish) and the C type
    of the first group's state."""

    k: int
    tree: TreeSums
    pre: list[Launch]
    finish: Launch
    groups: dict[Any, Group]
    partials: cla.Array
    new_state: tuple[Any, ...]
    post: list[tuple[Any, Any]]
    ctype: str  # the C type of the first group's state, which every fused kernel reads

    @property
    def chunk_ranges(self) -> list[tuple[int, int]]:
        """The partials (in chunks) this step wrote: every group's ``[base + c0, base + c1)``."""
        return [(g.base + g.c0, g.base + g.c1) for g in self.groups.values()]


_partials: dict[tuple, cla.Array] = {}
_outputs: dict[tuple, cla.Array] = {}


def _workspace(cache: dict, key: tuple, queue: cl.CommandQueue, n: int, dtype: Any) -> cla.Array:
    ws = cache.get(key)
    if ws is None:
        ws = cache[key] = cla.zeros(queue, (max(n, 1),), dtype)
    return ws


def prepare(
    queue: cl.CommandQueue,
    parts: Sequence[Any],
    k: int,
    u_leaves: list[Any],
    p_leaves: list[Any],
    slot_leaves: list[list[list[Any]]],
    treedef: Any,
    inplace: bool,
    u_role: str,
) -> TreeStep | None:
    """Check part ``k``'s tree state and plan its launches (see the module's docstring);
    ``None`` for a tree without leaves."""
    part = parts[k]
    frag = part.fragment
    tree = frag.tree_sums
    assert tree is not None
    by_dtype = group_by_dtype(u_leaves)
    if not by_dtype:
        return None
    acc = acc_ctype(queue)
    acc_dtype = np.dtype(np.float64 if acc == "double" else np.float32)
    width = len(tree.terms)
    ctx = queue.context
    fragments = [p.fragment for p in parts]
    what = frag.name
    plans = {}
    chunks = 0
    shapes_of: list[tuple[int, ...]] = [()] * len(u_leaves)
    for dtype, idx in by_dtype.items():
        sl = slice_of(dtype)
        shapes = tuple(u_leaves[i].shape for i in idx)
        if sl is not None and len(idx) == 1 and shapes[0] == (sl.hi - sl.lo,):
            shapes = sl.shapes
        seg = segmentation(shapes, "leaf")
        c0, c1 = chunk_range(seg, sl.lo, sl.hi) if sl is not None else (0, len(seg.chunks))
        plans[dtype] = (idx, seg, chunks, c0, c1, sl)
        for i in idx:
            shapes_of[i] = (len(sl.shapes),) if sl is not None else ()
        chunks += len(seg.chunks)
    partials = _workspace(_partials, (queue, chunks, width, acc_dtype), queue, width * chunks,
                          acc_dtype)  # fmt: skip
    pbuf = partials.base_data
    outputs = _workspace(_outputs, (queue, frag.key, k, acc_dtype), queue, len(tree.outputs),
                         acc_dtype)  # fmt: skip
    all_leaves = [
        segment_state_leaves(
            tree_, treedef, u_leaves, f"state.{name} of {what}", u_role, queue, shapes_of
        )
        for name, tree_ in zip(tree.state, part.segment_state, strict=True)
    ]
    new_leaves = [list(leaves) for leaves in all_leaves]
    post: list[tuple[Any, Any]] = []
    f_args: list[Any] = [pbuf, 0, pbuf, chunks]
    groups: dict[Any, Group] = {}
    ctypes: list[str] = []
    first_state: list[tuple[Any, int]] = []
    pre: list[Launch] = []
    for dtype, (idx, seg, base, c0, c1, _sl) in plans.items():
        st_dtype = state_dtype(dtype)
        ctypes.append(state_ctype("double" if st_dtype == np.float64 else "float"))
        olds = []
        for f, leaves in enumerate(all_leaves):
            group = [leaves[i] for i in idx]
            old = contiguous_run(group)
            if old is None:  # scattered 0-d arrays (a cohort of a stateful group): packed
                packed = pack(group, queue)
                old = (packed[0].base_data, element_offset(packed[0]))
                if inplace:
                    post.append((packed, group))
            new = old
            if not inplace:
                block = layout(tuple(shapes_of[i] for i in idx), st_dtype).allocate(queue)
                new = (block.buffer, block.offset // st_dtype.itemsize)
                for i, view in zip(idx, block.views, strict=True):
                    new_leaves[f][i] = view
            olds.append(old)
            f_args += [*old, *new]
        first_state = first_state or olds
        f_args += [pbuf, sum(math.prod(shapes_of[i]) for i in idx)]
        fixed: dict[str, tuple[Any, int]] = {}
        if tree.after:  # (every group reads the first's: one number)
            for name, old in zip(tree.state, first_state, strict=True):
                fixed[tree_state_arg(name, k)] = old
        else:
            fixed[tree_outputs_arg(k)] = (outputs.base_data, 0)
            us = [u_leaves[i] for i in idx]
            slots = [  # (parts 0..k: the pre-pass runs the parts before the rule too)
                (slot_arg(slot, j, "in"), [leaves[i] for i in idx])
                for j in range(k + 1)
                for slot, leaves in zip(fragments[j].slots, slot_leaves[j], strict=True)
            ]
            slot_storage = [storage_of(leaves[0].dtype) for _, leaves in slots]
            prepass, _ = tree_kernel(ctx, "prepass", fragments, k, dtype, slot_storage, acc,
                                     (ctypes[0],))  # fmt: skip
            lay = layout(tuple(x.shape for x in us), dtype)
            ps = [p_leaves[i] for i in idx]
            columns: list[tuple[str, Any, Any]] = [
                (U_IN, us, contiguous_run(us, lay)),
                (P_IN, ps, contiguous_run(ps, lay)),
            ]
            for arg, leaves in slots:
                slot_lay = layout(lay.shapes, leaves[0].dtype)
                columns.append((arg, leaves, contiguous_run(leaves, slot_lay)))
            columns += [(tree_state_arg(name, k), None, old) for name, old in
                        zip(tree.state, first_state, strict=True)]  # fmt: skip
            columns += [(CHUNKS, None, (seg.tables(queue)["chunks"].base_data, 0)),
                        (PARTIALS, None, (pbuf, base * width))]  # fmt: skip
            pre += tree_chunk_launches(seg, prepass, columns, lay.offsets, dtype)
        groups[dtype] = Group(seg, base, c0, c1, fixed)
    f_args += [outputs.base_data, 0]
    finish_dtype: Any = np.float64 if all(d == np.float64 for d in plans) else np.float32
    finisher, _ = tree_kernel(ctx, "finish", fragments, k, finish_dtype, (), acc, tuple(ctypes))
    finish: Launch = (finisher, Single(1), f_args)
    new_state = tuple(
        tree_ if inplace else optree.tree_unflatten(treedef, leaves)
        for tree_, leaves in zip(part.segment_state, new_leaves, strict=True)
    )
    return TreeStep(k, tree, pre, finish, groups, partials, new_state, post,
                    ctypes[0])  # fmt: skip


def tree_chunk_launches(
    seg: Any,
    kernel: cl.Kernel,
    columns: list[tuple[str, Any, Any]],
    offsets: tuple[int, ...],
    dtype: Any,
) -> list[Launch]:
    """A chunk-form kernel's launches over ``seg`` (see ``_segments.chunk_launches``); on a
    ZeRO slice (one flat leaf of the slice's dtype), over this rank's chunks only, each
    array bound so that the chunk table's element positions (in the whole layout) index
    it."""
    sl = slice_of(dtype)
    if sl is None:
        return chunk_launches(seg, kernel, columns, offsets, CHUNKS)
    c0, c1 = chunk_range(seg, sl.lo, sl.hi)
    args: list[Any] = []
    for name, leaves, run in columns:
        if name == CHUNKS:
            args += [run[0], c0]
        elif leaves is None:
            args += list(run)
        else:
            args += [leaves[0].base_data, element_offset(leaves[0]) - sl.lo]
    return [(kernel, Single(c1 - c0), args)] if c1 > c0 else []


def chunk_range(seg: Any, lo: int, hi: int) -> tuple[int, int]:
    """The chunks of ``seg`` inside the elements ``[lo, hi)`` (a ZeRO slice): they must
    cover it exactly (the slice is cut at chunk boundaries)."""
    firsts = seg.chunks[:, 0]
    c0 = int(np.searchsorted(firsts, lo))
    c1 = int(np.searchsorted(firsts, hi))
    covered = int(seg.chunks[c0:c1, 1].sum()) if c1 > c0 else 0
    if (c0 < len(firsts) and int(firsts[c0]) != lo and hi > lo) or covered != hi - lo:
        raise ValueError(
            f"a shard [{lo}, {hi}) of a rule with tree sums must be cut at chunk boundaries "
            "(shard_bounds with the rule's granularity)"
        )
    return c0, c1


__all__ = ["TREE_SUMS_BLOCK", "TreeStep", "chunk_range", "combine_partials", "combiner",
           "finish_source",
           "prepare", "prepass_source", "tree_kernel", "tree_part"]  # fmt: skip
