"""The kernels that amp and clipping run outside a fused step: unscaling with a finiteness
flag, loss scaling, and scaling by a clip coefficient left on the device by a reduction."""

from __future__ import annotations

from functools import cache
from typing import Any, cast

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._packing import element_offset
from ._codegen import POINTER, load, preamble, storage_of, store
from ._launch import launch, note_launches
from ._programs import build
from ._reductions import acc_ctype

# ---------------------------------------------------------------------------- unscale, scale

_CHUNK_MIN = 4096  # elements per work-item at least (a multiple of 8)
_WORKERS = 512  # work-items per launch at most, beyond _CHUNK_MIN * _WORKERS elements


def _unscale_source(storage: str, inplace: bool) -> tuple[str, str]:
    """``y = x * inv_scale`` over one contiguous chunk per work-item (vectors of 8, or 4 for
    double: PoCL mishandles double8 without AVX-512; bfloat16 widened to float), and
    ``found[0] = 1`` from every work-item that saw a non-finite *input* (torch checks the
    scaled values). All writers store the same value, as torch's CUDA kernel does."""
    real = "double" if storage == "double" else "float"
    mode = "inplace" if inplace else "pure"
    name = f"netcl_unscale_{mode}_{storage}"
    pointer = POINTER[storage]
    if inplace:
        buffers = f"__global {pointer} *x_base, const long x_off"
        rebase = (
            "    __global const {s} *x = x_base + x_off;\n    __global {s} *y = x_base + x_off;"
        )
    else:
        buffers = (
            f"__global const {pointer} *restrict x_base, const long x_off,\n"
            f"    __global {pointer} *restrict y_base, const long y_off"
        )
        rebase = (
            "    __global const {s} *restrict x = x_base + x_off;\n"
            "    __global {s} *restrict y = y_base + y_off;"
        )
    src = f"""//CL// {name}: x * inv_scale in chunks; found[0] = 1 if any input is not finite
{preamble(real, real == "double", storage == "bf16")}
__kernel void {name}(
    {buffers},
    const long n, const long chunk, __global float *restrict found, const real inv_scale)
{{
{rebase.format(s=pointer)}
    long k = get_global_id(0) * chunk;
    const long stop = min(k + chunk, n);
{_unscale_vectors(storage, real)}
    for (; k < stop; k++) {{
        const real v = {load(storage, "x", "k")};
        bad |= isnan(v - v);
        {store(storage, "y", "k", "v * inv_scale")}
    }}
    if (bad) found[0] = 1.0f;
}}
"""
    return src, name


# bfloat16 by 8: widened to float8 on load; BF16_RNE lane by lane on store (a NaN's bits
# >> 16 with the quiet bit, else round to nearest even)
_BF16_LOAD8 = "as_float8(convert_uint8(vload8(0, x + k)) << 16)"
_BF16_STORE8 = """const uint8 b = as_uint8(v * inv_scale);
        const uint8 rne = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
        const int8 nan = (b & 0x7fffffffu) > 0x7f800000u;
        vstore8(convert_ushort8(select(rne, (b >> 16) | 0x40u, nan)), 0, y + k);"""


def _unscale_vectors(storage: str, real: str) -> str:
    """The unscale kernel's vector loop, which leaves ``bad`` set for the scalar loop after
    it."""
    w = 4 if real == "double" else 8
    mask = f"long{w}" if real == "double" else f"int{w}"
    if storage == "bf16":
        load_v, store_v = _BF16_LOAD8, _BF16_STORE8
    elif storage == "half":
        load_v = f"vload_half{w}(0, x + k)"
        store_v = f"vstore_half{w}_rte(v * inv_scale, 0, y + k);"
    else:
        load_v = f"vload{w}(0, x + k)"
        store_v = f"vstore{w}(v * inv_scale, 0, y + k);"
    return f"""\
    {mask} bad_v = ({mask})(0);
    for (; k + {w} <= stop; k += {w}) {{
        const {real}{w} v = {load_v};
        bad_v |= isnan(v - v);
        {store_v}
    }}
    int bad = any(bad_v);"""


def _scale_source(storage: str) -> tuple[str, str]:
    """``y = x * s``, one work-item per element (loss scaling of device arrays)."""
    real = "double" if storage == "double" else "float"
    name = f"netcl_scale_{storage}"
    value = load(storage, "x", "x_off + i") + " * s"
    body = store(storage, "y", "y_off + i", value)
    pointer = POINTER[storage]
    src = f"""//CL// {name}: y = x * s
{preamble(real, real == "double", storage == "bf16")}
__kernel void {name}(__global const {pointer} *restrict x, const long x_off,
                     __global {pointer} *restrict y, const long y_off, const real s)
{{
    const long i = get_global_id(0);
    {body}
}}
"""
    return src, name


@cache
def _sources(kind: str, storage: str, inplace: bool) -> tuple[str, str, tuple]:
    real = np.float64 if storage == "double" else np.float32
    if kind == "unscale":
        src, name = _unscale_source(storage, inplace)
        n_buf = 1 if inplace else 2
        dts = (None, np.int64) * n_buf + (np.int64, np.int64, None, real)
    else:
        src, name = _scale_source(storage)
        dts = (None, np.int64, None, np.int64, real)
    return src, name, dts


def _kernel(queue: cl.CommandQueue, kind: str, dtype: np.dtype, inplace: bool = False) -> Any:
    src, name, dts = _sources(kind, storage_of(dtype), inplace)
    return build(queue.context, src, name, list(dts))


def _chunk(n: int) -> int:
    per_worker = -(-n // _WORKERS)
    return max(_CHUNK_MIN, -(-per_worker // 8) * 8)


def unscale(
    queue: cl.CommandQueue,
    dtype: np.dtype,
    x: Any,
    x_off: int,
    y: Any | None,
    y_off: int,
    n: int,
    found: cla.Array,
    inv_scale: float,
) -> None:
    """``y = x * inv_scale`` over ``n`` elements of the buffers ``x`` and ``y`` (element
    offsets ``x_off``, ``y_off``; in place when ``y`` is None), and ``found[0] = 1`` if any
    input element is not finite. Device: one launch (none for ``n == 0``), no host sync."""
    if not n:
        return
    kernel = _kernel(queue, "unscale", dtype, inplace=y is None)
    chunk = _chunk(n)
    bufs = [x, x_off] if y is None else [x, x_off, y, y_off]
    note_launches(kernel.function_name)
    kernel(queue, (-(-n // chunk),), (1,), *bufs, n, chunk, found.base_data, inv_scale)


def scale_into(x: cla.Array, y: cla.Array, s: float) -> None:
    """``y = x * s`` for C-contiguous arrays alike (half and bfloat16 computed in float,
    rounded once to nearest even). One launch."""
    queue = cast(cl.CommandQueue, x.queue)  # (pyopencl types it optional)
    kernel = _kernel(queue, "scale", x.dtype)
    launch(
        kernel, queue, x.size, [x.base_data, element_offset(x), y.base_data, element_offset(y), s]
    )


# ---------------------------------------------------------------------------- clip scale


@cache
def _clip_scale_source(storage: str, acc: str) -> tuple[str, str]:
    real = "double" if storage == "double" else "float"
    name = f"netcl_clip_scale_{storage}_{acc}"
    if storage == "half":
        body = "vstore_half_rte(vload_half(x_off + i, x) * coef, x_off + i, x);"
    elif storage == "bf16":
        body = store("bf16", "x", "x_off + i", load("bf16", "x", "x_off + i") + " * coef")
    else:
        body = "x[x_off + i] = x[x_off + i] * coef;"
    src = f"""//CL// {name}: x *= clip coefficient (red[1]), in place
{preamble(real, "double" in (real, acc), storage == "bf16")}
__kernel void {name}(__global {POINTER[storage]} *restrict x, const long x_off,
                     __global const {acc} *restrict red)
{{
    const long i = get_global_id(0);
    const real coef = (real)red[1];
    {body}
}}
"""
    return src, name


def _clip_scale_kernel(queue: cl.CommandQueue, dtype: np.dtype, acc: str) -> cl.Kernel:
    src, name = _clip_scale_source(storage_of(dtype), acc)
    return build(queue.context, src, name, [None, np.int64, None])


def clip_scale(
    queue: cl.CommandQueue, dtype: np.dtype, x: Any, x_off: int, n: int, red: Any
) -> None:
    """In place: ``x *= red[1]`` over ``n`` elements of the buffer ``x`` from ``x_off``,
    ``red`` a ``"clip"`` reduction's result buffer (its coefficient). One launch."""
    acc = acc_ctype(queue)
    launch(_clip_scale_kernel(queue, dtype, acc), queue, n, [x, x_off, red])


# ---------------------------------------------------------------------------- clip value, coef


@cache
def _clip_value_source(storage: str) -> tuple[str, str]:
    real = "double" if storage == "double" else "float"
    name = f"netcl_clip_value_{storage}"
    clamp = "v < -c ? -c : (v > c ? c : v)"  # torch's clamp_min then clamp_max: NaN stays NaN
    if storage in ("half", "bf16"):  # stores only a clamped value: a NaN keeps its bits
        body = (
            f"const real v = {load(storage, 'x', 'x_off + i')};\n"
            f"    if (v < -c || v > c) {store(storage, 'x', 'x_off + i', 'v < -c ? -c : c')}"
        )
    else:
        body = f"const real v = x[x_off + i];\n    x[x_off + i] = {clamp};"
    src = f"""//CL// {name}: x = clamp(x, -c, c), in place
{preamble(real, real == "double", storage == "bf16")}
__kernel void {name}(__global {POINTER[storage]} *restrict x, const long x_off, const real c)
{{
    const long i = get_global_id(0);
    {body}
}}
"""
    return src, name


def clamp_value(
    queue: cl.CommandQueue, dtype: np.dtype, x: Any, x_off: int, n: int, c: float
) -> None:
    """In place: ``x = clamp(x, -c, c)`` over ``n`` elements of the buffer ``x`` from
    ``x_off`` (half clamped in float; NaN stays NaN). One launch (none for ``n == 0``)."""
    if not n:
        return
    storage = storage_of(dtype)
    src, name = _clip_value_source(storage)
    real = np.float64 if storage == "double" else np.float32
    launch(build(queue.context, src, name, [None, np.int64, real]), queue, n, [x, x_off, c])


@cache
def _clip_coef_source(storage: str, acc: str) -> tuple[str, str]:
    name = f"netcl_clip_coef_{storage}_{acc}"
    value = load(storage, "norm", "norm_off")
    src = f"""//CL// {name}: out = [norm, clamp(max_norm / (norm + 1e-6), max=1)] (NaN stays NaN)
{preamble(acc, "double" in (storage, acc), storage == "bf16")}
__kernel void {name}(__global const {POINTER[storage]} *restrict norm, const long norm_off,
                     __global {acc} *restrict out, const {acc} max_norm)
{{
    const {acc} t = ({acc}){value};
    const {acc} c = max_norm / (t + ({acc})1e-6);
    out[0] = t;
    out[1] = isnan(c) ? c : fmin(c, ({acc})1);
}}
"""
    return src, name


def clip_coefficient(norm: cla.Array, max_norm: float, out: cla.Array) -> None:
    """``out[:2] = [norm, min(1, max_norm / (norm + 1e-6))]`` from the one-element device
    array ``norm`` (``out``: the reduction type of its queue, see ``acc_ctype``), as a
    ``"clip"`` reduction leaves them for :func:`clip_scale`. One single-work-item launch."""
    queue = cast(cl.CommandQueue, norm.queue)  # (pyopencl types it optional)
    acc = acc_ctype(queue)
    src, name = _clip_coef_source(storage_of(norm.dtype), acc)
    acc_dtype = np.float64 if acc == "double" else np.float32
    kernel = build(queue.context, src, name, [None, np.int64, None, acc_dtype])
    launch(kernel, queue, 1, [norm.base_data, element_offset(norm), out.base_data, max_norm])
