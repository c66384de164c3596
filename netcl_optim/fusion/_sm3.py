"""SM3's kernels (optax's ``scale_by_sm3``) over one dtype group's packed layout: three
launches per group whatever the number of leaves. No host read of any value.

A leaf of rank >= 2 is ``R`` rows (its leading axes) of ``L`` (its last axis); one of rank 1
is one row, a 0-d leaf one row of one element. Per group:

1. **rows**: one work-item per chunk of a row (at most ``CHUNK`` elements), or per run of
   whole rows (``CHUNK`` elements or fewer): per row, the min of the old leading-axis
   accumulators at the row's indices (a few integer divisions per row, kept in ``rowmin``
   for step 2; +inf where the leaf has no leading axis), then per element, in vectors of
   ``width`` lanes, ``a``, the update and ``nu``, and the chunk's max of ``a``
   (``chunkmax``). For a leaf of rank <= 1 it writes the new ``mu = a`` too;
2. **cols** (leaves of rank >= 2): one work-item per ``width`` columns and block of at most
   ``ROWS`` rows: the same ``a`` again (the same expression over the same values, so the
   same bits), its max over the block (``colpart``);
3. **finish** (leaves of rank >= 2): one work-item per element of the new accumulators: a
   last-axis one is the max of its column's block partials, a leading-axis one the max of
   the chunk maxes of its rows.

A work-item finds its leaf (or accumulator) by a binary search in a host-built table. Maxima
are exact, so the result depends on nothing but the values: a packed tree and the same leaves
as separate arrays (copied into a packed scratch first) give the same bits. The rows launch
reads a rank <= 1 accumulator before it writes it in the same work-item, and the finish reads
no old accumulator, so the accumulators are written in place.

On PoCL (2 cores) a step takes ~3x Adam's at 2048x2048 (rows of 2048: 9.8 ms vs 3.4 ms) and
~1.3x at 4M elements of rank 1; tall leaves with short rows ((1M, 4): 14 ms) and short wide
ones ((4, 1M): 15 ms) are slower (a row or a column per work-item; short loops).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, cast

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._device import state_dtype
from .._packing import contiguous_run, layout
from ._codegen import POINTER, preamble, storage_of
from ._codegen import load as load_expr
from ._codegen import store as store_stmt
from ._launch import note_launches
from ._programs import build

CHUNK = 2048  # elements of a row per work-item of the rows launch
ROWS = 128  # rows per work-item of the cols launch
_PAD = 64  # work sizes are rounded up to this; the kernels check their bound

# leaf table columns
(L_W1, L_CPR, L_R, L_L, L_ELEM, L_ROW, L_MULAST, L_NLEAD, L_AXIS, L_W2, L_NB, L_COLPART, L_RPI,
 L_CHUNK) = range(14)  # fmt: skip
L_COLS = 14
# axis table: per leading axis (dim, mu offset, row stride)
A_COLS = 3
# segment table: per leading-axis or last-axis vector of a leaf of rank >= 2 (first work-item,
# kind, then 5 values, mu start; see _finish_source)
S_COLS = 8


def sm3_mu_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The accumulators of a leaf of ``shape``: one vector per axis for rank >= 2, else one
    array of the leaf's shape."""
    if len(shape) < 2:
        return [tuple(shape)]
    return [(n,) for n in shape]


class Sm3Plan:
    """The host tables (``int64``) of leaves with ``shapes`` packed back to back, for
    kernels whose vectors have ``width`` lanes (a cols work-item's columns)."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], width: int) -> None:
        self.shapes = shapes
        self.mu_shapes = tuple(m for s in shapes for m in sm3_mu_shapes(s))
        elems = layout(shapes, np.dtype(np.float32)).offsets
        mu_offsets = layout(self.mu_shapes, np.dtype(np.float32)).offsets
        leaves: list[list[int]] = []
        axes: list[list[int]] = []
        segs: list[list[int]] = []
        w1 = w2 = w3 = rows = colparts = chunks = 0
        k = 0  # index of the leaf's first accumulator
        for shape, elem in zip(shapes, elems, strict=True):
            big = len(shape) >= 2
            length = shape[-1] if shape else 1
            r = math.prod(shape[:-1]) if big else 1
            cpr = -(-length // CHUNK)
            rpi = max(1, CHUNK // length) if cpr == 1 else 1  # short rows: several per item
            items = -(-r // rpi) * cpr
            nb = -(-r // ROWS) if big else 0  # rank <= 1: the rows launch writes mu
            lead = list(shape[:-1]) if big else []
            mu_last = mu_offsets[k + len(lead)]
            leaves.append(
                [w1, cpr, r, length, elem, rows, mu_last, len(lead), len(axes), w2, nb, colparts,
                 rpi, chunks]
            )  # fmt: skip
            for a, dim in enumerate(lead):
                stride = math.prod(lead[a + 1 :])
                outer = math.prod(lead[:a])
                axes.append([dim, mu_offsets[k + a], stride])
                segs.append([w3, 1, dim, outer, stride, cpr, chunks, mu_offsets[k + a]])
                w3 += dim
            if big:
                segs.append([w3, 0, length, nb, colparts, 0, 0, mu_last])
                w3 += length
            k += len(lead) + 1
            w1 += items
            w2 += nb * -(-length // width)
            rows += r
            chunks += r * cpr
            colparts += nb * length
        self.leaves = np.array(leaves, np.int64).reshape(-1, L_COLS)
        self.axes = np.array(axes, np.int64).reshape(-1, A_COLS)
        self.segs = np.array(segs, np.int64).reshape(-1, S_COLS)
        self.work = (w1, w2, w3)
        self.rows = rows
        self.chunks = chunks
        self.colparts = colparts
        self._device: dict[cl.Context, dict[str, cla.Array]] = {}

    def tables(self, queue: cl.CommandQueue) -> dict[str, cla.Array]:
        """The tables on ``queue``'s device (uploaded once per context; never empty)."""
        tables = self._device.get(queue.context)
        if tables is None:
            tables = {
                name: cla.to_device(queue, host if host.size else np.zeros(S_COLS, np.int64))
                for name, host in (("leaves", self.leaves), ("axes", self.axes),
                                   ("segs", self.segs))
            }  # fmt: skip
            queue.finish()  # uploads done before any queue may use them
            self._device[queue.context] = tables
        return tables


@lru_cache(maxsize=256)
def sm3_plan(shapes: tuple[tuple[int, ...], ...], width: int) -> Sm3Plan:
    return Sm3Plan(shapes, width)


def width(dtype: np.dtype) -> int:
    """Vector lanes of the kernels for ``dtype`` leaves: 4 for double (PoCL loads only half
    a double8 on CPUs without AVX-512), else 8."""
    return 4 if np.dtype(dtype) == np.float64 else 8


# ---------------------------------------------------------------------------- kernels

_HELPERS = """\
/* min and max that keep a NaN (as numpy's minimum and maximum) */
#define MINN(x, y) (((x) < (y) || ISNAN(x)) ? (x) : (y))
#define MAXN(x, y) (((x) > (y) || ISNAN(x)) ? (x) : (y))
/* the leaf (row of the table) of work-item w: the last whose first work-item is <= w */
static inline long find(__global const long *t, const long n, const long cols, const long col,
                        const long w)
{
    long lo = 0, hi = n - 1;
    while (lo < hi) {
        const long mid = (lo + hi + 1) / 2;
        if (t[mid * cols + col] <= w) lo = mid; else hi = mid - 1;
    }
    return lo;
}
"""


def _mu_load(ms: str, index: str) -> str:
    """An accumulator of storage ``ms`` at ``index``, as ``real``."""
    return f"(real)mu[{index}]" if ms in ("float", "double") else load_expr(ms, "mu", index)


def _accum(storage: str, ms: str) -> str:
    """``a`` of element ``e`` (column ``j``) of a row: ``c g^2 + b2 bound``."""
    g = {"half": "vload_half(e, g)", "bf16": "BF16_LOAD(g[e])"}.get(storage, "(real)g[e]")
    pad = " " * 12
    return (
        f"{pad}const real x = {g};\n"
        f"{pad}const real bound = MINN(lead, {_mu_load(ms, 'mu_last + j')});\n"
        f"{pad}const real a = c * x * x + b2 * bound;\n"
    )


def _rows_source(storage: str, ms: str, ns: str) -> str:
    """The rows and cols kernels for ``storage`` updates, accumulators stored as ``ms`` and
    momentum as ``ns`` (bfloat16 updates or 16-bit state: no vector loop, each element as
    the scalar loop's)."""
    ws = "double" if storage == "double" else "float"  # the workspace's type
    vector = storage != "bf16" and {ms, ns} <= {"float", "double"}
    if storage == "bf16":
        out = "out[e] = BF16_RNE(nn);"
    else:
        out = "vstore_half_rte(nn, e, out);" if storage == "half" else f"out[e] = ({storage})nn;"
    nu_load = "(real)nu_in[e]" if ns in ("float", "double") else load_expr(ns, "nu_in", "e")
    w = 4 if storage == "double" else 8  # see width()
    load_v = f"vload_half{w}(0, g + e)" if storage == "half" else f"vload{w}(0, g + e)"
    store_v = (
        f"vstore_half{w}_rte(nn, 0, out + e);"
        if storage == "half"
        else f"vstore{w}(nn, 0, out + e);"
    )
    accum = _accum(storage, ms)
    lanes = "".join(f"        m = MAXN(mv.s{k}, m);\n" for k in range(w)) if vector else ""
    real = "double" if storage == "double" else "float"
    g_t, mu_t, nu_t = POINTER[storage], POINTER[ms], POINTER[ns]
    mu_store = store_stmt(ms, "mu_out", "mu_last + j", "a")
    rows_head = f"for (; j + {w} <= j1; j += {w}) {{  /* as the scalar loop below, {w} lanes */"
    rows_vector = f"""        {rows_head}
            const long e = base + j;
            const vec x = {load_v};
            const vec mul = vload{w}(0, mu + mu_last + j);
            const vec bound = select(mul, leadv, (leadv < mul) | isnan(leadv));
            const vec a = c * x * x + b2 * bound;
            const vec up = select((vec)(0), x / sqrt(a + eps), a > (vec)(0));
            const vec nn = omb1 * up + b1 * vload{w}(0, nu_in + e);
            vstore{w}(nn, 0, nu_out + e);
            {store_v}
            if (n_lead == 0) vstore{w}(a, 0, mu_out + mu_last + j);
            mv = select(mv, a, (a > mv) | isnan(a));
        }}
"""
    cols_note = f"/* {w} columns as one vector: as the scalar loop below */"
    cols_head = f"if (j0 + {w} <= length) {{  {cols_note}"
    cols_vector = f"""    {cols_head}
        const vec mul = vload{w}(0, mu + mu_last + j0);
        vec mv = (vec)(0);
        for (long r = r0; r < r1; r++) {{
            const long e = first + r * length + j0;
            const vec x = {load_v};
            const vec leadv = (vec)(mins[r]);
            const vec bound = select(mul, leadv, (leadv < mul) | isnan(leadv));
            const vec a = c * x * x + b2 * bound;
            mv = select(mv, a, (a > mv) | isnan(a));
        }}
        vstore{w}(mv, 0, part + j0);
        return;
    }}
"""
    if not vector:
        rows_vector = cols_vector = ""
    cols_end = "length" if vector else f"min(j0 + {w}, length)"
    return f"""
typedef {real}{w} vec;
__kernel void sm3_rows(__global const long *restrict leaves, const long n_leaves,
                       __global const long *restrict axes, const long n_work,
                       __global const {g_t} *restrict g, const long g_off,
                       __global const {mu_t} *mu, const long mu_off,
                       __global {mu_t} *mu_out, const long mu_out_off,
                       __global const {nu_t} *nu_in, const long nu_in_off,
                       __global {nu_t} *nu_out, const long nu_out_off,
                       __global {g_t} *restrict out, const long out_off,
                       __global {ws} *restrict rowmin, __global {ws} *restrict chunkmax,
                       const real c, const real b2, const real eps, const real b1,
                       const real omb1)
{{
    const long w = get_global_id(0);
    if (w >= n_work) return;
    g += g_off; mu += mu_off; mu_out += mu_out_off; nu_in += nu_in_off; nu_out += nu_out_off;
    out += out_off;
    __global const long *leaf = leaves + find(leaves, n_leaves, {L_COLS}, {L_W1}, w) * {L_COLS};
    const long cpr = leaf[{L_CPR}], length = leaf[{L_L}], mu_last = leaf[{L_MULAST}];
    const long n_lead = leaf[{L_NLEAD}], rpi = leaf[{L_RPI}];
    const long local_w = w - leaf[{L_W1}];
    /* rows [row0, row1) from column j0 to j1: several whole rows, or one chunk of a row */
    const long row0 = cpr == 1 ? local_w * rpi : local_w / cpr;
    const long row1 = cpr == 1 ? min(row0 + rpi, leaf[{L_R}]) : row0 + 1;
    const long chunk = cpr == 1 ? 0 : local_w - row0 * cpr;
    const long j0 = chunk * {CHUNK}, j1 = min(j0 + {CHUNK}, length);
    __global {ws} *chunk_max = chunkmax + leaf[{L_CHUNK}] + chunk;
    for (long row = row0; row < row1; row++) {{
        real lead = INFINITY;
        __global const long *axis = axes + leaf[{L_AXIS}] * {A_COLS};
        for (long k = 0; k < n_lead; k++, axis += {A_COLS}) {{
            const long i = (row / axis[2]) % axis[0];
            lead = MINN(lead, {_mu_load(ms, "axis[1] + i")});
        }}
        if (chunk == 0) rowmin[leaf[{L_ROW}] + row] = lead;
        const long base = leaf[{L_ELEM}] + row * length;
        long j = j0;
        vec mv = (vec)(0);
        const vec leadv = (vec)(lead);
{rows_vector}        real m = 0;
{lanes}        for (; j < j1; j++) {{
            const long e = base + j;
{accum}            const real up = a > 0 ? x / SQRT(a + eps) : (real)0;
            const real nn = omb1 * up + b1 * {nu_load};
            {store_stmt(ns, "nu_out", "e", "nn")}
            {out}
            if (n_lead == 0) {mu_store}  /* rank <= 1: mu <- a */
            m = MAXN(a, m);
        }}
        chunk_max[row * cpr] = m;
    }}
}}

__kernel void sm3_cols(__global const long *restrict leaves, const long n_leaves,
                       const long n_work,
                       __global const {g_t} *restrict g, const long g_off,
                       __global const {mu_t} *restrict mu, const long mu_off,
                       __global const {ws} *restrict rowmin, __global {ws} *restrict colpart,
                       const real c, const real b2)
{{
    const long w = get_global_id(0);
    if (w >= n_work) return;
    g += g_off; mu += mu_off;
    __global const long *leaf = leaves + find(leaves, n_leaves, {L_COLS}, {L_W2}, w) * {L_COLS};
    const long length = leaf[{L_L}], mu_last = leaf[{L_MULAST}];
    const long local_w = w - leaf[{L_W2}], groups = (length + {w - 1}) / {w};
    const long block = local_w / groups, j0 = (local_w - block * groups) * {w};
    const long r0 = block * {ROWS}, r1 = min(r0 + {ROWS}, leaf[{L_R}]);
    __global const {ws} *mins = rowmin + leaf[{L_ROW}];
    __global {ws} *part = colpart + leaf[{L_COLPART}] + block * length;
    const long first = leaf[{L_ELEM}];
{cols_vector}    for (long j = j0; j < {cols_end}; j++) {{
        real m = 0;
        for (long r = r0; r < r1; r++) {{
            const long e = first + r * length + j;
            const real lead = mins[r];
{accum}            m = MAXN(a, m);
        }}
        part[j] = m;
    }}
}}
"""


def _finish_source(ws: str, ms: str) -> str:
    """Segment row: ``(first work-item, 0, L, blocks, first colpart, -, -, mu start)`` for
    a last-axis vector, ``(first work-item, 1, dim, outer, inner, chunks per row, first
    chunk, mu start)`` for a leading axis (its rows: ``(o * dim + i) * inner + t``)."""
    return f"""
__kernel void sm3_finish(__global const long *restrict segs, const long n_segs,
                         const long n_work,
                         __global const {ws} *restrict chunkmax,
                         __global const {ws} *restrict colpart,
                         __global {POINTER[ms]} *restrict mu_out, const long mu_out_off)
{{
    const long w = get_global_id(0);
    if (w >= n_work) return;
    __global const long *s = segs + find(segs, n_segs, {S_COLS}, 0, w) * {S_COLS};
    mu_out += mu_out_off + s[7];
    const long i = w - s[0];
    real m = 0;
    if (s[1] == 0) {{
        const long length = s[2];
        __global const {ws} *p = colpart + s[4] + i;
        for (long b = 0; b < s[3]; b++) m = MAXN((real)p[b * length], m);
    }} else {{
        const long dim = s[2], outer = s[3], inner = s[4], cpr = s[5];
        for (long o = 0; o < outer; o++) {{
            const long row0 = (o * dim + i) * inner;
            __global const {ws} *p = chunkmax + s[6] + row0 * cpr;
            for (long k = 0; k < inner * cpr; k++) m = MAXN((real)p[k], m);
        }}
    }}
    {store_stmt(ms, "mu_out", "i", "m")}
}}
"""


_kernels: dict[tuple, tuple[cl.Kernel, cl.Kernel, cl.Kernel]] = {}


def source(
    dtype: np.dtype, mu_dtype: np.dtype | None = None, nu_dtype: np.dtype | None = None
) -> str:
    """The program of a group of ``dtype`` leaves (for reading), its accumulators stored as
    ``mu_dtype`` and its momentum as ``nu_dtype`` (default: the state dtype)."""
    storage = storage_of(dtype)
    ms = storage_of(state_dtype(dtype) if mu_dtype is None else mu_dtype)
    ns = storage_of(state_dtype(dtype) if nu_dtype is None else nu_dtype)
    real = "double" if storage == "double" else "float"
    title = storage if {ms, ns} <= {"float", "double"} else f"{storage}; state {ms}, {ns}"
    bf16 = "bf16" in (storage, ms, ns)
    head = f"//CL// netcl SM3 ({title})\n{preamble(real, real == 'double', bf16)}\n"
    head += _HELPERS
    return head + _rows_source(storage, ms, ns) + _finish_source(real, ms)


def kernels(
    context: cl.Context, dtype: np.dtype, mu_dtype: np.dtype, nu_dtype: np.dtype
) -> tuple[cl.Kernel, cl.Kernel, cl.Kernel]:
    """The rows, cols and finish kernels for ``dtype`` leaves with state stored as
    ``mu_dtype`` and ``nu_dtype``, built once per context."""
    dtype, mu_dtype, nu_dtype = np.dtype(dtype), np.dtype(mu_dtype), np.dtype(nu_dtype)
    hit = _kernels.get((context, dtype, mu_dtype, nu_dtype))
    if hit is None:
        src = source(dtype, mu_dtype, nu_dtype)
        real = np.float64 if dtype == np.float64 else np.float32
        i64 = np.int64
        rows = build(
            context, src, "sm3_rows",
            [None, i64, None, i64, None, i64, None, i64, None, i64, None, i64, None, i64,
             None, i64, None, None, real, real, real, real, real],
        )  # fmt: skip
        cols = build(
            context, src, "sm3_cols",
            [None, i64, i64, None, i64, None, i64, None, None, real, real],
        )  # fmt: skip
        finish = build(context, src, "sm3_finish", [None, i64, i64, None, None, None, i64])
        hit = _kernels[(context, dtype, mu_dtype, nu_dtype)] = (rows, cols, finish)
    return hit


# ---------------------------------------------------------------------------- host

_workspaces: dict[tuple, tuple[cla.Array, cla.Array, cla.Array]] = {}


def _workspace(
    queue: cl.CommandQueue, plan: Sm3Plan, st: np.dtype
) -> tuple[cla.Array, cla.Array, cla.Array]:
    """``(rowmin, chunkmax, colpart)``, kept across steps: the queue runs one step's
    launches in order, so the next step writes them after this one read them."""
    key = (queue, plan, np.dtype(st))
    ws = _workspaces.get(key)
    if ws is None:
        sizes = (plan.rows, plan.chunks, plan.colparts)
        arrays = tuple(cla.empty(queue, (max(n, 1),), st) for n in sizes)
        ws = _workspaces[key] = cast("tuple[cla.Array, cla.Array, cla.Array]", arrays)  # (3 sizes)
    return ws


def _packed(
    queue: cl.CommandQueue, leaves: list[cla.Array], shapes: tuple, dtype: np.dtype
) -> tuple[Any, int, bool]:
    """``(buffer, element offset, copied)``: where ``leaves`` lie packed, or a fresh packed
    copy of them (one device copy per leaf)."""
    lay = layout(shapes, dtype)
    run = contiguous_run(leaves, lay) if leaves else None
    if run is not None:
        return run[0], run[1], False
    block = lay.allocate(queue)
    for src, view in zip(leaves, block.views, strict=True):
        if src.nbytes:
            cl.enqueue_copy(  # pyright: ignore[reportCallIssue]
                queue, view.base_data, src.base_data, byte_count=src.nbytes,  # pyright: ignore[reportArgumentType]
                src_offset=src.offset, dst_offset=view.offset,
            )  # fmt: skip
    return block.buffer, block.offset // lay.dtype.itemsize, True


def _copy_back(
    queue: cl.CommandQueue, buffer: Any, offset: int, leaves: list[cla.Array], lay: Any
) -> None:
    item = lay.dtype.itemsize
    for dst, off in zip(leaves, lay.offsets, strict=True):
        if dst.nbytes:
            cl.enqueue_copy(  # pyright: ignore[reportCallIssue]
                queue, dst.base_data, buffer, byte_count=dst.nbytes,  # pyright: ignore[reportArgumentType]
                src_offset=(offset + off) * item, dst_offset=dst.offset,
            )  # fmt: skip


def _round(n: int) -> int:
    return -(-n // _PAD) * _PAD


def sm3_group(
    queue: cl.CommandQueue,
    g: list[cla.Array],
    mu: list[cla.Array],
    nu: list[cla.Array],
    b1: float,
    b2: float,
    eps: float,
    inplace: bool,
) -> tuple[list[cla.Array], list[cla.Array], list[cla.Array]]:
    """One SM3 step over the leaves ``g`` of one dtype (checked by the caller): ``mu`` the
    accumulators of every leaf in order (:func:`sm3_mu_shapes`), ``nu`` shaped like ``g``,
    each stored as its arrays are (one dtype over the group: the state dtype, or float16 or
    bfloat16: float math, the new values rounded once on store). Returns ``(updates, new
    mu, new nu)``: the updates in a fresh packed buffer; the state fresh and packed, or
    with ``inplace`` written into ``mu`` and ``nu`` (and those returned)."""
    dtype = g[0].dtype
    mu_dtype, nu_dtype = mu[0].dtype, nu[0].dtype
    shapes = tuple(x.shape for x in g)
    plan = sm3_plan(shapes, width(dtype))
    rows_k, cols_k, finish_k = kernels(queue.context, dtype, mu_dtype, nu_dtype)
    tables = plan.tables(queue)
    real = np.dtype(np.float64 if dtype == np.float64 else np.float32)
    rowmin, chunkmax, colpart = _workspace(queue, plan, real)
    mu_lay = layout(plan.mu_shapes, mu_dtype)
    nu_lay = layout(shapes, nu_dtype)
    g_buf, g_off, _ = _packed(queue, g, shapes, dtype)
    mu_buf, mu_off, mu_copied = _packed(queue, mu, plan.mu_shapes, mu_dtype)
    nu_buf, nu_off, nu_copied = _packed(queue, nu, shapes, nu_dtype)
    out = layout(shapes, dtype).allocate(queue)
    if inplace:
        nu_out_buf, nu_out_off, new_nu = nu_buf, nu_off, None
        mu_out_buf, mu_out_off, new_mu = mu_buf, mu_off, None
    else:
        nu_block, mu_block = nu_lay.allocate(queue), mu_lay.allocate(queue)
        nu_out_buf, nu_out_off = nu_block.buffer, nu_block.offset // nu_lay.dtype.itemsize
        mu_out_buf, mu_out_off = mu_block.buffer, mu_block.offset // mu_lay.dtype.itemsize
        new_nu, new_mu = nu_block.views, mu_block.views
    c = (1.0 - b2) if b2 != 1.0 else 1.0
    n_leaves = len(plan.leaves)
    w1, w2, w3 = plan.work
    if w1:
        rows_k(
            queue, (_round(w1),), None, tables["leaves"].data, n_leaves, tables["axes"].data, w1,  # pyright: ignore[reportArgumentType]
            g_buf, g_off, mu_buf, mu_off, mu_out_buf, mu_out_off, nu_buf, nu_off, nu_out_buf,
            nu_out_off,
            out.buffer, out.offset // dtype.itemsize, rowmin.data, chunkmax.data,  # pyright: ignore[reportArgumentType]
            c, b2, eps, b1, 1.0 - b1,
        )  # fmt: skip
    if w2:
        cols_k(
            queue, (_round(w2),), None, tables["leaves"].data, n_leaves, w2, g_buf, g_off,  # pyright: ignore[reportArgumentType]
            mu_buf, mu_off, rowmin.data, colpart.data, c, b2,  # pyright: ignore[reportArgumentType]
        )  # fmt: skip
    if w3:
        finish_k(
            queue, (_round(w3),), None, tables["segs"].data, len(plan.segs), w3,  # pyright: ignore[reportArgumentType]
            chunkmax.data, colpart.data, mu_out_buf, mu_out_off,  # pyright: ignore[reportArgumentType]
        )  # fmt: skip
    for name, n in (("sm3_rows", w1), ("sm3_cols", w2), ("sm3_finish", w3)):
        note_launches(name, int(n > 0))
    if inplace:
        if nu_copied:
            _copy_back(queue, nu_buf, nu_off, nu, nu_lay)
        if mu_copied:
            _copy_back(queue, mu_buf, mu_off, mu, mu_lay)
        new_nu, new_mu = nu, mu
    # (set in both cases: in place, just above)
    return out.views, cast("list[cla.Array]", new_mu), cast("list[cla.Array]", new_nu)


__all__ = ["CHUNK", "ROWS", "kernels", "sm3_group", "sm3_mu_shapes", "sm3_plan", "source"]
