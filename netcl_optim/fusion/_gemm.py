"""A register-blocked GEMM of our own: ``out = alpha * op(a) @ op(b) + beta * c``.

Operands are C-contiguous pyopencl arrays of shape ``[..., M, K]`` and ``[..., K, N]`` (or their
transposes with ``trans_a`` / ``trans_b``), float32 or float64 (where the device has fp64), with
the same leading batch dims (no broadcasting). A call is three launches whatever the batch:
two packs and the GEMM kernel. Views at an offset into a bigger buffer (a packed tree) are read
through ``base_data`` and their element offset; nothing is read back to the host.

Kernel design (generated per dtype and tile ``(TM, TN)``, cached per context by
:func:`._programs.build`): both operands are first copied into packed panels (one cheap
``O(MK + KN)`` launch each, :func:`pack_source`): ``op(a)`` as ``[batch, M/TM, K, TM]`` and
``op(b)`` as ``[batch, N/TN, K, TN]``, zero-padded at the bottom and right edges. Transposes,
views at an offset and batches are only strides of the pack launches, so one GEMM kernel
serves every case. Each work-item of the GEMM kernel then computes a ``TM x TN`` block of
the output in registers, ``TM`` rows of ``TN / W`` vectors of width ``W`` (8 floats or 4
doubles: PoCL returns only half a ``double8`` from ``vload8`` on CPUs without AVX-512):
per ``k`` it reads ``TN`` consecutive panel elements of ``b`` as vectors (plain vector
reads of the aligned panels: ``vloadn`` compiles to a function call on PoCL 3, which made the
kernel 3-5x slower) and ``TM`` of ``a``, broadcast, and accumulates ``acc = acc + a * b``,
with no masking in the loop (the padding
is zero). There is no local memory (PoCL's CPU device runs work-groups as loops, where
barriers are costly); each work-group is 2 column blocks by up to 32 row blocks, so its
``b`` panels stay in cache while ``a`` panels stream. Only the store is masked, at an edge.

The epilogue applies ``alpha`` and ``beta * c`` before the store (``c`` may be ``out``
itself), so ``aX + B X`` of a Newton-Schulz step costs no extra pass. With ``beta == 0``,
``c`` is not read (as BLAS: NaN in ``out`` does not propagate).

Rounding: ``FP_CONTRACT OFF`` and a separate multiply and add, as the rest of the library.
Measured on this PoCL CPU device (960^3, same run): OFF 191 GFLOPS, ``FP_CONTRACT ON`` 221
(the compiler then fuses into FMA instructions), an explicit ``fma()`` or ``mad()`` 24 (a
library call). The 15% was not worth a second rounding convention; the switch is one line
of :func:`_header` if a device needs it.
Each output is a sequential sum over ``k`` in order (``K`` is never split), so the error bound
is the classic ``|C - C_exact| <= (K + 3) u (|alpha| |A| |B| + |beta| |C|)`` (``u`` the unit
roundoff), and results are bit for bit the same for every tile, batch position and offset.

The tile is chosen by :func:`tile_for`: a fixed default, or (``tune=True``) the fastest of a
few configurations timed once per ``(device, dtype, trans_a, shape class)`` and kept in
:data:`tuned` (memory only).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._device import allocator, has_fp64
from .._packing import element_offset
from ._programs import build

# (TM, TN) candidates per dtype; the first is the default.
TILES = {
    np.dtype(np.float32): ((4, 16), (12, 8), (6, 16), (8, 16)),
    np.dtype(np.float64): ((4, 8), (12, 4), (6, 8), (8, 8)),
}
_WIDTH = {np.dtype(np.float32): 8, np.dtype(np.float64): 4}

tuned: dict[tuple, tuple[int, int]] = {}


def _header(real: str) -> str:
    fp64 = "#pragma OPENCL EXTENSION cl_khr_fp64 : enable\n" if real == "double" else ""
    return f"#pragma OPENCL FP_CONTRACT OFF\n{fp64}typedef {real} real;\n"


def gemm_source(dtype: np.dtype, tm: int, tn: int) -> tuple[str, str]:
    """The OpenCL source and kernel name of the ``TM x TN`` register-blocked kernel over
    packed panels (see :func:`pack_source`)."""
    dtype = np.dtype(dtype)
    real = "double" if dtype == np.float64 else "float"
    w = _WIDTH[dtype]
    if tn % w:
        raise ValueError(f"tile width {tn} is not a multiple of the vector width {w}")
    nv = tn // w
    name = f"netcl_gemm_{real}_{tm}x{tn}"
    acc = ", ".join(f"acc{r}_{v} = (realw)(0)" for r in range(tm) for v in range(nv))
    # (direct vector reads: vload compiles to a call on PoCL, 3-5x slower; the panels come
    # from fresh buffers, aligned, and TN is a multiple of W)
    body = "".join(
        f"        const realw b{v} = *(__global const realw *)(bp + {v * w});\n" for v in range(nv)
    )
    for r in range(tm):
        body += f"        const realw a{r} = (realw)(ap[{r}]);\n"
        body += "".join(f"        acc{r}_{v} = acc{r}_{v} + a{r} * b{v};\n" for v in range(nv))
    fast, edge = "", ""
    for r in range(tm):
        for v in range(nv):
            at = f"(i0 + {r}) * N + j0 + {v * w}"
            lanes = ", ".join(f"d[{at} + {e}]" for e in range(w))
            stores = " ".join(f"c[{at} + {e}] = y.s{e:x};" for e in range(w))
            fast += (  # (lane by lane: vloadn/vstoren are calls on PoCL; c may be unaligned)
                f"        {{ realw y = alpha * acc{r}_{v};\n"
                f"          if (beta != 0) y = y + beta * (realw)({lanes});\n"
                f"          {stores} }}\n"
            )
            for e in range(w):
                at_e = f"(i0 + {r}) * N + j0 + {v * w + e}"
                edge += (
                    f"        if (i0 + {r} < M && j0 + {v * w + e} < N) {{\n"
                    f"            real y = alpha * acc{r}_{v}.s{e:x};\n"
                    f"            if (beta != 0) y = y + beta * d[{at_e}];\n"
                    f"            c[{at_e}] = y; }}\n"
                )
    src = f"""//CL// {name}: C = alpha A B + beta D over packed panels, {tm}x{tn} outputs per item
{_header(real)}typedef {real}{w} realw;
__kernel void {name}(__global const real *restrict a_panels, __global const real *restrict b_panels,
                     __global real *c_base, const long c_off,
                     __global const real *d_base, const long d_off,
                     const long M, const long N, const long K, const real alpha, const real beta)
{{
    const long jb = get_global_id(0), ib = get_global_id(1), z = get_global_id(2);
    const long j0 = jb * {tn}, i0 = ib * {tm};
    const long mb = (M + {tm - 1}) / {tm}, nb = (N + {tn - 1}) / {tn};
    if (ib >= mb || jb >= nb) return;  /* (the launch pads to whole work-groups) */
    __global const real *ap = a_panels + (z * mb + ib) * K * {tm};
    __global const real *bp = b_panels + (z * nb + jb) * K * {tn};
    __global real *c = c_base + c_off + z * M * N;
    __global const real *d = d_base + d_off + z * M * N;
    realw {acc};
    for (long k = 0; k < K; k++, ap += {tm}, bp += {tn}) {{
{body}    }}
    if (i0 + {tm} <= M && j0 + {tn} <= N) {{
{fast}    }} else {{
{edge}    }}
}}
"""
    return src, name


def pack_source(dtype: np.dtype, mode: str) -> tuple[str, str]:
    """A kernel copying a ``[..., L, K]``-indexed operand into panels ``P[z, blk, k, t]`` of
    ``T`` lines each (line ``blk * T + t``, zero past ``L``), reading element ``(l, k)`` at
    ``off + z * step + l * s_l + k * s_k``: transposes are strides. ``mode`` picks the launch
    for the source's contiguous axis: ``"k"`` one element per item, ``k`` along dim 0;
    ``"l"`` the same along ``l``; ``"t"`` one run of ``T`` lines per item (``s_l == 1``)."""
    real = "double" if np.dtype(dtype) == np.float64 else "float"
    name = f"netcl_gemm_pack_{real}_{mode}"
    at = "off + z * step + l * s_l + k * s_k"
    if mode == "t":
        body = f"""    const long k = get_global_id(0), blk = get_global_id(1);
    const long z = get_global_id(2);
    const long K = get_global_size(0), blocks = get_global_size(1);
    __global real *p = panels + ((z * blocks + blk) * K + k) * T;
    for (long t = 0; t < T; t++) {{
        const long l = blk * T + t;
        p[t] = l < L ? x_base[{at}] : (real)0;
    }}"""
    else:
        ids = ("k", "l") if mode == "k" else ("l", "k")
        body = f"""    const long {ids[0]} = get_global_id(0), {ids[1]} = get_global_id(1);
    const long z = get_global_id(2);
    const long K = get_global_size({ids.index("k")}), padded = get_global_size({ids.index("l")});
    const long blk = l / T, t = l - blk * T;
    panels[((z * (padded / T) + blk) * K + k) * T + t] = l < L ? x_base[{at}] : (real)0;"""
    src = f"""//CL// {name}: panels of T lines, zero-padded past L
{_header(real)}__kernel void {name}(__global const real *restrict x_base, const long off,
                     const long step, const long s_l, const long s_k, const long L,
                     __global real *restrict panels, const long T)
{{
{body}
}}
"""
    return src, name


# Work-groups of 2 column blocks by 32 row blocks: PoCL runs a group's work-items in turn,
# so the group's two b panels (K x TN each) stay in cache while the small a panels stream
# past. Measured (float32, 4x16, GFLOPS at 512 / 1024 / 2048, numpy 187 / 198 / 204 in the
# same run): PoCL's own choice of local size 78 / 113 / 142 (an earlier run), (1, 64) 155 /
# 117 / 140, (8, 8) 87 / 124 / 174, (4, 16) 154 / 124 / 185, (2, 32) 157 / 188 / 190.
_GROUP = (2, 32)  # (column blocks, row blocks)

_GEMM_ARGS = [None, None, None, np.int64, None, np.int64, np.int64, np.int64, np.int64]
_PACK_ARGS = [None, np.int64, np.int64, np.int64, np.int64, np.int64, None, np.int64]


def _check(queue: cl.CommandQueue, x: cla.Array, what: str, dtype: np.dtype | None) -> None:
    if not isinstance(x, cla.Array):
        raise TypeError(f"gemm: {what} must be a pyopencl array, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"gemm: {what} must have at least 2 dims [..., rows, cols], got {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"gemm: {what} must be C-contiguous")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"gemm: {what} has dtype {x.dtype}, expected {dtype}")
    if x.context != queue.context:
        raise ValueError(f"gemm: {what} lives in another context than the queue")


def _shapes(a, b, trans_a: bool, trans_b: bool) -> tuple[tuple, int, int, int]:
    """``(batch, M, N, K)`` of ``op(a) @ op(b)``, or a ValueError naming the mismatch."""
    m, ka = (a.shape[-1], a.shape[-2]) if trans_a else a.shape[-2:]
    kb, n = (b.shape[-1], b.shape[-2]) if trans_b else b.shape[-2:]
    if ka != kb:
        raise ValueError(
            f"gemm: inner dims differ: op(a) is {m}x{ka}, op(b) is {kb}x{n} "
            f"(a {a.shape}, b {b.shape}, trans_a={trans_a}, trans_b={trans_b})"
        )
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"gemm: batch dims differ: a {a.shape[:-2]}, b {b.shape[:-2]}")
    return a.shape[:-2], m, n, ka


def _shape_class(m: int, n: int, k: int) -> tuple[int, int, int]:
    def log2(x: int) -> int:
        return min(int(math.log2(max(x, 1))), 12)

    return log2(m), log2(n), log2(k)


def tile_for(queue, dtype, trans_a, batch, m, n, k, tune: bool = False) -> tuple[int, int]:
    """The tile for this product: the tuned one if known, else (``tune``) the fastest
    candidate timed once on operands of this shape, else the default."""
    dtype = np.dtype(dtype)
    key = (queue.device.int_ptr, dtype, trans_a, _shape_class(m, n, k))
    tile = tuned.get(key)
    if tile is not None:
        return tile
    if not tune:
        return TILES[dtype][0]
    nb = int(np.prod(batch, dtype=np.int64))
    a_shape = (*batch, k, m) if trans_a else (*batch, m, k)
    a = cla.zeros(queue, a_shape, dtype)
    b = cla.zeros(queue, (*batch, k, n), dtype)
    out = cla.empty(queue, (*batch, m, n), dtype)
    best: tuple[float, tuple[int, int]] | None = None
    for tile in TILES[dtype]:
        args = (queue, a, b, out, out, trans_a, False, 1.0, 0.0, nb, m, n, k, tile)
        _launch(*args)  # build and warm up
        queue.finish()
        elapsed = math.inf
        for _ in range(2):  # the better of two: the machine may be busy
            start = time.perf_counter()
            _launch(*args)
            queue.finish()
            elapsed = min(elapsed, time.perf_counter() - start)
        if best is None or elapsed < best[0]:
            best = (elapsed, tile)
    assert best is not None  # (TILES has a candidate per dtype)
    tuned[key] = best[1]
    return best[1]


def _pack(queue, x, nb, step, lines, tile, s_l, s_k, k):
    """Panels of ``tile`` lines of ``x`` (``lines`` long, zero-padded), from the pool."""
    dtype = x.dtype
    mode = "t" if s_l == 1 else "k" if s_k == 1 else "l"
    src, name = pack_source(dtype, mode)
    kernel = build(queue.context, src, name, _PACK_ARGS)
    padded = -(-lines // tile) * tile
    size = {"t": (k, padded // tile, nb), "k": (k, padded, nb), "l": (padded, k, nb)}[mode]
    panels = cla.empty(queue, (nb * padded * k,), dtype, allocator=allocator(queue))
    kernel(
        queue, size, None,
        x.base_data, element_offset(x), step, s_l, s_k, lines, panels.data, tile,  # pyright: ignore[reportArgumentType]
    )  # fmt: skip
    return panels


def _launch(queue, a, b, out, c, trans_a, trans_b, alpha, beta, nb, m, n, k, tile):
    """Pack both operands, then one launch of the kernel over the whole batch."""
    dtype = out.dtype
    tm, tn = tile
    src, name = gemm_source(dtype, tm, tn)
    kernel = build(queue.context, src, name, [*_GEMM_ARGS, dtype.type, dtype.type])
    # op(a)[i, k] at i * s_i + k * s_k; op(b)[k, j] at j * s_j + k * s_k
    a_panels = _pack(queue, a, nb, m * k, m, tm, *((1, m) if trans_a else (k, 1)), k)
    b_panels = _pack(queue, b, nb, k * n, n, tn, *((k, 1) if trans_b else (1, n)), k)
    blocks = (-(-n // tn), -(-m // tm))
    group = tuple(min(g, b) for g, b in zip(_GROUP, blocks, strict=True))
    size = (*(-(-b // g) * g for b, g in zip(blocks, group, strict=True)), nb)
    kernel(
        queue, size, (*group, 1), a_panels.data, b_panels.data,  # pyright: ignore[reportArgumentType]
        out.base_data, element_offset(out), c.base_data, element_offset(c),  # pyright: ignore[reportArgumentType]
        m, n, k, dtype.type(alpha), dtype.type(beta),
    )  # fmt: skip


def gemm(
    queue: cl.CommandQueue,
    a: cla.Array,
    b: cla.Array,
    out: cla.Array | None = None,
    *,
    trans_a: bool = False,
    trans_b: bool = False,
    alpha: float = 1.0,
    beta: float = 0.0,
    c: cla.Array | None = None,
    tile: tuple[int, int] | None = None,
    tune: bool = False,
) -> cla.Array:
    """``out = alpha * op(a) @ op(b) + beta * c`` for ``[..., M, K] x [..., K, N]`` (``op``
    transposes the last two dims when ``trans_a`` / ``trans_b``), batched over the leading
    dims in three launches whatever the batch (two packs, one GEMM); returns ``out``
    (allocated from the queue's pool when ``None``).

    ``c`` (shape ``[..., M, N]``; ``out`` itself or disjoint from it) is read only when
    ``beta != 0``; ``c=None`` with ``beta != 0`` means ``c = out``. ``out`` may alias ``a`` or
    ``b`` (``X <- X X^T X`` in place): the kernel reads only the packed copies. The queue must
    be in order (the scratch panels return to its pool when the call ends). ``tile`` forces a
    ``(TM, TN)`` of :data:`TILES`; ``tune`` times the candidates once per shape class.
    Enqueued on ``queue``, nothing is read back to the host. Bad input raises before anything
    is written."""
    _check(queue, a, "a", None)
    dtype = a.dtype
    if dtype not in TILES:
        raise ValueError(f"gemm: dtype {dtype} is not supported (float32, float64)")
    if dtype == np.float64 and not has_fp64(queue.device):
        raise ValueError("gemm: float64 needs a device with fp64 (cl_khr_fp64)")
    _check(queue, b, "b", dtype)
    batch, m, n, k = _shapes(a, b, trans_a, trans_b)
    if k == 0:
        raise ValueError("gemm: the inner dim K is 0")
    shape = (*batch, m, n)
    if out is None:
        if beta != 0 and c is None:
            raise ValueError("gemm: beta != 0 needs c (or out) to read")
        out = cla.empty(queue, shape, dtype, allocator=allocator(queue))
    else:
        _check(queue, out, "out", dtype)
        if out.shape != shape:
            raise ValueError(f"gemm: out has shape {out.shape}, the product has {shape}")
    if c is None:
        c = out
    else:
        _check(queue, c, "c", dtype)
        if c.shape != shape:
            raise ValueError(f"gemm: c has shape {c.shape}, the product has {shape}")
    if tile is None:
        tile = tile_for(queue, dtype, trans_a, batch, m, n, k, tune)
    elif tile not in TILES[dtype]:
        raise ValueError(f"gemm: tile {tile} is not one of {TILES[dtype]} for {dtype}")
    nb = int(np.prod(batch, dtype=np.int64))
    if nb == 0 or m == 0 or n == 0:
        return out
    _launch(queue, a, b, out, c, trans_a, trans_b, alpha, beta, nb, m, n, k, tile)
    return out
