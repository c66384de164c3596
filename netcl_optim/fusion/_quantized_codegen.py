"""Fragments -> the OpenCL C source of one fused kernel over 8-bit block-quantized state.

A work-item per row of the block table (``_quantized.BlockTable``): a 256-element block of a
leaf whose state is quantized, or a run of up to 256 elements of a leaf that keeps float32
state (below ``min_8bit_size``). For a block it

1. loads each quantized slot as ``map[code] * absmax[block]`` (bitsandbytes' dequantization),
2. runs the fragments over the block's elements (a loop the compiler vectorises), writing
   the outputs (the params from the new, unquantized state, as bitsandbytes does) and
   keeping the new state in a private array and its running maximum ``|s|``,
3. stores ``absmax = max |s|`` and each element's code: the nearest map value of
   ``s * (1 / absmax)`` (a value exactly between two codes takes the lower), then, for the
   signed map, the sign fix of bitsandbytes' CUDA kernel (a non-zero ``s`` whose code has
   the other sign moves one code toward it). A block of zeros keeps the zero code.

The code of a whole block's element is one load from a direct table (``direct_words``:
indexed by the value's sign, exponent and top 8 mantissa bits, the sign fix folded in), plus
a carry from its low 15 mantissa bits; a block where some ``v`` is NaN (or, for the signed
map, ``-0``: the sign fix of an ``s < 0`` whose ``v`` underflowed needs ``s``) is then redone
by the exact rule: the bucket words (``_qmaps.bucket_words``) and the sign fix. Both loops
vectorise; on PoCL (AVX2) the direct one is ~40% fewer instructions, most of them the
emulated gather of the one load (see benchmarks/README.md, "8-bit").

A work-item per block (not a work-group with a barrier): on a CPU device the block's loops
vectorise within the work-item, and the step stays one launch per packed tree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache

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
    bucketed_codes,
    dynamic_map,
    midpoints,
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


DIRECT_KEYS = 1 << 17  # a direct table's words: one per (sign, exponent, 8 mantissa bits)


_TABLES = (
    f"#define BUCKETS {BUCKETS}\n#define BUCKET_EXPONENT {BUCKET_EXPONENT}\n"
    f"#define SPLIT {SPLIT}u\n#define Q8_KEYS {DIRECT_KEYS}\n"
    + _table("QMAP_SIGNED", SIGNED_BITS)
    + _table("QMAP_UNSIGNED", UNSIGNED_BITS)
)


def direct_words(signed: bool) -> np.ndarray:
    """``(DIRECT_KEYS,)`` uint32, a word per key ``bits(v) >> 15`` (sign, exponent, top 8
    mantissa bits of a float32 ``v``): the code of a ``v`` that is not NaN (nor, for the
    signed map, ``-0``) is ``(word + lowx) >> 15``, where ``lowx`` is the low 15 bits of
    ``bits(v)``, or ``0x7fff`` less them for a negative ``v``. That is ``Q8_NEAREST``'s rule
    (and the signed map's sign fix) as a code ``r`` and a threshold ``t``, the code being
    ``r + 1`` where ``lowx > t``, stored as ``(r << 15) + 0x7fff - t``. Checked against the
    bucket words where either can change."""
    words = bucket_words(signed)
    key = np.arange(DIRECT_KEYS, dtype=np.int64)
    side, e, m8 = key >> 16, (key >> 8) & 255, key & 255
    clamp = e >= 128  # |v| >= 2: Q8_NEAREST's clamp to 0x3fffffff (the last bucket, low 0x7fff)
    inner = ((e - BUCKET_EXPONENT) << 8) + m8 + 1
    w = words[side, np.where(e < BUCKET_EXPONENT, 0, np.where(clamp, BUCKETS - 1, inner))]
    w = w.astype(np.int64)
    code, split, has = w & 255, w >> 9, (w & SPLIT) != 0
    # past the midpoint: low > split (positive), low < split (negative), i.e. lowx > t
    t = np.where(has, np.where(side == 0, split, 0x7FFF - split), 0x7FFF)
    top = has & np.where(side == 0, split < 0x7FFF, False)  # (the clamped low is 0x7fff)
    code = np.where(clamp, code + top, code)
    t = np.where(clamp, 0x7FFF, t)
    if signed:  # the sign fix, by the sign of v (that of s, but where v is -0 or NaN)
        low_code, high_code = _sign_fix(code, side), _sign_fix(code + (t < 0x7FFF), side)
        code, t = low_code, np.where(high_code == low_code, 0x7FFF, t)
    out = ((code << 15) + 0x7FFF - t).astype(np.uint32)
    _check_direct(out, words, signed)
    return out


def _sign_fix(c: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """The signed map's codes ``c`` of values of sign ``negative`` (not -0 or NaN), fixed."""
    return np.where(negative, np.where(c >= 127, c - 1, c), np.where(c < 127, c + 1, c))


def _direct_codes(v: np.ndarray, table: np.ndarray) -> np.ndarray:
    bits = np.asarray(v, np.float32).view(np.uint32).astype(np.int64)
    lowx = (bits ^ np.where(bits >> 31, 0x7FFF, 0)) & 0x7FFF
    return (table[bits >> 15].astype(np.int64) + lowx) >> 15


def _check_direct(table: np.ndarray, words: np.ndarray, signed: bool) -> None:
    """``table`` gives the exact rule at every value where either rule can change: each
    key's first and last value and their neighbours, each map value and midpoint and their
    neighbours (both signs), and values of 2 and above."""
    key = np.arange(DIRECT_KEYS, dtype=np.uint32) << 15
    probe = np.concatenate([key, key | 1, key | 0x7FFE, key | 0x7FFF]).view(np.float32)
    m = np.concatenate([dynamic_map(signed), midpoints(signed)[:255]]).astype(np.float32)
    m = np.concatenate([m, -m])
    inf = np.float32(np.inf)
    probe = np.concatenate([probe, m, np.nextafter(m, inf), np.nextafter(m, -inf)])
    negative_zero = probe.view(np.uint32) == 0x80000000
    probe = probe[~np.isnan(probe) & ~(negative_zero & signed)]
    want = bucketed_codes(probe, words)
    if signed:  # (+0 keeps its code: the fix moves only a code of the other sign)
        want = np.where(probe == 0, want, _sign_fix(want, probe < 0))
    if not np.array_equal(_direct_codes(probe, table), want):
        raise AssertionError("the direct quantization table differs from the bucket words")


@lru_cache(maxsize=1)
def bucket_host_table() -> np.ndarray:
    """The ``buckets`` argument's contents: the signed map's direct words, the unsigned
    map's (``direct_words``), then the signed map's bucket words (positive side, negative
    side), then the unsigned map's (``_qmaps.bucket_words``)."""
    return np.concatenate([direct_words(True), direct_words(False),
                           bucket_words(True).ravel(), bucket_words(False).ravel()])  # fmt: skip


_QUANTIZE = """\
/* |x| as its bits, which order as the magnitudes do; NaN as 0. (Maxima and minima here are
   ternaries, not OpenCL's max and min: PoCL's builtins are calls, which keep a loop from
   vectorising. The NaN test is a float compare: one instruction, where an unsigned one is
   two on AVX2.) */
#define Q8_MAGNITUDE(x) (FABS(x) == FABS(x) ? as_uint(FABS(x)) : 0u)
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
        f"    __global const uint *restrict q8_direct = {BUCKETS_ARG} + {BUCKETS_ARG}_off;",
        "    __global const uint *restrict q8_words = q8_direct + 2 * Q8_KEYS;",
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
    direct, odd, exact = [], [], []  # (see the module's docstring)
    for k, slot in quantized:
        name, kind = f"q8_{slot}_{k}", kind_of[k, slot]
        signed = QUANTIZED[kind]
        out = arg(k, slot, "out")
        a, c = absmax_arg(out), codes_arg(out)
        quantize = "Q8_SIGNED" if signed else "Q8_UNSIGNED"
        zero = ZERO_CODE[signed]
        body += [
            f"    const float {name}_absmax = as_float({name}_max);",
            f"    {a}[{a}_off + q8_block] = {name}_absmax;",
            # (a subnormal absmax is scaled by 2^64 first, so that its reciprocal is finite)
            f"    const float {name}_pre = {name}_absmax < 0x1p-100f ? 0x1p64f : 1.0f;",
            f"    const float {name}_inv = 1.0f / ({name}_absmax * {name}_pre);",
        ]
        value = f"{name}_new[q8_e] * {name}_pre"
        put = f"{c}[{c}_off + q8_s] = {name}_max == 0 ? {zero} : "
        exact.append(f"        {put}{quantize}(q8_words, {value}, {name}_inv);")
        # the direct rule (inline: the body calls no helper but the exact rule's), and
        # whether v is NaN (signed map: or -0), for which the block is redone exactly: a
        # (uint) of bitwise tests (with ||, &&, "? ~0u : 0u" or -(uint) instead, the loop
        # ran 65-90% slower on PoCL)
        key = "(q8_b >> 15)" if signed else "Q8_KEYS + (q8_b >> 15)"
        flag = "((q8_b & 0x7fffffffu) > 0x7f800000u)"
        if signed:
            flag = f"({flag} | (q8_b == 0x80000000u))"
        direct += [
            f"        {{ const float q8_v = ({value}) * {name}_inv;",
            "          const uint q8_b = as_uint(q8_v);",
            f"          {put}(uchar)((q8_direct[{key}] + "
            "((q8_b ^ (uint)(as_int(q8_b) >> 31)) & 0x7fffu)) >> 15);",
            f"          {name}_odd |= (uint){flag}; }}",
        ]
        odd.append((name, exact[-1]))
    head = "const long q8_s = q8_pos + q8_e;"

    def over(bound: str, lines: list[str]) -> list[str]:
        return [f"    for (long q8_e = 0; q8_e < {bound}; q8_e++) {{", f"        {head}", *lines,
                "    }"]  # fmt: skip

    body.append(f"    if (q8_count == {BLOCK}) {{")
    if odd:
        body += ["    uint " + ", ".join(f"{name}_odd = 0" for name, _ in odd) + ";",
                 *over(str(BLOCK), direct)]  # fmt: skip
    for name, line in odd:
        body += [f"    if ({name}_odd && {name}_max != 0)", *over(str(BLOCK), [line])]
    body += ["    } else {", *over("q8_count", exact), "    }"]

    name = blockwise_name(spec)
    title = " | ".join([f.name for f in fragments] + (["apply"] if spec.apply else []))
    head = (
        f"//CL// {name}: {title} (8-bit state)\n"
        + kernel_preamble("float", spec, storage, indexed)
        + _TABLES
        + _QUANTIZE
    )
    return kernel_text(head, name, params, body), name, args
