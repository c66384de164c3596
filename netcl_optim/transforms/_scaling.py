"""scale, scale_by_learning_rate, scale_by_schedule."""

from __future__ import annotations

from typing import Any, NamedTuple

from .._base import EmptyState, Fragment, GradientTransformation, ScalarOrSchedule, Schedule
from .._validation import FINITE, NON_NEGATIVE, check, invalid, require
from ._combining import elementwise

_SCALE = "u = u * step_size;"


class ScaleByScheduleState(NamedTuple):
    """Number of updates so far: the schedule is evaluated at this count."""

    count: int


def scale(step_size: float) -> GradientTransformation:
    """``u <- step_size * u``. Stateless.

    Device: fused into the neighbouring kernel; ``step_size`` is a kernel argument.
    """
    check(FINITE, step_size=step_size)
    value = (float(step_size),)
    return elementwise(
        Fragment(
            "scale", _SCALE, scalars=("step_size",), host_step=lambda state, **_: (value, state)
        )
    )


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """``u <- step_size_fn(count) * u``; count starts at 0 (the first update uses
    ``step_size_fn(0)``) and advances on the host: no device read."""
    if not callable(step_size_fn):
        raise invalid("step_size_fn", step_size_fn, "callable: a schedule", error=TypeError)

    def host_step(state: ScaleByScheduleState, **_: Any):
        return (float(step_size_fn(state.count)),), ScaleByScheduleState(state.count + 1)

    return elementwise(
        Fragment("scale_by_schedule", _SCALE, scalars=("step_size",), host_step=host_step),
        init=lambda: ScaleByScheduleState(count=0),
    )


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """``u <- -learning_rate * u`` (or ``+`` without ``flip_sign``); a float or a schedule
    ``count -> float``. A float gives a stateless :func:`scale`."""
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * float(learning_rate(count)))
    require("learning_rate", learning_rate, NON_NEGATIVE)
    return scale(sign * float(learning_rate))


__all__ = [
    "EmptyState",
    "ScaleByScheduleState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
]
