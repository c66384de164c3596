"""clip, clip_by_global_norm and global_norm (device-side norm, no host sync)."""

from __future__ import annotations

from typing import Any

import optree
import pyopencl.array as cla

from .._base import EmptyState, Fragment, GradientTransformation, Reduction
from .._device import check_float_dtype, queue_of
from .._validation import NON_NEGATIVE, check
from ..fusion import reduce_leaves
from ._combining import elementwise

_CLIP = "u = u < -max_delta ? -max_delta : (u > max_delta ? max_delta : u);"
_CLIP_BY_NORM = "u = u * clip_coef;"

GLOBAL_NORM = Reduction(
    "sumsq", "clip", outputs=("global_norm", "clip_coef"), scalars=("max_norm",)
)


def clip(max_delta: float) -> GradientTransformation:
    """Clamp every element of the updates to ``[-max_delta, max_delta]`` (NaN stays NaN)."""
    check(NON_NEGATIVE, max_delta=max_delta)
    value = (float(max_delta),)
    return elementwise(
        Fragment("clip", _CLIP, scalars=("max_delta",), host_step=lambda s, **_: (value, s))
    )


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the updates by ``min(1, max_norm / (global_norm + 1e-6))`` (torch's coefficient,
    always multiplied; a zero norm is fine).

    The norm is computed without overflow whenever the accumulator's type holds it
    (float64, or float32 on a device without fp64), as in
    :func:`~netcl_optim.clip_grad_norm_device`: large updates are clipped, not zeroed.
    Beyond that range (or with an inf update) the norm is inf and the coefficient 0.

    Device:
      One sum-of-squares reduction (a partials launch per packed run or leaf, then one
      finishing launch) leaves the norm and coefficient in a device buffer; the scaling is
      fused into the next kernel. No host sync.
    """
    check(NON_NEGATIVE, max_norm=max_norm)
    value = (float(max_norm),)

    def host_step(state: EmptyState, **_: Any):
        return value, state

    return elementwise(
        Fragment(
            "clip_by_global_norm",
            _CLIP_BY_NORM,
            scalars=("max_norm",),
            host_step=host_step,
            reduction=GLOBAL_NORM,
        )
    )


def global_norm(updates: Any) -> cla.Array:
    """optax.global_norm: ``sqrt(sum over all leaves of sum(x**2))``, as a 0-d device array
    (float64 where the device has fp64, else float32; optax: the leaves' dtype), unread.
    ``None`` leaves are skipped and an empty tree has norm 0, as in optax.

    The norm of :func:`clip_by_global_norm`, without overflow whenever the accumulator's
    type holds it (large leaves are rescaled, as there).

    Device:
      One sum-of-squares reduction: a partials launch per packed run of leaves (else per
      leaf) and one finishing launch. No host sync.
    """
    leaves = optree.tree_leaves(updates)
    for i, x in enumerate(leaves):
        if not isinstance(x, cla.Array):
            raise TypeError(f"global_norm: leaf {i} is a {type(x).__name__}, not a device array")
        if not x.flags.c_contiguous:
            raise ValueError(f"global_norm: leaf {i} is not C-contiguous")
    queue = queue_of(leaves)
    for x in leaves:
        check_float_dtype(x.dtype, queue, "global_norm")
    return reduce_leaves(queue, leaves, GLOBAL_NORM.op, "norm")[0]
