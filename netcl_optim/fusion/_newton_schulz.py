"""Newton–Schulz orthogonalisation of many matrices at once (Muon's step), on the device.

Each leaf is seen as a batch of ``R x C`` matrices through a *view* (any object with
``shape``, ``permutation``, ``batch_shape``, ``rows`` and ``cols``: see
``optimizers/_muon_layout.MatrixView``): transpose the leaf by ``permutation``, reshape it to
``batch_shape + (R, C)``. Matrices of the same ``(R, C)``, storage dtype and gather pattern
form a *group*, orthogonalised together whatever the number of leaves they come from, in a
constant number of launches:

1. **prepare** (two launches): the Frobenius norm's squares summed in the reduction type
   (double where the device has fp64) in :data:`NORM_PARTS` parts per matrix, each a
   work-group (strided sums, then a tree: a fixed order); then, :data:`PREPARE_ITEMS`
   work-items per matrix, the parts added in order, the denominator ``max(norm, eps)``
   (``"clamp"``, torch) or ``norm + eps`` (``"add"``, optax, Keller Jordan), and ``X = M /
   denom`` written to a scratch stack ``[B, m, n]`` with ``m <= n`` (``X = M^T`` where ``R >
   C``, as every variant does). The input is only read: the momentum is never normalised
   in place (pytorch#190597). optax's ``"aol"`` and ``"schatten"`` preconditionings skip
   the norm (one launch) and rescale ``X`` and ``A`` after the first ``A = X X^T`` instead
   (one launch).
2. **iterations**, per ``(a, b, c)``: ``A = X X^T``; ``B = c A A + b A``;
   ``X = B X + a X``: two symmetric products (:func:`._gemm.gram`: the blocks on and above
   the diagonal, mirrored; ``A A = A A^T`` as ``A`` is exactly symmetric) and one
   :func:`._gemm.gemm`, the sums in their epilogues (no extra pass), each batched over the
   whole group: 6 launches, ``1.5 m^2 n + 0.5 m^3`` multiply-adds per matrix.

   A group at least :data:`GRAM_ASPECT` times wider than tall (``n >= 2m``: GPT-2's
   ``768 x 3072``) iterates on its ``m x m`` Gram matrices instead (Gram Newton-Schulz: Dao,
   Zhang, Amsel and Chen, 2026): ``R = X X^T``, then per step ``B = b R + c R^2``,
   ``P = B + a I``, ``Q <- P Q`` and ``R <- P R P``, and at the end ``X <- Q X``. Every ``P``,
   ``Q`` and ``R`` is a polynomial of the first ``R``, so they commute and each product is
   symmetric: computed as one (``gemm(..., symmetric=True)``, half the work). In exact
   arithmetic this is the plain iteration; in float32 the ``R`` recursion loses the small
   singular values (the Gram matrix squares the condition number: 25-50x the plain
   iteration's error at condition 1e6), so every :data:`GRAM_RESTART` steps ``X <- Q X`` and
   ``R = X X^T`` are recomputed, which brings the error back to the plain iteration's. Five
   steps on ``768 x 3072``: ``3 m^2 n + 7 m^3`` multiply-adds instead of
   ``7.5 m^2 n + 2.5 m^3`` (0.58x), 8 launches per step, 1 fewer per restart.
3. **finish** (one launch): ``out = scale * X`` (``scale * <M, X> X`` with ``adaptive``, two
   small launches more for the dots) written through the inverse view into a fresh packed
   buffer of the leaves.

Products accumulate in the compute dtype (float32 for float16, bfloat16 and float32 leaves,
float64 for float64). With ``bf16`` (``ns_dtype="bfloat16"``) the iteration is torch's and
Keller Jordan's, in bfloat16: ``M`` rounded first, then ``X``, every product's operands and
results rounded to bfloat16, the sums in float32 (:func:`._gemm.gemm`'s ``bfloat16``), the
plain iteration whatever the shape. Where the device's bfloat16 tile allows
(:func:`._ns_panels.panel_tile`: 16-lane vectors) ``X`` stays in packed bfloat16 panels
between products (``_ns_panels``: 5 + 5 launches per step, the same bits), else it is
packed from float32 for every product (3 + 7).
Nothing is read back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache, lru_cache
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._device import allocator, has_fp64
from .._packing import element_offset, layout
from ._codegen import POINTER, preamble, storage_of
from ._codegen import load as load_expr
from ._codegen import store as store_stmt
from ._gemm import BF16_ROUND, bf16_round_vector, gemm, gram
from ._launch import note_launches
from ._ns_panels import panel_iterations, panel_tile
from ._programs import build

NORMALIZE = ("clamp", "add", "aol", "schatten")
_GROUP = 64  # work-items per work-group of the norm and dot launches
NORM_PARTS = 16  # work-groups per matrix summing its squares (then added in order)
PREPARE_ITEMS = 4096  # work-items per matrix writing X (each sums the parts once)
_PAD = 64
GRAM_ASPECT = 2  # groups at least this many times wider than tall iterate on Gram matrices
GRAM_RESTART = 3  # ... and recompute X and R = X X^T every this many iterations

Schedule = Sequence[tuple[float, float, float]]

# C lines adding the work-items' ``sum``s of a work-group into ``part[0]``: a tree in a fixed
# order (the same bits whatever the launch)
_GROUP_SUM = f"""    part[lid] = sum;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int span = {_GROUP // 2}; span > 0; span >>= 1) {{
        if (lid < span) part[lid] = part[lid] + part[lid + span];
        barrier(CLK_LOCAL_MEM_FENCE);
    }}
"""


def _index_lines(ndim: int, identity: bool, pos: str, z: str, out: str) -> str:
    """C lines setting ``out`` to the element offset, within its leaf, of the matrix
    element at C-order position ``pos`` of matrix ``z`` of the leaf's permuted view: the
    position itself for a plain reshape, else its mixed-radix digits over the permuted
    shape times the leaf's strides (``dims`` / ``strides``, ``ndim`` each)."""
    if identity:
        return f"        const long {out} = {z} * RC + {pos};\n"
    return (
        f"        long {out} = 0;\n"
        f"        {{ long f = {z} * RC + {pos};\n"
        f"          for (int k = {ndim - 1}; k >= 0; k--) {{\n"
        f"              const long d = dims[k]; {out} += (f % d) * strides[k]; f /= d; }} }}\n"
    )


@cache
def norm_parts_source(storage: str, real: str, acc: str, ndim: int, identity: bool,
                      bf16: bool = False) -> tuple[str, str]:  # fmt: skip
    """The squares of each matrix summed in :data:`NORM_PARTS` parts (one work-group each:
    its items' strided sums, then a tree, in a fixed order), into ``parts[b * P + part]``;
    ``bf16``: of the elements rounded to bfloat16."""
    name = f"netcl_ns_norm_parts_{storage}_{real}_{ndim}{'i' if identity else 'p'}" + (
        "_bf16" if bf16 else ""
    )
    index = _index_lines(ndim, identity, "e", "z", "at")
    load = load_expr(storage, "src", "base + at")
    if bf16:
        load = f"bf16_round((float)({load}))"
    src = f"""//CL// {name}: sums of squares of each matrix, in {NORM_PARTS} parts
{preamble(real, real == "double" or acc == "double", storage == "bf16")}
{BF16_ROUND if bf16 else ""}typedef {acc} acc_t;
__kernel void {name}(__global const {POINTER[storage]} *src, __global const long *table,
                     __global const long *dims, __global const long *strides,
                     const long R, const long C, __global acc_t *parts)
{{
    const long g = get_group_id(0), b = g / {NORM_PARTS}, piece = g % {NORM_PARTS};
    const int lid = get_local_id(0);
    const long base = table[2 * b], z = table[2 * b + 1], RC = R * C;
    const long chunk = (RC + {NORM_PARTS - 1}) / {NORM_PARTS};
    const long end = min(RC, (piece + 1) * chunk);
    __local acc_t part[{_GROUP}];
    acc_t sum = 0;
    for (long e = piece * chunk + lid; e < end; e += {_GROUP}) {{
{index}        const acc_t v = (acc_t)({load});
        sum = sum + v * v;
    }}
{_GROUP_SUM}    if (lid == 0) parts[g] = part[0];
}}
"""
    return src, name


@cache
def prepare_source(storage: str, real: str, acc: str, ndim: int, identity: bool,
                   transposed: bool, normalize: str, bf16: bool = False,
                   vec8: bool = False) -> tuple[str, str]:  # fmt: skip
    """``X[b] = M_b / denom_b`` (transposed where ``R > C``), :data:`PREPARE_ITEMS` items per
    matrix, the norm from :func:`norm_parts_source`'s parts (added in order by every item).
    ``bf16`` (``real`` float): as torch's bfloat16 iteration, ``M`` rounded to bfloat16
    first, then the norm, the denominator and ``X`` (the squares still summed in ``acc``).
    ``vec8`` (float32 leaves as plain matrices, offsets and ``R C`` multiples of 8): 8
    elements per step as a ``float8``, the same arithmetic lane by lane (PoCL does not
    vectorise the loop itself: 3-4x)."""
    name = f"netcl_ns_prepare_{storage}_{real}_{ndim}{'i' if identity else 'p'}" + (
        f"{'t' if transposed else 'n'}_{normalize}{'_bf16' if bf16 else ''}{'_v8' if vec8 else ''}"
    )
    ptr = POINTER[storage]
    index = _index_lines(ndim, identity, "e", "z", "at")
    load = load_expr(storage, "src", "base + at")
    denom = {"clamp": "(norm >= eps ? norm : eps)", "add": "(norm + eps)"}.get(normalize, "1")
    rounded = "bf16_round" if bf16 else ""
    if bf16:
        load = f"bf16_round((float)({load}))"
    norm = ""
    if normalize in ("clamp", "add"):
        norm = (
            f"    acc_t sum = 0;\n"
            f"    for (int piece = 0; piece < {NORM_PARTS}; piece++) "
            f"sum = sum + parts[b * {NORM_PARTS} + piece];\n"
            f"    const real norm = {rounded}((real)SQRT(sum));\n"
        )
    if transposed:  # 16 x 16 tiles: the reads 16 rows, the writes 16 runs of 16
        tile_index = _index_lines(ndim, identity, "e", "z", "at").replace("\n", "\n    ")
        loop = f"""    const long tiles_c = (C + 15) / 16, tiles = (R + 15) / 16 * tiles_c;
    for (long tile = get_global_id(0); tile < tiles; tile += {PREPARE_ITEMS}) {{
        const long r0 = tile / tiles_c * 16, c0 = tile % tiles_c * 16;
        for (long c = c0; c < min(C, c0 + 16); c++) {{
            for (long r = r0; r < min(R, r0 + 16); r++) {{
                const long e = r * C + c;
    {tile_index}            x[b * RC + c * R + r] = {rounded}((real)({load}) / denom);
            }}
        }}
    }}"""
    elif vec8:
        rounded_w = "bf16_round_w" if bf16 else ""
        loop = f"""    __global const float8 *s8 = (__global const float8 *)(src + base + z * RC);
    __global float8 *x8 = (__global float8 *)(x + b * RC);
    for (long e = get_global_id(0); e < RC / 8; e += {PREPARE_ITEMS})
        x8[e] = {rounded_w}({rounded_w}(s8[e]) / denom);"""
    else:
        loop = f"""    for (long e = get_global_id(0); e < RC; e += {PREPARE_ITEMS}) {{
{index}        x[b * RC + e] = {rounded}((real)({load}) / denom);
    }}"""
    helpers = (BF16_ROUND + (bf16_round_vector(8) if vec8 else "")) if bf16 else ""
    src = f"""//CL// {name}: X = M / {denom} per matrix ({"transposed" if transposed else "as is"})
{preamble(real, real == "double" or acc == "double", storage == "bf16")}
{helpers}typedef {acc} acc_t;
__kernel void {name}(__global const {ptr} *src, __global const long *table,
                     __global const long *dims, __global const long *strides,
                     const long R, const long C, const real eps, __global const acc_t *parts,
                     __global real *x)
{{
    const long b = get_global_id(1);
    const long base = table[2 * b], z = table[2 * b + 1], RC = R * C;
{norm}    const real denom = {rounded}({denom});
{loop}
}}
"""
    return src, name


@cache
def rescale_source(real: str, acc: str, mode: str) -> tuple[str, str]:
    """optax's first-iteration preconditionings on ``A = X X^T`` (``m x m``) and ``X``
    (``m x n``), one work-group per matrix. ``"schatten"``: ``s = rsqrt(max(||A||_F, eps))``,
    ``X <- X s``, ``A <- A s^2``. ``"aol"``: ``s_i = rsqrt(max(sum_j |A_ij|, eps))``,
    ``X_i <- X_i s_i``, ``A_ij <- A_ij s_i s_j`` (rows of ``A`` summed in order)."""
    name = f"netcl_ns_rescale_{mode}_{real}"
    if mode == "schatten":
        body = f"""    acc_t sum = 0;
    for (long e = lid; e < m * m; e += {_GROUP}) {{
        const acc_t v = (acc_t)ab[e];
        sum = sum + v * v;
    }}
{_GROUP_SUM}    if (lid == 0) {{
        const real norm = (real)SQRT(part[0]);
        const real clipped = norm >= eps ? norm : eps;
        shared[0] = (real)1 / SQRT(clipped);
    }}
    barrier(CLK_LOCAL_MEM_FENCE);
    const real s = shared[0], s2 = s * s;
    for (long e = lid; e < m * n; e += {_GROUP}) xb[e] = xb[e] * s;
    for (long e = lid; e < m * m; e += {_GROUP}) ab[e] = ab[e] * s2;"""
    else:
        body = f"""    for (long i = lid; i < m; i += {_GROUP}) {{
        acc_t sum = 0;
        for (long j = 0; j < m; j++) sum = sum + (acc_t)fabs(ab[i * m + j]);
        const real r = (real)sum;
        sb[i] = (real)1 / SQRT(r >= eps ? r : eps);
    }}
    barrier(CLK_GLOBAL_MEM_FENCE);
    for (long e = lid; e < m * n; e += {_GROUP}) xb[e] = xb[e] * sb[e / n];
    for (long e = lid; e < m * m; e += {_GROUP}) ab[e] = ab[e] * sb[e / m] * sb[e % m];"""
    src = f"""//CL// {name}: optax's {mode} rescaling of the first iteration
{preamble(real, real == "double" or acc == "double")}
typedef {acc} acc_t;
__kernel void {name}(__global real *x, __global real *a, __global real *scratch,
                     const long m, const long n, const real eps)
{{
    const long b = get_group_id(0);
    const int lid = get_local_id(0);
    __global real *xb = x + b * m * n, *ab = a + b * m * m, *sb = scratch + b * m;
    __local acc_t part[{_GROUP}];
    __local real shared[1];
{body}
}}
"""
    return src, name


@cache
def add_identity_source(real: str) -> tuple[str, str]:
    """``out = src + a I`` over a stack of ``m x m`` matrices, one work-item per element."""
    name = f"netcl_ns_add_identity_{real}"
    src = f"""//CL// {name}: out = src + a I per matrix
{preamble(real, real == "double")}
__kernel void {name}(__global const real *src, __global real *out, const long total,
                     const long m, const real a)
{{
    const long e = get_global_id(0);
    if (e >= total) return;
    const long j = e % m, i = (e / m) % m;
    out[e] = i == j ? src[e] + a : src[e];
}}
"""
    return src, name


@cache
def dots_source(storage: str, real: str, acc: str, ndim: int, identity: bool,
                transposed: bool) -> tuple[str, str]:  # fmt: skip
    """``dots[b] = sum M_b * X_b`` (the input and the result, in the input's orientation),
    one work-group per matrix; then ``leaf_dot[b]`` = the sum of its leaf's matrices' dots in
    order (the same value for every matrix of a leaf)."""
    name = f"netcl_ns_dots_{storage}_{real}_{ndim}{'i' if identity else 'p'}" + (
        "t" if transposed else "n"
    )
    ptr = POINTER[storage]
    index = _index_lines(ndim, identity, "e", "z", "at")
    load = load_expr(storage, "src", "base + at")
    dest = "(e % C) * R + e / C" if transposed else "e"
    src = f"""//CL// {name}: per-matrix <M, X>, then per-leaf sums
{preamble(real, real == "double" or acc == "double", storage == "bf16")}
typedef {acc} acc_t;
__kernel void {name}(__global const {ptr} *src, __global const long *table,
                     __global const long *dims, __global const long *strides,
                     const long R, const long C, __global const real *x, __global acc_t *dots)
{{
    const long b = get_group_id(0);
    const int lid = get_local_id(0);
    const long base = table[2 * b], z = table[2 * b + 1], RC = R * C;
    __local acc_t part[{_GROUP}];
    __global const real *xb = x + b * RC;
    acc_t sum = 0;
    for (long e = lid; e < RC; e += {_GROUP}) {{
{index}        sum = sum + (acc_t)({load}) * (acc_t)xb[{dest}];
    }}
{_GROUP_SUM}    if (lid == 0) dots[b] = part[0];
}}

__kernel void {name}_leaf(__global const acc_t *dots, __global const long *first,
                          __global real *leaf_dot, const long B)
{{
    const long b = get_global_id(0);
    if (b >= B) return;
    acc_t sum = 0;
    for (long k = first[2 * b]; k < first[2 * b + 1]; k++) sum = sum + dots[k];
    leaf_dot[b] = (real)sum;
}}
"""
    return src, name


@cache
def finish_source(storage: str, real: str, ndim: int, identity: bool, transposed: bool,
                  adaptive: bool, exact: bool = False) -> tuple[str, str]:  # fmt: skip
    """``out = scale_b * X_b`` (``scale_b * (leaf_dot_b * X_b)`` with ``adaptive``) through
    the inverse view, one work-item per element; ``exact``: the launch has exactly ``R C``
    items per matrix, and no bounds check (which stops PoCL's vectoriser)."""
    name = f"netcl_ns_finish_{storage}_{real}_{ndim}{'i' if identity else 'p'}" + (
        f"{'t' if transposed else 'n'}{'a' if adaptive else ''}{'x' if exact else ''}"
    )
    ptr = POINTER[storage]
    index = _index_lines(ndim, identity, "e", "z", "at")
    dest = "(e % C) * R + e / C" if transposed else "e"
    value = "leaf_dot[b] * x[b * RC + src_e]" if adaptive else "x[b * RC + src_e]"
    store = store_stmt(storage, "out", "base + at", "y")
    check = "" if exact else "\n    if (e >= RC) return;"
    src = f"""//CL// {name}: out = scale * X through the inverse view
{preamble(real, real == "double", storage == "bf16")}
__kernel void {name}(__global const real *x, __global const long *table,
                     __global const long *dims, __global const long *strides,
                     const long R, const long C, __global const real *scale,
                     __global const real *leaf_dot, __global {ptr} *out)
{{
    const long e = get_global_id(0), b = get_global_id(1), RC = R * C;{check}
    const long base = table[2 * b], z = table[2 * b + 1];
    const long src_e = {dest};
{index}    const real y = scale[b] * ({value});
    {store}
}}
"""
    return src, name


class Group:
    """Matrices of one ``(R, C)``, storage dtype and gather pattern: per matrix, the element
    offset of its leaf in the group's buffer and its index in the leaf; the leaf's permuted
    shape and strides (a non-plain view); the shape scale per matrix; each matrix's leaf's
    first and end matrix (for the adaptive dots)."""

    def __init__(self, rows: int, cols: int, shape: tuple | None, perm: tuple | None) -> None:
        self.rows, self.cols = rows, cols
        self.shape, self.perm = shape, perm  # None: a plain reshape (any leaf shape)
        self.entries: list[tuple[int, int, int, float]] = []  # (leaf, offset, count, scale)

    @property
    def count(self) -> int:
        return sum(e[2] for e in self.entries)


def group_key(view: Any) -> tuple:
    """Leaves whose views share this key are orthogonalised in one group."""
    plain = tuple(view.permutation) == tuple(range(len(view.shape)))
    pattern = None if plain else (tuple(view.shape), tuple(view.permutation))
    return (view.rows, view.cols, pattern)


@lru_cache(maxsize=256)
def _tables(queue: cl.CommandQueue, rows: int, cols: int, pattern: tuple | None,
            src_entries: tuple, out_entries: tuple, scales: tuple,
            real: np.dtype) -> dict[str, Any]:  # fmt: skip
    """Host-built device tables of a group (cached: the same model builds them once)."""

    def table(entries: tuple) -> np.ndarray:
        rows_ = [(off, z) for off, count in entries for z in range(count)]
        return np.asarray(rows_, np.int64).reshape(-1)

    if pattern is None:
        dims = strides = np.zeros(1, np.int64)
        ndim = 1
    else:
        shape, perm = pattern
        item_strides = np.cumprod((1, *shape[::-1]))[:-1][::-1]  # C strides in elements
        dims = np.asarray([shape[p] for p in perm], np.int64)
        strides = np.asarray([item_strides[p] for p in perm], np.int64)
        ndim = len(shape)
    counts = [count for _, count in src_entries]
    ends = np.cumsum(counts)
    first = np.concatenate([[0], ends[:-1]])
    spans = np.asarray(
        [(f, e) for f, e, n in zip(first, ends, counts, strict=True) for _ in range(n)], np.int64
    ).reshape(-1)
    per_matrix = np.asarray([s for s, n in zip(scales, counts, strict=True) for _ in range(n)])
    out = {
        "src": table(src_entries),
        "out": table(out_entries),
        "dims": dims,
        "strides": strides,
        "spans": spans,
        "scale": per_matrix.astype(real),
    }
    tables: dict[str, Any] = {k: cla.to_device(queue, v) for k, v in out.items()}
    queue.finish()
    tables["ndim"] = ndim
    return tables


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def orthogonalize(
    queue: cl.CommandQueue,
    leaves: Sequence[cla.Array],
    views: Sequence[Any],
    schedule: Schedule,
    eps: float,
    normalize: str,
    scales: Sequence[float],
    adaptive: bool = False,
    bf16: bool = False,
) -> list[cla.Array]:
    """``scales[i] * NS(leaves[i])`` per leaf (see the module doc), as views of one fresh
    packed buffer per dtype; ``adaptive``: ``scales[i] * <M, O> O`` with the dot over the
    whole leaf (optax). The leaves must be C-contiguous arrays of one context (float16,
    bfloat16, float32 or float64); each dtype's leaves are read from one buffer (copied into
    a packed scratch first when they lie in several). Launches per group of same-shaped
    matrices: ``3 + 6 * len(schedule)`` (``+2`` adaptive; ``bf16``: ``5 + 5 *
    len(schedule)``, or ``3 + 7 * len(schedule)`` without panels), whatever
    their number; a group iterating on Gram matrices (:func:`uses_gram_iteration`) ``2 + 8 *
    len(schedule)``, 1 fewer per restart.

    ``bf16``: torch's bfloat16 iteration (float64 leaves raise): ``M`` rounded to bfloat16,
    then ``X``, every product's operands and results (``gemm(..., bfloat16=True)``: float32
    sums), always the plain iteration (the Gram one squares the condition number: not in 8
    bits of mantissa)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if bf16 and any(np.dtype(x.dtype) == np.float64 for x in leaves):
        raise ValueError("a bfloat16 Newton-Schulz iteration takes float16, bfloat16 or "
                         "float32 leaves, not float64")  # fmt: skip
    out: list[Any] = [None] * len(leaves)
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, x in enumerate(leaves):
        by_dtype.setdefault(np.dtype(x.dtype), []).append(i)
    for idx in by_dtype.values():
        results = _orthogonalize_dtype(
            queue, [leaves[i] for i in idx], [views[i] for i in idx], schedule, eps,
            normalize, [float(scales[i]) for i in idx], adaptive, bf16,
        )  # fmt: skip
        for i, r in zip(idx, results, strict=True):
            out[i] = r
    return out


def _one_buffer(queue: cl.CommandQueue, leaves: list[cla.Array]) -> tuple[Any, list[int]]:
    """A buffer holding every leaf and each leaf's element offset in it: their own buffer
    when they share one, else a packed scratch copy."""
    base = leaves[0].base_data
    if all(x.base_data is base or x.base_data == base for x in leaves):
        return base, [element_offset(x) for x in leaves]
    lay = layout(tuple(x.shape for x in leaves), leaves[0].dtype)
    block = lay.allocate(queue)
    for view, x in zip(block.views, leaves, strict=True):
        if x.size:
            cl.enqueue_copy(queue, view.base_data, x.base_data, byte_count=x.nbytes,  # pyright: ignore[reportCallIssue, reportArgumentType]
                            dst_offset=view.offset, src_offset=x.offset)  # fmt: skip
    return block.views[0].base_data, [element_offset(v) for v in block.views]


def _orthogonalize_dtype(queue, leaves, views, schedule, eps, normalize, scales, adaptive, bf16):
    dtype = np.dtype(leaves[0].dtype)
    real_dtype = _compute_dtype(dtype)
    real = "double" if real_dtype == np.float64 else "float"
    acc = "double" if has_fp64(queue.device) else "float"
    storage = storage_of(dtype)
    lay = layout(tuple(x.shape for x in leaves), dtype)
    result = lay.allocate(queue)
    out_base = result.views[0].base_data if result.views else None
    out_offsets = [element_offset(v) for v in result.views]
    src_base, src_offsets = _one_buffer(queue, list(leaves))
    groups: dict[tuple, Group] = {}
    for i, view in enumerate(views):
        key = group_key(view)
        group = groups.get(key)
        if group is None:
            pattern = key[2]
            group = groups[key] = Group(view.rows, view.cols, *(pattern or (None, None)))
        group.entries.append((i, src_offsets[i], math.prod(view.batch_shape), scales[i]))
    for key, group in groups.items():
        if group.count == 0 or group.rows * group.cols == 0:
            continue
        _run_group(
            queue, group, key[2], src_base, out_base,
            tuple((src_offsets[i], n) for i, _, n, _ in group.entries),
            tuple((out_offsets[i], n) for i, _, n, _ in group.entries),
            tuple(s for _, _, _, s in group.entries),
            storage, real, acc, real_dtype, schedule, eps, normalize, adaptive, bf16,
        )  # fmt: skip
    return result.views


def _run_group(queue, group, pattern, src_base, out_base, src_entries, out_entries, scales,
               storage, real, acc, real_dtype, schedule, eps, normalize, adaptive,
               bf16):  # fmt: skip
    rows, cols = group.rows, group.cols
    t = _tables(queue, rows, cols, pattern, src_entries, out_entries, scales, real_dtype)
    ndim, identity = t["ndim"], pattern is None
    transposed = rows > cols
    m, n = (cols, rows) if transposed else (rows, cols)
    count = group.count
    pool = allocator(queue)
    x = cla.empty(queue, (count, m, n), real_dtype, allocator=pool)
    real_t = real_dtype.type
    long_t = np.int64

    acc_dtype = np.dtype(np.float64) if acc == "double" else np.dtype(np.float32)
    parts = cla.empty(queue, (count * NORM_PARTS,), acc_dtype, allocator=pool)
    tables = (src_base, t["src"].data, t["dims"].data, t["strides"].data, rows, cols)
    if normalize in ("clamp", "add"):
        src, name = norm_parts_source(storage, real, acc, ndim, identity, bf16)
        kernel: Any = build(queue.context, src, name, [None, None, None, None, long_t, long_t,
                                                       None])  # fmt: skip
        kernel(queue, (count * NORM_PARTS * _GROUP,), (_GROUP,), *tables, parts.data)
        note_launches(name)
    vec8 = (
        identity and not transposed and storage == "float" and real == "float"
        and rows * cols % 8 == 0 and all(off % 8 == 0 for off, _ in src_entries)
    )  # fmt: skip
    src, name = prepare_source(storage, real, acc, ndim, identity, transposed, normalize, bf16,
                               vec8)  # fmt: skip
    kernel: Any = build(queue.context, src, name,
                   [None, None, None, None, long_t, long_t, real_t, None, None])  # fmt: skip
    kernel(queue, (PREPARE_ITEMS, count), None, *tables, real_t(eps), parts.data, x.data)
    note_launches(name)

    gram_a = cla.empty(queue, (count, m, m), real_dtype, allocator=pool)
    poly_b = cla.empty(queue, (count, m, m), real_dtype, allocator=pool)
    tile = panel_tile(queue.device) if bf16 and normalize in ("clamp", "add") else None
    x_transposed = transposed  # (X, as the finish reads it: the iteration's orientation)
    if tile is not None and schedule:  # (the last product writes X back as the leaf lies)
        panel_iterations(queue, x, gram_a, poly_b, schedule, count, m, n, tile, transposed)
        x_transposed = False
    elif not bf16 and uses_gram_iteration(m, n, len(schedule)):
        _gram_iterations(queue, x, gram_a, poly_b, schedule, normalize, count, m, n, real, acc)
    else:
        for k, (a, b, c) in enumerate(schedule):
            gram(queue, x, gram_a, bfloat16=bf16)
            if k == 0 and normalize in ("aol", "schatten"):
                _rescale(queue, normalize, x, gram_a, poly_b, count, m, n, real, acc)
            # A symmetric: A A = A A^T
            gram(queue, gram_a, poly_b, alpha=c, beta=b, c=gram_a, bfloat16=bf16)
            gemm(queue, poly_b, x, x, alpha=1.0, beta=a, c=x, bfloat16=bf16)

    leaf_dot = t["scale"]  # (unread unless adaptive)
    if adaptive:
        dots = cla.empty(queue, (count,), acc_dtype, allocator=pool)
        leaf_dot = cla.empty(queue, (count,), real_dtype, allocator=pool)
        src, name = dots_source(storage, real, acc, ndim, identity, x_transposed)
        kernel: Any = build(queue.context, src, name,
                       [None, None, None, None, long_t, long_t, None, None])  # fmt: skip
        kernel(queue, (count * _GROUP,), (_GROUP,), src_base, t["src"].data, t["dims"].data,
               t["strides"].data, rows, cols, x.data, dots.data)  # fmt: skip
        leaf: Any = build(queue.context, src, name + "_leaf", [None, None, None, long_t])
        leaf(queue, (-(-count // _PAD) * _PAD,), None, dots.data, t["spans"].data,
             leaf_dot.data, count)  # fmt: skip
        note_launches(name, 2)

    exact = rows * cols % _PAD == 0
    src, name = finish_source(storage, real, ndim, identity, x_transposed, adaptive, exact)
    kernel: Any = build(queue.context, src, name,
                   [None, None, None, None, long_t, long_t, None, None, None])  # fmt: skip
    size = (-(-(rows * cols) // _PAD) * _PAD, count)
    kernel(queue, size, None, x.data, t["out"].data, t["dims"].data, t["strides"].data,
           rows, cols, t["scale"].data, leaf_dot.data, out_base)  # fmt: skip
    note_launches(name)


def uses_gram_iteration(m: int, n: int, steps: int) -> bool:
    """Whether a group of ``m x n`` matrices (``m <= n``) iterates on its Gram matrices
    (:func:`_gram_iterations`): at least :data:`GRAM_ASPECT` times wider than tall and two
    iterations or more."""
    return n >= GRAM_ASPECT * m and steps >= 2


def _gram_iterations(queue, x, r, poly_b, schedule, normalize, count, m, n, real, acc):
    """``X <- Q X`` with ``Q = P_K ... P_1``, ``P_k = a I + b R_k + c R_k^2`` and ``R_{k+1}
    = P_k R_k P_k`` from ``R_0 = X X^T``: the iterations' products are ``m x m`` (see the
    module doc). Every ``P_k``, ``R_k`` and ``Q_k`` is a polynomial of ``R_0``: they commute
    and their products are symmetric, so each is computed as one (the upper blocks,
    mirrored). Every :data:`GRAM_RESTART` steps ``X <- Q X`` and ``R = X X^T`` afresh; the
    step before a restart, like the last, does not update ``R``."""
    pool = allocator(queue)
    q = cla.empty(queue, (count, m, m), x.dtype, allocator=pool)
    t = cla.empty(queue, (count, m, m), x.dtype, allocator=pool)
    restarts = {k for k in range(1, len(schedule)) if k % GRAM_RESTART == 0}
    gram(queue, x, r)
    if normalize in ("aol", "schatten"):
        _rescale(queue, normalize, x, r, poly_b, count, m, n, real, acc)
    for k, (a, b, c) in enumerate(schedule):
        if k in restarts:  # X <- Q X, R = X X^T afresh, Q = I
            gemm(queue, q, x, x)
            gram(queue, x, r)
        gram(queue, r, poly_b, alpha=c, beta=b, c=r)  # B = b R + c R^2
        if k == 0 or k in restarts:
            _add_identity(queue, poly_b, q, a, count, m, real)  # Q = P_k = B + a I
        else:
            gemm(queue, poly_b, q, q, beta=a, c=q, symmetric=True)  # Q <- P Q = B Q + a Q
        if k + 1 < len(schedule) and k + 1 not in restarts:
            gemm(queue, poly_b, r, t, beta=a, c=r, symmetric=True)  # T = P R
            gemm(queue, poly_b, t, r, beta=a, c=t, symmetric=True)  # R <- P T
    gemm(queue, q, x, x)  # X <- Q X (X is packed before it is written)


def _add_identity(queue, src, out, a, count, m, real):
    """``out = src + a I`` per matrix: one launch."""
    src_text, name = add_identity_source(real)
    kernel: Any = build(queue.context, src_text, name, [None, None, np.int64, np.int64,
                                                        src.dtype.type])  # fmt: skip
    total = count * m * m
    kernel(queue, (-(-total // _PAD) * _PAD,), None, src.data, out.data, total, m,
           src.dtype.type(a))  # fmt: skip
    note_launches(name)


def _rescale(queue, mode, x, gram_a, scratch, count, m, n, real, acc):
    """optax's ``aol`` / ``schatten`` rescaling of ``X`` and ``A`` (``scratch``: ``m`` reals
    per matrix, the row scales of ``aol``); its ``eps`` is its function's default, 1e-8."""
    src, name = rescale_source(real, acc, mode)
    kernel: Any = build(queue.context, src, name, [None, None, None, np.int64, np.int64,
                                                   x.dtype.type])  # fmt: skip
    kernel(queue, (count * _GROUP,), (_GROUP,), x.data, gram_a.data, scratch.data, m, n,
           x.dtype.type(1e-8))  # fmt: skip
    note_launches(name)
