"""Fragments -> the OpenCL C source of one fused kernel over 8-bit block-quantized state.

A work-item per row of the block table (``_quantized.BlockTable``): a 256-element block of a
leaf whose state is quantized, or a run of up to 256 elements of a leaf that keeps float32
state (below ``min_8bit_size``). For a block it

1. loads each quantized slot as ``map[code] * absmax[block]`` (bitsandbytes' dequantization),
2. runs the fragments over the block's elements (a loop the compiler vectorises), writing
   the outputs (the params from the new, unquantized state, as bitsandbytes does) and
   keeping the new state in a private array and its running maximum ``|s|``,
3. stores ``absmax = max |s|`` and each element's code: the nearest map value of
   ``s * (1 / absmax)`` (binary search; a value exactly between two codes takes the lower),
   then, for the signed map, the sign fix of bitsandbytes' CUDA kernel (a non-zero ``s``
   whose code has the other sign moves one code toward it). A block of zeros keeps the zero
   code.

A work-item per block (not a work-group with a barrier): on a CPU device the block's loops
vectorise within the work-item, and the step stays one launch per packed tree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from .._base import Fragment
from ._codegen import (
    INDEX,
    OUT,
    P_IN,
    POINTER,
    U_IN,
    Arg,
    KernelSpec,
    kernel_preamble,
    kernel_text,
    load,
    part_lines,
    slot_arg,
    step_arguments,
    storage_of,
    store,
)
from ._qmaps import (
    BUCKET_EXPONENT,
    BUCKETS,
    SIGNED_BITS,
    SPLIT,
    UNSIGNED_BITS,
    ZERO_CODE,
    bucket_words,
)

BLOCK = 256
BLOCKS = "blocks"  # the block table argument (its offset: the launch's first row)
BUCKETS_ARG = "buckets"  # _qmaps.bucket_tables of both maps (see bucket_buffer)
QUANTIZED = {"q8s": True, "q8u": False}  # slot storage -> the map is signed


def codes_arg(base: str) -> str:
    return base + "_codes"


def absmax_arg(base: str) -> str:
    return base + "_absmax"


def plain_arg(base: str) -> str:
    """A quantized slot's float32 state of the leaves below ``min_8bit_size``."""
    return base + "_plain"


def _table(name: str, bits: Sequence[int]) -> str:
    rows = [", ".join(f"0x{b:08x}u" for b in bits[i : i + 8]) for i in range(0, 256, 8)]
    return f"__constant uint {name}[256] = {{\n    " + ",\n    ".join(rows) + "\n};\n"


_TABLES = (
    f"#define BUCKETS {BUCKETS}\n#define BUCKET_EXPONENT {BUCKET_EXPONENT}\n"
    f"#define SPLIT {SPLIT}u\n"
    + _table("QMAP_SIGNED", SIGNED_BITS)
    + _table("QMAP_UNSIGNED", UNSIGNED_BITS)
)


def bucket_host_table() -> np.ndarray:
    """The ``buckets`` argument's contents: the signed map's bucket words (positive side,
    negative side), then the unsigned map's (``_qmaps.bucket_words``)."""
    return np.concatenate([bucket_words(True).ravel(), bucket_words(False).ravel()])


_QUANTIZE = """\
/* |x| as its bits, which order as the magnitudes do; NaN as 0. (Maxima and minima here are
   ternaries, not OpenCL's max and min: PoCL's builtins are calls, which keep a loop from
   vectorising.) */
#define Q8_MAGNITUDE(x) (as_uint(FABS(x)) > 0x7f800000u ? 0u : as_uint(FABS(x)))
/* the nearest code of v (the lower one at a midpoint; 0 for NaN), by one lookup: the word of
   v's bucket (_qmaps.bucket_words: per side of zero, |v|'s exponent from 2^-23 and 8
   mantissa bits) holds the code of the bucket's lowest value and, flagged, the low 15 bits
   of a midpoint inside the bucket; past it, the next code */
static inline __attribute__((always_inline)) uint Q8_NEAREST(
    __global const uint *restrict words, const float v)
{
    const uint bits = as_uint(v);
    const uint ab = (bits & 0x7fffffffu) < 0x3fffffffu ? (bits & 0x7fffffffu) : 0x3fffffffu;
    const uint e = ab >> 23;
    const uint b = e < BUCKET_EXPONENT ? 0 : ((e - BUCKET_EXPONENT) << 8) + ((ab >> 15) & 255) + 1;
    const uint negative = bits >> 31;
    const uint w = words[negative * BUCKETS + b];
    const uint low = ab & 0x7fffu, split = w >> 9;
    const uint past = (w & SPLIT) && (negative ? low < split : low > split);
    return ISNAN(v) ? 0 : (w & 255) + past;
}
static inline __attribute__((always_inline)) uchar Q8_SIGNED(
    __global const uint *restrict buckets, const float s, const float inv)
{
    uint c = Q8_NEAREST(buckets, s * inv);
    const uint negative = c < 127;  /* the signed map's values below code 127 (0.0) */
    c = (s > 0 && negative) ? c + 1 : (s < 0 && !negative) ? c - 1 : c;
    return (uchar)c;
}
static inline __attribute__((always_inline)) uchar Q8_UNSIGNED(
    __global const uint *restrict buckets, const float s, const float inv)
{
    return (uchar)Q8_NEAREST(buckets + 2 * BUCKETS, s * inv);
}
"""


def blockwise_name(spec: KernelSpec) -> str:
    digest = hashlib.sha1(repr(spec).encode()).hexdigest()[:10]
    return f"netcl_q8_{digest}"


def blockwise_source(fragments: Sequence[Fragment], spec: KernelSpec) -> tuple[str, str, list[Arg]]:
    """The kernel source, its name and its argument list for ``fragments`` under ``spec``
    (``spec.slot_storage``: ``"q8s"`` / ``"q8u"`` for a quantized slot, else the storage of
    a slot kept whole). Arguments: updates, params (when read), output (unless the params
    are updated in place), each slot's arrays (a quantized slot's codes, absmax and plain
    float32 state; in and out when pure), the block table, the reductions' buffers, the
    scalars; every array with an element offset."""
    storage = storage_of(spec.dtype)
    pure = spec.mode == "pure"
    inplace_params = spec.mode == "inplace" and spec.apply
    kinds = iter(spec.slot_storage)
    kind_of = {(k, slot): next(kinds) for k, frag in enumerate(fragments) for slot in frag.slots}
    args: list[Arg] = []
    params: list[str] = []

    def buffer(arg: str, ctype_: str, const: bool) -> None:
        q = "const " if const else ""
        params.append(f"__global {q}{ctype_} *restrict {arg}, const long {arg}_off")
        args.extend((Arg(arg, "buffer"), Arg(arg + "_off", "offset")))

    buffer(U_IN, POINTER[storage], True)
    if spec.needs_params or spec.apply:
        buffer(P_IN, POINTER[storage], not inplace_params)
    if not inplace_params:
        buffer(OUT, POINTER[storage], False)
    ios = ("in", "out") if pure else ("",)
    for (k, slot), kind in kind_of.items():
        for io in ios:
            base, const = slot_arg(slot, k, io), io == "in"
            if kind in QUANTIZED:
                buffer(codes_arg(base), "uchar", const)
                buffer(absmax_arg(base), "float", const)
                buffer(plain_arg(base), "float", const)
            else:
                buffer(base, POINTER[kind], const)
    indexed = any(frag.element_index for frag in fragments)
    if indexed:  # (the element index's base: see _codegen.INDEX)
        buffer(INDEX, "uchar", True)
    buffer(BLOCKS, "long", True)
    buffer(BUCKETS_ARG, "uint", True)
    step_arguments(fragments, spec.acc, params, args)

    def arg(k: int, slot: str, io: str) -> str:
        return slot_arg(slot, k, io if pure else "")

    def element(quantized_block: bool) -> list[str]:
        def load_slot(k: int, slot: str) -> str:
            kind, a = kind_of[k, slot], arg(k, slot, "in")
            if kind not in QUANTIZED:
                return load(kind, a, a + "_off + i")
            if not quantized_block:
                return f"{plain_arg(a)}[{plain_arg(a)}_off + q8_s]"
            table = "QMAP_SIGNED" if QUANTIZED[kind] else "QMAP_UNSIGNED"
            code = f"{codes_arg(a)}[{codes_arg(a)}_off + q8_s]"
            return f"as_float({table}[{code}]) * q8_{slot}_{k}_scale"

        def store_slot(k: int, slot: str) -> str:
            kind, a = kind_of[k, slot], arg(k, slot, "out")
            if kind not in QUANTIZED:
                return store(kind, a, a + "_off + i", slot)
            if not quantized_block:
                return f"{plain_arg(a)}[{plain_arg(a)}_off + q8_s] = {slot};"
            name = f"q8_{slot}_{k}"
            return (f"{name}_new[q8_e] = {slot}; {{ const uint q8_m = Q8_MAGNITUDE({slot}); "
                    f"{name}_max = q8_m > {name}_max ? q8_m : {name}_max; }}")  # fmt: skip

        lines = [f"    real u = {load(storage, U_IN, U_IN + '_off + i')};"]
        if spec.needs_params or spec.apply:
            lines.append(f"    const real p = {load(storage, P_IN, P_IN + '_off + i')};")
        for k, frag in enumerate(fragments):
            lines += part_lines(frag, k, load_slot, store_slot)
        dst = P_IN if inplace_params else OUT
        lines.append("    " + store(storage, dst, f"{dst}_off + i", "p + u" if spec.apply else "u"))
        return ["        " + line for line in lines]

    quantized = [(k, slot) for (k, slot), kind in kind_of.items() if kind in QUANTIZED]

    def loop(lines: list[str]) -> list[str]:
        """``lines`` (over ``q8_e``) for each element of the row: a loop of a constant trip
        count for a whole block (vectorised), else one up to ``q8_count``."""
        head = "const long i = q8_first + q8_e, q8_s = q8_pos + q8_e;"
        if indexed:
            head += f" const ulong idx = (ulong)({INDEX}_off + i);"
        out = []
        for cond, bound in ((f"if (q8_count == {BLOCK}) {{", BLOCK), ("} else {", "q8_count")):
            out += [f"    {cond}", f"    for (long q8_e = 0; q8_e < {bound}; q8_e++) {{",
                    f"        {head}", *lines, "    }"]  # fmt: skip
        return [*out, "    }"]

    body = [
        f"    __global const uint *restrict q8_buckets_table = {BUCKETS_ARG} + {BUCKETS_ARG}_off;",
        f"    const long q8_r = 4 * ({BLOCKS}_off + (long)get_global_id(0));",
        f"    const long q8_first = {BLOCKS}[q8_r], q8_block = {BLOCKS}[q8_r + 1];",
        f"    const long q8_count = {BLOCKS}[q8_r + 2], q8_pos = {BLOCKS}[q8_r + 3];",
        "    if (q8_block < 0) { /* float32 state (a leaf below min_8bit_size) */",
        *loop(element(False)),
        "        return;",
        "    }",
    ]
    for k, slot in quantized:
        a = absmax_arg(arg(k, slot, "in"))
        body += [
            f"    const float q8_{slot}_{k}_scale = {a}[{a}_off + q8_block];",
            f"    float q8_{slot}_{k}_new[{BLOCK}];",
            f"    uint q8_{slot}_{k}_max = 0;  /* max |s| as bits (NaN ignored) */",
        ]
    body += loop(element(True))
    stores = []  # every quantized slot's codes, in one loop
    for k, slot in quantized:
        name, kind = f"q8_{slot}_{k}", kind_of[k, slot]
        out = arg(k, slot, "out")
        a, c = absmax_arg(out), codes_arg(out)
        quantize = "Q8_SIGNED" if QUANTIZED[kind] else "Q8_UNSIGNED"
        zero = ZERO_CODE[QUANTIZED[kind]]
        body += [
            f"    const float {name}_absmax = as_float({name}_max);",
            f"    {a}[{a}_off + q8_block] = {name}_absmax;",
            # (a subnormal absmax is scaled by 2^64 first, so that its reciprocal is finite)
            f"    const float {name}_pre = {name}_absmax < 0x1p-100f ? 0x1p64f : 1.0f;",
            f"    const float {name}_inv = 1.0f / ({name}_absmax * {name}_pre);",
        ]
        value = f"{name}_new[q8_e] * {name}_pre"
        stores.append(f"        {c}[{c}_off + q8_s] = {name}_max == 0 ? {zero} : "
                      f"{quantize}(q8_buckets_table, {value}, {name}_inv);")  # fmt: skip
    body += loop(stores)

    name = blockwise_name(spec)
    title = " | ".join([f.name for f in fragments] + (["apply"] if spec.apply else []))
    head = (
        f"//CL// {name}: {title} (8-bit state)\n"
        + kernel_preamble("float", spec, storage, indexed)
        + _TABLES
        + _QUANTIZE
    )
    return kernel_text(head, name, params, body), name, args
