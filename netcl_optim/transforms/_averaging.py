"""Weight averaging over device trees: optax's ``incremental_update`` and ``periodic_update``,
and the in-place averages that ``stateful.AveragedParams`` (torch's ``swa_utils``) runs.

Each average is one fragment run by the executor: one fused launch per dtype for a packed
tree (one per leaf otherwise). optax's ``ema`` (of the updates) is in :mod:`._ema`.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._base import Fragment, Part
from .._device import queue_of
from .._packing import contiguous_run
from .._validation import CLOSED_UNIT, at_least, invalid, real, require
from ..fusion import run_parts

# optax: step_size * new + (1 - step_size) * old (p: old, u: new); 1 - step_size from the host
_INCREMENTAL = Fragment(
    "incremental_update",
    "u = step_size * u + one_minus_step_size * p;",
    scalars=("step_size", "one_minus_step_size"),
    needs_params=True,
)
# in place over the average (p), from the current values (u); the executor writes p + u
_LERP = Fragment("average_lerp", "u = weight * (u - p);", scalars=("weight",), needs_params=True)
# torch's get_ema_avg_fn: decay avg + (1 - decay) current, into the slot (in place)
_EMA_INTO = Fragment(
    "average_ema",
    "avg = one_minus_decay * u + decay * avg;",
    slots=("avg",),
    scalars=("one_minus_decay", "decay"),
)
_RUNNING_MEAN = Fragment(
    "average_running_mean", "u = (u - p) / count;", scalars=("count",), needs_params=True
)


def check_like(
    new: Any, old: Any, new_name: str, old_name: str, where: str
) -> tuple[list[cla.Array], list[cla.Array]]:
    """The leaves of two trees that must match: same structure, every leaf a device array of
    the same shape and dtype. Raises ``ValueError``/``TypeError`` naming the first
    difference; nothing runs."""
    new_leaves, new_def = optree.tree_flatten(new)
    old_leaves, old_def = optree.tree_flatten(old)
    if new_def != old_def:
        raise ValueError(
            f"{where}: {new_name} and {old_name} differ in structure: {new_def} vs {old_def}"
        )
    try:
        if [(a.shape, a.dtype) for a in new_leaves] == [(b.shape, b.dtype) for b in old_leaves]:
            if all(isinstance(x, cla.Array) for x in (*new_leaves, *old_leaves)):
                return new_leaves, old_leaves
    except AttributeError:
        pass
    for i, (a, b) in enumerate(zip(new_leaves, old_leaves, strict=True)):
        for name, x in ((new_name, a), (old_name, b)):
            if not isinstance(x, cla.Array):
                raise TypeError(
                    f"{where}: leaf {i} of {name} is a {type(x).__name__}, not a device array"
                )
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"{where}: leaf {i} is {a.dtype}{list(a.shape)} in {new_name} but "
                f"{b.dtype}{list(b.shape)} in {old_name}"
            )
    return new_leaves, old_leaves


def _step_size(step_size: Any) -> float:
    """A host number in [0, 1] (a device array would need a read-back: refused)."""
    if isinstance(step_size, cla.Array):
        raise TypeError(
            "Invalid step_size: a device array (must be a host number in [0, 1]: reading it "
            "back would stall the queue)"
        )
    return require("step_size", step_size, CLOSED_UNIT)


def incremental_update(new_tensors: Any, old_tensors: Any, step_size: float) -> Any:
    """optax's Polyak average: ``step_size * new + (1 - step_size) * old`` per leaf, in fresh
    buffers (pure; the inputs are untouched). Same signature as optax.

    ``step_size`` is a host number in [0, 1] (optax takes any array; a traced value has no
    host counterpart here). ``1 - step_size`` is computed on the host in double precision
    and passed as the kernel's scalar, as Python does for optax. ``None`` leaves stay
    ``None`` (both trees must have them at the same places).

    Device: one fused launch per dtype when both trees are packed (one per leaf otherwise).
    """
    a = _step_size(step_size)
    check_like(new_tensors, old_tensors, "new_tensors", "old_tensors", "incremental_update")
    if not optree.tree_leaves(new_tensors):
        return new_tensors
    part = Part(_INCREMENTAL, (a, 1.0 - a), ())
    out, _ = run_parts([part], new_tensors, old_tensors, apply=False, inplace=False)
    return out


def _host_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, cla.Array):
        raise TypeError(
            f"Invalid {name}: a device array (must be a host integer: reading it back would "
            "stall the queue)"
        )
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    return require(name, value, at_least(low))


def periodic_update(new_tensors: Any, old_tensors: Any, steps: int, update_period: int) -> Any:
    """optax's periodic copy: ``new_tensors`` when ``steps % update_period == 0``, else
    ``old_tensors`` (the trees themselves, as optax returns them; no launch).

    ``steps`` (>= 0) and ``update_period`` (>= 1) are host integers: the choice is made on
    the host (optax's ``lax.cond`` on the device). Both trees must have one structure,
    shapes and dtypes (optax's ``cond`` requires it too)."""
    steps = _host_int("steps", steps, 0)
    period = _host_int("update_period", update_period, 1)
    check_like(new_tensors, old_tensors, "new_tensors", "old_tensors", "periodic_update")
    return new_tensors if steps % period == 0 else old_tensors


# ---------------------------------------------------------------------------- in place


def _average_(averaged: list[cla.Array], current: list[cla.Array], part: Part) -> None:
    """``averaged <- averaged + u`` where ``part`` computes ``u`` from ``current`` (u) and
    ``averaged`` (p): in place, one launch per dtype and per buffer of ``current`` when the
    leaves are packed."""
    for lo, hi in _runs(current):
        run_parts([part], current[lo:hi], averaged[lo:hi], apply=True, inplace=True)


def _runs(leaves: list[cla.Array]) -> list[tuple[int, int]]:
    """Index ranges of consecutive leaves in one buffer (an optimizer packs each param group
    in buffers of its own): each range can be one launch per dtype."""
    runs: list[tuple[int, int]] = []
    bases = list(map(operator.attrgetter("base_data"), leaves))
    lo = 0
    for i in range(1, len(leaves) + 1):
        if i == len(leaves) or bases[i] is not bases[lo]:
            runs.append((lo, i))
            lo = i
    return runs


def copy_(dst: list[cla.Array], src: list[cla.Array]) -> None:
    """``dst <- src`` on the device: one copy per run of leaves that lie back to back in one
    buffer in both lists (a packed group: one copy), else one per leaf. No kernel launch."""
    for lo, hi in _runs(src):
        d, s = dst[lo:hi], src[lo:hi]
        run_d, run_s = contiguous_run(d), contiguous_run(s)
        if run_d is not None and run_s is not None and len({x.dtype for x in s}) == 1:
            _copy(d[0], s[0], s[-1].offset + s[-1].nbytes - s[0].offset)
            continue
        for x, y in zip(d, s, strict=True):
            _copy(x, y, y.nbytes)


def _copy(dst: cla.Array, src: cla.Array, nbytes: int) -> None:
    if nbytes:
        cl.enqueue_copy(queue_of(src), dst.base_data, src.base_data, byte_count=nbytes,  # pyright: ignore[reportCallIssue, reportArgumentType]
                        src_offset=src.offset, dst_offset=dst.offset)  # fmt: skip


def lerp_(averaged: list[cla.Array], current: list[cla.Array], weight: float) -> None:
    """``averaged <- averaged + weight * (current - averaged)`` in place (torch's ``lerp``
    with a weight below 0.5; torch switches to ``current - (current - averaged) * (1 -
    weight)`` from 0.5 on, and its vectorised CPU loop uses a fused multiply-add: the same
    value to an ulp or so)."""
    w = real(weight)
    if w is None:
        raise invalid("weight", weight, "a host number")
    _average_(averaged, current, Part(_LERP, (w,), ()))


def ema_(averaged: list[cla.Array], current: list[cla.Array], decay: float) -> None:
    """``averaged <- decay * averaged + (1 - decay) * current`` in place (torch's
    ``get_ema_avg_fn``, bit for bit on CPU). The average is the kernel's slot, so the
    executor also writes the unchanged ``current`` to a fresh buffer (dropped): one launch
    per dtype and packed run, with one more array's worth of writes than :func:`lerp_`."""
    for lo, hi in _runs(current):
        part = Part(_EMA_INTO, (1.0 - decay, decay), (averaged[lo:hi],))
        run_parts([part], current[lo:hi], None, apply=False, inplace=True)


def running_mean_(averaged: list[cla.Array], current: list[cla.Array], count: int) -> None:
    """``averaged <- averaged + (current - averaged) / count`` in place (torch's
    ``get_swa_avg_fn`` with ``count = num_averaged + 1``; a correctly rounded division)."""
    _average_(averaged, current, Part(_RUNNING_MEAN, (float(count),), ()))


__all__ = ["incremental_update", "periodic_update"]
