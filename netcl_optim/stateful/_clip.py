"""Gradient clipping in place on the ``.grad`` of parameters: clip_grad_norm (host, returns
a float), clip_grad_norm_device (no host sync), and torch.nn.utils' names and signatures:
clip_grad_norm_, get_total_norm, clip_grads_with_norm_ and clip_grad_value_."""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._device import allocator, check_float_dtype, queue_of
from .._packing import contiguous_run, element_offset
from .._validation import BOOL, Rule, number, real, require
from ..fusion import acc_ctype, clip_scale, reduce_leaves
from ..fusion._kernels import clamp_value, clip_coefficient

_EPS = 1e-6  # torch: clip_coef = max_norm / (total_norm + 1e-6)


def _grads(parameters: Any, where: str = "clip_grad_norm") -> list[cla.Array]:
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
        if p.grad is not None:
            grads.append(_array(p.grad, f"parameters[{i}].grad"))
    return _checked_dtypes(grads, where)


def _tensors(tensors: Any) -> list[cla.Array]:
    """``tensors`` (one device array or an iterable of them) as a checked list."""
    if isinstance(tensors, cla.Array):
        tensors = [tensors]
    elif not isinstance(tensors, Iterable):
        raise TypeError(
            f"tensors must be a device array or an iterable of them, got {type(tensors).__name__}"
        )
    arrays = [_array(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    return _checked_dtypes(arrays, "get_total_norm")


def _array(x: Any, label: str) -> cla.Array:
    if not isinstance(x, cla.Array):
        raise TypeError(f"{label} is a {type(x).__name__}, not a pyopencl.array.Array")
    if not x.flags.c_contiguous:
        raise ValueError(f"{label} is not C-contiguous")
    return x


def _checked_dtypes(arrays: list[cla.Array], where: str) -> list[cla.Array]:
    if arrays:
        queue = queue_of(arrays)
        for x in arrays:
            check_float_dtype(x.dtype, queue, where)
    return arrays


_AT_LEAST_ZERO = number("a number >= 0", lambda f: f >= 0)
_NORM_TYPE = number("a number > 0, or inf", lambda f: f > 0)
_TOTAL_NORM = Rule("a one-element device array or a number", real)


def _norm_args(max_norm: float, norm_type: float) -> tuple[float, float]:
    return require("max_norm", max_norm, _AT_LEAST_ZERO), require(
        "norm_type", norm_type, _NORM_TYPE
    )


def _check_foreach(foreach: bool | None) -> None:
    """torch's ``foreach``: None or a bool, and nothing more here (each packed run of grads
    is one launch whichever it is)."""
    if foreach is not None:
        require("foreach", foreach, BOOL)


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
    queue = queue_of(grads)
    if not any(g.size for g in grads):
        return _zeros(queue, (1,))
    red = _reduce_norm(queue, grads, norm_type, "clip", max_norm)
    if error_if_nonfinite:
        _raise_if_nonfinite(red[:1], norm_type)
    _scale_runs(queue, grads, red)
    return red[:1]


def _zeros(queue: cl.CommandQueue, shape: tuple[int, ...]) -> cla.Array:
    """A zero norm in the reduction type of ``queue`` (one fill, no launch)."""
    acc_dtype = _acc_dtype(queue)
    zero = cla.empty(queue, shape, acc_dtype, allocator=allocator(queue))
    cl.enqueue_fill_buffer(queue, zero.base_data, acc_dtype(0), zero.offset, zero.nbytes)  # pyright: ignore[reportArgumentType]
    return zero


def _acc_dtype(queue: cl.CommandQueue) -> type[np.floating]:
    return np.float64 if acc_ctype(queue) == "double" else np.float32


def _reduce_norm(
    queue: cl.CommandQueue, arrays: list[cla.Array], norm_type: float, finish: str, s0: float
) -> cla.Array:
    """The ``reduce_leaves`` result of the ``norm_type`` norm of ``arrays``: ``[norm,
    coefficient]`` (finish ``"clip"``, ``s0`` the max norm) or ``[norm, ?]`` (``"norm"``)."""
    if norm_type == math.inf:
        op = "maxabs"
    elif norm_type == 2.0:
        op = "sumsq"
    elif norm_type == 1.0:
        op = "sumabs"
    else:
        op = "sumpow"
    return reduce_leaves(queue, arrays, op, finish, s0=s0, pw=norm_type)


def _raise_if_nonfinite(norm: cla.Array, norm_type: float) -> None:
    """Raise torch's RuntimeError if the one-element ``norm`` is not finite (one read)."""
    if not math.isfinite(float(norm.get().reshape(-1)[0])):
        raise _nonfinite_error(norm_type)


def _scale_runs(queue: cl.CommandQueue, grads: list[cla.Array], red: cla.Array) -> None:
    """``g *= red[1]`` for every grad: one launch per packed run (else per grad)."""
    for dtype, buf, off, xs in _runs(grads):
        n = sum(x.size for x in xs)
        if n:
            clip_scale(queue, dtype, buf, off, n, red.base_data)


# ---------------------------------------------------------------------------- torch's names


def clip_grad_norm_(
    parameters: Any,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> cla.Array:
    """torch.nn.utils.clip_grad_norm_: scale every non-None ``.grad`` in place by
    ``min(1, max_norm / (total + 1e-6))`` and return ``total``, the ``norm_type`` norm of
    all the grads together, as a 0-d device array (torch returns a 0-d tensor), unread.

    :func:`clip_grad_norm_device` (same rule, same launches) with torch's signature and a
    0-d result; :func:`get_total_norm` then :func:`clip_grads_with_norm_` give the same
    grads. The norm is float64 where the device has fp64 (torch: the grads' dtype).

    How it differs from torch: ``max_norm < 0``, a NaN ``max_norm`` and ``norm_type <= 0``
    are errors (torch flips or NaNs the grads, or computes a 0-"norm"); an empty grad adds 0
    to an ``inf`` norm (torch raises). ``foreach`` is checked (None or a bool) and
    otherwise ignored: each packed run of grads is one launch anyway. As in torch, an empty
    generator of parameters warns.

    Device:
      No host read unless ``error_if_nonfinite=True`` (torch syncs then too): one 8-byte
      read of the norm before any grad is scaled.
    """
    _check_foreach(foreach)
    if isinstance(parameters, types.GeneratorType):
        parameters = list(parameters)
        if not parameters:
            warnings.warn(
                "`parameters` is an empty generator, no gradient clipping will occur.",
                stacklevel=2,
            )
    return clip_grad_norm_device(parameters, max_norm, norm_type, error_if_nonfinite)[0]


def get_total_norm(
    tensors: Any,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> cla.Array:
    """torch.nn.utils.get_total_norm: the ``norm_type`` norm of all ``tensors`` (device
    arrays, or one) together, as if concatenated, as a 0-d device array (float64 where the
    device has fp64), unread. An empty set has norm 0.

    ``error_if_nonfinite=True`` reads the norm back (8 bytes) and raises RuntimeError if it
    is NaN or inf. ``foreach``: checked, then ignored. Differs from torch as
    :func:`clip_grad_norm_` does (``norm_type > 0``; empty arrays allowed with ``inf``).

    Device:
      One reduction: a partials launch per dtype where the arrays are packed (else per
      array) and one finishing launch; none for an empty set (a fill).
    """
    _check_foreach(foreach)
    norm_type = require("norm_type", norm_type, _NORM_TYPE)
    arrays = _tensors(tensors)
    queue = queue_of(arrays)
    if not any(x.size for x in arrays):
        return _zeros(queue, ())
    norm = _reduce_norm(queue, arrays, norm_type, "norm", 0.0)[0]
    if error_if_nonfinite:
        _raise_if_nonfinite(norm, norm_type)
    return norm


def clip_grads_with_norm_(
    parameters: Any,
    max_norm: float,
    total_norm: cla.Array | float,
    foreach: bool | None = None,
) -> None:
    """torch.nn.utils.clip_grads_with_norm_: scale every non-None ``.grad`` in place by
    ``min(1, max_norm / (total_norm + 1e-6))`` (NaN stays NaN, the coefficient is always
    multiplied in: no branch, no host sync).

    ``total_norm``: a one-element device array (0-d or shape (1,), as
    :func:`get_total_norm` returns; any float dtype) or a real number (torch wants a tensor);
    the coefficient is computed in the reduction type (float64 where the device has fp64).
    ``max_norm >= 0``; ``foreach``: checked, then ignored.

    Device:
      A device ``total_norm``: one single-work-item launch computes the coefficient, then
      one scaling launch per packed run of grads (else per grad). A number: the
      coefficient is computed on the host and written (no read), then the scaling launches.
    """
    _check_foreach(foreach)
    max_norm = require("max_norm", max_norm, _AT_LEAST_ZERO)
    grads = _grads(parameters, "clip_grads_with_norm_")
    total = _total_norm_arg(total_norm)
    if not any(g.size for g in grads):
        return
    queue = queue_of(grads)
    acc_dtype = _acc_dtype(queue)
    if isinstance(total, cla.Array):
        coef = cla.empty(queue, (2,), acc_dtype, allocator=allocator(queue))
        clip_coefficient(total, max_norm, coef)
    else:
        host = np.array([total, _coefficient(total, max_norm)], acc_dtype)
        coef = cla.to_device(queue, host, allocator=allocator(queue), async_=True)
    _scale_runs(queue, grads, coef)


def _total_norm_arg(total_norm: Any) -> cla.Array | float:
    if isinstance(total_norm, cla.Array):
        if total_norm.size != 1:
            raise ValueError(
                f"Invalid total_norm: an array of shape {total_norm.shape} "
                "(must be a one-element device array or a number)"
            )
        check_float_dtype(total_norm.dtype, total_norm.queue, "clip_grads_with_norm_")  # pyright: ignore[reportArgumentType]
        return total_norm
    return require("total_norm", total_norm, _TOTAL_NORM)


def clip_grad_value_(parameters: Any, clip_value: float, foreach: bool | None = None) -> None:
    """torch.nn.utils.clip_grad_value_: clamp every non-None ``.grad`` in place to
    ``[-clip_value, clip_value]``; NaN stays NaN (half grads are clamped in float and
    rounded back, as torch does).

    ``clip_value`` must be a number >= 0 (``inf``: no change); torch also takes a negative
    one, which sets every element to ``clip_value``. ``foreach``: checked, then ignored.

    Device:
      One launch per packed run of grads (else per grad); no host sync.
    """
    _check_foreach(foreach)
    clip_value = require("clip_value", clip_value, _AT_LEAST_ZERO)
    grads = _grads(parameters, "clip_grad_value_")
    if not grads:
        return
    queue = queue_of(grads)
    for dtype, buf, off, xs in _runs(grads):
        clamp_value(queue, dtype, buf, off, sum(x.size for x in xs), clip_value)
