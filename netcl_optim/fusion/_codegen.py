"""Fragments -> the OpenCL C source of one fused kernel (strings only; no device needed)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .._base import Fragment, TreeSums
from .._device import BFLOAT16
from ._launch import TILE
from ._random import random_helpers

_CTYPE = {
    np.dtype(np.float16): "half",
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}
# storage only (state): bfloat16 as 16-bit words, converted to and from float
_STORAGE = {**_CTYPE, BFLOAT16: "bf16"}
# each storage's C type in a kernel's argument list
POINTER = {"half": "half", "float": "float", "double": "double", "bf16": "ushort"}


def storage_of(dtype: np.dtype) -> str:
    """The storage name of arrays of ``dtype`` in kernels: their C type (``half``, ``float``,
    ``double``), or ``"bf16"`` for bfloat16 (16-bit words, see ``POINTER``)."""
    return _STORAGE[np.dtype(dtype)]


def preamble(real: str, uses_double: bool, bf16: bool = False) -> str:
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
    if bf16:  # (only where used: every other kernel keeps its source, and PoCL's cached binary)
        lines.append(_BF16)
    return "\n".join(lines)


# bfloat16 storage: the top 16 bits of a float; stores round to nearest even (a NaN stays a
# quiet NaN of its sign, as ml_dtypes converts)
_BF16 = """\
#define BF16_LOAD(w) as_float((uint)(w) << 16)
static inline __attribute__((always_inline)) ushort BF16_RNE(const float x)
{
    const uint b = as_uint(x);
    const uint r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    return (ushort)(ISNAN(x) ? ((b >> 16) | 0x40u) : r);
}
"""


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
    if storage == "bf16":
        return f"BF16_LOAD({ptr}[{index}])"
    return f"{ptr}[{index}]"


def store(storage: str, ptr: str, index: str, value: str) -> str:
    if storage == "half":
        return f"vstore_half_rte({value}, {index}, {ptr});"
    if storage == "bf16":
        return f"{ptr}[{index}] = BF16_RNE({value});"
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
    # output per chunk of its segments: a work-item per chunk (see ``sums_body``)
    sums: Any = None
    # each slot's storage (``storage_of``), parts' slots in order; empty: all the state dtype
    slot_storage: tuple[str, ...] = ()
    # the C type of the tree-sum state an after=True part reads (the first dtype group's: one
    # number for every group); empty without one
    tree_ctype: str = ""


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
# offset: its launch's first chunk) and the partials buffer (see ``sums_body``).
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


def tree_state_arg(field: str, k: int) -> str:
    """Part ``k``'s tree-sum state field ``field`` (its per-leaf values, packed: the kernel
    reads the first; see ``TreeSums``)."""
    return f"ts_{field}_{k}"


def tree_outputs_arg(k: int) -> str:
    """The buffer of part ``k``'s tree-sum outputs (``TreeSums(after=False)``)."""
    return f"tso_{k}"


def state_ctype(real: str) -> str:
    """The C type of the state dtype's values for a kernel of compute type ``real``."""
    return "double" if real == "double" else "float"


def scalar_arg(name: str, k: int) -> str:
    """Part ``k``'s scalar ``name``."""
    return f"{name}_{k}"


def kernel_name(spec: KernelSpec) -> str:
    # (a spec with the state dtype's storage hashes as before slot_storage existed: the
    # kernels' names, and so PoCL's cache of their binaries, stay as they were)
    optional = {"slot_storage", "tree_ctype"}  # (empty: left out of the name)
    fields = [f for f in KernelSpec._fields if f not in optional or getattr(spec, f)]
    text = "KernelSpec(" + ", ".join(f"{f}={getattr(spec, f)!r}" for f in fields) + ")"
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return f"netcl_fused_{digest}"


def sums_body(element: list[str], spec: KernelSpec, storage: str, real: str) -> list[str]:
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
    tree = isinstance(red, TreeSums)  # terms: variables the element's code assigns
    out = P_IN if spec.mode == "inplace" and spec.apply else OUT
    half = storage in ("half", "bf16")
    reload = [f"u = {load(storage, out, out + '_off + i')};"] if half and not tree else []
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
    if acc == "double" and real == "float" and not tree:
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


def step_arguments(
    fragments: Sequence[Fragment], acc: str, params: list[str], args: list[Arg]
) -> None:
    """Append the per-step arguments (each part's reduction buffer, then each part's
    scalars), after a kernel's arrays: their declarations to ``params``, their ``Arg``s to
    ``args`` (the executor binds them in this order)."""
    for k, frag in enumerate(fragments):
        if frag.reduction is not None:
            params.append(f"__global const {acc} *restrict {reduction_arg(k)}")
            args.append(Arg(reduction_arg(k), "buffer"))
    for k, frag in enumerate(fragments):
        for s in frag.scalars:
            params.append(f"const real {scalar_arg(s, k)}")
            args.append(Arg(scalar_arg(s, k), "scalar"))


def part_lines(
    frag: Fragment,
    k: int,
    load_slot: Callable[[int, str], str],
    store_slot: Callable[[int, str], str],
) -> list[str]:
    """Part ``k``'s code for one element (a block of lines, indented for a kernel body): its
    scalars, reduction and segment outputs, its slots loaded (``load_slot(k, slot)``: an
    expression), its source, its slots stored (``store_slot(k, slot)``: a statement)."""
    lines = [f"    {{ /* {frag.name} */"]
    for s in frag.scalars:
        lines.append(f"        const real {s} = {scalar_arg(s, k)};")
    if frag.reduction is not None:
        for j, out in enumerate(frag.reduction.outputs):
            lines.append(f"        const real {out} = (real){reduction_arg(k)}[{j}];")
    red = frag.segment_reduction
    if red is not None:
        arg, width = segment_arg(k), len(red.outputs)
        for j, out in enumerate(red.outputs):
            lines.append(
                f"        const real {out} = (real){arg}[{arg}_off + {width} * seg + {j}];"
            )
    tree = frag.tree_sums
    if tree is not None and tree.after:  # the state at the start of the step
        for f in tree.state:
            arg = tree_state_arg(f, k)
            lines.append(f"        const real {f} = (real){arg}[{arg}_off];")
    elif tree is not None:  # the finish's outputs
        arg = tree_outputs_arg(k)
        for j, out in enumerate(tree.outputs):
            lines.append(f"        const real {out} = (real){arg}[{arg}_off + {j}];")
    for slot in frag.slots:
        lines.append(f"        real {slot} = {load_slot(k, slot)};")
    for line in frag.source.strip("\n").splitlines():
        lines.append("        " + line.strip())
    for slot in frag.slots:
        lines.append("        " + store_slot(k, slot))
    lines.append("    }")
    return lines


def fused_source(fragments: Sequence[Fragment], spec: KernelSpec) -> tuple[str, str, list[Arg]]:
    """The kernel source, its name and its argument list for ``fragments`` under ``spec``.

    Arguments, in order: updates, params (when read), output (unless params are updated
    in place), each part's slots (in; out too when pure), the element index base (when a
    fragment asks for ``element_index``: see ``INDEX``), each part's reduction buffer, then
    each part's scalars. Buffers come with an element offset, so the kernel serves a whole
    packed tree or one leaf alike.
    """
    storage = storage_of(spec.dtype)
    real = "double" if storage == "double" else "float"
    n_slots = sum(len(frag.slots) for frag in fragments)
    slot_storage = list(spec.slot_storage or (real,) * n_slots)
    slot_of = {}  # (part, slot) -> its storage
    for k, frag in enumerate(fragments):
        for slot in frag.slots:
            slot_of[k, slot] = slot_storage.pop(0)
    name = kernel_name(spec)
    args: list[Arg] = []
    params: list[str] = []

    def buffer(arg: str, ctype_: str, const: bool) -> None:
        q = "const " if const else ""
        params.append(f"__global {q}{ctype_} *restrict {arg}, const long {arg}_off")
        args.append(Arg(arg, "buffer"))
        args.append(Arg(arg + "_off", "offset"))

    inplace_params = spec.mode == "inplace" and spec.apply
    buffer(U_IN, POINTER[storage], True)
    if spec.needs_params or spec.apply:
        buffer(P_IN, POINTER[storage], not inplace_params)
    if not inplace_params:
        buffer(OUT, POINTER[storage], False)
    pure = spec.mode == "pure"
    for k, frag in enumerate(fragments):
        for slot in frag.slots:
            slot_t = POINTER[slot_of[k, slot]]
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
        tree = frag.tree_sums
        if tree is not None and tree.after:
            for f in tree.state:
                buffer(tree_state_arg(f, k), spec.tree_ctype or state_ctype(real), True)
        elif tree is not None:
            buffer(tree_outputs_arg(k), spec.acc, True)
    step_arguments(fragments, spec.acc, params, args)

    def load_slot(k: int, slot: str) -> str:
        src = slot_arg(slot, k, "in" if pure else "")
        return load(slot_of[k, slot], src, src + "_off + i")

    draws, random_bits = state_rounding(fragments, slot_of)

    def store_slot(k: int, slot: str) -> str:
        dst = slot_arg(slot, k, "out" if pure else "")
        if (k, slot) in random_bits:
            return f"{dst}[{dst}_off + i] = BF16_SR({slot}, {random_bits[k, slot]});"
        return store(slot_of[k, slot], dst, dst + "_off + i", slot)

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
    body += draws
    body.append(f"    real u = {load(storage, U_IN, U_IN + '_off + i')};")
    if spec.needs_params or spec.apply:
        body.append(f"    const real p = {load(storage, P_IN, P_IN + '_off + i')};")
    if isinstance(spec.sums, TreeSums):  # assigned by the fragment's source, then summed
        body.append(f"    real {', '.join(spec.sums.terms)};")
    for k, frag in enumerate(fragments):
        body += part_lines(frag, k, load_slot, store_slot)
    if spec.apply:
        dst = P_IN if inplace_params else OUT
        body.append("    " + store(storage, dst, f"{dst}_off + i", "p + u"))
    else:
        body.append("    " + store(storage, OUT, OUT + "_off + i", "u"))
    if spec.tiling.startswith("partial"):
        body.append("    }")
    if spec.sums is not None:
        body = sums_body(body, spec, storage, real)

    title = " | ".join([f.name for f in fragments] + (["apply"] if spec.apply else []))
    head = (
        f"//CL// {name}: {title or 'copy'}\n"
        + kernel_preamble(real, spec, storage, indexed)
        + (BF16_SR if draws else "")
        + (f"__attribute__((reqd_work_group_size({TILE}, 1, 1)))\n" if spec.tiling else "")
    )
    return kernel_text(head, name, params, body), name, args


# bfloat16 with stochastic rounding: up with probability (the low 16 bits) / 2^16, from 16
# random bits (torchao's bf16_stochastic_round); NaN as BF16_RNE keeps it
BF16_SR = """static inline __attribute__((always_inline))
ushort BF16_SR(const float x, const uint r)
{
    return ISNAN(x) ? BF16_RNE(x) : (ushort)((as_uint(x) + r) >> 16);
}
"""
ROUNDING_SCALARS = ("key0_lo", "key0_hi", "key1_lo", "key1_hi", "t_lo", "t_hi")
STATE_ROUNDING_WORD = 0x53530000  # the generator's fourth counter word for state ("SS")


def state_rounding(
    fragments: Sequence[Fragment], slot_of: dict[tuple[int, str], str]
) -> tuple[list[str], dict[tuple[int, str], str]]:
    """Where a fragment ``rounds_state``: the lines that draw the random bits of the
    kernel's bfloat16 slots (one Philox-4x32-10 draw per 8 slots, of (element index, t,
    ``STATE_ROUNDING_WORD`` + draw) under the fragment's key), and each such slot's 16 bits
    (an expression). Else nothing."""
    k = next((k for k, f in enumerate(fragments) if f.rounds_state), None)
    slots = [ks for ks, st in slot_of.items() if st == "bf16"]
    if k is None or not slots:
        return [], {}
    key0_lo, key0_hi, key1_lo, key1_hi, t_lo, t_hi = (scalar_arg(n, k) for n in ROUNDING_SCALARS)
    lines, bits = [], {}
    for d in range(-(-len(slots) // 8)):
        lines.append(
            f"    const uint4 sr_state{d} = philox4x32_10((uint4)((uint)idx, (uint)(idx >> 32), "
            f"WORD16({t_lo}, {t_hi}), 0x{STATE_ROUNDING_WORD + d:08x}u), "
            f"(uint2)(WORD16({key0_lo}, {key0_hi}), WORD16({key1_lo}, {key1_hi})));"
        )
    for j, ks in enumerate(slots):
        word = f"sr_state{j // 8}.{'xyzw'[j % 8 // 2]}"
        bits[ks] = f"({word} & 0xffffu)" if j % 2 == 0 else f"({word} >> 16)"
    return lines, bits


def kernel_preamble(real: str, spec: KernelSpec, storage: str, indexed: bool) -> str:
    """A fused kernel's preamble: the helpers of its arithmetic type, bfloat16's where its
    arrays use it (``PARAMS_BF16`` where the params are bfloat16), the generator's where a
    fragment reads the element index."""
    return (
        preamble(real, "double" in (real, spec.acc), "bf16" in (storage, *spec.slot_storage))
        + ("#define PARAMS_BF16\n" if storage == "bf16" else "")
        + (random_helpers(real) if indexed else "")
    )


def kernel_text(head: str, name: str, params: list[str], body: list[str]) -> str:
    """``head`` (comment, preamble, attributes), then the kernel ``name`` over ``params``
    with ``body``."""
    return (
        head
        + f"__kernel void {name}(\n    "
        + ",\n    ".join(params)
        + ")\n{\n"
        + "\n".join(body)
        + "\n}\n"
    )
