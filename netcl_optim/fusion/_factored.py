"""Adafactor's factored second moment over packed trees (``scale_by_factored_rms``): the row
and column means of ``g^2`` of each factored leaf, their EMAs (state shaped like neither the
params nor one value per leaf), the mean of the row factors, and the scaled updates. No host
sync.

One step, per dtype group, whatever the number of leaves (see ``_segments``):

1. the row sums and the column sums of ``g^2``: one launch streaming blocks of rows where
   every factored leaf's factored axes are its last two (see :func:`_both_table`), else a
   reduce launch each (two where a sum runs across rows); then a finish launch each, which
   writes the new row (column) EMA, one value per segment, straight into the state (the
   segments' order is the state's);
2. the mean of the new row EMA over the other factored axis: a reduce and a finish launch
   over the row state; then one launch for every row's and column's factor;
3. the updates: one launch over the factored leaves (a work-item per run of rows: no
   division per element, vectors of 8), one over the leaves that are not factored (their
   EMA ``v`` is shaped like them), one copying the ``(1,)`` placeholders in pure mode.

So 8 to 11 launches per dtype group (a launch over many segments may be split in two, see
``_launch.launch``); separate arrays take one sums launch per leaf, state arrays that are
not packed go through a packed copy. Row and column state stored in 16 bits (float16,
bfloat16) takes two more: it is widened into a float copy before the EMAs, and the new
values rounded back once after them (the factors, the updates, read the float values: the
float32 rule with its state rounded after every step).
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._base import SegmentReduction
from .._packing import contiguous_run, element_offset, layout, pack
from ._checks import (
    all_valid,
    check_init_leaves,
    check_leaves,
    group_by_dtype,
    queue_of_leaves,
)
from ._codegen import POINTER, preamble, storage_of
from ._codegen import load as load_expr
from ._codegen import store as store_stmt
from ._launch import launch, note_launches
from ._programs import build
from ._reductions import acc_ctype
from ._segments import CHUNK, View, axis_view, reduce_segments, segmentation, workspace

PLACEHOLDER = (1,)


class FactoredRule(NamedTuple):
    """Which leaves are factored and how (optax's rule by default).

    ``last_two``: factor the last two axes of every leaf of ndim >= 2, the leading ones a
    batch (torch), and keep torch's state shapes (``row_var [..., R, 1]``, ``col_var [...,
    1, C]``); else the two largest axes when ``factored`` and the second largest is at
    least ``min_dim_size_to_factor`` (optax; state: the shape without one axis).
    ``epsilon`` is added to each ``g^2`` (optax). ``eps1`` (torch): the row factors' mean is
    floored at ``eps1`` and the variance at ``eps1^2``. ``lerp``: the EMA is torch's
    ``v.lerp_(s, w)``, else ``keep * v + add * s``.
    """

    factored: bool = True
    min_dim_size_to_factor: int = 128
    last_two: bool = False
    epsilon: float = 1e-30
    eps1: float | None = None
    lerp: bool = False


def factor_dims(shape: tuple[int, ...], rule: FactoredRule) -> tuple[int, int] | None:
    """``(d1, d0)``: the row EMA averages over axis ``d0``, the column EMA over ``d1``
    (optax's names: the second largest and the largest axis); ``None``: not factored."""
    if len(shape) < 2:
        return None
    if rule.last_two:
        return len(shape) - 2, len(shape) - 1
    if not rule.factored:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < rule.min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


def _without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1 :]


def state_shapes(shape: tuple[int, ...], rule: FactoredRule) -> tuple[Any, Any, Any]:
    """The shapes of a leaf's ``(v_row, v_col, v)``; ``None`` where it is a ``(1,)``
    placeholder (torch keeps no such entry)."""
    dims = factor_dims(shape, rule)
    if dims is None:
        return None, None, tuple(shape)
    d1, d0 = dims
    if rule.last_two:
        return (*shape[:-1], 1), (*shape[:-2], 1, shape[-1]), None
    return _without(shape, d0), _without(shape, d1), None


def _concrete(shape: Any) -> tuple[int, ...]:
    return PLACEHOLDER if shape is None else tuple(shape)


class Plan:
    """The host tables of one dtype group of leaves with ``shapes`` under ``rule``."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], rule: FactoredRule) -> None:
        self.shapes = shapes
        self.dims = [factor_dims(s, rule) for s in shapes]
        per = [state_shapes(s, rule) for s in shapes]
        self.row_shapes = tuple(_concrete(r) for r, _, _ in per)
        self.col_shapes = tuple(_concrete(c) for _, c, _ in per)
        self.v_shapes = tuple(_concrete(v) for _, _, v in per)
        pairs = list(zip(shapes, self.dims, strict=True))
        self.row_views = tuple(axis_view(s, None if d is None else d[1]) for s, d in pairs)
        self.col_views = tuple(axis_view(s, None if d is None else d[0]) for s, d in pairs)
        mean_views = []
        for shape, d in zip(shapes, self.dims, strict=True):
            if d is None:
                mean_views.append(axis_view(PLACEHOLDER, None))
                continue
            d1, d0 = d
            mean_views.append(axis_view(_without(shape, d0), d1 - 1 if d1 > d0 else d1))
        self.mean_views: tuple[View, ...] = tuple(mean_views)
        g_off = layout(shapes, np.float32).offsets
        r_off = layout(self.row_shapes, np.float32).offsets
        c_off = layout(self.col_shapes, np.float32).offsets
        v_off = layout(self.v_shapes, np.float32).offsets
        self.factor_rows = layout(self.row_shapes, np.float32).total
        self.factor_count = self.factor_rows + layout(self.col_shapes, np.float32).total
        blocks: list[tuple[int, ...]] = []
        row_means: list[np.ndarray] = []
        rows: list[tuple[int, int, int]] = []
        copies: list[tuple[int, int, int]] = []
        mean_first = 0
        for j, (shape, d) in enumerate(zip(shapes, self.dims, strict=True)):
            outer, _, inner, _ = self.mean_views[j]
            if d is None:
                size = math.prod(shape)
                rows += [
                    (g_off[j] + k, v_off[j] + k, min(CHUNK, size - k))
                    for k in range(0, size, CHUNK)
                ]
                copies += [(-1, r_off[j], 0), (-2, c_off[j], 0)]
                row_means.append(np.full(1, -1, np.int64))
                mean_first += 1
                continue
            copies.append((-3, v_off[j], 0))
            # the factors: the rows' then the columns' (see _factors_source)
            blocks += _blocks(shape, d, g_off[j], r_off[j], self.factor_rows + c_off[j])
            mid = self.mean_views[j][1]
            index = np.arange(outer)[:, None, None] * inner + np.arange(inner)[None, None, :]
            row_means.append(np.broadcast_to(index, (outer, mid, inner)).ravel() + mean_first)
            mean_first += outer * inner
        self.blocks = np.array(blocks, np.int64).reshape(-1, 10)
        self.items = _items(self.blocks)
        self.rows = np.array(rows, np.int64).reshape(-1, 3)
        self.copies = np.array(copies, np.int64).reshape(-1, 3)
        self.row_means = np.concatenate(row_means) if row_means else np.zeros(0, np.int64)
        self.both = _both_table(self)
        self._device: dict[cl.Context, dict[str, cla.Array]] = {}

    def tables(self, queue: cl.CommandQueue) -> dict[str, cla.Array]:
        tables = self._device.get(queue.context)
        if tables is None:
            tables = {
                name: cla.to_device(queue, host if host.size else np.zeros(10, np.int64))
                for name, host in (("blocks", self.blocks), ("items", self.items),
                                   ("rows", self.rows),
                                   ("copies", self.copies), ("row_means", self.row_means),
                                   ("both", np.zeros(0) if self.both is None else self.both))
            }  # fmt: skip
            queue.finish()
            self._device[queue.context] = tables
        return tables


def _blocks(
    shape: tuple[int, ...], dims: tuple[int, int], g0: int, r0: int, c0: int
) -> list[tuple[int, ...]]:
    """A factored leaf's work-items: the leaf as ``[P0, Da, P1, Db, P2]`` (``a < b`` its
    factored axes), one per ``(p0, i, p1)``, over its ``Db * P2`` consecutive elements
    ``(j, q)``: ``(first element, Db, P2, then its row factor's index as base + j * sj + q *
    sq, its column factor's likewise, 0)`` (``r0``, ``c0``: the leaf's first factors)."""
    d0 = dims[1]
    a, b = sorted(dims)
    p0, da = math.prod(shape[:a]), shape[a]
    p1, db = math.prod(shape[a + 1 : b]), shape[b]
    p2 = math.prod(shape[b + 1 :])
    out = []
    for x in range(p0):
        for i in range(da):
            for y in range(p1):
                first = g0 + (((x * da + i) * p1 + y) * db) * p2
                over_b = ((x * da + i) * p1 + y) * p2  # the index without axis b, at j = q = 0
                over_a = (x * p1 + y) * db * p2  # without axis a
                if d0 == b:  # rows average over b: the row index has no j
                    row, col = (r0 + over_b, 0, 1), (c0 + over_a, p2, 1)
                else:
                    row, col = (r0 + over_a, p2, 1), (c0 + over_b, 0, 1)
                out.append((first, db, p2, *row, *col, 0))
    return out


def _both_table(plan: Plan) -> np.ndarray | None:
    """Where every factored leaf averages its rows over the last axis (contiguous, at most
    ``CHUNK`` long: one chunk per row) and its columns over the axis before (torch's rule
    always; optax's when the two largest axes are the last two, the larger last): one
    launch sums both, a work-item per block of rows of the column segmentation, ``(first
    element, rows, row length, its first column partial, its first row partial)``. ``None``
    where some leaf is factored otherwise (then a reduce launch each)."""
    row_seg = segmentation(plan.shapes, "leaf", plan.row_views)
    col_seg = segmentation(plan.shapes, "leaf", plan.col_views)
    offsets = layout(plan.shapes, np.float32).offsets
    out = []
    for j, (shape, d) in enumerate(zip(plan.shapes, plan.dims, strict=True)):
        if d is None:
            continue
        if d != (len(shape) - 2, len(shape) - 1) or shape[-1] > CHUNK or not shape[-1]:
            return None
        c0 = row_seg.leaf_chunks[j][0]
        s0, s1 = col_seg.leaf_strided[j]
        for e, rows, width, first in col_seg.strided[s0:s1].tolist():
            out.append((e, rows, width, first, c0 + (e - offsets[j]) // width))
    return np.array(out, np.int64).reshape(-1, 5)


SPAN = 4096  # elements per work-item of the apply launch, at least (whole blocks)


def _items(blocks: np.ndarray) -> np.ndarray:
    """The apply launch's work-items: ``(first block, blocks)``, runs of consecutive blocks
    of at least ``SPAN`` elements together (a row of 240 elements per work-item made PoCL
    spend more on work-groups than on the row: 5.3 ms against 2.5 ms on a GPT-like tree)."""
    items: list[tuple[int, int]] = []
    start, size = 0, 0
    for b, (nj, nq) in enumerate(blocks[:, 1:3].tolist()):
        size += nj * nq
        if size >= SPAN:
            items.append((start, b + 1 - start))
            start, size = b + 1, 0
    if start < len(blocks):
        items.append((start, len(blocks) - start))
    return np.array(items, np.int64).reshape(-1, 2)


@lru_cache(maxsize=128)
def plan_of(shapes: tuple[tuple[int, ...], ...], rule: FactoredRule) -> Plan:
    return Plan(shapes, rule)


# ---------------------------------------------------------------------------- reductions


def _ema(rule: FactoredRule, mean: str) -> str:
    """The new EMA of a row (column) from the old ``v`` and this step's ``mean``."""
    if rule.lerp:
        return f"LERP(v, {mean}, add)"
    return f"keep * v + add * ({mean})"


@lru_cache(maxsize=16)
def _segment_ema(rule: FactoredRule) -> SegmentReduction:
    """The sums of ``g^2`` over a row (column) and its EMA, written as the finish's state
    (a placeholder segment, ``n == 0``, keeps its value)."""
    mean = "s0 / n + epsilon" if rule.epsilon else "s0 / n"
    return SegmentReduction(
        terms=("u * u",), outputs=(), finish=(), state=("v",),
        update=(f"n > 0 ? {_ema(rule, mean)} : v",),
    )  # fmt: skip


_ROW_MEAN = SegmentReduction(terms=("u",), outputs=("mean",), finish=("n > 0 ? s0 / n : 1",))


# ---------------------------------------------------------------------------- kernels


def _both_source(storage: str, acc: str) -> tuple[str, str]:
    """One work-item per block of rows (see :func:`_both_table`): streams them; per row, adds
    each ``g^2`` (in the reduction type) to its column's partial, then sums the row (now in
    cache) as the reduce launch sums a chunk (``g^2`` in float lanes over blocks of 64,
    each block's lanes added in the reduction type; again in double where that gives 0 or
    not a finite number). Writes the rows' sums as the row segmentation's partials and the
    columns' as the column one's: the order of the additions depends only on the shapes."""
    name = f"netcl_factored_sums_{storage}_{acc}"
    real = "double" if storage == "double" else "float"
    w = 4 if real == "double" else 8
    if storage == "half":
        load, loadv = "vload_half(k, g)", f"vload_half{w}(0, g + k)"
    elif storage == "bf16":  # (16-bit words widened lane by lane: the float lanes' sums)
        load, loadv = "BF16_LOAD(g[k])", f"as_float{w}(convert_uint{w}(vload{w}(0, g + k)) << 16)"
    else:
        load, loadv = "g[k]", f"vload{w}(0, g + k)"
    if w == 4:
        lanes = f"(({acc})b.s0 + ({acc})b.s1) + (({acc})b.s2 + ({acc})b.s3)"
    else:
        pairs = [f"(({acc})b.s{a} + ({acc})b.s{a + 1})" for a in range(0, 8, 2)]
        lanes = f"({pairs[0]} + {pairs[1]}) + ({pairs[2]} + {pairs[3]})"
    block = 1 if w == 4 else 8
    rescue = ""
    if acc == "double" and real == "float":
        rescue = f"""        if (row == 0 || row - row != 0) {{
            row = 0;
            for (long c = 0; c < width; c++) {{
                const long k = first + c;
                const double x = (double){load};
                row = row + x * x;
            }}
        }}
"""
    src = f"""//CL// {name}: Adafactor's row sums and column partials of g^2 in one pass
{preamble(real, "double" in (storage, acc), storage == "bf16")}
__kernel void {name}(__global const {POINTER[storage]} *restrict g, const long g_off,
    __global const long *restrict both, const long both_off,
    __global {acc} *restrict row_partials, __global {acc} *restrict col_partials)
{{
    g += g_off;
    const long t = 5 * (both_off + (long)get_global_id(0));
    const long base = both[t], rows = both[t + 1], width = both[t + 2];
    __global {acc} *restrict cols = col_partials + both[t + 3];
    const long r0 = both[t + 4];
    for (long c = 0; c < width; c++) {{
        const long k = base + c;
        const {acc} x = ({acc}){load};
        cols[c] = x * x;
    }}
    for (long m = 1; m < rows; m++) {{
        for (long c = 0; c < width; c++) {{
            const long k = base + m * width + c;
            const {acc} x = ({acc}){load};
            cols[c] += x * x;
        }}
    }}
    for (long m = 0; m < rows; m++) {{
        const long first = base + m * width, stop = first + width;
        {acc} row = 0;
        long k = first;
        while (k + {w} <= stop) {{
            {real}{w} b = ({real}{w})(0);
            for (int v = 0; v < {block} && k + {w} <= stop; v++, k += {w}) {{
                const {real}{w} x = {loadv};
                b = b + x * x;
            }}
            row = row + {lanes};
        }}
        for (; k < stop; k++) {{
            const {real} x = ({real}){load};
            row = row + ({acc})(x * x);
        }}
{rescue}        row_partials[r0 + m] = row;
    }}
}}
"""
    return src, name


def _factors_source(rule: FactoredRule, state_t: str, acc: str, real: str) -> tuple[str, str]:
    """One work-item per row and per column of the state: its factor, the row's
    ``(v_row / mean)^-1/2`` (torch: the mean floored at eps1) and the column's ``v_col^-1/2``
    (``factors``: the rows', then the columns'; a placeholder's is 0)."""
    key = repr((rule.eps1 is not None, state_t, acc, real))
    name = f"netcl_factored_factors_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    mean = "(real)means[m]" if rule.eps1 is None else "fmax((real)means[m], (real)eps1)"
    src = f"""//CL// {name}: Adafactor's row and column factors
{preamble(real, "double" in (real, state_t, acc))}
__kernel void {name}(__global const {state_t} *restrict vr, const long vr_off,
    __global const {state_t} *restrict vc, const long vc_off,
    __global const {acc} *restrict means, __global const long *restrict row_means,
    __global real *restrict factors, const long rows, const {acc} eps1)
{{
    const long s = get_global_id(0);
    if (s < rows) {{
        const long m = row_means[s];
        factors[s] = m < 0 ? (real)0 : (real)1 / SQRT((real)vr[vr_off + s] / {mean});
    }} else {{
        factors[s] = (real)1 / SQRT((real)vc[vc_off + s - rows]);
    }}
}}
"""
    return src, name


def _apply_source(rule: FactoredRule, storage: str, acc: str) -> tuple[str, str]:
    """One work-item per block (see :func:`_blocks`): the factored leaves' updates, ``g`` times
    the row factor times the column factor (optax's order), or torch's ``g`` times
    ``min(row factor * column factor, 1 / eps1)`` (``max(var, eps1^2)^-1/2``). A block of one
    row (the factored axes last, the usual case) has one factor per block and one per
    element: in vectors of 8 (4 in double)."""
    key = repr((rule.eps1 is not None, storage, acc))
    name = f"netcl_factored_apply_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    real = "double" if storage == "double" else "float"
    w = 4 if real == "double" else 8  # (double8 changes the ABI on AVX: PoCL drops the kernel)
    if storage == "half":
        load, store = "vload_half(k, g)", "vstore_half_rte(x, k, u)"
        load8, store8 = "vload_half8(0, g + k)", "vstore_half8_rte(x, 0, u + k)"
    elif storage == "bf16":  # (no vector loop: each element as the scalar loop's)
        load, store = "BF16_LOAD(g[k])", "u[k] = BF16_RNE(x)"
        load8 = store8 = ""
    else:
        load, store = "g[k]", "u[k] = x"
        load8, store8 = f"vload{w}(0, g + k)", f"vstore{w}(x, 0, u + k)"
    if rule.eps1 is None:  # g * row factor * column factor, in that order

        def scaled(y: str, row: str, col: str) -> str:
            return f"({y} * {row}) * {col}"
    else:

        def scaled(y: str, row: str, col: str) -> str:
            return f"{y} * fmin({row} * {col}, inv_e)"

    def loop(row: str, col: str) -> str:  # row and col: the uniform one is fu, the other fv
        vec_row = row.replace("fv[j]", f"vload{w}(0, fv + j)")
        vec_col = col.replace("fv[j]", f"vload{w}(0, fv + j)")
        vector = f"""for (; j + {w} <= nj; j += {w}) {{
                const long k = e + j;
                const realv y = convert_{real}{w}({load8});
                const realv x = {scaled("y", vec_row, vec_col)};
                {store8};
            }}
            """
        return (
            (vector if load8 else "")
            + f"""for (; j < nj; j++) {{
                const long k = e + j;
                const real x = {scaled(f"({real}){load}", row, col)};
                {store};
            }}"""
        )

    src = f"""//CL// {name}: Adafactor's factored updates, a run of the last axes per work-item
{preamble(real, "double" in (real, acc), storage == "bf16")}
typedef {real}{w} realv;
__kernel void {name}(__global const {POINTER[storage]} *restrict g, const long g_off,
    __global {POINTER[storage]} *restrict u, const long u_off,
    __global const real *restrict f, __global const long *restrict blocks,
    __global const long *restrict items, const long items_off, const {acc} eps1)
{{
    g += g_off; u += u_off;
    const real inv_e = (real)1 / (real)eps1;
    const long item = 2 * (items_off + (long)get_global_id(0));
    for (long b = items[item]; b < items[item] + items[item + 1]; b++) {{
    const long t = 10 * b;
    const long e = blocks[t], nj = blocks[t + 1], nq = blocks[t + 2];
    const long rb = blocks[t + 3], rsj = blocks[t + 4], rsq = blocks[t + 5];
    const long cb = blocks[t + 6], csj = blocks[t + 7], csq = blocks[t + 8];
    if (nq == 1) {{
        long j = 0;
        if (rsj == 0) {{  /* one row factor, a column factor per element */
            const real fu = f[rb];
            __global const real *fv = f + cb;
            {loop("fu", "fv[j]")}
        }} else {{  /* a row factor per element, one column factor */
            const real fu = f[cb];
            __global const real *fv = f + rb;
            {loop("fv[j]", "fu")}
        }}
        continue;
    }}
    for (long j = 0; j < nj; j++) {{
        for (long q = 0; q < nq; q++) {{
            const long k = e + j * nq + q;
            const real x = {
        scaled(f"({real}){load}", "f[rb + j * rsj + q * rsq]", "f[cb + j * csj + q * csq]")
    };
            {store};
        }}
    }}
    }}
}}
"""
    return src, name


def _plain_source(rule: FactoredRule, storage: str, state_t: str, acc: str) -> tuple[str, str]:
    """One work-item per chunk of a leaf that is not factored: its EMA ``v`` (shaped like
    it) and its updates ``g v^-1/2``."""
    key = repr((rule.lerp, rule.epsilon != 0, rule.eps1 is not None, storage, state_t, acc))
    name = f"netcl_factored_plain_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    real = "double" if storage == "double" else "float"
    if storage == "half":
        load, store = "vload_half(gs + k, g)", "vstore_half_rte(x, gs + k, u)"
    elif storage == "bf16":
        load, store = "BF16_LOAD(g[gs + k])", "u[gs + k] = BF16_RNE(x)"
    else:
        load, store = "g[gs + k]", "u[gs + k] = x"
    square = "y * y + (real)epsilon" if rule.epsilon else "y * y"
    ema = "LERP(v, s, (real)add)" if rule.lerp else "(real)keep * v + (real)add * s"
    scale = "v" if rule.eps1 is None else "fmax(v, (real)eps1 * (real)eps1)"
    if state_t in ("float", "double"):
        v_load, v_round = "(real)v_in[vs + k]", f"({state_t})"
        v_store = f"v_out[vs + k] = ({state_t})v;"
    else:  # low-precision state: float math, one rounding on store
        v_load, v_round = load_expr(state_t, "v_in", "vs + k"), "(real)"
        v_store = store_stmt(state_t, "v_out", "vs + k", "v")
    bf16 = "bf16" in (storage, state_t)
    src = f"""//CL// {name}: Adafactor's updates of the leaves that are not factored
{preamble(real, "double" in (real, state_t, acc), bf16)}
__kernel void {name}(__global const {POINTER[storage]} *restrict g, const long g_off,
    __global {POINTER[storage]} *restrict u, const long u_off,
    __global const {POINTER[state_t]} *restrict v_in, const long v_in_off,
    __global {POINTER[state_t]} *restrict v_out, const long v_out_off,
    __global const long *restrict rows, const long rows_off,
    const {acc} keep, const {acc} add, const {acc} epsilon, const {acc} eps1)
{{
    g += g_off; u += u_off; v_in += v_in_off; v_out += v_out_off;
    const long t = 3 * (rows_off + (long)get_global_id(0));
    const long gs = rows[t], vs = rows[t + 1], n = rows[t + 2];
    for (long k = 0; k < n; k++) {{
        const real y = ({real}){load};
        const real s = {square};
        real v = {v_load};
        v = {v_round}({ema});
        {v_store}
        const real x = y * ((real)1 / SQRT({scale}));
        {store};
    }}
}}
"""
    return src, name


def _copy_source(state_t: str) -> tuple[str, str]:
    """Pure mode: the placeholders of the new state (``copies``: which array, which index).
    ``state_t``: the fields' C type, or their storages ``"row,col,v"`` where they differ or
    are 16-bit (copied as words)."""
    fields = state_t.split(",") if "," in state_t else [state_t] * 3
    types = [{"half": "ushort", "bf16": "ushort"}.get(t, t) for t in fields]
    name = f"netcl_factored_copy_{state_t.replace(',', '_')}"
    args = ", ".join(
        f"__global const {t} *restrict {r}_in, const long {r}_in_off, "
        f"__global {t} *restrict {r}_out, const long {r}_out_off"
        for r, t in zip(("vr", "vc", "v"), types, strict=True)
    )
    src = f"""//CL// {name}: Adafactor's placeholders, copied to the new state
{preamble("double" if state_t == "double" else "float", state_t == "double")}
__kernel void {name}({args}, __global const long *restrict copies, const long copies_off)
{{
    const long t = 3 * (copies_off + (long)get_global_id(0));
    const long which = copies[t], k = copies[t + 1];
    if (which == -1) vr_out[vr_out_off + k] = vr_in[vr_in_off + k];
    else if (which == -2) vc_out[vc_out_off + k] = vc_in[vc_in_off + k];
    else v_out[v_out_off + k] = v_in[v_in_off + k];
}}
"""
    return src, name


def _convert_source(state_t: str, widen: bool) -> tuple[str, str]:
    """Low-precision row and column state (``state_t``: their storages ``"row,col"``) to a
    float copy (rows, then columns: ``widen``) or back from it, rounded once."""
    row_t, col_t = state_t.split(",")
    which = "widen" if widen else "narrow"
    name = f"netcl_factored_{which}_{row_t}_{col_t}"

    def move(t: str, v: str, index: str) -> str:
        if widen:
            return f"wide[s] = {load_expr(t, v, index)};"
        return store_stmt(t, v, index, "wide[s]")

    state_q, wide_q = ("const ", "") if widen else ("", "const ")
    src = f"""//CL// {name}: Adafactor's row and column state, {which}ed
{preamble("float", False, "bf16" in (row_t, col_t))}
__kernel void {name}(__global {state_q}{POINTER[row_t]} *restrict vr, const long vr_off,
    __global {state_q}{POINTER[col_t]} *restrict vc, const long vc_off,
    __global {wide_q}float *restrict wide, const long rows)
{{
    const long s = get_global_id(0);
    if (s < rows) {{
        {move(row_t, "vr", "vr_off + s")}
    }} else {{
        {move(col_t, "vc", "vc_off + s - rows")}
    }}
}}
"""
    return src, name


_kernels: dict[tuple, cl.Kernel] = {}


def _kernel(ctx: cl.Context, which: str, rule: FactoredRule, storage: str, state_t: str,
            acc: str) -> cl.Kernel:  # fmt: skip
    key = (ctx, which, rule, storage, state_t, acc)
    kernel = _kernels.get(key)
    if kernel is None:
        a = np.float64 if acc == "double" else np.float32
        if which == "apply":
            src, name = _apply_source(rule, storage, acc)
            dtypes = [None, np.int64] * 2 + [None, None, None, np.int64, a]
        elif which == "both":
            src, name = _both_source(storage, acc)
            dtypes = [None, np.int64, None, np.int64, None, None]
        elif which == "factors":
            real = "double" if storage == "double" else "float"
            src, name = _factors_source(rule, state_t, acc, real)
            dtypes = [None, np.int64] * 2 + [None, None, None, np.int64, a]
        elif which == "plain":
            src, name = _plain_source(rule, storage, state_t, acc)
            dtypes = [None, np.int64] * 5 + [a] * 4
        elif which in ("widen", "narrow"):
            src, name = _convert_source(state_t, which == "widen")
            dtypes = [None, np.int64, None, np.int64, None, np.int64]
        else:
            src, name = _copy_source(state_t)
            dtypes = [None, np.int64] * 7
        kernel = _kernels[key] = build(ctx, src, name, dtypes)
    return kernel


# ---------------------------------------------------------------------------- running


_outputs: dict[tuple, Any] = {}


def _row_and_column_sums(
    queue: cl.CommandQueue, plan: Plan, ema: SegmentReduction, grads: list[cla.Array], acc: str
) -> None:
    """Both segmentations' partials in one launch (see :func:`_both_table`); per leaf where
    the grads are not packed."""
    assert plan.both is not None  # (the caller's check)
    dtype = grads[0].dtype
    acc_dtype = np.dtype(np.float64 if acc == "double" else np.float32)
    row_seg = segmentation(plan.shapes, "leaf", plan.row_views)
    col_seg = segmentation(plan.shapes, "leaf", plan.col_views)
    row_partials, _ = workspace(queue, row_seg, ema, dtype, acc_dtype)
    col_partials, _ = workspace(queue, col_seg, ema, dtype, acc_dtype)
    kernel = _kernel(queue.context, "both", FactoredRule(), storage_of(dtype), "", acc)
    table = plan.tables(queue)["both"].base_data
    lay = layout(plan.shapes, dtype)
    run = contiguous_run(grads, lay)
    tail = [row_partials.base_data, col_partials.base_data]
    if run is not None:
        kernel(queue, (len(plan.both),), (1,), *run, table, 0, *tail)  # pyright: ignore[reportArgumentType]
        note_launches(kernel.function_name)
        return
    ranges = col_seg.leaf_strided
    for j, (s0, s1) in enumerate(ranges):
        if s1 > s0 and plan.dims[j] is not None:
            g = grads[j]
            first = int(np.searchsorted(plan.both[:, 0], lay.offsets[j]))
            args = [g.base_data, element_offset(g) - lay.offsets[j], table, first, *tail]
            kernel(queue, (s1 - s0,), (1,), *args)
            note_launches(kernel.function_name)


def _factors(queue: cl.CommandQueue, plan: Plan, dtype: np.dtype) -> cla.Array:
    """The row and column factors' buffer of ``plan``'s leaves (kept across steps: the queue
    runs a step's launches in order)."""
    real = np.float64 if dtype == np.float64 else np.float32
    key = (queue, plan, "factors", real)
    buf = _outputs.get(key)
    if buf is None:
        buf = _outputs[key] = cla.empty(queue, (max(plan.factor_count, 1),), real)
    return buf


def _wide(queue: cl.CommandQueue, plan: Plan) -> cla.Array:
    """A float copy of low-precision row and column state (rows, then columns; kept across
    steps as the factors' buffer)."""
    key = (queue, plan, "wide")
    buf = _outputs.get(key)
    if buf is None:
        buf = _outputs[key] = cla.empty(queue, (max(plan.factor_count, 1),), np.float32)
    return buf


def _convert(
    queue: cl.CommandQueue, plan: Plan, which: str, state_t: str, runs: list, wide: cla.Array
) -> None:
    """``which``: ``"widen"`` the row and column state ``runs[0]``, ``runs[1]`` into ``wide``,
    or ``"narrow"`` it back into them (rounded to nearest even)."""
    kernel = _kernel(queue.context, which, FactoredRule(), "", state_t, "")
    launch(kernel, queue, plan.factor_count, [*runs[0], *runs[1], wide.base_data,
                                              plan.factor_rows])  # fmt: skip


def _copy_types(row_t: str, col_t: str, v_t: str) -> str:
    """The copy kernel's ``state_t``: one C type where the fields share a 32- or 64-bit one
    (the kernels as before low-precision state), else the three storages."""
    if row_t == col_t == v_t and row_t in ("float", "double"):
        return row_t
    return f"{row_t},{col_t},{v_t}"


def _run_of(leaves: list[cla.Array], shapes: tuple, queue: cl.CommandQueue) -> tuple[Any, int]:
    """``(buffer, element offset)`` of ``leaves`` packed back to back (a packed copy if
    they are not)."""
    run = contiguous_run(leaves, layout(shapes, leaves[0].dtype))
    if run is None:
        packed = pack(leaves, queue)
        run = contiguous_run(packed)
        assert run is not None
    return run


def factored_step(
    queue: cl.CommandQueue,
    rule: FactoredRule,
    grads: list[cla.Array],
    state: tuple[list[cla.Array], ...],  # (its three fields)
    keep: float,
    add: float,
    eps1: float,
    inplace: bool,
) -> tuple[list[cla.Array], tuple[list[cla.Array], ...]]:
    """One step over one dtype group: ``(updates, (v_row, v_col, v))``. Pure: every output
    is fresh (the inputs are unchanged); in place: the state's arrays are written where they
    are (through a packed copy, copied back, where they are not packed) and the updates are a
    buffer kept for the next step. Each state field is stored as its arrays are (the state
    dtype, or float16 or bfloat16: float math, the new values rounded once on store)."""
    dtype = grads[0].dtype
    shapes = tuple(g.shape for g in grads)
    plan = plan_of(shapes, rule)
    acc = acc_ctype(queue)
    storage = storage_of(dtype)
    fields = (plan.row_shapes, plan.col_shapes, plan.v_shapes)
    lays = [layout(s, leaves[0].dtype) for s, leaves in zip(fields, state, strict=True)]
    row_t, col_t, v_t = (storage_of(lay.dtype) for lay in lays)
    ctx = queue.context
    g_run = _run_of(grads, shapes, queue)
    olds = [_run_of(leaves, lay.shapes, queue) for leaves, lay in zip(state, lays, strict=True)]
    new_leaves: list[list[cla.Array]] = []
    news = []
    copy_back = []
    for leaves, lay, old in zip(state, lays, olds, strict=True):
        if inplace:
            news.append(old)
            new_leaves.append(leaves)
            if contiguous_run(leaves, lay) is None:
                copy_back.append((old, leaves, lay))
            continue
        block = lay.allocate(queue)
        news.append((block.buffer, block.offset // lay.dtype.itemsize))
        new_leaves.append(block.views)
    out_lay = layout(shapes, dtype)
    if inplace:
        key = (queue, shapes, dtype)
        out = _outputs.get(key)
        if out is None:
            out = _outputs[key] = out_lay.allocate(queue)
    else:
        out = out_lay.allocate(queue)
    u_run = (out.buffer, out.offset // dtype.itemsize)
    tables = plan.tables(queue)
    a = np.float64 if acc == "double" else np.float32
    scalars = (("keep", keep), ("add", add), ("epsilon", rule.epsilon))
    ema = _segment_ema(rule)
    # an EMA per row and per column, each written into the state by its finish
    sums = plan.both is None or not len(plan.both)
    if not sums:
        _row_and_column_sums(queue, plan, ema, grads, acc)
    factor_t = storage_of(lays[0].dtype)
    ema_runs: list[tuple[Any, ...]] = [(olds[0], news[0]), (olds[1], news[1])]
    rows_at = (lays[0], *news[0])
    wide = None
    if {row_t, col_t} - {"float", "double"}:  # low precision: the EMAs in a float copy
        factor_t, wide = "float", _wide(queue, plan)
        _convert(queue, plan, "widen", f"{row_t},{col_t}", olds, wide)
        ema_runs = [((wide.base_data, 0),) * 2, ((wide.base_data, plan.factor_rows),) * 2]
        rows_at = (layout(plan.row_shapes, np.float32), wide.base_data, 0)
    for (views, s), run in zip(((plan.row_views, 0), (plan.col_views, 1)), ema_runs,
                               strict=True):  # fmt: skip
        reduce_segments(queue, ema, grads, [], acc, scalars, (run,), views,
                        factor_t if wide is not None else (row_t, col_t)[s], sums)  # fmt: skip
    if wide is not None:  # (the new state rounded once; the factors from its float values)
        _convert(queue, plan, "narrow", f"{row_t},{col_t}", news, wide)
    row_lay, row_buf, row_off = rows_at
    rows = row_lay.views_of(queue, row_buf, row_off * row_lay.dtype.itemsize)
    means = reduce_segments(queue, _ROW_MEAN, rows, [], acc, views=plan.mean_views)
    if len(plan.blocks):
        factors = _factors(queue, plan, dtype)
        kernel = _kernel(ctx, "factors", rule, storage, factor_t, acc)
        state_runs = [*news[0], *news[1]] if wide is None else [
            wide.base_data, 0, wide.base_data, plan.factor_rows]  # fmt: skip
        args = [*state_runs, means.base_data, tables["row_means"].base_data,
                factors.base_data, plan.factor_rows, a(eps1)]  # fmt: skip
        launch(kernel, queue, plan.factor_count, args)
        kernel = _kernel(ctx, "apply", rule, storage, "", acc)
        args = [*g_run, *u_run, factors.base_data, tables["blocks"].base_data,
                tables["items"].base_data, 0, a(eps1)]  # fmt: skip
        kernel(queue, (len(plan.items),), (1,), *args)
        note_launches(kernel.function_name)
    if len(plan.rows):
        kernel = _kernel(ctx, "plain", rule, storage, v_t, acc)
        args = [*g_run, *u_run, *olds[2], *news[2], tables["rows"].base_data, 0,
                a(keep), a(add), a(rule.epsilon), a(eps1)]  # fmt: skip
        kernel(queue, (len(plan.rows),), (1,), *args)
        note_launches(kernel.function_name)
    if not inplace and len(plan.copies):
        kernel = _kernel(ctx, "copy", rule, storage, _copy_types(row_t, col_t, v_t), acc)
        args = [*olds[0], *news[0], *olds[1], *news[1], *olds[2], *news[2],
                tables["copies"].base_data, 0]  # fmt: skip
        kernel(queue, (len(plan.copies),), None, *args)
        note_launches(kernel.function_name)
    for (buf, off), leaves, lay in copy_back:
        item = lay.dtype.itemsize
        for leaf, start in zip(leaves, lay.offsets, strict=True):
            cl.enqueue_copy(queue, leaf.base_data, buf, byte_count=leaf.nbytes,
                            dst_offset=leaf.offset, src_offset=(off + start) * item)  # fmt: skip
    return out.views, tuple(new_leaves)


def init_packed(
    leaves: list[Any], shapes: list[tuple[int, ...]], dtype_of: Any, tree: Any
) -> list[cla.Array]:
    """Zeroed arrays of ``shapes`` (one per leaf of ``tree``, of ``dtype_of(leaf.dtype)``),
    packed in one buffer per dtype; raises naming a leaf that is not a float device array."""
    if not leaves:
        return []
    queue = queue_of_leaves(leaves)
    check_init_leaves(leaves, tree, queue)
    out: list[Any] = [None] * len(leaves)
    for dtype, idx in group_by_dtype(leaves).items():
        block = layout(tuple(shapes[i] for i in idx), dtype_of(dtype)).allocate(queue)
        block.fill(queue, 0.0)
        for i, view in zip(idx, block.views, strict=True):
            out[i] = view
    return out


def check_updates(leaves: list[Any], tree: Any, queue: cl.CommandQueue) -> None:
    """The updates' leaves: C-contiguous float device arrays on one context (raises naming
    the first that is not)."""
    if not all_valid(leaves, [], queue):
        check_leaves(leaves, [], tree, queue, "updates")


__all__ = [
    "FactoredRule",
    "check_updates",
    "factor_dims",
    "factored_step",
    "init_packed",
    "plan_of",
    "state_shapes",
]
