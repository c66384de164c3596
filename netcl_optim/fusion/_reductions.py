"""Whole-tree reductions (norms, finiteness) into a small device buffer: no host sync."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._base import Part
from .._device import allocator, has_fp64
from .._packing import contiguous_run, element_offset
from ._launch import note_launches
from ._programs import finish_kernel, reduce_kernel

_acc: dict[cl.CommandQueue, str] = {}


def acc_ctype(queue: cl.CommandQueue) -> str:
    """C type of reduction results on ``queue``'s device."""
    acc = _acc.get(queue)
    if acc is None:
        acc = _acc[queue] = "double" if has_fp64(queue.device) else "float"
    return acc


def reduce_leaves(
    queue: cl.CommandQueue,
    leaves: Sequence[cla.Array],
    op: str,
    finish: str,
    s0: float = 0.0,
    pw: float = 2.0,
) -> cla.Array:
    """Reduce all ``leaves`` to a small device array (see ``Reduction``): no host sync.

    Device: one partials launch per dtype where the leaves are packed (else per leaf), then
    one finishing launch.
    """
    acc = acc_ctype(queue)
    acc_dtype = np.float64 if acc == "double" else np.float32
    ctx = queue.context
    by_dtype: dict[np.dtype, list[cla.Array]] = {}
    for x in leaves:
        if x.size:
            by_dtype.setdefault(x.dtype, []).append(x)
    runs: list[tuple[np.dtype, Any, int, int]] = []  # dtype, buffer, offset, n
    for dtype, xs in by_dtype.items():
        packed = contiguous_run(xs)
        if packed is not None:
            runs.append((dtype, packed[0], packed[1], sum(x.size for x in xs)))
        else:
            runs.extend((dtype, x.base_data, element_offset(x), x.size) for x in xs)
    total = sum(r[3] for r in runs)
    chunk = max(4096, -(-total // 512))
    counts = [-(-r[3] // chunk) for r in runs]
    pool = allocator(queue)
    partials = cla.empty(queue, (2 * max(sum(counts), 1),), acc_dtype, allocator=pool)
    out = cla.empty(queue, (2,), acc_dtype, allocator=pool)
    p_off = 0
    for (dtype, base, off, n), count in zip(runs, counts, strict=True):
        kernel = reduce_kernel(ctx, op, dtype, acc)
        note_launches(kernel.function_name)
        kernel(queue, (count,), (1,), base, off, n, chunk, partials.base_data, p_off, pw)  # pyright: ignore[reportArgumentType]
        p_off += count
    finisher = finish_kernel(ctx, op, finish, acc)
    note_launches(finisher.function_name)
    finisher(queue, (1,), (1,), partials.base_data, p_off, out.base_data, s0, pw)  # pyright: ignore[reportArgumentType]
    return out


def reduce_parts(parts: Sequence[Part], u_leaves: list[Any], queue: cl.CommandQueue) -> list:
    """The result buffers of the reduction that starts a segment of ``parts`` (run now), if
    any: what the fused kernel reads for it."""
    buffers: list[Any] = []
    for k, part in enumerate(parts):
        red = part.fragment.reduction
        if red is not None:
            if k != 0:
                raise AssertionError("a reduction must start a segment")
            values = dict(zip(part.fragment.scalars, part.scalars, strict=True))
            s0 = float(values.get(red.scalars[0], 0.0)) if red.scalars else 0.0
            pw = float(values.get("norm_type", 2.0))
            buffers.append(reduce_leaves(queue, u_leaves, red.op, red.finish, s0, pw).base_data)
    return buffers
