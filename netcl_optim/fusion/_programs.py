"""Build each kernel once per (context, source) and cache it, argument dtypes preset."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pyopencl as cl

from .._base import Fragment
from ._codegen import Arg, KernelSpec, ctype, fused_source, preamble

_lock = threading.Lock()
_kernels: dict[tuple[cl.Context, str, str], cl.Kernel] = {}
_programs: dict[tuple[cl.Context, str], cl.Program] = {}
_fused: dict[tuple[cl.Context, KernelSpec], tuple[cl.Kernel, list[Arg]]] = {}
build_count = 0  # programs built in this process (tests check it stops growing)


def _arg_dtypes(args: Sequence[Arg], real: np.dtype) -> list:
    return [None if a.kind == "buffer" else np.int64 if a.kind == "offset" else real for a in args]


def build(context: cl.Context, source: str, name: str, arg_dtypes: list) -> cl.Kernel:
    """The kernel ``name`` of ``source``, built on first use in ``context`` (a program with
    several kernels is built once)."""
    global build_count
    key = (context, source, name)
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                program = _programs.get((context, source))
                if program is None:
                    program = _programs[(context, source)] = cl.Program(context, source).build()
                    build_count += 1
                kernel = getattr(program, name)
                kernel.set_scalar_arg_dtypes(arg_dtypes)
                _kernels[key] = kernel
    return kernel


def fused_kernel(
    context: cl.Context, fragments: Sequence[Fragment], spec: KernelSpec
) -> tuple[cl.Kernel, list[Arg]]:
    key = (context, spec)
    hit = _fused.get(key)
    if hit is None:
        source, name, args = fused_source(fragments, spec)
        real = np.dtype(np.float64) if spec.dtype == np.float64 else np.dtype(np.float32)
        hit = (build(context, source, name, _arg_dtypes(args, real)), args)
        _fused[key] = hit
    return hit


def kernel_source(fragments: Sequence[Fragment], spec: KernelSpec) -> str:
    """The OpenCL source of a fused kernel, for reading."""
    return fused_source(fragments, spec)[0]


def clear_kernel_caches() -> None:
    with _lock:
        _kernels.clear()
        _programs.clear()
        _fused.clear()
        _reduce.clear()


# ---------------------------------------------------------------------------- reductions

# op: (vector lane update of a with x, the same for one element, combine partials a and b)
_OPS = {
    "sumsq": ("a + x * x", "a + x * x", "a + b"),
    "sumabs": ("a + fabs(x)", "a + fabs(x)", "a + b"),
    "sumpow": ("a + pow(fabs(x), (real8)(pw))", "a + pow(fabs(x), pw)", "a + b"),
    "maxabs": (
        "select(fmax(a, fabs(x)), (real8)(NAN), isnan(x) | isnan(a))",
        "(isnan(x) || isnan(a)) ? (real)NAN : fmax(a, fabs(x))",
        "isnan(b) ? b : (isnan(a) ? a : fmax(a, b))",
    ),
    "nonfinite": (
        "a + select((real8)(0), (real8)(1), isnan(x - x))",
        "a + (isnan(x - x) ? (real)1 : (real)0)",
        "a + b",
    ),
}

_reduce: dict[tuple, cl.Kernel] = {}


def _stage1_source(op: str, storage: str, acc: str) -> tuple[str, str]:
    real = "double" if storage == "double" else "float"
    if acc == "double" and real == "float" and op != "maxabs":
        return _stage1_blocked_source(op, storage)
    # 8 lanes for float and half; 4 for double: PoCL returns only the low half of a double8
    # from vload8 on CPUs without AVX-512 (seen on PoCL 3.0).
    width = 4 if real == "double" else 8
    vec, one, combine = _OPS[op]
    vec = vec.replace("real8", "realv")
    name = f"netcl_reduce_{op}_{storage}"
    load_v = (
        f"vload_half{width}(0, x_base + k)" if storage == "half" else f"vload{width}(0, x_base + k)"
    )
    load1 = "vload_half(k, x_base)" if storage == "half" else "x_base[k]"
    lanes = "".join(f"        b = v.s{j}; a = r; r = {combine};\n" for j in range(1, width))
    src = f"""//CL// {name}: one partial per work-item over a contiguous chunk
{preamble(real, "double" in (real, acc))}
typedef {real}{width} realv;
__kernel void {name}(__global const {storage} *restrict x_base, const long x_off, const long n,
                     const long chunk, __global {acc} *restrict partials, const long p_off,
                     const real pw)
{{
    const long w = get_global_id(0);
    long k = x_off + w * chunk;
    const long stop = x_off + min(w * chunk + chunk, n);
    realv a = (realv)(0);
    for (; k + {width} <= stop; k += {width}) {{
        const realv x = {load_v};
        a = {vec};
    }}
    const realv v = a;
    real r = v.s0, b;
    {{
        real a;
{lanes}    }}
    for (; k < stop; k++) {{
        const real x = {load1};
        const real a = r;
        r = {one};
    }}
    partials[p_off + w] = ({acc})r;
}}
"""
    return src, name


def _stage1_blocked_source(op: str, storage: str) -> tuple[str, str]:
    """Stage 1 of a sum over float or half data on an fp64 device: float lanes over blocks of
    64 elements, blocks added in double. Float lanes over a whole chunk were off by up to
    ~3e-6 relative (thousands of terms per lane), enough to break "clipped norm <= max_norm
    (1 + 1e-6)" and host/device clipping agreement; blocks bound that by ~8 ulp, and the
    loop ran faster than the unblocked one on PoCL. ``sumpow`` (rare p-norms) computes in
    double lanes: ``|x|**p`` underflows float for small ``x``."""
    vec, one, _ = _OPS[op]
    vec = vec.replace("real8", "realv")
    lane, w = ("double", 4) if op == "sumpow" else ("float", 8)
    name = f"netcl_reduce_{op}_{storage}"
    load_v = f"vload_half{w}(0, x_base + k)" if storage == "half" else f"vload{w}(0, x_base + k)"
    load1 = "vload_half(k, x_base)" if storage == "half" else "x_base[k]"
    if lane == "double":
        load_v, load1 = f"convert_double4({load_v})", f"(double){load1}"
        add = "lo += a;"
    else:
        add = "lo += convert_double4(a.lo);\n        hi += convert_double4(a.hi);"
    src = f"""//CL// {name}: one partial per work-item over a contiguous chunk, blocks in double
{preamble(lane, True)}
typedef {lane}{w} realv;
__kernel void {name}(__global const {storage} *restrict x_base, const long x_off, const long n,
                     const long chunk, __global double *restrict partials, const long p_off,
                     const float pw_in)
{{
    const real pw = (real)pw_in;
    const long w = get_global_id(0);
    long k = x_off + w * chunk;
    const long stop = x_off + min(w * chunk + chunk, n);
    double4 lo = (double4)(0), hi = (double4)(0);
    while (k + {8 * w} <= stop) {{
        realv a = (realv)(0);
        for (int j = 0; j < 8; j++, k += {w}) {{
            const realv x = {load_v};
            a = {vec};
        }}
        {add}
    }}
    {{
        realv a = (realv)(0);
        for (; k + {w} <= stop; k += {w}) {{
            const realv x = {load_v};
            a = {vec};
        }}
        {add}
    }}
    double r = ((lo.s0 + lo.s1) + (lo.s2 + lo.s3)) + ((hi.s0 + hi.s1) + (hi.s2 + hi.s3));
    for (; k < stop; k++) {{
        const real x = {load1};
        const real a = 0;
        r = r + (double)({one});
    }}
    partials[p_off + w] = r;
}}
"""
    return src, name


def _stage2_source(op: str, finish: str, acc: str) -> tuple[str, str]:
    combine = _OPS[op][2]
    zero = "0"
    name = f"netcl_finish_{finish}_{op}"
    if finish == "clip":
        norm = {"sumsq": "sqrt(t)", "sumpow": "pow(t, 1 / pw)"}.get(op, "t")
        tail = f"""    const {acc} norm = {norm};
    const {acc} c = s0 / (norm + ({acc})1e-6);
    out[0] = norm;
    out[1] = isnan(c) ? c : fmin(c, ({acc})1);"""
    elif finish == "norm":
        norm = {"sumsq": "sqrt(t)", "sumpow": "pow(t, 1 / pw)"}.get(op, "t")
        tail = f"    out[0] = {norm};"
    elif finish == "flag":
        tail = f"    out[0] = t > 0 ? ({acc})1 : ({acc})0;"
    else:
        raise ValueError(f"unknown reduction finish {finish!r}")
    src = f"""//CL// {name}: one work-item combines the partials
{preamble(acc, acc == "double")}
__kernel void {name}(__global const {acc} *restrict partials, const long count,
                     __global {acc} *restrict out, const {acc} s0, const {acc} pw)
{{
    {acc} t = {zero};
    for (long k = 0; k < count; k++) {{
        const {acc} a = t;
        const {acc} b = partials[k];
        t = {combine};
    }}
{tail}
}}
"""
    return src, name


def reduce_kernel(context: cl.Context, op: str, dtype: np.dtype, acc: str) -> cl.Kernel:
    key = (context, "stage1", op, np.dtype(dtype), acc)
    kernel = _reduce.get(key)
    if kernel is None:
        src, name = _stage1_source(op, ctype(dtype), acc)
        real = np.float64 if np.dtype(dtype) == np.float64 else np.float32
        dts = [None, np.int64, np.int64, np.int64, None, np.int64, real]
        kernel = _reduce[key] = build(context, src, name, dts)
    return kernel


def finish_kernel(context: cl.Context, op: str, finish: str, acc: str) -> cl.Kernel:
    key = (context, "stage2", op, finish, acc)
    kernel = _reduce.get(key)
    if kernel is None:
        src, name = _stage2_source(op, finish, acc)
        a = np.float64 if acc == "double" else np.float32
        kernel = _reduce[key] = build(context, src, name, [None, np.int64, None, a, a])
    return kernel
