"""Fragments -> the OpenCL C source of one fused kernel (strings only; no device needed)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from .._base import Fragment
from ._launch import TILE
from ._random import random_helpers

_CTYPE = {
    np.dtype(np.float16): "half",
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}


def ctype(dtype: np.dtype) -> str:
    return _CTYPE[np.dtype(dtype)]


def preamble(real: str, uses_double: bool) -> str:
    lines = ["#pragma OPENCL FP_CONTRACT OFF"]
    if uses_double:
        lines.append("#pragma OPENCL EXTENSION cl_khr_fp64 : enable")
    lines += [
        f"typedef {real} real;",
        "#define SQRT(x) " + ("__builtin_sqrt(x)" if real == "double" else "__builtin_sqrtf(x)"),
        "/* torch's lerp: exact at both ends */",
        "#define LERP(a, b, w) \\",
        "    ((w) < 0.5f ? (a) + (w) * ((b) - (a)) : (b) - ((b) - (a)) * (1 - (w)))",
        _BRANCH_FREE[real],
    ]
    return "\n".join(lines)


# OpenCL's isnan, sign and fabs bit for bit, and a cube root within 1 ulp, without a library
# call: PoCL's builtins are calls, and one call keeps it from vectorising the whole kernel (a
# step then runs at a fifth of the memory bandwidth or less; benchmarks/README.md, "Library
# calls"). Fragments use these; tests/test_kernel_calls.py keeps the builtins out.
_COMMON = """\
#define ISNAN(x) ((x) != (x))
/* sign(): 1, -1, +-0 as given, 0 for NaN */
#define SIGN(x) ((x) > 0 ? (real)1 : (x) < 0 ? (real)-1 : ISNAN(x) ? (real)0 : (x))
"""
_BRANCH_FREE = {
    "float": _COMMON
    + """\
#define FABS(x) as_float(as_uint((float)(x)) & 0x7fffffffu)
/* cube root: a guess from the exponent bits (Kahan, 5 bits), one Halley step (15 bits), one
   Newton step (30 bits); subnormals and values near the top of the range scaled by 2^+-120 */
static inline __attribute__((always_inline)) float CBRT(const float x)
{
    const float a = FABS(x);
    const int tiny = a < 0x1p-100f, huge = a > 0x1p+100f;
    const float s = a * (tiny ? 0x1p+120f : huge ? 0x1p-120f : 1.0f);
    float y = as_float((uint)((float)as_int(s) * 0.333333333f) + 0x2a5137a0u);
    const float t = y * y * y;
    y = y * ((t + s + s) / (t + t + s));
    y = y - (y * y * y - s) / (3.0f * y * y);
    y = y * (tiny ? 0x1p-40f : huge ? 0x1p+40f : 1.0f);
    const float signed_y = as_float(as_uint(y) | (as_uint(x) & 0x80000000u));
    return (a == 0.0f || a == INFINITY || ISNAN(x)) ? x : signed_y;
}
""",
    "double": _COMMON
    + """\
#define FABS(x) as_double(as_ulong((double)(x)) & 0x7fffffffffffffffUL)
/* cube root: the same scheme in double: Kahan's guess, two Halley steps (45 bits), one
   Newton step; subnormals and values near the top of the range scaled by 2^+-960 */
static inline __attribute__((always_inline)) double CBRT(const double x)
{
    const double a = FABS(x);
    const int tiny = a < 0x1p-900, huge = a > 0x1p+900;
    const double s = a * (tiny ? 0x1p+960 : huge ? 0x1p-960 : 1.0);
    double y = as_double(as_ulong(s) / 3UL + 0x2a9f7893782da1ceUL);
    double t = y * y * y;
    y = y * ((t + s + s) / (t + t + s));
    t = y * y * y;
    y = y * ((t + s + s) / (t + t + s));
    y = y - (y * y * y - s) / (3.0 * y * y);
    y = y * (tiny ? 0x1p-320 : huge ? 0x1p+320 : 1.0);
    const double signed_y = as_double(as_ulong(y) | (as_ulong(x) & 0x8000000000000000UL));
    return (a == 0.0 || a == INFINITY || ISNAN(x)) ? x : signed_y;
}
""",
}


def load(storage: str, ptr: str, index: str) -> str:
    if storage == "half":
        return f"vload_half({index}, {ptr})"
    return f"{ptr}[{index}]"


def store(storage: str, ptr: str, index: str, value: str) -> str:
    if storage == "half":
        return f"vstore_half_rte({value}, {index}, {ptr});"
    return f"{ptr}[{index}] = {value};"


class KernelSpec(NamedTuple):
    """What one fused kernel is: it is built once per context for each distinct spec."""

    fragments: tuple[tuple, ...]  # Fragment.key of each part
    dtype: np.dtype  # storage dtype of updates and params
    mode: str  # "pure": fresh outputs; "inplace": slots (and params) written in place
    apply: bool  # write p + u to the params instead of u to a new updates buffer
    needs_params: bool
    acc: str  # C type of reduction results: "double" where the device has fp64, else "float"
    # with a segment reduction: "full" or "partial" groups, "_stepped" where a group's
    # work-items may be in consecutive segments (columns; see _segments)
    tiling: str = ""
    # the next part's segment reduction (a SegmentReduction), summed over this kernel's
    # output per chunk of its segments: a work-item per chunk (see ``_sums_body``)
    sums: Any = None


class Arg(NamedTuple):
    name: str
    kind: str  # "buffer", "offset" or "scalar"


# Argument names: the executor binds its arrays and per-step values by these.
U_IN, P_IN, OUT = "u_in", "p_in", "out"
# A kernel with an ``element_index`` fragment also takes the index of its first element as
# the offset of a buffer-and-offset pair (the buffer, the updates', is not read), so that
# its launches keep the (buffer, offset) shape of every other array argument.
INDEX = "index"
# A tiled kernel (one with a segment reduction) takes the work-group table as a buffer and
# the index of its launch's first group as the offset (see ``_segments``).
TILE_ARG = "tile"
# A kernel that also sums the next part's segment reduction takes the chunk table (the
# offset: its launch's first chunk) and the partials buffer (see ``_sums_body``).
CHUNKS, PARTIALS = "chunks", "partials"


def slot_arg(slot: str, k: int, io: str = "") -> str:
    """Part ``k``'s ``slot`` buffer: ``io`` is ``"in"`` or ``"out"`` when pure, else empty."""
    return f"{slot}_{k}_{io}" if io else f"{slot}_{k}"


def reduction_arg(k: int) -> str:
    """The buffer of part ``k``'s reduction results."""
    return f"red_{k}"


def segment_arg(k: int) -> str:
    """The buffer of part ``k``'s segment reduction outputs (``K`` per segment)."""
    return f"seg_{k}"


def scalar_arg(name: str, k: int) -> str:
    """Part ``k``'s scalar ``name``."""
    return f"{name}_{k}"


def kernel_name(spec: KernelSpec) -> str:
    digest = hashlib.sha1(repr(spec).encode()).hexdigest()[:10]
    return f"netcl_fused_{digest}"


def _sums_body(element: list[str], spec: KernelSpec, storage: str, real: str) -> list[str]:
    """The kernel body that runs ``element`` (one element's code, over ``i``) for every
    element of a chunk (``CHUNKS``: a work-item per chunk, never across segments) and sums
    the next part's segment reduction terms (``spec.sums``) over the stored outputs ``u``
    (and ``p``) in the reduce launch's order (``_segments._reduce_source``: ``real`` lanes of
    8 over blocks of 64 elements, 4 of 4 in double, each block's lanes added in the reduction
    type; again in double, from the stored outputs, where that gives 0 or not a finite
    number), so the partials are the reduce launch's, bit for bit. One partial per chunk and
    term, into ``PARTIALS`` (the next part's workspace)."""
    red, acc = spec.sums, spec.acc
    terms = red.terms
    out = P_IN if spec.mode == "inplace" and spec.apply else OUT
    reload = [f"u = {load(storage, out, out + '_off + i')};"] if storage == "half" else []
    inner = [line.replace("    ", "", 1) for line in element]
    w = 4 if real == "double" else 8  # lanes, and vectors per block: as the reduce kernel's
    block = 1 if real == "double" else 8
    lanes = [f"b{t}[j] = b{t}[j] + ({term});" for t, term in enumerate(terms)]
    tails = [f"r{t} = r{t} + ({acc})({term});" for t, term in enumerate(terms)]

    def lane_sum(t: int) -> str:
        pairs = [f"(({acc})b{t}[{a}] + ({acc})b{t}[{a + 1}])" for a in range(0, w, 2)]
        if w == 4:
            return f"{pairs[0]} + {pairs[1]}"
        return f"({pairs[0]} + {pairs[1]}) + ({pairs[2]} + {pairs[3]})"

    zeros = ", ".join(["0"] * w)
    n = w * block  # elements per block
    b_zero = [f"{real} b{t}[{w}] = {{{zeros}}};" for t in range(len(terms))]
    b_add = [f"r{t} = r{t} + {lane_sum(t)};" for t in range(len(terms))]
    lane_loop = [
        f"for (int j = 0; j < {w}; j++) {{",
        *("    " + line for line in ["const long i = first + e + j;", *inner, *reload, *lanes]),
        "}",
    ]
    body = [
        f"    const long c = {CHUNKS}_off + (long)get_global_id(0);",
        f"    const long first = {CHUNKS}[2 * c], count = {CHUNKS}[2 * c + 1];",
        *(f"    {acc} r{t} = 0;" for t in range(len(terms))),
        "    long e = 0;",
        # whole blocks (constant trip counts: vectorised), then the last, shorter one
        f"    for (; e + {n} <= count; e += {n}) {{",
        *("        " + line for line in b_zero),
        f"        for (int v = 0; v < {n}; v += {w}) {{",
        *("            " + line.replace("e + j", "e + v + j") for line in lane_loop),
        "        }",
        *("        " + line for line in b_add),
        "    }",
    ]
    if block > 1:
        body += [
            f"    if (e + {w} <= count) {{",
            *("        " + line for line in b_zero),
            f"        for (; e + {w} <= count; e += {w}) {{",
            *("            " + line for line in lane_loop),
            "        }",
            *("        " + line for line in b_add),
            "    }",
        ]
    body += [
        "    for (; e < count; e++) {",
        "        const long i = first + e;",
        *("        " + line for line in inner + reload + tails),
        "    }",
    ]
    if acc == "double" and real == "float":
        suspicious = " || ".join(f"r{t} == 0 || r{t} - r{t} != 0" for t in range(len(terms)))
        p_load = (
            [f"const double p = (double){load(storage, P_IN, P_IN + '_off + i')};"]
            if red.needs_params else []
        )  # fmt: skip
        body += [
            f"    if ({suspicious}) {{",
            *(f"        r{t} = 0;" for t in range(len(terms))),
            "        for (long i = first; i < first + count; i++) {",
            f"            const double u = (double){load(storage, out, out + '_off + i')};",
            *("            " + line for line in p_load),
            *(f"            r{t} = r{t} + ({term});" for t, term in enumerate(terms)),
            "        }",
            "    }",
        ]
    width = len(terms)
    body += [f"    {PARTIALS}[{PARTIALS}_off + {width} * c + {t}] = r{t};" for t in range(width)]
    return body


def fused_source(fragments: Sequence[Fragment], spec: KernelSpec) -> tuple[str, str, list[Arg]]:
    """The kernel source, its name and its argument list for ``fragments`` under ``spec``.

    Arguments, in order: updates, params (when read), output (unless params are updated
    in place), each part's slots (in; out too when pure), the element index base (when a
    fragment asks for ``element_index``: see ``INDEX``), each part's reduction buffer, then
    each part's scalars. Buffers come with an element offset, so the kernel serves a whole
    packed tree or one leaf alike.
    """
    storage = ctype(spec.dtype)
    real = "double" if storage == "double" else "float"
    slot_t = real
    name = kernel_name(spec)
    args: list[Arg] = []
    params: list[str] = []

    def buffer(arg: str, ctype_: str, const: bool) -> None:
        q = "const " if const else ""
        params.append(f"__global {q}{ctype_} *restrict {arg}, const long {arg}_off")
        args.append(Arg(arg, "buffer"))
        args.append(Arg(arg + "_off", "offset"))

    inplace_params = spec.mode == "inplace" and spec.apply
    buffer(U_IN, storage, True)
    if spec.needs_params or spec.apply:
        buffer(P_IN, storage, not inplace_params)
    if not inplace_params:
        buffer(OUT, storage, False)
    pure = spec.mode == "pure"
    for k, frag in enumerate(fragments):
        for slot in frag.slots:
            if pure:
                buffer(slot_arg(slot, k, "in"), slot_t, True)
                buffer(slot_arg(slot, k, "out"), slot_t, False)
            else:
                buffer(slot_arg(slot, k), slot_t, False)
    indexed = any(frag.element_index for frag in fragments)
    if indexed:
        buffer(INDEX, "uchar", True)
    if spec.sums is not None:
        buffer(CHUNKS, "long", True)
        buffer(PARTIALS, spec.acc, False)
    if spec.tiling:
        buffer(TILE_ARG, "long", True)
        for k, frag in enumerate(fragments):
            if frag.segment_reduction is not None:
                buffer(segment_arg(k), spec.acc, True)
    for k, frag in enumerate(fragments):
        if frag.reduction is not None:
            params.append(f"__global const {spec.acc} *restrict {reduction_arg(k)}")
            args.append(Arg(reduction_arg(k), "buffer"))
    for k, frag in enumerate(fragments):
        for s in frag.scalars:
            params.append(f"const real {scalar_arg(s, k)}")
            args.append(Arg(scalar_arg(s, k), "scalar"))

    if spec.sums is not None:
        body: list[str] = []
    elif spec.tiling:  # the group's first element and segment from the table (_segments)
        # (a segment uniform over the group keeps its values' loads scalar: PoCL then
        # vectorises the kernel; a stepped one is read per lane)
        step = f" + {TILE_ARG}[tile_row + 3] * (long)get_local_id(0)"
        body = [
            f"    const long tile_row = 4 * ({TILE_ARG}_off + (long)get_group_id(0));",
            f"    const long seg = {TILE_ARG}[tile_row + 1]"
            + (step if spec.tiling.endswith("_stepped") else "")
            + ";",
            f"    const long i = {TILE_ARG}[tile_row] + (long)get_local_id(0);",
        ]
    else:
        body = ["    const long i = get_global_id(0);"]
    if spec.tiling.startswith("partial"):
        body.append(f"    if ((long)get_local_id(0) < {TILE_ARG}[tile_row + 2]) {{")
    if indexed:
        body.append(f"    const ulong idx = (ulong)({INDEX}_off + i);")
    body.append(f"    real u = {load(storage, U_IN, U_IN + '_off + i')};")
    if spec.needs_params or spec.apply:
        body.append(f"    const real p = {load(storage, P_IN, P_IN + '_off + i')};")
    for k, frag in enumerate(fragments):
        body.append(f"    {{ /* {frag.name} */")
        for s in frag.scalars:
            body.append(f"        const real {s} = {scalar_arg(s, k)};")
        if frag.reduction is not None:
            for j, out in enumerate(frag.reduction.outputs):
                body.append(f"        const real {out} = (real){reduction_arg(k)}[{j}];")
        red = frag.segment_reduction
        if red is not None:
            arg, width = segment_arg(k), len(red.outputs)
            for j, out in enumerate(red.outputs):
                body.append(
                    f"        const real {out} = (real){arg}[{arg}_off + {width} * seg + {j}];"
                )
        for slot in frag.slots:
            src = slot_arg(slot, k, "in" if pure else "")
            body.append(f"        real {slot} = {src}[{src}_off + i];")
        for line in frag.source.strip("\n").splitlines():
            body.append("        " + line.strip())
        for slot in frag.slots:
            dst = slot_arg(slot, k, "out" if pure else "")
            body.append(f"        {dst}[{dst}_off + i] = {slot};")
        body.append("    }")
    if spec.apply:
        dst = P_IN if inplace_params else OUT
        body.append("    " + store(storage, dst, f"{dst}_off + i", "p + u"))
    else:
        body.append("    " + store(storage, OUT, OUT + "_off + i", "u"))
    if spec.tiling.startswith("partial"):
        body.append("    }")
    if spec.sums is not None:
        body = _sums_body(body, spec, storage, real)

    title = " | ".join([f.name for f in fragments] + (["apply"] if spec.apply else []))
    src = (
        f"//CL// {name}: {title or 'copy'}\n"
        + preamble(real, "double" in (real, spec.acc))
        + (random_helpers(real) if indexed else "")
        + (f"__attribute__((reqd_work_group_size({TILE}, 1, 1)))\n" if spec.tiling else "")
        + f"__kernel void {name}(\n    "
        + ",\n    ".join(params)
        + ")\n{\n"
        + "\n".join(body)
        + "\n}\n"
    )
    return src, name, args
