"""8-bit block-quantized state (bitsandbytes' layout) for any element-wise rule: the state
type, the host quantizer, allocation, the block table and a fused step over it.

A slot stored in 8 bits keeps, per parameter of at least ``min_8bit_size`` elements, a
:class:`QuantizedState`: ``uint8`` codes shaped like the parameter and one float32 absmax per
256-element block of the flattened parameter (the last block may be short), the codes
indexing bitsandbytes' signed or unsigned dynamic map (``_qmaps``); a smaller parameter
keeps a float32 array. A step is one launch per dtype group of a packed tree (see
``_quantized_codegen``); the kernel reads each slot's layout from its arrays, so the rule's
update is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple, TypeGuard

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._base import Part
from .._packing import contiguous_run, element_offset, layout
from ._codegen import INDEX, OUT, P_IN, U_IN, KernelSpec, slot_arg, storage_of
from ._launch import Single, launch_all
from ._programs import fused_kernel
from ._qmaps import ZERO_CODE, dynamic_map
from ._quantized_codegen import (
    BLOCK,
    BLOCKS,
    BUCKETS_ARG,
    absmax_arg,
    bucket_host_table,
    codes_arg,
    plain_arg,
)
from ._reductions import acc_ctype, reduce_parts
from ._slices import slice_for, slices_active, whole_view

F32 = np.dtype(np.float32)
BLOCK_8BIT = BLOCK  # (exported: ZeRO cuts its shards at these blocks)
U8 = np.dtype(np.uint8)


class QuantizedState(NamedTuple):
    """One parameter's 8-bit state (bitsandbytes' layout): ``codes`` (``uint8``, shaped like
    the parameter), ``absmax`` (float32, one per 256-element block of the flattened
    parameter) and ``signed`` (which dynamic map the codes index: the signed one for state
    that may be negative, the unsigned one for non-negative state). Its value is
    ``map[codes] * absmax[block]`` (:func:`dequantize`)."""

    codes: Any
    absmax: Any
    signed: bool


class QuantizedSlice(NamedTuple):
    """A ZeRO shard's 8-bit state of one dtype: the state of each piece of a parameter that
    the rank's slice of the packed parameters holds, in order: a :class:`QuantizedState`
    for a piece of a parameter of at least ``min_8bit_size`` elements (its blocks are the
    parameter's own: shards are cut at blocks), a float32 array otherwise."""

    pieces: tuple[Any, ...]


def is_quantized(x: Any) -> TypeGuard[QuantizedState]:
    return type(x) is QuantizedState


def is_eight_bit(x: Any) -> bool:
    """Whether ``x`` is a leaf's 8-bit state: a :class:`QuantizedState` or, on a ZeRO
    slice, a :class:`QuantizedSlice`."""
    return type(x) is QuantizedState or type(x) is QuantizedSlice


def n_blocks(size: int) -> int:
    return -(-size // BLOCK)


# ---------------------------------------------------------------------------- host side


def quantize(values: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, absmax)`` of ``values`` (flattened, float32) as the kernel computes them:
    ``absmax`` the largest ``|x|`` of each 256-element block (NaN ignored); each code the
    nearest map value of ``x * (1 / absmax)`` (both scaled by ``2^64`` first where
    ``absmax < 2^-100``; the lower code at a float32 midpoint), then the sign
    fix (signed map: a non-zero ``x`` whose code has the other sign moves one code toward
    it); a block of zeros takes the zero code."""
    qmap = dynamic_map(signed)
    x = np.ascontiguousarray(values, dtype=F32).reshape(-1)
    n = x.size
    pad = np.zeros(n_blocks(n) * BLOCK, F32)
    pad[:n] = x
    blocks = pad.reshape(-1, BLOCK)
    mags = np.abs(blocks)
    absmax = (
        np.where(np.isnan(mags), np.float32(0), mags).max(axis=1, initial=np.float32(0)).astype(F32)
    )
    # (a subnormal absmax is scaled by 2^64 first, so that its reciprocal is finite)
    pre = np.where(absmax < np.float32(2.0**-100), np.float32(2.0**64), np.float32(1)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = (np.float32(1) / (absmax * pre)).astype(F32)
        v = ((blocks * pre[:, None]).astype(F32) * inv[:, None]).astype(F32)
    lo = np.searchsorted(qmap, v, side="right").astype(np.int64) - 1
    lo = np.where(np.isnan(v), 0, np.clip(lo, 0, 255))
    hi = np.minimum(lo + 1, 255)
    mid = ((qmap[lo] + qmap[hi]) * np.float32(0.5)).astype(F32)
    codes = np.where((lo < 255) & (v > mid), lo + 1, lo)
    if signed:
        negative = np.signbit(qmap[codes])
        codes = np.where((blocks > 0) & negative, codes + 1, codes)
        codes = np.where((blocks < 0) & ~negative, codes - 1, codes)
    codes = np.where((absmax == 0)[:, None], ZERO_CODE[signed], codes)
    return codes.reshape(-1)[:n].astype(U8), absmax


def dequantize(codes: np.ndarray, absmax: np.ndarray, signed: bool) -> np.ndarray:
    """The float32 values of ``codes`` (any shape) under ``absmax`` (one per block)."""
    flat = np.asarray(codes).reshape(-1)
    scale = np.repeat(np.asarray(absmax, F32), BLOCK)[: flat.size]
    return (dynamic_map(signed)[flat] * scale).astype(F32).reshape(np.shape(codes))


def init_quantized(
    leaves: list[cla.Array],
    queue: cl.CommandQueue,
    start: float,
    signed: bool,
    min_size: int,
) -> list[Any]:
    """Fresh 8-bit state for params ``leaves`` (float16 or float32), every element ``start``
    (as quantized): a :class:`QuantizedState` per leaf of at least ``min_size`` elements
    (codes and absmax each packed in one buffer per params dtype), a float32 array for the
    others (packed). Inside ``_slices.sliced`` (ZeRO), each dtype's one leaf is a slice of
    whole leaves, and gets a :class:`QuantizedSlice` of their pieces."""
    out: list[Any] = [None] * len(leaves)
    by_dtype: dict[np.dtype, list[int]] = {}
    for j, x in enumerate(leaves):
        if x.dtype == np.float64:
            raise ValueError("8-bit state needs float32 or float16 params (float64 given)")
        by_dtype.setdefault(x.dtype, []).append(j)
    for idx in by_dtype.values():
        if slices_active():
            s = slice_for(leaves, idx)
            if s is None:
                raise ValueError("8-bit state on a ZeRO slice: each dtype's leaf must be the "
                                 "slice of the packed parameters")  # fmt: skip
            pieces = slice_pieces(s.shapes, s.lo, s.hi)
            for n, _, first in pieces:
                if n >= min_size and first % BLOCK:
                    raise ValueError(
                        f"a ZeRO slice [{s.lo}, {s.hi}) starts at element {first} of a leaf, "
                        f"not at a {BLOCK}-element block of it, so its 8-bit blocks would not "
                        "be the unsharded ones (cut shards with distributed.shard_bounds)"
                    )
            states = _allocate(
                [(m,) for _, m, _ in pieces], [n >= min_size for n, _, _ in pieces],
                queue, start, signed,
            )  # fmt: skip
            out[idx[0]] = QuantizedSlice(tuple(states))
            continue
        shapes = [leaves[j].shape for j in idx]
        states = _allocate(shapes, [leaves[j].size >= min_size for j in idx], queue, start, signed)
        for j, y in zip(idx, states, strict=True):
            out[j] = y
    return out


def _allocate(
    shapes: list[tuple[int, ...]],
    quantized: list[bool],
    queue: cl.CommandQueue,
    start: float,
    signed: bool,
) -> list[Any]:
    """State for leaves of ``shapes``, every element ``start``: a :class:`QuantizedState`
    where ``quantized`` (codes and absmax each packed in one buffer), else a float32 array
    (packed)."""
    out: list[Any] = [None] * len(shapes)
    big = [j for j, q in enumerate(quantized) if q]
    small = [j for j, q in enumerate(quantized) if not q]
    if big:
        codes1, absmax1 = quantize(np.array([start], F32), signed)
        codes = layout(tuple(shapes[j] for j in big), U8).allocate(queue)
        codes.fill(queue, codes1[0])
        sizes = (int(np.prod(shapes[j])) for j in big)
        absmax = layout(tuple((n_blocks(n),) for n in sizes), F32).allocate(queue)
        absmax.fill(queue, absmax1[0])
        for j, c, a in zip(big, codes.views, absmax.views, strict=True):
            out[j] = QuantizedState(c, a, signed)
    if small:
        plain = layout(tuple(shapes[j] for j in small), F32).allocate(queue)
        plain.fill(queue, start)
        for j, v in zip(small, plain.views, strict=True):
            out[j] = v
    return out


def slice_pieces(
    shapes: tuple[tuple[int, ...], ...], lo: int, hi: int
) -> list[tuple[int, int, int]]:
    """The pieces of the leaves of ``shapes`` (laid end to end) that the elements ``[lo,
    hi)`` hold, in order: ``(leaf size, piece size, first element of the leaf)``."""
    out = []
    offset = 0
    for shape in shapes:
        n = int(np.prod(shape))
        a, b = max(offset, lo), min(offset + n, hi)
        if a < b:
            out.append((n, b - a, a - offset))
        offset += n
    return out


def stored_8bit(
    y: Any, size: int, signed: bool, min_size: int, pieces: list[Any] | None = None
) -> bool:
    """Whether ``y`` is the 8-bit state (``signed`` map, ``min_size``) that a leaf of
    ``size`` elements keeps, or, given its ``pieces`` (a ZeRO slice's: ``slice_pieces``),
    that slice keeps."""
    if pieces is not None:
        return (
            type(y) is QuantizedSlice
            and len(y.pieces) == len(pieces)
            and all(stored_8bit(p, n, signed, min_size)
                    for p, (n, _, _) in zip(y.pieces, pieces, strict=True))
        )  # fmt: skip
    if size >= min_size:
        return is_quantized(y) and y.signed == signed
    return not is_eight_bit(y)


def state_size(buf: Any) -> int:
    """A state buffer's element count: an array's, 8-bit state's codes', a ZeRO slice's
    pieces'."""
    if type(buf) is QuantizedSlice:
        return sum(map(state_size, buf.pieces))
    return int(buf.codes.size if is_quantized(buf) else buf.size)


def host_value(buf: Any) -> np.ndarray:
    """A state buffer's values on the host: an array's, or 8-bit state's dequantized
    (float32; a ZeRO slice's 8-bit state: its pieces' end to end)."""
    if type(buf) is QuantizedSlice:
        return np.concatenate([host_value(p).reshape(-1) for p in buf.pieces] +
                              [np.zeros(0, np.float32)])  # fmt: skip
    if is_quantized(buf):
        return dequantize(buf.codes.get(), buf.absmax.get(), buf.signed)
    return buf.get()


def set_value(buf: Any, value: np.ndarray) -> None:
    """Write host ``value`` (shaped like the buffer) into a state buffer: cast to an array's
    dtype (bfloat16: to nearest even), or quantized into 8-bit state."""
    if not state_size(buf):  # (pyopencl's set() refuses some empty arrays' strides)
        return
    if type(buf) is QuantizedSlice:
        flat, k = np.asarray(value).reshape(-1), 0
        for piece in buf.pieces:
            n = state_size(piece)
            set_value(piece, flat[k : k + n])
            k += n
        return
    if is_quantized(buf):
        codes, absmax = quantize(np.asarray(value, np.float32), buf.signed)
        buf.codes.set(codes.reshape(buf.codes.shape))
        buf.absmax.set(absmax)
    else:
        buf.set(np.require(value, dtype=buf.dtype, requirements="C").reshape(buf.shape))


def copy_params(states: list[Any], leaves: list[cla.Array], queue: cl.CommandQueue) -> None:
    """Fill each state buffer with its param's values (a slot that starts at
    ``_base.PARAMS``): a device copy where the dtypes match, else through the host (rounded
    to nearest even, or quantized)."""
    for y, x in zip(states, leaves, strict=True):
        if not x.size:
            continue
        if isinstance(y, cla.Array) and y.dtype == x.dtype:
            cl.enqueue_copy(queue, y.base_data, x.base_data, byte_count=x.nbytes,  # pyright: ignore[reportCallIssue, reportArgumentType]
                            src_offset=x.offset, dst_offset=y.offset)  # fmt: skip
        else:
            set_value(y, x.get())


# ---------------------------------------------------------------------------- the table


class BlockTable:
    """The rows of a step over leaves with ``shapes`` where ``quantized[j]`` says whether
    leaf ``j``'s state is 8-bit: per row ``(first element, block, elements, state
    position)``: a block of a quantized leaf (``block``: its absmax index; ``state
    position``: its first code) or a run of up to 256 elements of another leaf (``block``
    -1; ``state position``: its first element in the float32 state of those leaves). Element
    positions count in each array role's packed layout: all leaves (updates, params, slots
    kept whole), the quantized ones (codes; absmax in blocks), the others (plain state)."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], quantized: tuple[bool, ...]) -> None:
        self.shapes = shapes
        self.quantized = quantized
        big = tuple(s for s, q in zip(shapes, quantized, strict=True) if q)
        small = tuple(s for s, q in zip(shapes, quantized, strict=True) if not q)
        self.all = layout(shapes, F32)
        self.codes = layout(big, U8)
        self.absmax = layout(tuple((n_blocks(int(np.prod(s))),) for s in big), F32)
        self.plain = layout(small, F32)
        rows: list[tuple[int, int, int, int]] = []
        self.leaf_rows: list[tuple[int, int]] = []
        # per leaf, its first position in the codes, absmax and plain layouts (0 if none)
        self.positions: list[tuple[int, int, int]] = []
        qi = pi = 0
        for j, (first, n) in enumerate(zip(self.all.offsets, self.all.sizes, strict=True)):
            r0 = len(rows)
            if quantized[j]:
                c0, a0 = self.codes.offsets[qi], self.absmax.offsets[qi]
                rows += [(first + e, a0 + e // BLOCK, min(BLOCK, n - e), c0 + e)
                         for e in range(0, n, BLOCK)]  # fmt: skip
                self.positions.append((c0, a0, 0))
                qi += 1
            else:
                s0 = self.plain.offsets[pi]
                rows += [(first + e, -1, min(BLOCK, n - e), s0 + e) for e in range(0, n, BLOCK)]
                self.positions.append((0, 0, s0))
                pi += 1
            self.leaf_rows.append((r0, len(rows)))
        self.rows = np.array(rows, np.int64).reshape(-1, 4)
        self._device: dict[cl.Context, cla.Array] = {}

    def table(self, queue: cl.CommandQueue) -> cla.Array:
        """The rows on ``queue``'s device (uploaded once per context; never empty)."""
        t = self._device.get(queue.context)
        if t is None:
            host = self.rows if self.rows.size else np.zeros(4, np.int64)
            t = self._device[queue.context] = cla.to_device(queue, host)
            queue.finish()
        return t


_buckets: dict[cl.Context, cla.Array] = {}


def bucket_buffer(queue: cl.CommandQueue) -> cla.Array:
    """The quantization bucket tables on ``queue``'s device (uploaded once per context)."""
    t = _buckets.get(queue.context)
    if t is None:
        t = _buckets[queue.context] = cla.to_device(queue, bucket_host_table())
        queue.finish()
    return t


@lru_cache(maxsize=256)
def block_table(shapes: tuple[tuple[int, ...], ...], quantized: tuple[bool, ...]) -> BlockTable:
    return BlockTable(shapes, quantized)


# ---------------------------------------------------------------------------- checks


def _bad_slot(y: Any, x: cla.Array, ctx: cl.Context, quantized: bool | None) -> str | None:
    """Why ``y`` cannot be the 8-bit state of a leaf like ``x`` (``quantized``: whether the
    slot's other leaves of that size are), or None."""
    if is_quantized(y):
        if quantized is False:
            return "is 8-bit state where a leaf of its size keeps float32 state"
        c, a = y.codes, y.absmax
        if not (isinstance(c, cla.Array) and isinstance(a, cla.Array)):
            return "is 8-bit state whose codes or absmax is not a pyopencl.array.Array"
        if c.context != ctx or a.context != ctx:
            return "is 8-bit state on another OpenCL context"
        if c.dtype != U8 or c.shape != x.shape or not c.flags.c_contiguous:
            return f"has codes {c.dtype} {c.shape}, expected C-contiguous uint8 {x.shape}"
        want = (n_blocks(x.size),)
        if a.dtype != F32 or a.shape != want or not a.flags.c_contiguous:
            return f"has absmax {a.dtype} {a.shape}, expected C-contiguous float32 {want}"
        if not isinstance(y.signed, (bool, np.bool_)):
            return f"has signed={y.signed!r}, not a bool"
        return None
    if quantized is True:
        return "is a float32 array where a leaf of its size keeps 8-bit state"
    if not isinstance(y, cla.Array):
        return f"is a {type(y).__name__}, not a pyopencl.array.Array"
    if y.context != ctx:
        return "belongs to another OpenCL context"
    if y.dtype != F32 or y.shape != x.shape or not y.flags.c_contiguous:
        return f"has {y.dtype} {y.shape}, expected C-contiguous float32 {x.shape}"
    return None


# ---------------------------------------------------------------------------- the step


def run_quantized(
    parts: Sequence[Part],
    u_leaves: list[cla.Array],
    p_leaves: list[cla.Array],
    slot_leaves: list[list[list[Any]]],
    treedef: optree.PyTreeSpec,
    queue: cl.CommandQueue,
    *,
    apply: bool,
    inplace: bool,
    names: list[list[str]],
    launched: list[Any] | None = None,
    origins: Any = None,
) -> tuple[list[Any], list[list[list[Any]]]]:
    """One fused step of ``parts`` whose slots hold 8-bit state (checked first: raises
    naming the leaf, nothing written): ``(output leaves, new slot leaves)``. Pure, every
    output is fresh; in place, params and state are written where they are. ``names``: each
    slot's name in errors; ``launched`` (if given) receives the launches' array arguments
    (for the in-place cache); ``origins``: per dtype, the element index of the first element
    (``_fused.element_origin``)."""
    fragments = [p.fragment for p in parts]
    for f in fragments:
        if f.segment_reduction is not None:
            raise ValueError(
                f"{f.name}: 8-bit state serves element-wise rules (not values per leaf or row)"
            )
    pieces = _pieces(u_leaves, slot_leaves)
    if pieces:  # ZeRO slices: their pieces are the leaves of the step
        split = _Split(pieces, queue)
        out, new = run_quantized(
            parts, split.arrays(u_leaves), split.arrays(p_leaves),
            [[split.slot(leaves) for leaves in per] for per in slot_leaves], treedef, queue,
            apply=apply, inplace=inplace, names=names, launched=launched, origins=origins,
        )  # fmt: skip
        merged = split.merge_arrays(out, p_leaves if inplace and apply else None, u_leaves)
        slots = [
            [split.merge_slot(ys, old, inplace) for ys, old in zip(per, olds, strict=True)]
            for per, olds in zip(new, slot_leaves, strict=True)
        ]
        return merged, slots
    by_dtype: dict[np.dtype, list[int]] = {}
    for j, x in enumerate(u_leaves):
        by_dtype.setdefault(x.dtype, []).append(j)
    if np.dtype(np.float64) in by_dtype:
        raise TypeError("8-bit state needs float32 or float16 updates (float64 given)")
    slots = [leaves for per in slot_leaves for leaves in per]
    kinds, mask = _check_slots(slots, [n for ns in names for n in ns], u_leaves, queue.context)
    step = _Step(fragments, slots, kinds, mask, queue, apply, inplace)
    step.needs_params = apply or any(f.needs_params for f in fragments)
    out_leaves: list[Any] = [None] * len(u_leaves)
    new_slots: list[list[Any]] = [[None] * len(u_leaves) for _ in slots]
    reductions = reduce_parts(parts, u_leaves, queue)
    launches = []
    for dtype, idx in by_dtype.items():
        origin = (origins or {}).get(dtype, 0)
        launches += step.group(dtype, idx, u_leaves, p_leaves, out_leaves, new_slots, origin)
    values = reductions
    for part in parts:
        values.extend(part.scalars)
    if launched is not None:
        launched.extend(launches)
    launch_all(queue, [(kernel, n, a + values) for kernel, n, a in launches], False)
    per_part: list[list[list[Any]]] = []
    s = 0
    for per in slot_leaves:
        per_part.append(new_slots[s : s + len(per)])
        s += len(per)
    return out_leaves, per_part


def _pieces(u_leaves: list[Any], slot_leaves: list[list[list[Any]]]) -> dict[int, list[int]]:
    """Per leaf that a slot holds as a :class:`QuantizedSlice` (a ZeRO slice), the sizes
    of its pieces; raises where they do not add up to the leaf."""
    out: dict[int, list[int]] = {}
    for per in slot_leaves:
        for leaves in per:
            for j, y in enumerate(leaves):
                if type(y) is not QuantizedSlice:
                    continue
                sizes = [int(p.codes.size if is_quantized(p) else p.size) for p in y.pieces]
                if sum(sizes) != u_leaves[j].size or out.get(j, sizes) != sizes:
                    raise ValueError(
                        f"leaf {j}'s 8-bit slice state has pieces of {sizes} elements, for "
                        f"{u_leaves[j].size} elements{'' if j not in out else f' ({out[j]})'}"
                    )
                out[j] = sizes
    return out


class _Split:
    """A step's ZeRO slices cut into their pieces (views), and its results put back."""

    def __init__(self, pieces: dict[int, list[int]], queue: cl.CommandQueue) -> None:
        self.pieces, self.queue = pieces, queue

    def arrays(self, leaves: list[Any]) -> list[Any]:
        """``leaves`` (1-D arrays, or none) with each sliced one replaced by its pieces."""
        out: list[Any] = []
        for j, x in enumerate(leaves):
            sizes = self.pieces.get(j)
            if sizes is None:
                out.append(x)
                continue
            lay = layout(tuple((n,) for n in sizes), x.dtype)
            out += lay.views_of(x.queue or self.queue, x.base_data, x.offset) if sizes else []
        return out

    def slot(self, leaves: list[Any]) -> list[Any]:
        out: list[Any] = []
        for j, y in enumerate(leaves):
            if type(y) is QuantizedSlice:
                out += list(y.pieces)
            else:
                out += self.arrays([y]) if j in self.pieces else [y]
        return out

    def _groups(self, n: int) -> list[tuple[int, int, int]]:
        """Per leaf of the step before the split: ``(leaf, first, end)`` among the pieces."""
        out, k = [], 0
        for j in range(n):
            m = len(self.pieces[j]) if j in self.pieces else 1
            out.append((j, k, k + m))
            k += m
        return out

    def _one(self, ys: list[Any], a: int, b: int, like: Any) -> Any:
        """Pieces ``ys[a:b]`` of a fresh packed output as one 1-D array like ``like``."""
        if b > a:
            return whole_view(ys[a], 0, like.size)
        return cla.empty(self.queue, like.shape, like.dtype)

    def merge_arrays(self, out: list[Any], inplace: list[Any] | None, like: list[Any]) -> list[Any]:
        """The step's output per leaf: a sliced leaf's pieces as one 1-D array (fresh ones
        are packed, end to end), or the params' own leaf when written ``inplace``."""
        return [
            out[a] if j not in self.pieces else inplace[j] if inplace is not None
            else self._one(out, a, b, like[j])
            for j, a, b in self._groups(len(like))
        ]  # fmt: skip

    def merge_slot(self, ys: list[Any], old: list[Any], inplace: bool) -> list[Any]:
        """A slot's new leaves: a sliced leaf's pieces as a :class:`QuantizedSlice`, or as
        one 1-D array (a slot kept whole: the old one when written ``inplace``)."""
        return [
            ys[a] if j not in self.pieces
            else QuantizedSlice(tuple(ys[a:b])) if type(old[j]) is QuantizedSlice
            else old[j] if inplace else self._one(ys, a, b, old[j])
            for j, a, b in self._groups(len(old))
        ]  # fmt: skip


def _check_slots(
    slots: list[list[Any]], names: list[str], u_leaves: list[cla.Array], ctx: cl.Context
) -> tuple[list[str], list[bool]]:
    """Each slot's kind (``"q8s"``, ``"q8u"``, or ``""`` for a slot kept whole) and which
    leaves are quantized (as every quantized slot must agree); raises naming the leaf."""
    mask: list[bool] | None = None
    kinds: list[str] = []
    for leaves, name in zip(slots, names, strict=True):
        q: list[bool] = [is_quantized(y) for y in leaves]
        if not any(q):
            kinds.append("")
            continue
        mask = mask or q
        signs = {bool(y.signed) for y in leaves if is_quantized(y)}
        if len(signs) != 1:
            raise ValueError(f"{name}: 8-bit state with both the signed and the unsigned map")
        kinds.append("q8s" if signs.pop() else "q8u")
    if mask is None:  # (a ZeRO slice without pieces of 8-bit parameters)
        mask = [False] * len(u_leaves)
    for leaves, name, kind in zip(slots, names, kinds, strict=True):
        for j, (y, x) in enumerate(zip(leaves, u_leaves, strict=True)):
            if kind:
                bad = _bad_slot(y, x, ctx, mask[j])
            elif not isinstance(y, cla.Array) or y.context != ctx:
                bad = "is not a pyopencl.array.Array on the updates' context"
            elif y.shape != x.shape or not y.flags.c_contiguous:
                bad = f"has shape {y.shape}, expected C-contiguous {x.shape}"
            else:
                bad = None
            if bad is not None:
                raise (TypeError if "not a" in bad else ValueError)(f"leaf {j} of {name} {bad}")
    return kinds, mask


class _Step:
    """One step's kernel and launches per dtype group (see :func:`run_quantized`)."""

    def __init__(
        self,
        fragments: list[Any],
        slots: list[list[Any]],
        kinds: list[str],
        mask: list[bool],
        queue: cl.CommandQueue,
        apply: bool,
        inplace: bool,
    ) -> None:
        self.fragments, self.slots, self.kinds, self.mask = fragments, slots, kinds, mask
        self.queue, self.apply, self.inplace = queue, apply, inplace
        self.needs_params = apply

    def group(
        self,
        dtype: np.dtype,
        idx: list[int],
        u_leaves: list[Any],
        p_leaves: list[Any],
        out_leaves: list[Any],
        new_slots: list[list[Any]],
        origin: int = 0,
    ) -> list[tuple[cl.Kernel, int, list[Any]]]:
        """The launches over the leaves ``idx`` (of ``dtype``); fills their outputs and new
        slots (fresh arrays when pure)."""
        queue, mask = self.queue, self.mask
        table = block_table(tuple(u_leaves[j].shape for j in idx), tuple(mask[j] for j in idx))
        storage = tuple(
            kind or storage_of(leaves[idx[0]].dtype)
            for kind, leaves in zip(self.kinds, self.slots, strict=True)
        )
        mode = "inplace" if self.inplace else "pure"
        inplace_params = self.inplace and self.apply
        spec = KernelSpec(
            tuple(f.key for f in self.fragments), dtype, mode, self.apply, self.needs_params,
            acc_ctype(queue), "blocks", None, storage,
        )  # fmt: skip
        kernel, args = fused_kernel(queue.context, self.fragments, spec)
        # each array role: (name, per-leaf arrays (None: the leaf has none), its layout)
        roles: list[tuple[str, list[Any], Any]] = []
        every = list(range(len(idx)))

        def fresh(lay: Any, which: list[int]) -> list[Any]:
            out: list[Any] = [None] * len(idx)
            for g, v in zip(which, lay.allocate(queue).views, strict=True):
                out[g] = v
            return out

        lay = layout(table.all.shapes, dtype)  # (the updates' and params' own dtype)
        roles.append((U_IN, [u_leaves[j] for j in idx], lay))
        if self.needs_params:
            roles.append((P_IN, [p_leaves[j] for j in idx], lay))
        outs = roles[-1][1] if inplace_params else fresh(lay, every)
        if not inplace_params:
            roles.append((OUT, outs, lay))
        for j, o in zip(idx, outs, strict=True):
            out_leaves[j] = o
        qpos = [g for g, j in enumerate(idx) if mask[j]]
        ppos = [g for g, j in enumerate(idx) if not mask[j]]
        for s, (leaves, kind) in enumerate(zip(self.slots, self.kinds, strict=True)):
            k, slot = _part_slot(self.fragments, s)
            group = [leaves[j] for j in idx]
            news = group
            for io in ("in", "out") if mode == "pure" else ("",):
                base = slot_arg(slot, k, io)
                if not kind:
                    whole = layout(table.all.shapes, group[0].dtype)
                    news = fresh(whole, every) if io == "out" else group
                    roles.append((base, news, whole))
                    continue
                if io != "out":
                    codes = [y.codes if is_quantized(y) else None for y in group]
                    absmax = [y.absmax if is_quantized(y) else None for y in group]
                    plain = [None if is_quantized(y) else y for y in group]
                else:
                    codes, absmax = fresh(table.codes, qpos), fresh(table.absmax, qpos)
                    plain = fresh(table.plain, ppos)
                roles.append((codes_arg(base), codes, table.codes))
                roles.append((absmax_arg(base), absmax, table.absmax))
                roles.append((plain_arg(base), plain, table.plain))
                news = [QuantizedState(c, a, kind == "q8s") if c is not None else pl
                        for c, a, pl in zip(codes, absmax, plain, strict=True)]  # fmt: skip
            for j, y in zip(idx, news, strict=True):
                new_slots[s][j] = y
        return _launches(kernel, args, roles, table, queue, origin)


def state_arrays(slot_leaves: list[list[list[Any]]]) -> list[list[Any]]:
    """The arrays of a step's slots, one list per array role (a slot's codes, absmax and
    float32 arrays; a slot kept whole), for the in-place cache's keys."""
    out = []
    for per in slot_leaves:
        for slot in per:
            leaves = [p for y in slot for p in (y.pieces if type(y) is QuantizedSlice else (y,))]
            if any(map(is_quantized, leaves)):
                out.append([y.codes if is_quantized(y) else y for y in leaves])
                out.append([y.absmax for y in leaves if is_quantized(y)])
            else:
                out.append(list(leaves))
    return out


def _part_slot(fragments: Sequence[Any], s: int) -> tuple[int, str]:
    """The part and slot name of the ``s``-th slot of the step (parts' slots in order)."""
    for k, f in enumerate(fragments):
        if s < len(f.slots):
            return k, f.slots[s]
        s -= len(f.slots)
    raise IndexError(s)


def _position(table: BlockTable, lay: Any, g: int) -> int:
    """Leaf ``g``'s first position in ``lay`` (one of the table's layouts)."""
    c0, a0, s0 = table.positions[g]
    if lay is table.codes:
        return c0
    if lay is table.absmax:
        return a0
    if lay is table.plain:
        return s0
    return table.all.offsets[g]


def _launches(
    kernel: cl.Kernel,
    args: list[Any],
    roles: list[tuple[str, list[Any], Any]],
    table: BlockTable,
    queue: cl.CommandQueue,
    origin: int = 0,
) -> list[tuple[cl.Kernel, int, list[Any]]]:
    """One launch over every row where each role's arrays are packed (in its layout's
    order), else one per leaf (each array at its offset less its leaf's position)."""
    by_name = {name: (leaves, lay) for name, leaves, lay in roles}
    fixed_names = (BLOCKS, BUCKETS_ARG, INDEX)
    order = [a.name for a in args
             if a.name in fixed_names or (a.kind == "buffer" and a.name in by_name)]  # fmt: skip
    rows = table.table(queue).base_data
    buckets = bucket_buffer(queue).base_data
    n_rows = len(table.rows)
    runs = {}
    for name, (leaves, lay) in by_name.items():
        present = [x for x in leaves if x is not None]
        runs[name] = contiguous_run(present, lay) if present else (rows, 0)
    fallback = next(x for x in by_name[U_IN][0])
    if all(run is not None for run in runs.values()):
        flat: list[Any] = []
        for name in order:
            fixed = {BLOCKS: [rows, 0], BUCKETS_ARG: [buckets, 0], INDEX: [buckets, origin]}
            flat += fixed[name] if name in fixed else list(runs[name])
        return [(kernel, Single(n_rows), flat)] if n_rows else []
    out = []
    for g, (r0, r1) in enumerate(table.leaf_rows):
        if r1 <= r0:
            continue
        flat = []
        for name in order:
            if name == BLOCKS:
                flat += [rows, r0]
                continue
            if name == BUCKETS_ARG:
                flat += [buckets, 0]
                continue
            if name == INDEX:  # (a buffer not read: the offset is the first element's index)
                flat += [buckets, origin]
                continue
            leaves, lay = by_name[name]
            x = leaves[g]
            if x is None:  # (this leaf's rows never read it)
                flat += [fallback.base_data, 0]
            else:
                flat += [x.base_data, element_offset(x) - _position(table, lay, g)]
        out.append((kernel, Single(r1 - r0), flat))
    return out
