"""Reductions per segment (a leaf, a row of a leaf, or a unit: a row or a column) of one
dtype group's packed layout, and the tables by which a fused kernel finds the segment of its
element. No host sync.

A step whose fused kernel reads a value per segment (``SegmentReduction``) runs, per dtype
group and whatever the number of leaves:

1. a **reduce** launch: one work-item per chunk (at most ``CHUNK`` elements, never across
   segments), each summing the reduction's terms over its chunk in the reduction type; where
   the segments are columns, one more launch: one work-item per block of ``ROWS`` rows,
   streaming them and keeping a partial per column;
2. a **finish** launch: one work-item per segment, adding its partials in order, updating
   its state (``SegmentReduction.state``) and evaluating the outputs into a small buffer
   (``K`` values per segment);
3. the fused kernel as **tiled** launches: work-groups of ``TILE`` work-items, each group
   inside one segment, or inside one row of columns (work-item ``k`` in column ``first +
   k``; a table gives each group's first element and segment): one launch over the full
   groups (no bounds check, so PoCL vectorises it) and one over the partial ones (checked).

So a packed tree steps in 4 launches per dtype group (5 with columns). Separate arrays take
one reduce launch and up to two fused launches per leaf (one finish). Chunks and groups
start at their segment's first element whichever way the tree is laid out, so a packed tree
and the same tree as separate arrays sum in the same order: the same bits.

Where the updates come from an earlier fused kernel of the same step (LAMB: Adam, then the
trust ratio), that kernel sums them itself, and the reduce launch is left out: it runs as
one work-item per chunk (``chunk_launches``), its element code in a loop over the chunk,
adding the terms in the reduce launch's order, so its partials are the reduce launch's bit
for bit (``_codegen.sums_body``; ``_fused.can_sum`` says when). A work-group reduction
would need a barrier, which on PoCL's CPU device costs more than re-reading the updates;
a loop over a chunk per work-item does not (``benchmarks/bench_fused_sums.py``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._base import SegmentReduction
from .._packing import contiguous_run, element_offset, layout
from ._codegen import POINTER, preamble, storage_of
from ._launch import TILE, Single, Tiled, launch, note_launches
from ._programs import build

if TYPE_CHECKING:
    from ._slices import Window

CHUNK = 8192  # elements per partial sum of the reduce launch


def unit_axes(shape: tuple[int, ...], spec: str) -> tuple[int, int] | None:
    """The consecutive axes ``(first, last)`` a unit's sum runs over for a ``"units:"``
    segmentation (``None``: the whole leaf is one unit). ``spec``: ``"in_out"`` (optax's
    ``unitwise_norm``: a leaf of squeezed rank <= 1 is one unit; rank 2 and 3 sum over axis
    0, rank 4 over (0, 1, 2), rank 5 over (0, 1, 2, 3); the units are the trailing axes of
    a JAX ``[in, out]`` / HWIO weight), ``"out_in"`` (torch's ``[out, in]`` / OIHW: rank <= 1
    is one unit, else the sum runs over axes 1..: the units are the rows of axis 0), or
    ``"axes=a,b,.."`` (given axes, consecutive; negative ones count from the end)."""
    ndim = len(shape)
    if spec == "out_in":
        return None if ndim <= 1 else (1, ndim - 1)
    if spec == "in_out":
        if sum(1 for n in shape if n != 1) <= 1:
            return None
        last = {2: 0, 3: 0, 4: 2, 5: 3}.get(ndim)
        if last is None:
            raise ValueError(
                f"Invalid shape: {shape} (adaptive_grad_clip's default units need rank <= 5; "
                "pass axis)"
            )
        return (0, last)
    given = sorted({int(a) % ndim if ndim else int(a) for a in spec[5:].split(",")})
    if ndim == 0 or given[-1] >= ndim or given != list(range(given[0], given[-1] + 1)):
        raise ValueError(
            f"Invalid axis: ({spec[5:]}) for a leaf of shape {shape} (must be consecutive "
            "axes of the leaf)"
        )
    return (given[0], given[-1])


View = tuple[int, int, int, bool]


def axis_view(shape: tuple[int, ...], axis: int | None) -> View:
    """The view of a leaf whose segments are sums over ``axis`` (their order: the shape
    without that axis, C order), or, for ``None``, one segment that is not reduced."""
    if axis is None:
        return 1, math.prod(shape), 1, False
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]), True


def leaf_view(shape: tuple[int, ...], kind: str) -> View:
    """A leaf as ``[outer, mid, inner]`` whose segments are its ``(outer, inner)`` pairs,
    each a sum over ``mid``, and whether they are reduced (see ``SegmentReduction``)."""
    size = math.prod(shape)
    if kind == "leaf":
        return 1, size, 1, True
    if kind == "rows":
        if len(shape) < 2:
            return 1, size, 1, False
        return shape[0], size // shape[0] if shape[0] else 0, 1, True
    axes = unit_axes(shape, kind[len("units:") :])
    if axes is None:
        return 1, size, 1, True
    a, b = axes
    return math.prod(shape[:a]), math.prod(shape[a : b + 1]), math.prod(shape[b + 1 :]), True


ROWS = 32  # rows of columns per work-item of the column reduce launch


class Segmentation:
    """The segments of leaves with ``shapes`` packed back to back, with the host tables of
    the reduce, finish and tiled launches (``int64``):

    - ``segs``: per segment ``(first partial, partials, n, stride)``: its partials are
      ``stride`` apart; ``n`` its element count (0 for a segment that is not reduced: a leaf
      of ndim <= 1 when segments are rows);
    - ``chunks``: per chunk of a contiguous segment ``(first element, elements)``;
      ``strided``: per block of up to ``ROWS`` rows of columns (segments whose elements are a
      row apart) ``(first element, rows, row length, its first partial)``: its work-item
      streams the rows and keeps one partial per column (``row length`` of them, in order);
      the partials are the chunks', then the column blocks';
    - ``groups``: per work-group ``(first element, segment, elements, step)``: the group's
      elements are consecutive and its work-item ``k`` is in segment ``segment + step * k``
      (``step`` 0: a group inside one segment; 1: inside one row of columns); every full
      group first, then every partial one (``full`` of them are full);
    - per leaf, its ranges: ``leaf_chunks``, ``leaf_strided``, ``leaf_full`` and
      ``leaf_tail`` (``(start, stop)`` into those tables, the tails counted from ``full``).
    """

    def __init__(
        self, shapes: tuple[tuple[int, ...], ...], kind: str, views: tuple[View, ...] = ()
    ) -> None:
        self.shapes = shapes
        self.kind = kind
        lay = layout(shapes, np.dtype(np.float32))
        segs: list[list[int]] = []
        chunks: list[tuple[int, int]] = []
        strided: list[tuple[int, int, int, int]] = []
        column_partials = 0  # they follow the chunks' partials (their count known at the end)
        columns: list[int] = []  # the segments that are columns
        full: list[tuple[int, int, int, int]] = []
        tail: list[tuple[int, int, int, int]] = []
        self.leaf_chunks: list[tuple[int, int]] = []
        self.leaf_strided: list[tuple[int, int]] = []
        self.leaf_full: list[tuple[int, int]] = []
        self.leaf_tail: list[tuple[int, int]] = []

        def tile(start: int, n: int, seg: int, step: int) -> None:
            for g in range(0, n, TILE):
                count = min(TILE, n - g)
                row = (start + g, seg + step * g, count, step)
                (full if count == TILE else tail).append(row)

        for j, (shape, offset) in enumerate(zip(shapes, lay.offsets, strict=True)):
            c0, s0, f0, t0 = len(chunks), len(strided), len(full), len(tail)
            outer, mid, inner, reduced = views[j] if views else leaf_view(shape, kind)
            if inner == 1 and mid == 1 and outer > 1:  # one-element segments, back to back:
                tile(offset, outer, len(segs), 1)  # groups across them, work-item k in seg k
            for o in range(outer):
                block = offset + o * mid * inner
                if inner == 1:  # contiguous segments: chunks, and groups inside each
                    seg = len(segs)
                    if reduced:
                        first = len(chunks)
                        chunks.extend(
                            (block + k, min(CHUNK, mid - k)) for k in range(0, mid, CHUNK)
                        )
                        segs.append([first, len(chunks) - first, mid, 1])
                    else:
                        segs.append([len(chunks), 0, 0, 1])
                    if mid != 1 or outer == 1:
                        tile(block, mid, seg, 0)
                    continue
                first_seg = len(segs)
                blocks = -(-mid // ROWS)
                for b in range(blocks):  # a work-item per ROWS rows: their column sums
                    rows = min(ROWS, mid - b * ROWS)
                    strided.append(
                        (block + b * ROWS * inner, rows, inner, column_partials + b * inner)
                    )
                for i in range(inner):  # column i: one partial per block of rows, inner apart
                    columns.append(len(segs))
                    segs.append([column_partials + i, blocks, mid, inner])
                column_partials += blocks * inner
                for m in range(mid):  # a row of columns: work-item k in column first + k
                    tile(block + m * inner, inner, first_seg, 1)
            self.leaf_chunks.append((c0, len(chunks)))
            self.leaf_strided.append((s0, len(strided)))
            self.leaf_full.append((f0, len(full)))
            self.leaf_tail.append((t0, len(tail)))
        for k in columns:
            segs[k][0] += len(chunks)
        self.segs = np.array(segs, np.int64).reshape(-1, 4)
        self.chunks = np.array(chunks, np.int64).reshape(-1, 2)
        self.strided = np.array(
            [(e, r, w, len(chunks) + first) for e, r, w, first in strided], np.int64
        ).reshape(-1, 4)
        self.partials = len(chunks) + column_partials
        self.full = len(full)
        self.groups = np.array(full + tail, np.int64).reshape(-1, 4)
        self.stepped = bool(self.groups[:, 3].any())  # some group spans several segments
        self._device: dict[cl.Context, dict[str, cla.Array]] = {}

    @property
    def count(self) -> int:
        """The number of segments."""
        return len(self.segs)

    def tables(self, queue: cl.CommandQueue) -> dict[str, cla.Array]:
        """The tables on ``queue``'s device (uploaded once per context; never empty)."""
        tables = self._device.get(queue.context)
        if tables is None:
            tables = {
                name: cla.to_device(queue, host if host.size else np.zeros(6, np.int64))
                for name, host in (("segs", self.segs), ("chunks", self.chunks),
                                   ("strided", self.strided), ("groups", self.groups))
            }  # fmt: skip
            queue.finish()  # uploads done before any queue may use them
            self._device[queue.context] = tables
        return tables


def segmentation(
    shapes: tuple[tuple[int, ...], ...], kind: str, views: tuple[View, ...] = ()
) -> Segmentation:
    """The segments of ``kind`` (or, given, each leaf's ``views``: see :func:`axis_view`):
    one object per distinct argument (the workspaces are keyed by it)."""
    return _segmentation(shapes, kind, tuple(views))


@lru_cache(maxsize=256)
def _segmentation(
    shapes: tuple[tuple[int, ...], ...], kind: str, views: tuple[View, ...]
) -> Segmentation:
    return Segmentation(shapes, kind, views)


_workspaces: dict[tuple, tuple[cla.Array, cla.Array]] = {}


def workspace(
    queue: cl.CommandQueue,
    seg: Segmentation,
    red: SegmentReduction,
    dtype: np.dtype,
    acc_dtype: np.dtype,
) -> tuple[cla.Array, cla.Array]:
    """``(partials, values)`` for ``red`` over ``seg`` (a group of ``dtype`` leaves) on
    ``queue``: kept across steps (the queue runs a step's reduce, finish and fused launches
    in order, so one step's values are read before the next step writes them); the fused
    launches are bound to ``values``. Each dtype group has its own: a step reduces every
    group before its first fused launch."""
    key = (queue, seg, np.dtype(dtype), len(red.terms), len(red.outputs), np.dtype(acc_dtype))
    ws = _workspaces.get(key)
    if ws is None:
        partials = cla.empty(queue, (max(len(red.terms) * seg.partials, 1),), acc_dtype)
        values = cla.zeros(queue, (max(len(red.outputs) * seg.count, 1),), acc_dtype)
        ws = _workspaces[key] = (partials, values)
    return ws


# ---------------------------------------------------------------------------- kernels


def _reduce_source(red: SegmentReduction, storage: str, acc: str) -> tuple[str, str]:
    """One partial per chunk. float and half data: the terms in float8 lanes over blocks
    of 64 elements, each block's lanes added in the reduction type (as the whole-tree
    reduction: 1.7-3.7x faster on PoCL than widening every element to double, and each
    block's float sum is short); double data: double4 lanes. The order depends only on the
    chunk. On an fp64 device a chunk whose float sum of a term is 0 or not finite (squares
    that underflow or overflow float: params below 1e-19 or above 1e19) is summed again
    with every element widened to double, where a float's square is exact."""
    digest = hashlib.sha1(repr((red.terms, red.needs_params)).encode()).hexdigest()[:10]
    name = f"netcl_segsum_{storage}_{acc}_{digest}"
    real = "double" if storage == "double" else "float"
    w = 4 if real == "double" else 8
    block = 1 if real == "double" else 8  # vectors per block
    vec = f"{real}{w}"
    roles = ["u"] + (["p"] if red.needs_params else [])
    t = len(red.terms)

    def load_v(r: str) -> str:
        if storage == "half":
            return f"vload_half{w}(0, {r}_in + k)"
        if storage == "bf16":  # (16-bit words, widened lane by lane)
            return f"({vec})(" + ", ".join(f"BF16_LOAD({r}_in[k + {j}])" for j in range(w)) + ")"
        return f"vload{w}(0, {r}_in + k)"

    def load1(r: str) -> str:
        return {"half": f"vload_half(k, {r}_in)", "bf16": f"BF16_LOAD({r}_in[k])"}.get(
            storage, f"{r}_in[k]"
        )

    def lanes(j: int) -> str:  # a block's lanes into the accumulator, in a fixed order
        if w == 4:
            return f"(({acc})b{j}.s0 + ({acc})b{j}.s1) + (({acc})b{j}.s2 + ({acc})b{j}.s3)"
        halves = [f"(({acc})b{j}.s{a} + ({acc})b{j}.s{a + 1})" for a in range(0, 8, 2)]
        return f"({halves[0]} + {halves[1]}) + ({halves[2]} + {halves[3]})"

    pointer = POINTER[storage]
    args = [f"__global const {pointer} *restrict {r}_in, const long {r}_in_off" for r in roles]
    shift = "".join(f"    {r}_in += {r}_in_off;\n" for r in roles)
    loads = "".join(f"            const {vec} {r} = {load_v(r)};\n" for r in roles)
    adds = "".join(f"            b{j} = b{j} + ({term});\n" for j, term in enumerate(red.terms))
    zeros = "".join(f"        {vec} b{j} = ({vec})(0);\n" for j in range(t))
    collect = "".join(f"        r{j} = r{j} + {lanes(j)};\n" for j in range(t))
    sums = "".join(f"    {acc} r{j} = 0;\n" for j in range(t))
    loads1 = "".join(f"        const {real} {r} = {load1(r)};\n" for r in roles)
    adds1 = "".join(f"        r{j} = r{j} + ({acc})({term});\n" for j, term in enumerate(red.terms))
    stores = "".join(f"    partials[{t} * c + {j}] = r{j};\n" for j in range(t))
    rescue = ""
    if acc == "double" and real == "float":
        suspicious = " || ".join(f"r{j} == 0 || r{j} - r{j} != 0" for j in range(t))
        wide = "".join(f"            const double {r} = (double){load1(r)};\n" for r in roles)
        again = "".join(
            f"            r{j} = r{j} + ({term});\n" for j, term in enumerate(red.terms)
        )
        reset = "".join(f"        r{j} = 0;\n" for j in range(t))
        rescue = f"""    if ({suspicious}) {{
{reset}        for (k = chunks[2 * c]; k < stop; k++) {{
{wide}{again}        }}
    }}
"""
    src = f"""//CL// {name}: one partial per chunk of a segment ({", ".join(red.terms)})
{preamble(real, "double" in (real, acc), storage == "bf16")}
typedef {vec} realv;
__kernel void {name}({", ".join(args)},
    __global const long *restrict chunks, const long chunks_off,
    __global {acc} *restrict partials)
{{
{shift}    const long c = chunks_off + (long)get_global_id(0);
    long k = chunks[2 * c];
    const long stop = k + chunks[2 * c + 1];
{sums}    while (k + {w} <= stop) {{
{zeros}        for (int v = 0; v < {block} && k + {w} <= stop; v++, k += {w}) {{
{loads}{adds}        }}
{collect}    }}
    for (; k < stop; k++) {{
{loads1}{adds1}    }}
{rescue}{stores}}}
"""
    return src, name


def _strided_source(red: SegmentReduction, storage: str, acc: str) -> tuple[str, str]:
    """One work-item per block of rows of columns: it streams the rows (contiguous memory),
    adding each column's terms in the reduction type into that column's partial (the
    block's ``row length`` partials stay in cache); the first row sets them. Each column's
    sum is then its blocks' partials in order: the same whatever the launch."""
    digest = hashlib.sha1(repr((red.terms, red.needs_params)).encode()).hexdigest()[:10]
    name = f"netcl_segsum_columns_{storage}_{acc}_{digest}"
    roles = ["u"] + (["p"] if red.needs_params else [])
    t = len(red.terms)
    pointer = POINTER[storage]
    args = [f"__global const {pointer} *restrict {r}_in, const long {r}_in_off" for r in roles]

    def load1(r: str) -> str:
        load = {"half": f"vload_half(k, {r}_in)", "bf16": f"BF16_LOAD({r}_in[k])"}
        return f"({acc})" + load.get(storage, f"{r}_in[k]")

    loads = "".join(f"            const {acc} {r} = {load1(r)};\n" for r in roles)
    first_row = "".join(
        f"            partials[{t} * (p0 + c) + {j}] = ({term});\n"
        for j, term in enumerate(red.terms)
    )
    next_rows = "".join(
        f"            partials[{t} * (p0 + c) + {j}] += ({term});\n"
        for j, term in enumerate(red.terms)
    )
    shift = "".join(f"    {r}_in += {r}_in_off;\n" for r in roles)
    src = f"""//CL// {name}: one work-item per block of rows of columns ({", ".join(red.terms)})
{
        preamble(
            "double" if "double" in (storage, acc) else "float",
            "double" in (storage, acc),
            storage == "bf16",
        )
    }
__kernel void {name}({", ".join(args)},
    __global const long *restrict strided, const long strided_off,
    __global {acc} *restrict partials)
{{
{shift}    const long e = 4 * (strided_off + (long)get_global_id(0));
    const long base = strided[e], rows = strided[e + 1], width = strided[e + 2];
    const long p0 = strided[e + 3];
    for (long c = 0; c < width; c++) {{
        const long k = base + c;
{loads.replace("            ", "        ")}{first_row.replace("            ", "        ")}    }}
    for (long m = 1; m < rows; m++) {{
        for (long c = 0; c < width; c++) {{
            const long k = base + m * width + c;
{loads}{next_rows}        }}
    }}
}}
"""
    return src, name


def _finish_source(
    red: SegmentReduction, acc: str, scalars: tuple[str, ...], state_t: str
) -> tuple[str, str]:
    """One work-item per segment: its sums (its chunks' partials in order), its state's new
    values (read, updated, written: ``state_t`` storage) and its outputs. The fragment's
    ``scalars`` come in the reduction type."""
    key = repr((red.terms, red.finish, red.state, red.update, scalars, state_t))
    name = f"netcl_segfinish_{acc}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    t, k = len(red.terms), len(red.outputs)
    args = [f"__global const {acc} *restrict partials", "__global const long *restrict segs",
            f"__global {acc} *restrict values"]  # fmt: skip
    for f in red.state:
        args += [f"__global const {state_t} *restrict {f}_in, const long {f}_in_off",
                 f"__global {state_t} *restrict {f}_out, const long {f}_out_off"]  # fmt: skip
    args += [f"const {acc} {sc}" for sc in scalars]
    sums = "".join(f"    {acc} s{j} = 0;\n" for j in range(t))
    adds = "".join(f"        s{j} = s{j} + partials[{t} * c + {j}];\n" for j in range(t))
    old = "".join(f"    {acc} {f} = ({acc}){f}_in[{f}_in_off + s];\n" for f in red.state)
    new = "".join(
        f"        const {acc} next_{f} = ({acc})({expr});\n"
        for f, expr in zip(red.state, red.update, strict=True)
    )
    # the outputs see the values as stored (rounded to the state's type), as a later step will
    new += "".join(f"        {f} = ({acc})({state_t})next_{f};\n" for f in red.state)
    store = "".join(f"    {f}_out[{f}_out_off + s] = ({state_t}){f};\n" for f in red.state)
    outs = "".join(
        f"    values[{k} * s + {j}] = ({acc})({expr});\n" for j, expr in enumerate(red.finish)
    )
    src = f"""//CL// {name}: each segment's sums, state and outputs ({", ".join(red.outputs)})
{preamble(acc, "double" in (acc, state_t))}
__kernel void {name}({", ".join(args)})
{{
    const long s = get_global_id(0);
    const long first = segs[4 * s], count = segs[4 * s + 1], stride = segs[4 * s + 3];
    const {acc} n = ({acc})segs[4 * s + 2];
{sums}    for (long c = first; c < first + count * stride; c += stride) {{
{adds}    }}
{old}    {{
{new}    }}
{store}{outs}}}
"""
    return src, name


_kernels: dict[tuple, cl.Kernel] = {}


def _reducer(ctx: cl.Context, red: SegmentReduction, storage: str, acc: str) -> cl.Kernel:
    key = (ctx, "reduce", red, storage, acc)
    kernel = _kernels.get(key)
    if kernel is None:
        src, name = _reduce_source(red, storage, acc)
        roles = 2 if red.needs_params else 1
        dtypes = [None, np.int64] * roles + [None, np.int64, None]
        kernel = _kernels[key] = build(ctx, src, name, dtypes)
    return kernel


def _strided_reducer(ctx: cl.Context, red: SegmentReduction, storage: str, acc: str) -> cl.Kernel:
    key = (ctx, "strided", red, storage, acc)
    kernel = _kernels.get(key)
    if kernel is None:
        src, name = _strided_source(red, storage, acc)
        roles = 2 if red.needs_params else 1
        dtypes = [None, np.int64] * roles + [None, np.int64, None]
        kernel = _kernels[key] = build(ctx, src, name, dtypes)
    return kernel


def _finisher(
    ctx: cl.Context, red: SegmentReduction, acc: str, scalars: tuple[str, ...], state_t: str
) -> cl.Kernel:
    key = (ctx, "finish", red, acc, scalars, state_t)
    kernel = _kernels.get(key)
    if kernel is None:
        src, name = _finish_source(red, acc, scalars, state_t)
        a = np.float64 if acc == "double" else np.float32
        dtypes = [None, None, None] + [None, np.int64] * (2 * len(red.state)) + [a] * len(scalars)
        kernel = _kernels[key] = build(ctx, src, name, dtypes)
    return kernel


def clear() -> None:
    _kernels.clear()
    _workspaces.clear()


# ---------------------------------------------------------------------------- running


def reduce_segments(
    queue: cl.CommandQueue,
    red: SegmentReduction,
    u_leaves: list[cla.Array],
    p_leaves: list[cla.Array],
    acc: str,
    scalars: tuple[tuple[str, float], ...] = (),
    state: tuple[tuple[Any, Any], ...] = (),
    views: tuple[View, ...] = (),
    state_t: str | None = None,
    sums: bool = True,
) -> cla.Array:
    """Run ``red`` over one dtype group's leaves (``p_leaves`` when it reads params) into
    its workspace's values buffer, returned (see the module docstring). ``scalars``: the
    fragment's ``(name, value)`` pairs; ``state``: per field of ``red.state``, the
    ``(buffer, offset)`` of the old and of the new values, one per segment in order (may be
    the same), of ``state_t`` (default: float, double for double leaves). ``views``: each
    leaf's segments (see :func:`axis_view`), instead of ``red.segments``'. ``sums=False``:
    only the finish; the caller's launches wrote the partials (see :func:`workspace`)."""
    acc_dtype = np.dtype(np.float64 if acc == "double" else np.float32)
    dtype = u_leaves[0].dtype
    seg = segmentation(tuple(x.shape for x in u_leaves), red.segments, tuple(views))
    partials, values = workspace(queue, seg, red, dtype, acc_dtype)
    if not seg.count:
        return values
    tables = seg.tables(queue)
    ctx = queue.context
    roles = [u_leaves] + ([p_leaves] if red.needs_params else [])
    lay = layout(seg.shapes, dtype)
    runs = [contiguous_run(leaves, lay) for leaves in roles]
    for table, ranges in (("chunks", seg.leaf_chunks), ("strided", seg.leaf_strided)):
        total = ranges[-1][1] if ranges and sums else 0
        if not total:
            continue
        if table == "chunks":
            kernel = _reducer(ctx, red, storage_of(dtype), acc)
        else:  # columns: a work-item streams a block of rows
            kernel = _strided_reducer(ctx, red, storage_of(dtype), acc)
        rows = tables[table].base_data
        if None not in runs:
            args = [v for run in cast("list[tuple[Any, int]]", runs) for v in run]
            _one_per_group(kernel, queue, total, [*args, rows, 0, partials.base_data])
            continue
        for j, (r0, r1) in enumerate(ranges):
            if r1 > r0:
                args = []
                for leaves in roles:
                    a = leaves[j]
                    args += [a.base_data, element_offset(a) - lay.offsets[j]]
                _one_per_group(kernel, queue, r1 - r0, [*args, rows, r0, partials.base_data])
    if state_t is None:
        state_t = "double" if dtype == np.float64 else "float"
    finisher = _finisher(ctx, red, acc, tuple(name for name, _ in scalars), state_t)
    args = [partials.base_data, tables["segs"].base_data, values.base_data]
    for old, new in state:
        args += [*old, *new]
    launch(finisher, queue, seg.count, args + [value for _, value in scalars])
    return values


def _one_per_group(kernel: cl.Kernel, queue: cl.CommandQueue, n: int, args: list[Any]) -> None:
    """A reduce launch: one work-item per work-group, each running its own vector loop over
    a chunk or a block of rows (a larger group would have PoCL vectorise across work-items,
    with a gather per load)."""
    kernel(queue, (n,), (1,), *args)
    note_launches(kernel.function_name)


def chunk_launches(
    seg: Segmentation,
    kernel: cl.Kernel,
    columns: Sequence[tuple[str, list[Any] | None, Any]],
    offsets: tuple[int, ...],
    chunk_name: str,
) -> list[tuple[cl.Kernel, int, list[Any]]]:
    """The launches of a fused kernel that also sums the next part's reduction per chunk of
    ``seg`` (``_codegen.sums_body``): one work-item per chunk, one launch where every array
    role is packed (``columns`` as in :func:`tiled_launches`), else one per leaf."""
    total = seg.leaf_chunks[-1][1] if seg.leaf_chunks else 0
    if all(run is not None for name, _, run in columns if name != chunk_name):
        args = [v for name, _, run in columns for v in (run if name != chunk_name else
                                                          (run[0], 0))]  # fmt: skip
        return [(kernel, Single(total), args)] if total else []
    out = []
    for j, (c0, c1) in enumerate(seg.leaf_chunks):
        if c1 <= c0:
            continue
        args: list[Any] = []
        for name, leaves, run in columns:
            if name == chunk_name:
                args += [run[0], c0]
            elif leaves is None:  # a workspace or an index origin: (buffer, offset)
                args += list(run)
            else:
                a = leaves[j]
                args += [a.base_data, element_offset(a) - offsets[j]]
        out.append((kernel, Single(c1 - c0), args))
    return out


def tiled_launches(
    seg: Segmentation | Window,
    kernels: tuple[cl.Kernel, cl.Kernel],
    groups: Any,
    columns: Sequence[tuple[str, list[Any] | None, Any]],
    offsets: tuple[int, ...],
    tile_name: str,
) -> list[tuple[cl.Kernel, int, list[Any]]]:
    """The fused launches over ``seg`` (``kernels``: the full-group and the partial-group
    kernel; ``groups``: the group table's buffer): one of each where every array role is
    packed (``columns``: ``(name, leaves, (buffer, offset) if packed else None)`` in
    argument order), else per leaf, each array at its leaf's offset less the leaf's place
    in the layout (the kernel indexes elements by their place in the layout)."""
    main, tail = kernels
    out: list[tuple[cl.Kernel, int, list[Any]]] = []
    n_groups = len(seg.groups)

    def add(kernel: cl.Kernel, start: int, stop: int, args_of) -> None:
        if stop > start:
            out.append((kernel, Tiled((stop - start) * TILE), args_of(start)))

    if all(run is not None for name, _, run in columns if name != tile_name):

        def packed(start: int) -> list[Any]:
            args: list[Any] = []
            for name, _, run in columns:
                args += [groups, start] if name == tile_name else list(run)
            return args

        add(main, 0, seg.full, packed)
        add(tail, seg.full, n_groups, packed)
        return out
    for j, ((f0, f1), (t0, t1)) in enumerate(zip(seg.leaf_full, seg.leaf_tail, strict=True)):

        def per_leaf(start: int, j: int = j) -> list[Any]:
            args: list[Any] = []
            for name, leaves, run in columns:
                if name == tile_name:
                    args += [groups, start]
                elif leaves is None:  # a workspace or an index origin: (buffer, offset)
                    args += list(run)
                else:
                    a = leaves[j]
                    args += [a.base_data, element_offset(a) - offsets[j]]
            return args

        add(main, f0, f1, per_leaf)
        add(tail, seg.full + t0, seg.full + t1, per_leaf)
    return out


__all__ = [
    "CHUNK",
    "TILE",
    "Segmentation",
    "axis_view",
    "chunk_launches",
    "reduce_segments",
    "segmentation",
    "tiled_launches",
]
