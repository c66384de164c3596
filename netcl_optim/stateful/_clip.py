"""clip_grad_norm (host, returns a float) and clip_grad_norm_device (no host sync), in place
on the ``.grad`` of parameters, with torch's ``clip_grad_norm_`` coefficient."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._device import allocator, check_float_dtype, default_queue, queue_of
from .._packing import contiguous_run, element_offset
from .._validation import number, require
from ..fusion import acc_ctype, clip_scale, reduce_leaves

_EPS = 1e-6  # torch: clip_coef = max_norm / (total_norm + 1e-6)


def _grads(parameters: Any) -> list[cla.Array]:
    """The non-None ``.grad`` arrays of ``parameters`` (one object with ``.grad`` or an
    iterable of them), checked."""
    if hasattr(parameters, "grad"):
        parameters = [parameters]
    elif isinstance(parameters, cla.Array) or not isinstance(parameters, Iterable):
        raise TypeError(
            "parameters must be an object with a .grad attribute or an iterable of them, "
            f"got {type(parameters).__name__}"
        )
    grads = []
    for i, p in enumerate(parameters):
        if not hasattr(p, "grad"):
            raise TypeError(f"parameters[{i}] ({type(p).__name__}) has no .grad attribute")
        g = p.grad
        if g is None:
            continue
        if not isinstance(g, cla.Array):
            raise TypeError(
                f"parameters[{i}].grad is a {type(g).__name__}, not a pyopencl.array.Array"
            )
        if not g.flags.c_contiguous:
            raise ValueError(f"parameters[{i}].grad is not C-contiguous")
        grads.append(g)
    if grads:
        queue = queue_of(grads)
        for g in grads:
            check_float_dtype(g.dtype, queue, "clip_grad_norm")
    return grads


_MAX_NORM = number("a number >= 0", lambda f: f >= 0)
_NORM_TYPE = number("a number > 0, or inf", lambda f: f > 0)


def _norm_args(max_norm: float, norm_type: float) -> tuple[float, float]:
    return require("max_norm", max_norm, _MAX_NORM), require("norm_type", norm_type, _NORM_TYPE)


def _coefficient(total: float, max_norm: float) -> float:
    """torch: ``clamp(max_norm / (total + 1e-6), max=1)``; NaN stays NaN."""
    coef = max_norm / (total + _EPS)
    return coef if math.isnan(coef) else min(coef, 1.0)


def _nonfinite_error(norm_type: float) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
        "so it cannot be clipped. To disable this error and scale the gradients by the "
        "non-finite norm anyway, set `error_if_nonfinite=False`"
    )


def _runs(grads: list[cla.Array]) -> list[tuple[np.dtype, Any, int, list[cla.Array]]]:
    """``(dtype, buffer, element offset, arrays)``: one per dtype where the grads of that
    dtype lie back to back (packed), else one per non-empty array."""
    groups: dict[np.dtype, list[cla.Array]] = {}
    for g in grads:
        groups.setdefault(g.dtype, []).append(g)
    runs = []
    for dtype, xs in groups.items():
        packed = contiguous_run(xs)
        if packed is not None:
            runs.append((dtype, packed[0], packed[1], xs))
        else:
            runs.extend((dtype, x.base_data, element_offset(x), [x]) for x in xs if x.size)
    return runs


# ---------------------------------------------------------------------------- host


def _host_norm(values: list[np.ndarray], norm_type: float) -> float:
    """The total norm of float64 ``values``. A sum that overflows while every element is
    finite is summed again over ``|v| / m`` (``m``: the largest magnitude) and multiplied
    by ``m``, as the device does, so only a norm beyond float64 is inf."""
    total = _plain_norm(values, norm_type)
    if total == math.inf and norm_type != math.inf:
        largest = max(float(np.max(np.abs(v))) for v in values if v.size)
        if largest < math.inf:
            total = largest * _plain_norm([np.abs(v) / largest for v in values], norm_type)
    return total


def _plain_norm(values: list[np.ndarray], norm_type: float) -> float:
    if not values:
        return 0.0
    with np.errstate(all="ignore"):
        if norm_type == math.inf:
            return float(np.max([np.max(np.abs(v)) if v.size else 0.0 for v in values]))
        if norm_type == 2.0:
            return math.sqrt(sum(float(np.dot(v, v)) for v in values))
        if norm_type == 1.0:
            return float(sum(float(np.sum(np.abs(v))) for v in values))
        total = sum(float(np.sum(np.abs(v) ** norm_type)) for v in values)
        return float(total ** (1.0 / norm_type))


def clip_grad_norm(
    parameters: Any,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> float:
    """Scale the gradients of ``parameters`` in place so that their total norm is at most
    ``max_norm``, on the host; return the total norm before clipping, as a float.

    ``total = ||(||g_1||_p, ..., ||g_n||_p)||_p`` over the grads that are not ``None``
    (``norm_type=inf``: the largest absolute value; an empty set has norm 0), computed in
    float64; every grad is multiplied by ``min(1, max_norm / (total + 1e-6))`` in its
    compute type (float32 for half and float32 grads), as torch's ``clip_grad_norm_``
    does, branch-free: a zero norm is fine, a non-finite one gives a NaN or zero
    coefficient unless ``error_if_nonfinite`` raises RuntimeError first (grads untouched).

    Large gradients: a sum (of squares, of ``|g|**p``) that overflows float64 while every
    element is finite is summed again over ``|g| / m`` and multiplied by ``m`` (``m``: the
    largest magnitude), so the norm is finite whenever float64 can hold it
    (``[1e30, 1e30]`` has norm ``1.414e30`` and clips to ``0.707``). A norm beyond float64
    (``~1.8e308``), or an inf element, gives ``total = inf``: the coefficient is 0, finite
    grads become 0 and inf ones NaN (as in torch), unless ``error_if_nonfinite`` raises;
    NaN anywhere gives NaN.

    ``parameters``: an object with ``.grad`` (a device array or ``None``) or an iterable
    of them. Matches :func:`clip_grad_norm_device` to float32 rounding (to float64
    rounding for float64 grads), large gradients included.

    Device:
      Reads the grads to the host and writes them back: one blocking copy each way per
      packed run of grads (else per grad). Use :func:`clip_grad_norm_device` in loops.
    """
    max_norm, norm_type = _norm_args(max_norm, norm_type)
    grads = _grads(parameters)
    if not grads:
        return 0.0
    queue = queue_of(grads)
    runs = _runs(grads)
    hosts = []
    for dtype, buf, off, xs in runs:
        n = sum(x.size for x in xs)
        h = np.empty(n, dtype)
        if n:
            cl.enqueue_copy(queue, h, buf, src_offset=off * dtype.itemsize, is_blocking=True)
        hosts.append(h)
    wide = [h.astype(np.float64) for h in hosts]
    total = _host_norm(wide, norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise _nonfinite_error(norm_type)
    coef = _coefficient(total, max_norm)
    with np.errstate(all="ignore"):
        for (dtype, buf, off, _), h in zip(runs, hosts, strict=True):
            if not h.size:
                continue
            compute = np.float64 if dtype == np.float64 else np.float32
            scaled = (h.astype(compute) * compute(coef)).astype(dtype)
            cl.enqueue_copy(queue, buf, scaled, dst_offset=off * dtype.itemsize, is_blocking=True)
    return total


# ---------------------------------------------------------------------------- device


def clip_grad_norm_device(
    parameters: Any,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> cla.Array:
    """:func:`clip_grad_norm` computed entirely on the device; returns a one-element device
    array holding the total norm before clipping (float64 where the device has fp64, else
    float32), without reading it.

    Same rule as :func:`clip_grad_norm` (torch's ``clip_grad_norm_``), in place on every
    non-None ``.grad``. ``norm_type``: 2 (sum of squares), 1, ``inf`` (max abs) or any
    ``p > 0``.

    Large gradients are handled as on the host: a chunk whose sum overflows is summed
    again in the accumulator's type over ``|g| / m`` (``m``: the chunk's largest
    magnitude), and the chunks are combined scaled alike; ordinary gradients take the plain
    path, bit for bit. The norm is finite whenever the accumulator's type holds it:
    float64, or float32 (``~3.4e38``) on a device without fp64. Beyond that it is inf,
    with the same consequences as on the host.

    Device:
      One reduction for the whole set of grads (a partials launch per dtype when packed,
      else per grad, and one finishing launch that leaves ``[norm, coefficient]`` in a
      device buffer), then one scaling launch per packed run (else per grad) that reads the
      coefficient there. No host sync, except that ``error_if_nonfinite=True`` must read
      the norm (one 8-byte read) before scaling.
    """
    max_norm, norm_type = _norm_args(max_norm, norm_type)
    grads = _grads(parameters)
    queue = queue_of(grads) if grads else default_queue()
    acc = acc_ctype(queue)
    acc_dtype = np.float64 if acc == "double" else np.float32
    if not any(g.size for g in grads):
        zero = cla.empty(queue, (1,), acc_dtype, allocator=allocator(queue))
        cl.enqueue_fill_buffer(queue, zero.base_data, acc_dtype(0), zero.offset, zero.nbytes)
        return zero
    if norm_type == math.inf:
        op = "maxabs"
    elif norm_type == 2.0:
        op = "sumsq"
    elif norm_type == 1.0:
        op = "sumabs"
    else:
        op = "sumpow"
    red = reduce_leaves(queue, grads, op, "clip", s0=max_norm, pw=norm_type)
    if error_if_nonfinite and not math.isfinite(float(red[:1].get()[0])):
        raise _nonfinite_error(norm_type)
    for dtype, buf, off, xs in _runs(grads):
        n = sum(x.size for x in xs)
        if n:
            clip_scale(queue, dtype, buf, off, n, red.base_data)
    return red[:1]
