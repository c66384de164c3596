"""Build each kernel once per (context, source) and cache it, argument dtypes preset. Every
program of the library is built here, with :func:`program_options`."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pyopencl as cl

from .._base import Fragment
from .._device import finish_known_queues
from ._codegen import Arg, KernelSpec, fused_source, preamble, storage_of
from ._quantized_codegen import blockwise_source

_lock = threading.Lock()
_kernels: dict[tuple[cl.Context, str, str], cl.Kernel] = {}
_programs: dict[tuple[cl.Context, str], cl.Program] = {}
_fused: dict[tuple[cl.Context, KernelSpec], tuple[cl.Kernel, list[Arg]]] = {}
_options: dict[cl.Context, tuple[str, ...]] = {}
build_count = 0  # programs built in this process (tests check it stops growing)


def arg_dtypes(args: Sequence[Arg], real: np.dtype) -> list:
    return [None if a.kind == "buffer" else np.int64 if a.kind == "offset" else real for a in args]


CORRECTLY_ROUNDED_DIVIDE_SQRT = "-cl-fp32-correctly-rounded-divide-sqrt"


def _correctly_rounded_divide_sqrt(device: cl.Device) -> bool:
    """Whether ``device`` divides and takes square roots of float32 correctly rounded when
    asked to (``CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT`` in its single_fp_config)."""
    return bool(device.single_fp_config & cl.device_fp_config.CORRECTLY_ROUNDED_DIVIDE_SQRT)


def program_options(context: cl.Context) -> tuple[str, ...]:
    """The options every program is built with in ``context`` (queried once per context):
    ``-cl-fp32-correctly-rounded-divide-sqrt`` where all its devices support it, so that
    float32 division and sqrt round correctly (OpenCL otherwise allows 2.5 ulp for division
    and 3 ulp for sqrt); none elsewhere."""
    options = _options.get(context)
    if options is None:
        exact = all(_correctly_rounded_divide_sqrt(d) for d in context.devices)
        options = _options[context] = (CORRECTLY_ROUNDED_DIVIDE_SQRT,) if exact else ()
    return options


def build(context: cl.Context, source: str, name: str, dtypes: list) -> cl.Kernel:
    """The kernel ``name`` of ``source``, built on first use in ``context`` with
    :func:`program_options` (a program with several kernels is built once)."""
    global build_count
    key = (context, source, name)
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                program = _programs.get((context, source))
                if program is None:
                    finish_known_queues(context)  # (no kernel compiling on a device thread)
                    options = list(program_options(context))
                    program = cl.Program(context, source).build(options=options)
                    _programs[(context, source)] = program
                    build_count += 1
                kernel = getattr(program, name)
                kernel.set_scalar_arg_dtypes(dtypes)
                _kernels[key] = kernel
    return kernel


def fused_kernel(
    context: cl.Context, fragments: Sequence[Fragment], spec: KernelSpec
) -> tuple[cl.Kernel, list[Arg]]:
    key = (context, spec)
    hit = _fused.get(key)
    if hit is None:
        make = blockwise_source if spec.tiling == "blocks" else fused_source
        source, name, args = make(fragments, spec)
        real = np.dtype(np.float64) if spec.dtype == np.float64 else np.dtype(np.float32)
        hit = (build(context, source, name, arg_dtypes(args, real)), args)
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
        _options.clear()


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

# Sums that may overflow although the norm is finite. Each work-item leaves a pair
# (partial, m): m is 0 unless its chunk's plain sum overflowed with every element finite; the
# chunk is then summed again in the accumulator's type over ``|x| / m`` (m: its largest
# magnitude, so the terms are at most 1), the pair meaning ``partial * m**p``. The finishing
# launch rescales only when a pair has m != 0 or the plain sum overflowed, so ordinary inputs
# take the plain path, bit for bit.
# op: (y**p for a scaled magnitude y, the p-th root of t)
_SUMS = {
    "sumsq": ("{y} * {y}", "sqrt({t})"),
    "sumabs": ("{y}", "{t}"),
    "sumpow": ("pow({y}, pw)", "pow({t}, 1 / pw)"),
}


def _loads(storage: str, width: int) -> tuple[str, str, str]:
    """A reduce kernel's loads from ``x_base`` at ``k``: ``width`` elements as a vector, one
    element, and the pointer's C type (bfloat16: 16-bit words, widened lane by lane)."""
    if storage == "half":
        return f"vload_half{width}(0, x_base + k)", "vload_half(k, x_base)", "half"
    if storage == "bf16":
        lanes = ", ".join(f"BF16_LOAD(x_base[k + {j}])" for j in range(width))
        return f"(realv)({lanes})", "BF16_LOAD(x_base[k])", "ushort"
    return f"vload{width}(0, x_base + k)", "x_base[k]", storage


def _rescue(op: str, storage: str, acc: str) -> str:
    """Stage 1, after the plain partial ``r``: the scale ``m`` of its pair, and for a sum,
    an overflowed chunk redone scaled."""
    if op not in _SUMS:
        return f"    const {acc} m = 0;\n"
    load = f"({acc})" + _loads(storage, 1)[1].replace("k", "j")
    power = _SUMS[op][0].format(y="y")
    return f"""    {acc} m = 0;
    if (r == INFINITY) {{  /* a sum overflowed, or an element is inf */
        const long start = x_off + w * chunk;
        for (long j = start; j < stop; j++) m = fmax(m, fabs({load}));
        if (m < INFINITY) {{  /* every element finite: the sum of (|x| / m)**p */
            {acc} s = 0;
            for (long j = start; j < stop; j++) {{
                const {acc} y = fabs({load}) / m;
                s = s + {power};
            }}
            r = s;
        }} else {{
            m = 0;
        }}
    }}
"""


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
    load_v, load1, pointer = _loads(storage, width)
    lanes = "".join(f"        b = v.s{j}; a = r; r = {combine};\n" for j in range(1, width))
    src = f"""//CL// {name}: one partial per work-item over a contiguous chunk
{preamble(real, "double" in (real, acc), storage == "bf16")}
typedef {real}{width} realv;
__kernel void {name}(__global const {pointer} *restrict x_base, const long x_off, const long n,
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
{_rescue(op, storage, acc)}    partials[2 * (p_off + w)] = ({acc})r;
    partials[2 * (p_off + w) + 1] = m;
}}
"""
    return src, name


def _stage1_blocked_source(op: str, storage: str) -> tuple[str, str]:
    """Stage 1 of a sum over float or half data on an fp64 device: float lanes over blocks of
    64 elements, blocks added in double. Float lanes over a whole chunk were off by up to
    ~3e-6 relative (thousands of terms per lane), enough to break "clipped norm <= max_norm
    (1 + 1e-6)" and host/device clipping agreement; blocks bound that by ~8 ulp, and the
    loop ran faster than the unblocked one on PoCL. ``sumpow`` (rare p-norms) computes in
    double lanes: ``|x|**p`` underflows float for small ``x``. A float lane that overflows
    (``|x| > 1.8e19`` squared) sends the chunk to :func:`_rescue`, in double."""
    vec, one, _ = _OPS[op]
    vec = vec.replace("real8", "realv")
    lane, w = ("double", 4) if op == "sumpow" else ("float", 8)
    name = f"netcl_reduce_{op}_{storage}"
    load_v, load1, pointer = _loads(storage, w)
    if lane == "double":
        load_v, load1 = f"convert_double4({load_v})", f"(double){load1}"
        if storage == "bf16":  # (lanes widened to float, then to double)
            load_v = "convert_double4((float4)(" + ", ".join(
                f"BF16_LOAD(x_base[k + {j}])" for j in range(w)) + "))"  # fmt: skip
        add = "lo += a;"
    else:
        add = "lo += convert_double4(a.lo);\n        hi += convert_double4(a.hi);"
    src = f"""//CL// {name}: one partial per work-item over a contiguous chunk, blocks in double
{preamble(lane, True, storage == "bf16")}
typedef {lane}{w} realv;
__kernel void {name}(__global const {pointer} *restrict x_base, const long x_off, const long n,
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
{_rescue(op, storage, "double")}    partials[2 * (p_off + w)] = r;
    partials[2 * (p_off + w) + 1] = m;
}}
"""
    return src, name


def _stage2_source(op: str, finish: str, acc: str) -> tuple[str, str]:
    combine = _OPS[op][2]
    name = f"netcl_finish_{finish}_{op}"
    flags, track = "", ""
    if finish in ("clip", "norm") and op in _SUMS:
        power, root = _SUMS[op]
        flags = "\n    int scaled = 0, inf_part = 0;"
        track = "\n        scaled |= partials[2 * k + 1] != 0;\n        inf_part |= b == INFINITY;"
        norm = f"""    {acc} norm;
    if (isnan(t) || inf_part || !(scaled || t == INFINITY)) {{
        norm = {root.format(t="t")};
    }} else {{  /* a sum overflowed: each pair's norm part, over the largest (M) */
        {acc} M = 0;
        for (long k = 0; k < count; k++) {{
            const {acc} b = partials[2 * k], m = partials[2 * k + 1];
            M = fmax(M, m != 0 ? m : {root.format(t="b")});
        }}
        {acc} u = 0;
        for (long k = 0; k < count; k++) {{
            const {acc} b = partials[2 * k], m = partials[2 * k + 1];
            const {acc} y = (m != 0 ? m : {root.format(t="b")}) / M;
            u = u + (m != 0 ? b : ({acc})1) * {power.format(y="y")};
        }}
        norm = M * {root.format(t="u")};
    }}
"""
    else:
        norm = f"    const {acc} norm = t;\n"
    if finish == "clip":
        tail = f"""{norm}    const {acc} c = s0 / (norm + ({acc})1e-6);
    out[0] = norm;
    out[1] = isnan(c) ? c : fmin(c, ({acc})1);"""
    elif finish == "norm":
        tail = f"{norm}    out[0] = norm;"
    elif finish == "flag":
        tail = f"    out[0] = t > 0 ? ({acc})1 : ({acc})0;"
    else:
        raise ValueError(f"unknown reduction finish {finish!r}")
    src = f"""//CL// {name}: one work-item combines the (partial, scale) pairs
{preamble(acc, acc == "double")}
__kernel void {name}(__global const {acc} *restrict partials, const long count,
                     __global {acc} *restrict out, const {acc} s0, const {acc} pw)
{{
    {acc} t = 0;{flags}
    for (long k = 0; k < count; k++) {{
        const {acc} a = t;
        const {acc} b = partials[2 * k];
        t = {combine};{track}
    }}
{tail}
}}
"""
    return src, name


def reduce_kernel(context: cl.Context, op: str, dtype: np.dtype, acc: str) -> cl.Kernel:
    key = (context, "stage1", op, np.dtype(dtype), acc)
    kernel = _reduce.get(key)
    if kernel is None:
        src, name = _stage1_source(op, storage_of(dtype), acc)
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
