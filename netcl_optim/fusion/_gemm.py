"""A register-blocked GEMM of our own: ``out = alpha * op(a) @ op(b) + beta * c``, and its
symmetric form :func:`gram` (``out = alpha * X X^T + beta * c``).

Operands are C-contiguous pyopencl arrays of shape ``[..., M, K]`` and ``[..., K, N]`` (or their
transposes with ``trans_a`` / ``trans_b``), float32 or float64 (where the device has fp64), with
the same leading batch dims (no broadcasting). A call is two or three launches whatever the
batch: a pack of ``op(b)``, a pack of ``op(a)`` unless the kernel reads it in place, and the
GEMM kernel. Views at an offset into a bigger buffer (a packed tree) are read through
``base_data`` and their element offset; nothing is read back to the host.

Kernel design (generated per dtype and tile ``(TM, TN)``, cached per context by
:func:`._programs.build`): the operands are first copied into packed panels (one cheap
``O(MK + KN)`` launch each, :func:`pack_source`): ``op(a)`` as ``[batch, M/TM, K, TM]`` and
``op(b)`` as ``[batch, N/TN, K, TN]``, zero-padded at the bottom and right edges. Transposes,
views at an offset and batches are only strides of the pack launches, so one GEMM kernel
serves every case. Each work-item of the GEMM kernel then computes a ``TM x TN`` block of
the output in registers, ``TM`` rows of ``TN / W`` vectors of width ``W`` (256 bits, 8
floats or 4 doubles; 512 bits where the device's native vectors are that wide and ``TN`` a
multiple, :func:`vector_width`: PoCL on an AVX-512 CPU, 1.5-1.9x faster there):
per ``k`` it reads ``TN`` consecutive panel elements of ``b`` as vectors (plain vector
reads of the aligned panels: ``vloadn`` compiles to a function call on PoCL 3, which made the
kernel 3-5x slower) and ``TM`` of ``a``, broadcast, and accumulates ``acc = acc + a * b``,
with no masking in the loop (the padding is zero). There is no local memory (PoCL's CPU
device runs work-groups as loops, where barriers are costly); each work-group is 2 column
blocks by 8 to 32 row blocks (:func:`work_group`), so its ``b`` panels stay in cache while the
``a`` rows stream. Only the store is masked, at an edge.

A row-major ``op(a)`` (``trans_a=False``) that does not overlap ``out`` is read in place
(:data:`DIRECT`): each work-item streams its ``TM`` rows, and the pack launch goes. Measured
on one core (``POCL_MAX_PTHREAD_COUNT=1``, steady on a busy machine; GFLOPS, 6x16, packed ->
in place, numpy 95-104): 512 81 -> 88, 768 96 -> 101, 1024 92 -> 98, 3072x768 @ 768x768 97 ->
104. Reading the other layouts in place was slower and is not done: ``op(b)`` row-major
(``TN`` elements per ``k`` at stride ``N``: 1024 92 -> 56, the rows 4 KiB apart share a few
L1 sets) and ``op(a) = A^T`` stored ``[K, M]`` (1024 93 -> 61).

The epilogue applies ``alpha`` and ``beta * c`` before the store (``c`` may be ``out``
itself), so ``aX + B X`` of a Newton-Schulz step costs no extra pass. With ``beta == 0``,
``c`` is not read (as BLAS: NaN in ``out`` does not propagate).

:func:`gram` runs the same kernel (``sym``) with ``op(b) = op(a)^T``: one pack of ``X`` (as
``b``'s panels; ``a`` read in place, or from the same panels when ``TM == TN``), blocks wholly
below the diagonal skipped, and each computed value stored at ``(i, j)`` and ``(j, i)``: the
flops are about halved, the upper triangle has :func:`gemm`'s bits and ``out`` is exactly
symmetric.

Rounding: ``FP_CONTRACT OFF`` and a separate multiply and add, as the rest of the library.
Measured on this PoCL CPU device (960^3, same run): OFF 191 GFLOPS, ``FP_CONTRACT ON`` 221
(the compiler then fuses into FMA instructions), an explicit ``fma()`` or ``mad()`` 24 (a
library call). The 15% was not worth a second rounding convention; the switch is one line
of :func:`kernel_header` if a device needs it.
Each output is a sequential sum over ``k`` in order (``K`` is never split), so the error bound
is the classic ``|C - C_exact| <= (K + 3) u (|alpha| |A| |B| + |beta| |C|)`` (``u`` the unit
roundoff), and results are bit for bit the same for every tile, work-group shape, batch
position and offset, packed or read in place. The one exception is CLBlast (below): its own
summation order and rounding.

The tile is chosen by :func:`tile_for`: a fixed default, or (``tune=True``) the fastest of a
few configurations timed once per ``(device, dtype, kind, transposes, shape class)``, kept in
:data:`tuned` and in a JSON file in :func:`cache_dir` (``$NETCL_OPTIM_CACHE_DIR``, else
``~/.cache/netcl_optim``), keyed by platform, device and driver version, read once per process
(a corrupt file is ignored with a warning). On a GPU with ``pyclblast`` installed the tuner
also times CLBlast's GEMM (:data:`CLBLAST`) and keeps it where it is faster; ``tile="clblast"``
forces it on any device. ``NETCL_OPTIM_TUNE_GEMM=1`` in the environment tunes every call that
did not ask (Muon's products), once per shape class; the choice then comes from the disk cache.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._atomic_file import write_atomically
from .._device import allocator, has_fp64
from .._packing import element_offset
from ._launch import note_launches
from ._programs import build

# (TM, TN) candidates per dtype; the first is the default, or the first of WIDE_TILES on a
# device with 512-bit vectors
# fmt: off
TILES = {
    np.dtype(np.float32): (
        (6, 16), (4, 16), (12, 8), (8, 16), (6, 64), (8, 32), (6, 32), (4, 64), (8, 48),
    ),
    np.dtype(np.float64): ((4, 8), (12, 4), (6, 8), (8, 8), (6, 32), (8, 16), (6, 16), (4, 32)),
}
# fmt: on
_WIDTH = {np.dtype(np.float32): 8, np.dtype(np.float64): 4}  # vector lanes: 256 bits
# On a device whose native vector is 512 bits (PoCL on an AVX-512 CPU: 16 floats), tiles whose
# TN is a multiple of 16 floats (8 doubles) use vectors of that width: the same arithmetic per
# lane, so the same bits. Measured on an AMD Zen 5 (2 cores, PoCL 3.1 skylake-avx512, GFLOPS at
# 768 / 1024 / 2048, numpy 136 / 251 / 232): 6x16 with float8 230 / 217 / 234; with float16
# 6x32 348 / 375 / 428, 8x32 369 / 341 / 453, 6x64 451 / 414 / 411, 4x64 429 / 390 / 364.
WIDE_TILES = {np.dtype(np.float32): (6, 64), np.dtype(np.float64): (6, 32)}

tuned: dict[str, tuple[int, int] | str] = {}  # tile per tuning key (:func:`_tune_key`)


def kernel_header(real: str) -> str:
    fp64 = "#pragma OPENCL EXTENSION cl_khr_fp64 : enable\n" if real == "double" else ""
    return f"#pragma OPENCL FP_CONTRACT OFF\n{fp64}typedef {real} real;\n"


# Rounding a float to the nearest bfloat16 (ties to even; NaN kept, overflow to inf), as a
# float (``bf16_round``, and ``bf16_round_w`` for the kernel's vectors) or as its 16 bits
BF16_ROUND = """inline float bf16_round(float y) {
    const uint u = as_uint(y);
    return isnan(y) ? y : as_float((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}
inline uint bf16_bits(float y) { return as_uint(bf16_round(y)) >> 16; }
"""


def bf16_round_vector(w: int) -> str:
    return f"""inline float{w} bf16_round_w(float{w} y) {{
    const uint{w} u = as_uint{w}(y);
    return select(as_float{w}((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u), y, isnan(y));
}}
"""


@functools.lru_cache(maxsize=64)
def _native_width(device: cl.Device, dtype: np.dtype) -> int:
    """The device's native vector lanes for ``dtype`` (queried once per device)."""
    if dtype == np.float64:
        return device.native_vector_width_double
    return device.native_vector_width_float


def vector_width(device: cl.Device, dtype: np.dtype, tn: int) -> int:
    """The vector lanes of a ``TN``-wide tile on ``device``: twice :data:`_WIDTH` (512 bits)
    where the device's native vectors are that wide and ``TN`` is a multiple, else
    :data:`_WIDTH`."""
    dtype = np.dtype(dtype)
    wide = 2 * _WIDTH[dtype]
    return wide if _native_width(device, dtype) >= wide and tn % wide == 0 else _WIDTH[dtype]


def default_tile(device: cl.Device, dtype: np.dtype) -> tuple[int, int]:
    """The tile used untuned: :data:`WIDE_TILES`'s on a device with 512-bit vectors, else the
    first of :data:`TILES`."""
    dtype = np.dtype(dtype)
    wide = WIDE_TILES[dtype]
    return wide if vector_width(device, dtype, wide[1]) > _WIDTH[dtype] else TILES[dtype][0]


BF16_WIDE_TILE = (8, 48)  # 16-lane vectors: TN a multiple of TM, so gram packs X once


def bf16_tile(device: cl.Device) -> tuple[int, int]:
    """The default tile of a bfloat16 product: :data:`BF16_WIDE_TILE` where the device's
    vectors are 16 floats wide, else :func:`default_tile`'s. Measured (AMD Zen 5, 2 cores,
    kernel alone, GFLOPS at 768x768x3072 / 768x3072x768 / 768^3): 8x48 1024 / 1014 / 978,
    6x64 1020 / 1026 / 987."""
    wide = BF16_WIDE_TILE
    if vector_width(device, np.dtype(np.float32), wide[1]) == 16:
        return wide
    return default_tile(device, np.dtype(np.float32))


NATIVE_BF16_ENV = "NETCL_OPTIM_NATIVE_BF16"  # "0": bfloat16 products never use vdpbf16ps


def native_bf16(device: cl.Device) -> bool:
    """Whether bfloat16 products on ``device`` use AVX-512's ``vdpbf16ps`` (:func:`gemm_source`,
    the same bits as the portable kernel): a CPU device with 16-lane float vectors on a host
    whose CPU has ``avx512_bf16`` (``/proc/cpuinfo``; without it the instruction would
    fault), whose compiler takes the inline assembly and whose result matches the portable
    rule on a probe. ``NETCL_OPTIM_NATIVE_BF16=0`` turns it off."""
    return os.environ.get(NATIVE_BF16_ENV) != "0" and _probe_native_bf16(device)


_PROBE_BF16 = r"""__kernel void netcl_probe_bf16(__global const float16 *a,
                              __global const float16 *b, __global float16 *c) {
    float16 acc = c[0];
    __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a[0]), "v"(b[0]));
    c[0] = acc;
}
"""


def _host_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=16)
def _probe_native_bf16(device: cl.Device) -> bool:
    if not device.type & cl.device_type.CPU or device.native_vector_width_float < 16:
        return False
    if "avx512_bf16" not in _host_cpu_flags():
        return False
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(n).astype(np.float32) for n in (32, 32, 16))
    bits = [(x.view(np.uint32) >> 16).astype(np.uint16) for x in (a, b)]  # (truncated: bf16)
    av, bv = ((x.astype(np.uint32) << 16).view(np.float32).astype(np.float64) for x in bits)
    expected = (c.astype(np.float64) + av[1::2] * bv[1::2]).astype(np.float32)
    expected = (expected.astype(np.float64) + av[0::2] * bv[0::2]).astype(np.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            context = cl.Context([device])
            queue = cl.CommandQueue(context)
            program = cl.Program(context, _PROBE_BF16).build()
            a_d, b_d = (cla.to_device(queue, x.view(np.float32)) for x in bits)
            c_d = cla.to_device(queue, c)
            kernel: Any = program.netcl_probe_bf16
            kernel(queue, (1,), None, a_d.data, b_d.data, c_d.data)
            return bool(np.array_equal(c_d.get(), expected))
    except (cl.Error, RuntimeError, ValueError):
        return False


@functools.cache
def gemm_source(
    dtype: np.dtype,
    tm: int,
    tn: int,
    *,
    sym: bool = False,
    a_rows: bool = False,
    width: int | None = None,
    bf16: bool = False,
    native: bool = False,
    a_in_b: bool = False,
) -> tuple[str, str]:
    """The OpenCL source and kernel name of the ``TM x TN`` register-blocked kernel over
    packed panels (see :func:`pack_source`). ``sym``: the symmetric product of :func:`gram`
    (``M == N``): blocks wholly below the diagonal return at once, the others store their
    elements on and above the diagonal and mirror them below (reading ``d`` above only).
    ``a_rows``: ``op(a)`` read in place, row-major ``[M, K]`` at element offset ``a_off`` of
    the buffer given for the panels, each work-item streaming its ``TM`` rows (rows past
    ``M`` re-read row ``M - 1``; their outputs are not stored): no pack launch, the same
    arithmetic, so the same bits.

    ``bf16`` (float32 only): the panels hold bfloat16 pairs (:func:`pack_source`), each step
    of the loop adds a pair of ``k``: ``acc + a[k+1] b[k+1]``, then ``+ a[k] b[k]``, each
    product exact in float32 and each sum rounded once, as AVX-512's ``vdpbf16ps``, which
    ``native`` uses (:func:`native_bf16`; 16-lane vectors): the same bits but where a
    partial sum falls below 2^-126 (the instruction flushes it to zero); the stored values
    are rounded to bfloat16. ``a_in_b`` (:func:`gram`, ``TN`` a multiple of ``TM``): the
    rows of ``op(a)`` read from ``b``'s panels (the same matrix), so ``a`` needs no pack."""
    dtype = np.dtype(dtype)
    real = "double" if dtype == np.float64 else "float"
    w = width or _WIDTH[dtype]
    if tn % w:
        raise ValueError(f"tile width {tn} is not a multiple of the vector width {w}")
    if bf16 and (dtype != np.float32 or a_rows or (native and w != 16)):
        raise ValueError("bfloat16 products: float32, packed a, 16 lanes for the native form")
    if a_in_b and (a_rows or tn % tm):
        raise ValueError(f"a read from b's panels needs TN a multiple of TM, got {tm}x{tn}")
    nv = tn // w
    kind = "_bf16n" if native else "_bf16" if bf16 else ""
    a_kind = "_rows" if a_rows else "_ainb" if a_in_b else ""
    name = f"netcl_{'gram' if sym else 'gemm'}_{real}{kind}_{tm}x{tn}w{w}{a_kind}"
    panel = "uint" if bf16 else "real"
    if a_in_b:
        setup = (
            f"    __global const {panel} *ap = b_panels + (z * nb + i0 / {tn}) * KP * {tn}"
            f" + i0 % {tn};\n"
        )
        a_read, steps = "ap[{r}]", f", ap += {tn}, bp += {tn}"
    elif a_rows:
        setup = "".join(
            f"    __global const real *ar{r} = a_panels + a_off + z * M * K"
            f" + min(i0 + {r}, M - 1) * K;\n"
            for r in range(tm)
        )
        a_read, steps = "ar{r}[k]", f", bp += {tn}"
    else:
        setup = f"    __global const {panel} *ap = a_panels + (z * mb + ib) * KP * {tm};\n"
        a_read, steps = "ap[{r}]", f", ap += {tm}, bp += {tn}"
    setup += f"    __global const {panel} *bp = b_panels + (z * nb + jb) * KP * {tn};\n"
    acc = ", ".join(f"acc{r}_{v} = (realw)(0)" for r in range(tm) for v in range(nv))
    # (direct vector reads: vload compiles to a call on PoCL, 3-5x slower; the panels come
    # from fresh buffers, aligned, and TN is a multiple of W)
    vec = f"uint{w}" if bf16 else "realw"
    body = "".join(
        f"        const {vec} b{v} = *(__global const {vec} *)(bp + {v * w});\n" for v in range(nv)
    )
    for r in range(tm):
        body += f"        const {vec} a{r} = ({vec})({a_read.format(r=r)});\n"
        if bf16:
            body += bf16_steps(r, nv, w, native)
        else:
            body += "".join(f"        acc{r}_{v} = acc{r}_{v} + a{r} * b{v};\n" for v in range(nv))
    fast, edge = _epilogue_sym(tm, nv, w, bf16) if sym else ("", _edge(tm, tn, nv, False, bf16))
    for r in range(tm if not sym else 0):
        for v in range(nv):
            at = f"(i0 + {r}) * N + j0 + {v * w}"
            lanes = ", ".join(f"d[{at} + {e}]" for e in range(w))
            stores = " ".join(f"c[{at} + {e}] = y.s{e:x};" for e in range(w))
            fast += (  # (lane by lane: vloadn/vstoren are calls on PoCL; c may be unaligned)
                f"        {{ realw y = alpha * acc{r}_{v};\n"
                f"          if (beta != 0) y = y + beta * (realw)({lanes});\n"
                f"{'          y = bf16_round_w(y);' + chr(10) if bf16 else ''}"
                f"          {stores} }}\n"
            )
    skip = f"\n    if (i0 > j0 + {tn - 1}) return;  /* wholly below the diagonal */" if sym else ""
    helpers = BF16_ROUND + bf16_round_vector(w) if bf16 else ""
    k_pairs = "(K + 1) / 2" if bf16 else "K"
    src = f"""//CL// {name}: C = alpha A B + beta D over packed panels, {tm}x{tn} outputs per item
{kernel_header(real)}typedef {real}{w} realw;
{helpers}__kernel void {name}(__global const {panel} *restrict a_panels,
                     __global const {panel} *restrict b_panels,
                     __global real *c_base, const long c_off,
                     __global const real *d_base, const long d_off,
                     const long M, const long N, const long K, const real alpha, const real beta,
                     const long a_off)
{{
    const long jb = get_global_id(0), ib = get_global_id(1), z = get_global_id(2);
    const long j0 = jb * {tn}, i0 = ib * {tm};
    const long mb = (M + {tm - 1}) / {tm}, nb = (N + {tn - 1}) / {tn};
    if (ib >= mb || jb >= nb) return;  /* (the launch pads to whole work-groups) */{skip}
    const long KP = {k_pairs};  /* panel steps: k, or pairs of k in bfloat16 */
{setup}    __global real *c = c_base + c_off + z * M * N;
    __global const real *d = d_base + d_off + z * M * N;
    realw {acc};
    for (long k = 0; k < KP; k++{steps}) {{
{body}    }}
    if (i0 + {tm} <= M && j0 + {tn} <= N{" && i0 + " + str(tm - 1) + " < j0" if sym else ""}) {{
{fast}    }} else {{
{edge}    }}
}}
"""
    return src, name


def bf16_steps(r: int, nv: int, w: int, native: bool) -> str:
    """The loop-body lines adding one pair of ``k`` to row ``r``'s accumulators
    ``acc{r}_{v}`` from the bfloat16 pairs ``a{r}`` (broadcast) and ``b{v}`` (``uint{w}``):
    ``k + 1`` (the high halves) first, then ``k``, each product exact in float32 and each sum
    rounded once; ``native``: one ``vdpbf16ps`` per vector, which does exactly that."""
    lines = ""
    for v in range(nv):
        if native:
            lines += (
                f'        __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc{r}_{v}) '
                f': "v"(as_float{w}(a{r})), "v"(as_float{w}(b{v})));\n'
            )
            continue
        for half in ("& 0xFFFF0000u", "<< 16"):
            lines += (
                f"        acc{r}_{v} = acc{r}_{v}"
                f" + as_float{w}(a{r} {half}) * as_float{w}(b{v} {half});\n"
            )
    return lines


def _epilogue_sym(tm: int, nv: int, w: int, bf16: bool = False) -> tuple[str, str]:
    """The stores of :func:`gemm_source`'s symmetric kernel: ``(fast, edge)``. ``fast`` (a
    whole block strictly above the diagonal): the rows as in the plain kernel, then each
    value again at its mirror ``(j, i)``. ``edge`` (:func:`_edge`): element by element, only
    ``i <= j`` in range, mirrored when ``i < j``. The arithmetic of a value is the plain
    kernel's."""
    fast = ""
    for r in range(tm):
        for v in range(nv):
            at = f"(i0 + {r}) * N + j0 + {v * w}"
            lanes = ", ".join(f"d[{at} + {e}]" for e in range(w))
            stores = " ".join(f"c[{at} + {e}] = y.s{e:x};" for e in range(w))
            mirror = " ".join(f"c[(j0 + {v * w + e}) * N + i0 + {r}] = y.s{e:x};" for e in range(w))
            fast += (
                f"        {{ realw y = alpha * acc{r}_{v};\n"
                f"          if (beta != 0) y = y + beta * (realw)({lanes});\n"
                f"{'          y = bf16_round_w(y);' + chr(10) if bf16 else ''}"
                f"          {stores}\n          {mirror} }}\n"
            )
    return fast, _edge(tm, nv * w, nv, True, bf16)


def _edge(tm: int, tn: int, nv: int, sym: bool, bf16: bool = False) -> str:
    """The masked stores of a block at an edge (or, ``sym``, on the diagonal): per row, its
    accumulators copied to a private array, then a loop over the columns storing those in
    range (``sym``: on or above the diagonal, mirrored below). A loop, not unrolled code:
    the kernels build twice as fast, and the edge is rare. ``y = alpha * acc`` and ``y + beta
    * d`` lane by lane, the fast path's arithmetic."""
    keep = "i <= j && j < N" if sym else "i < M && j < N"
    mirror = "\n                if (i < j) c[j * N + i] = y;" if sym else ""
    edge = f"        realw rowv[{nv}];\n        const real *row = (const real *)rowv;\n"
    for r in range(tm):
        copies = " ".join(f"rowv[{v}] = acc{r}_{v};" for v in range(nv))
        edge += (
            f"        {copies}\n"
            f"        for (long e = 0, i = i0 + {r}; e < {tn}; e++) {{\n"
            f"            const long j = j0 + e;\n"
            f"            if ({keep}) {{\n"
            f"                real y = alpha * row[e];\n"
            f"                if (beta != 0) y = y + beta * d[i * N + j];\n"
            f"{'                y = bf16_round(y);' + chr(10) if bf16 else ''}"
            f"                c[i * N + j] = y;{mirror} }}\n"
            f"        }}\n"
        )
    return edge


@functools.cache
def pack_source(dtype: np.dtype, mode: str, bf16: bool = False) -> tuple[str, str]:
    """A kernel copying a ``[..., L, K]``-indexed operand into panels ``P[z, blk, k, t]`` of
    ``T`` lines each (line ``blk * T + t``, zero past ``L``), reading element ``(l, k)`` at
    ``off + z * step + l * s_l + k * s_k``: transposes are strides. ``mode`` picks the launch
    for the source's contiguous axis: ``"k"`` one element per item, ``k`` along dim 0;
    ``"l"`` the same along ``l``; ``"t"`` one run of ``T`` lines per item (``s_l == 1``);
    ``"v"`` (``bf16``) as ``"t"`` with 8-float vectors (offsets, strides and ``T`` multiples
    of 8, ``L`` of ``T``, ``K`` even: no padding).
    ``bf16`` (float32): ``P[z, blk, p, t]`` holds the pair ``(k, k + 1) = (2p, 2p + 1)`` of
    line ``t`` rounded to bfloat16, ``k`` in the low 16 bits (zero past ``K``, an extra last
    argument): the launch runs over the pairs where it ran over ``k``."""
    real = "double" if np.dtype(dtype) == np.float64 else "float"
    name = f"netcl_gemm_pack_{real}{'_bf16' if bf16 else ''}_{mode}"
    at = "off + z * step + l * s_l + k * s_k"
    if bf16:
        k_at = at.replace("k * s_k", "2 * k * s_k")
        value = (
            f"(l < L ? bf16_bits(x_base[{k_at}]) "
            f"| (2 * k + 1 < Kr ? bf16_bits(x_base[{k_at} + s_k]) << 16 : 0u) : 0u)"
        )
        panel, extra, helpers = "uint", ", const long Kr", BF16_ROUND
    else:
        value, panel, extra, helpers = f"(l < L ? x_base[{at}] : (real)0)", "real", "", ""
    if mode == "v":  # bf16, s_l == 1, 8-aligned and no padding: "t" with float8 vectors
        helpers += bf16_round_vector(8)
        body = """    const long k = get_global_id(0), blk = get_global_id(1);
    const long z = get_global_id(2);
    const long K = get_global_size(0), blocks = get_global_size(1);
    __global uint *p = panels + ((z * blocks + blk) * K + k) * T;
    __global const float *x0 = x_base + off + z * step + blk * T + 2 * k * s_k;
    for (long c = 0; c < T; c += 8) {
        const uint8 lo = as_uint8(bf16_round_w(*(__global const float8 *)(x0 + c))) >> 16;
        const uint8 hi = as_uint8(bf16_round_w(*(__global const float8 *)(x0 + s_k + c)));
        *(__global uint8 *)(p + c) = lo | (hi & 0xFFFF0000u);
    }"""
    elif mode == "t":
        body = f"""    const long k = get_global_id(0), blk = get_global_id(1);
    const long z = get_global_id(2);
    const long K = get_global_size(0), blocks = get_global_size(1);
    __global {panel} *p = panels + ((z * blocks + blk) * K + k) * T;
    for (long t = 0; t < T; t++) {{
        const long l = blk * T + t;
        p[t] = {value};
    }}"""
    else:
        ids = ("k", "l") if mode == "k" else ("l", "k")
        body = f"""    const long {ids[0]} = get_global_id(0), {ids[1]} = get_global_id(1);
    const long z = get_global_id(2);
    const long K = get_global_size({ids.index("k")}), padded = get_global_size({ids.index("l")});
    const long blk = l / T, t = l - blk * T;
    panels[((z * (padded / T) + blk) * K + k) * T + t] = {value};"""
    src = f"""//CL// {name}: panels of T lines, zero-padded past L
{kernel_header(real)}{helpers}__kernel void {name}(__global const real *restrict x_base,
                     const long off, const long step, const long s_l, const long s_k, const long L,
                     __global {panel} *restrict panels, const long T{extra})
{{
{body}
}}
"""
    return src, name


# Work-groups of 2 column blocks by up to 32 row blocks: PoCL runs a group's work-items in
# turn, so the group's two b panels (K x TN each) stay in cache while the small a panels
# stream past. Measured (float32, 4x16, GFLOPS at 512 / 1024 / 2048, numpy 187 / 198 / 204 in
# the same run): PoCL's own choice of local size 78 / 113 / 142 (an earlier run), (1, 64) 155 /
# 117 / 140, (8, 8) 87 / 124 / 174, (4, 16) 154 / 124 / 185, (2, 32) 157 / 188 / 190.
# On one core (POCL_MAX_PTHREAD_COUNT=1: no imbalance, and steady on a busy machine), 6x16:
# (2, 32) 94 at 2048 against 82 for (2, 8); equal within 3% at 512-1024. On two cores the
# group count matters more: PoCL hands whole groups to its threads, and 48 groups (512, (2,
# 32)) left one thread idle at the end or stuck behind another process (best of 5: 76 GFLOPS
# against 168 with (1, 8) groups). So the rows per group shrink (32, 16, 8) until there are
# at least _MIN_GROUPS groups.
_GROUP_COLS, _GROUP_ROWS = 2, (32, 16, 8)
_MIN_GROUPS = 256
DIRECT = True  # read a row-major op(a) in place (:func:`_launch`)

_GEMM_ARGS = [None, None, None, np.int64, None, np.int64, np.int64, np.int64, np.int64]
_OFFSET_ARGS = [np.int64]
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


@functools.cache
def _device_id(device: cl.Device) -> str:
    """What a tuned tile is valid for: platform, device and driver (not a handle of this
    process, so that the disk cache serves the next one)."""
    return f"{device.platform.name}|{device.name}|{device.driver_version}"


def _tune_key(device, dtype, kind, trans_a, trans_b, m, n, k) -> str:
    """The key of a tuned tile, in memory (:data:`tuned`) and on disk: device, dtype, the
    product's kind (``gemm``, ``gram``), transposes and shape class (log2 of each dim)."""
    trans = f"{'T' if trans_a else 'N'}{'T' if trans_b else 'N'}"
    shape = ",".join(str(d) for d in _shape_class(m, n, k))
    return f"{_device_id(device)}|{np.dtype(dtype).name}|{kind}|{trans}|{shape}"


# -- the tuner's disk cache -----------------------------------------------------------------

CACHE_FILE = "gemm_tiles.json"
_CACHE_FORMAT = 1
_loaded_dirs: set[str] = set()  # cache directories read by this process (once each)


def cache_dir() -> str:
    """Where tuned tiles are kept: ``$NETCL_OPTIM_CACHE_DIR`` if set, else
    ``~/.cache/netcl_optim``."""
    return os.environ.get("NETCL_OPTIM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "netcl_optim"
    )


def _valid_tile(key: str, value) -> tuple[int, int] | str | None:
    """A cached value as a tile of :data:`TILES` for the key's dtype (or :data:`CLBLAST` for
    a ``gemm`` key), else None."""
    dtype = key.split("|")[-4] if key.count("|") >= 4 else ""
    if value == CLBLAST:
        return CLBLAST if key.split("|")[-3:-2] == ["gemm"] else None
    try:
        tile = (int(value[0]), int(value[1]))
        candidates = TILES[np.dtype(dtype)]
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return tile if len(value) == 2 and tile in candidates else None


def _read_disk_cache(directory: str) -> dict[str, tuple[int, int] | str]:
    """The tiles of the cache file in ``directory`` (empty if there is none); a file that
    cannot be read or parsed, or entries of an unknown form, are skipped with a warning."""
    path = os.path.join(directory, CACHE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"gemm: ignoring the unreadable tile cache {path}: {error}", stacklevel=3)
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
        warnings.warn(f"gemm: ignoring the tile cache {path}: unknown format", stacklevel=3)
        return {}
    tiles, bad = {}, 0
    for key, value in (
        (data.get("tiles") or {}).items() if isinstance(data.get("tiles"), dict) else ()
    ):
        tile = _valid_tile(key, value)
        if tile is None:
            bad += 1
        else:
            tiles[key] = tile
    if bad:
        warnings.warn(f"gemm: ignoring {bad} bad entries of the tile cache {path}", stacklevel=3)
    return tiles


def _load_disk_cache() -> None:
    """Merge the cache directory's tiles into :data:`tuned`, once per directory and process
    (tiles tuned in this process win)."""
    directory = cache_dir()
    if directory in _loaded_dirs:
        return
    _loaded_dirs.add(directory)
    for key, tile in _read_disk_cache(directory).items():
        tuned.setdefault(key, tile)


def _save_disk_cache(key: str, tile: tuple[int, int] | str) -> None:
    """Add ``key: tile`` to the cache file (re-read first: another process may have added
    tiles), written atomically; a directory that cannot be written costs a warning."""
    directory = cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (a bad old file was reported when loaded)
            tiles = _read_disk_cache(directory)
        tiles[key] = tile
        entries = {k: v if isinstance(v, str) else list(v) for k, v in sorted(tiles.items())}
        body = {"format": _CACHE_FORMAT, "tiles": entries}
        text = json.dumps(body, indent=1).encode()
        write_atomically(os.path.join(directory, CACHE_FILE), lambda f: _write(f, text))
    except OSError as error:
        warnings.warn(f"gemm: could not write the tile cache in {directory}: {error}", stacklevel=3)


def _write(f, data: bytes) -> None:
    f.write(data)


# -- tile choice ----------------------------------------------------------------------------


def _time_best(run, tiles):
    """The tile of ``tiles`` for which ``run(tile)`` (enqueue and finish) is fastest: each
    built and warmed up, then the better of two timings (the machine may be busy)."""
    best = None
    for tile in tiles:
        run(tile)  # build and warm up
        elapsed = math.inf
        for _ in range(2):
            start = time.perf_counter()
            run(tile)
            elapsed = min(elapsed, time.perf_counter() - start)
        if best is None or elapsed < best[0]:
            best = (elapsed, tile)
    assert best is not None  # (TILES has a candidate per dtype)
    return best[1]


TUNE_ENV = "NETCL_OPTIM_TUNE_GEMM"  # "1": tune every product's tile once (then cached on disk)


def tile_for(
    queue, dtype, trans_a, batch, m, n, k, tune: bool = False, *, trans_b: bool = False,
    kind: str = "gemm",
) -> tuple[int, int] | str:  # fmt: skip
    """The tile for this product: the tuned one if known (in this process or in the disk
    cache, :func:`cache_dir`), else (``tune``) the fastest candidate timed once on operands
    of this shape (then saved to the disk cache), else the default. ``tune`` is on for
    every call (Muon's too) where the environment sets ``NETCL_OPTIM_TUNE_GEMM=1``. ``kind``
    is ``"gemm"`` or ``"gram"`` (:func:`gram`: ``m == n``, ``trans_a`` its ``trans``). On a GPU with
    ``pyclblast`` importable, a ``gemm``'s candidates include CLBlast (:data:`CLBLAST`)."""
    dtype = np.dtype(dtype)
    _load_disk_cache()
    key = _tune_key(queue.device, dtype, kind, trans_a, trans_b, m, n, k)
    tile = tuned.get(key)
    if tile is not None and (tile != CLBLAST or _pyclblast() is not None):
        return tile
    if not (tune or os.environ.get(TUNE_ENV) == "1"):
        return default_tile(queue.device, dtype)
    nb = int(np.prod(batch, dtype=np.int64))
    a = cla.zeros(queue, (*batch, k, m) if trans_a else (*batch, m, k), dtype)
    out = cla.empty(queue, (*batch, m, n), dtype)
    candidates: tuple = TILES[dtype]
    if kind == "gram":

        def run(tile):
            _launch_gram(queue, a, out, out, trans_a, 1.0, 0.0, nb, m, k, tile)
            queue.finish()
    else:
        b = cla.zeros(queue, (*batch, n, k) if trans_b else (*batch, k, n), dtype)
        if _clblast_for(queue.device):
            candidates = (*candidates, CLBLAST)

        def run(tile):
            args = (queue, a, b, out, out, trans_a, trans_b, 1.0, 0.0, nb, m, n, k)
            _clblast_gemm(*args) if tile == CLBLAST else _launch(*args, tile)
            queue.finish()

    tile = tuned[key] = _time_best(run, candidates)
    _save_disk_cache(key, tile)
    return tile


# -- CLBlast (optional, GPUs) -----------------------------------------------------------------

CLBLAST = "clblast"  # a tile value: pyclblast's GEMM instead of ours
_clblast_module: list = []  # [pyclblast or None], imported once


def _pyclblast():
    """The ``pyclblast`` module, or None where it is not installed (looked up once)."""
    if not _clblast_module:
        try:
            import pyclblast  # pyright: ignore[reportMissingImports]
        except ImportError:
            pyclblast = None
        _clblast_module.append(pyclblast)
    return _clblast_module[0]


def _clblast_for(device: cl.Device) -> bool:
    """Whether the tuner may time CLBlast on ``device``: a GPU, with ``pyclblast`` (CLBlast
    has no tuned parameters for CPU devices: 12-24 GFLOPS on PoCL, below our kernel)."""
    return bool(device.type & cl.device_type.GPU) and _pyclblast() is not None


def _overlaps(x: cla.Array, y: cla.Array) -> bool:
    """Whether the bytes of ``x`` and ``y`` intersect (views of one buffer)."""
    if x.base_data != y.base_data:
        return False
    return x.offset < y.offset + y.nbytes and y.offset < x.offset + x.nbytes


def _copy(queue, dst: cla.Array, src: cla.Array) -> None:
    cl.enqueue_copy(  # pyright: ignore[reportCallIssue]
        queue, dst.base_data, src.base_data, byte_count=src.nbytes,  # pyright: ignore[reportArgumentType]
        src_offset=src.offset, dst_offset=dst.offset,
    )  # fmt: skip


def _clblast_gemm(queue, a, b, out, c, trans_a, trans_b, alpha, beta, nb, m, n, k):
    """The product by pyclblast (row-major; offsets passed explicitly: it reads
    ``base_data`` and ignores a view's offset). CLBlast reads and writes ``C`` in place, so
    ``c`` is copied to ``out`` first when it is another array (``beta != 0``), and an ``out``
    aliasing ``a`` or ``b`` is computed in a scratch array and copied back."""
    lib = _pyclblast()
    if lib is None:
        raise ValueError("gemm: tile='clblast' needs pyclblast (pip install pyclblast)")
    target = out
    if _overlaps(out, a) or _overlaps(out, b):
        target = cla.empty(queue, out.shape, out.dtype, allocator=allocator(queue))
    if beta != 0 and not (c.base_data == target.base_data and c.offset == target.offset):
        _copy(queue, target, c)
    lds = dict(a_ld=a.shape[-1], b_ld=b.shape[-1], c_ld=n)
    common = dict(
        alpha=float(alpha), beta=float(beta), a_transp=bool(trans_a), b_transp=bool(trans_b),
        a_offset=element_offset(a), b_offset=element_offset(b), c_offset=element_offset(target),
    )  # fmt: skip
    a, b, flat = (x.reshape(-1, x.shape[-1]) for x in (a, b, target))  # (it takes 2-D only)
    if nb == 1:
        lib.gemm(queue, m, n, k, a, b, flat, **lds, **common)
    else:
        strides = dict(a_stride=m * k, b_stride=k * n, c_stride=m * n)
        lib.gemmStridedBatched(queue, m, n, k, nb, a, b, flat, **lds, **strides, **common)
    if target is not out:
        _copy(queue, out, target)


def pack_operand(queue, x, nb, step, lines, tile, s_l, s_k, k, bf16=False):
    """Panels of ``tile`` lines of ``x`` (``lines`` long, zero-padded), from the pool;
    ``bf16``: of bfloat16 pairs along ``k`` (:func:`pack_source`)."""
    dtype = x.dtype
    mode = "t" if s_l == 1 else "k" if s_k == 1 else "l"
    aligned = all(v % 8 == 0 for v in (element_offset(x), step, s_k, tile))
    if bf16 and mode == "t" and aligned and lines % tile == 0 and k % 2 == 0:
        mode = "v"  # (3-4x "t" on Zen 5)
    src, name = pack_source(dtype, mode, bf16)
    kernel = build(queue.context, src, name, _PACK_ARGS + [np.int64] * bf16)
    padded = -(-lines // tile) * tile
    steps = -(-k // 2) if bf16 else k
    size = {"t": (steps, padded // tile, nb), "k": (steps, padded, nb), "l": (padded, steps, nb)}
    size["v"] = size["t"]
    panels = cla.empty(queue, (nb * padded * steps,), np.uint32 if bf16 else dtype,
                       allocator=allocator(queue))  # fmt: skip
    kernel(
        queue, size[mode], None,
        x.base_data, element_offset(x), step, s_l, s_k, lines, panels.data, tile,  # pyright: ignore[reportArgumentType]
        *([k] if bf16 else []),
    )  # fmt: skip
    note_launches(name)
    return panels


def work_group(blocks: tuple[int, int], nb: int) -> tuple[int, int]:
    """The work-group (column blocks, row blocks): 2 by the most rows of :data:`_GROUP_ROWS`
    that still gives :data:`_MIN_GROUPS` groups over the batch (else the fewest rows)."""
    cols = min(_GROUP_COLS, blocks[0])
    for rows in _GROUP_ROWS:
        rows = min(rows, blocks[1])
        if -(-blocks[0] // cols) * -(-blocks[1] // rows) * nb >= _MIN_GROUPS:
            break
    return cols, rows


def run_kernel(
    queue, a_src, b_panels, out, c, alpha, beta, nb, m, n, k, tile, sym=False, a_off=None,
    bf16=False, a_in_b=False,
):  # fmt: skip
    """One launch of the register-blocked kernel over the whole batch: ``a_src`` is the
    panels of ``op(a)``, or (``a_off`` given) the buffer of a row-major ``op(a)``."""
    dtype = out.dtype
    tm, tn = tile
    width = vector_width(queue.device, dtype, tn)
    native = bf16 and width == 16 and native_bf16(queue.device)
    src, name = gemm_source(
        dtype,
        tm,
        tn,
        sym=sym,
        a_rows=a_off is not None,
        width=width,
        bf16=bf16,
        native=native,
        a_in_b=a_in_b and tm != tn,
    )
    kernel = build(queue.context, src, name, [*_GEMM_ARGS, dtype.type, dtype.type, *_OFFSET_ARGS])
    blocks = (-(-n // tn), -(-m // tm))
    group = work_group(blocks, nb)
    size = (*(-(-b // g) * g for b, g in zip(blocks, group, strict=True)), nb)
    kernel(
        queue, size, (*group, 1), a_src, b_panels,
        out.base_data, element_offset(out), c.base_data, element_offset(c),  # pyright: ignore[reportArgumentType]
        m, n, k, dtype.type(alpha), dtype.type(beta), a_off or 0,
    )  # fmt: skip
    note_launches(name)


def _launch(
    queue, a, b, out, c, trans_a, trans_b, alpha, beta, nb, m, n, k, tile, direct=None, sym=False,
    bf16=False,
):  # fmt: skip
    """Pack ``op(b)`` (and ``op(a)`` unless it is read in place), then one launch of the
    kernel over the whole batch (``sym``: the symmetric kernel, upper blocks mirrored).
    ``op(a)`` is read in place (:data:`DIRECT`, or ``direct``) when it is ``a`` itself,
    row-major, and does not overlap ``out`` (written while read); never in bfloat16."""
    tm, tn = tile
    direct = DIRECT if direct is None else direct
    in_place = direct and not bf16 and not trans_a and not _overlaps(out, a)
    # op(a)[i, k] at i * s_i + k * s_k; op(b)[k, j] at j * s_j + k * s_k
    b_panels = pack_operand(queue, b, nb, k * n, n, tn, *((k, 1) if trans_b else (1, n)), k, bf16)
    if in_place:
        a_src, a_off = a.base_data, element_offset(a)
    else:
        a_src = pack_operand(
            queue, a, nb, m * k, m, tm, *((1, m) if trans_a else (k, 1)), k, bf16
        ).data
        a_off = None
    args = (queue, a_src, b_panels.data, out, c, alpha, beta, nb, m, n, k, tile)
    run_kernel(*args, sym=sym, a_off=a_off, bf16=bf16)


def _launch_gram(queue, x, out, c, trans, alpha, beta, nb, m, k, tile, bf16=False):
    """Pack ``op(x)`` once in panels of ``TN`` rows (``op(x)^T``'s panels of ``TN``
    columns), read ``op(x)`` in place as ``a`` where :func:`_launch` would (``trans=False``,
    no overlap with ``out``, not bfloat16), else from the same panels (``TM == TN``) or a
    second pack; then the symmetric kernel."""
    tm, tn = tile
    strides = (1, m) if trans else (k, 1)
    b_panels = pack_operand(queue, x, nb, m * k, m, tn, *strides, k, bf16)
    a_off, a_in_b = None, False
    if DIRECT and not bf16 and not trans and not _overlaps(out, x):
        a_src, a_off = x.base_data, element_offset(x)
    elif tn % tm == 0:  # a's rows read from b's panels
        a_src, a_in_b = b_panels.data, True
    else:
        a_src = pack_operand(queue, x, nb, m * k, m, tm, *strides, k, bf16).data
    args = (queue, a_src, b_panels.data, out, c, alpha, beta, nb, m, m, k, tile)
    run_kernel(*args, sym=True, a_off=a_off, bf16=bf16, a_in_b=a_in_b)


def _output(queue, out, c, shape, dtype, beta, who):
    """``(out, c)`` checked (or ``out`` allocated): ``c`` defaults to ``out``."""
    if out is None:
        if beta != 0 and c is None:
            raise ValueError(f"{who}: beta != 0 needs c (or out) to read")
        out = cla.empty(queue, shape, dtype, allocator=allocator(queue))
    else:
        _check(queue, out, "out", dtype)
        if out.shape != shape:
            raise ValueError(f"{who}: out has shape {out.shape}, the product has {shape}")
    if c is None:
        return out, out
    _check(queue, c, "c", dtype)
    if c.shape != shape:
        raise ValueError(f"{who}: c has shape {c.shape}, the product has {shape}")
    return out, c


def _check_dtype(queue, dtype, who) -> None:
    if dtype not in TILES:
        raise ValueError(f"{who}: dtype {dtype} is not supported (float32, float64)")
    if dtype == np.float64 and not has_fp64(queue.device):
        raise ValueError(f"{who}: float64 needs a device with fp64 (cl_khr_fp64)")


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
    tile: tuple[int, int] | str | None = None,
    tune: bool = False,
    symmetric: bool = False,
    bfloat16: bool = False,
) -> cla.Array:
    """``out = alpha * op(a) @ op(b) + beta * c`` for ``[..., M, K] x [..., K, N]`` (``op``
    transposes the last two dims when ``trans_a`` / ``trans_b``), batched over the leading
    dims in two or three launches whatever the batch (a pack of ``op(b)``, one of ``op(a)``
    unless read in place, the GEMM); returns ``out`` (allocated from the queue's pool when
    ``None``).

    ``c`` (shape ``[..., M, N]``; ``out`` itself or disjoint from it) is read only when
    ``beta != 0``; ``c=None`` with ``beta != 0`` means ``c = out``. ``out`` may alias ``a`` or
    ``b`` (``X <- X X^T X`` in place): an operand that overlaps ``out`` is always packed
    first. The queue must be in order (the scratch panels return to its pool when the call
    ends). ``tile`` forces a
    ``(TM, TN)`` of :data:`TILES` (every tile gives the same bits), or ``"clblast"``
    (:data:`CLBLAST`: pyclblast's GEMM, any device, its own rounding); ``tune`` times the
    candidates once per shape class (CLBlast among them on a GPU with ``pyclblast``) and
    keeps the choice in the disk cache (:func:`cache_dir`).
    ``symmetric``: the caller knows the product is symmetric (``op(a)``, ``op(b)`` and ``c``
    symmetric, ``op(a)`` and ``op(b)`` commuting, as two polynomials of one matrix): as
    :func:`gram`, only the blocks on and above the diagonal are computed (about half the
    flops) and mirrored, so ``out`` is exactly symmetric (the upper triangle has the bits of
    the full product). Not checked; CLBlast computes the full product.
    ``bfloat16`` (float32 arrays): torch's bfloat16 matmul, ``op(a)``, ``op(b)`` rounded to
    bfloat16 (to nearest even), the products summed in float32 by pairs of ``k``, and ``out``
    rounded to bfloat16 after the epilogue (see :func:`gemm_source`); natively where
    :func:`native_bf16`, twice the float32 rate there. Not tuned: ``tile`` or the default.
    Enqueued on ``queue``, nothing is read back to the host. Bad input raises before anything
    is written."""
    _check(queue, a, "a", None)
    dtype = a.dtype
    _check_dtype(queue, dtype, "gemm")
    _check_bf16(dtype, bfloat16, tile, "gemm")
    _check(queue, b, "b", dtype)
    batch, m, n, k = _shapes(a, b, trans_a, trans_b)
    if k == 0:
        raise ValueError("gemm: the inner dim K is 0")
    if symmetric and m != n:
        raise ValueError(f"gemm: symmetric=True needs a square product, got {m}x{n}")
    out, c = _output(queue, out, c, (*batch, m, n), dtype, beta, "gemm")
    if tile is None and bfloat16:
        tile = bf16_tile(queue.device)
    elif tile is None:
        tile = tile_for(queue, dtype, trans_a, batch, m, n, k, tune, trans_b=trans_b)
    elif tile == CLBLAST:
        if _pyclblast() is None:
            raise ValueError("gemm: tile='clblast' needs pyclblast (pip install pyclblast)")
    elif tile not in TILES[dtype]:
        raise ValueError(f"gemm: tile {tile} is not one of {TILES[dtype]} for {dtype}")
    nb = int(np.prod(batch, dtype=np.int64))
    if nb == 0 or m == 0 or n == 0:
        return out
    args = (queue, a, b, out, c, trans_a, trans_b, alpha, beta, nb, m, n, k)
    if tile == CLBLAST:
        _clblast_gemm(*args)
    else:
        _launch(*args, tile, sym=symmetric, bf16=bfloat16)
    return out


def _check_bf16(dtype, bfloat16, tile, who) -> None:
    if bfloat16 and dtype != np.float32:
        raise ValueError(f"{who}: bfloat16=True takes float32 arrays, got {dtype}")
    if bfloat16 and tile == CLBLAST:
        raise ValueError(f"{who}: bfloat16=True is not available with CLBlast")


def gram(
    queue: cl.CommandQueue,
    x: cla.Array,
    out: cla.Array | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    c: cla.Array | None = None,
    trans: bool = False,
    tile: tuple[int, int] | None = None,
    tune: bool = False,
    bfloat16: bool = False,
) -> cla.Array:
    """``out = alpha * X X^T + beta * c`` for ``X`` of shape ``[..., M, K]`` (``trans``:
    ``X^T X`` for ``[..., K, M]``), batched over the leading dims; returns ``out`` (``[...,
    M, M]``, from the queue's pool when ``None``). As BLAS's ``syrk`` (upper): only the blocks
    on and above the diagonal are computed, each value the same bits as :func:`gemm`'s
    ``gemm(x, x, trans_b=True)`` (``trans``: ``trans_a=True``) with the same ``alpha``,
    ``beta``, ``c``; the lower triangle is a copy of the upper, so ``out`` is exactly
    symmetric and ``c``'s lower triangle is never read (give a symmetric ``c``, as Newton-Schulz's
    ``b A + c A A``, for the full product). ``X`` is packed once when the tile is square,
    twice otherwise; two launches or three whatever the batch. ``c`` (``out`` itself or
    disjoint from it) is read only when ``beta != 0``; ``out`` may alias ``x``.
    ``bfloat16``: as :func:`gemm`'s. Enqueued on ``queue``, nothing read back. Bad input
    raises before anything is written."""
    _check(queue, x, "x", None)
    dtype = x.dtype
    _check_dtype(queue, dtype, "gram")
    _check_bf16(dtype, bfloat16, tile, "gram")
    batch = x.shape[:-2]
    k, m = x.shape[-2:] if trans else x.shape[-2:][::-1]
    if k == 0:
        raise ValueError("gram: the inner dim K is 0")
    out, c = _output(queue, out, c, (*batch, m, m), dtype, beta, "gram")
    if tile is None and bfloat16:
        tile = bf16_tile(queue.device)
    elif tile is None:
        chosen = tile_for(queue, dtype, trans, batch, m, m, k, tune, trans_b=not trans, kind="gram")
        tile = chosen if isinstance(chosen, tuple) else default_tile(queue.device, dtype)
    elif tile not in TILES[dtype]:
        raise ValueError(f"gram: tile {tile} is not one of {TILES[dtype]} for {dtype}")
    nb = int(np.prod(batch, dtype=np.int64))
    if nb == 0 or m == 0:
        return out
    _launch_gram(queue, x, out, c, trans, alpha, beta, nb, m, k, tile, bf16=bfloat16)
    return out
