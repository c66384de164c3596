"""trace: momentum with torch's undamped first step."""

from __future__ import annotations

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation
from .._validation import NON_NEGATIVE, check
from ._combining import elementwise

_TRACE = """
trace = first != 0 ? u : decay * trace + one_minus_dampening * u;
u = trace;
"""
_TRACE_NESTEROV = """
trace = first != 0 ? u : decay * trace + one_minus_dampening * u;
u = u + decay * trace;
"""


class TraceState(NamedTuple):
    """Momentum buffer ``trace`` (shaped like the params) and the number of updates."""

    count: int
    trace: Any


def trace(decay: float, nesterov: bool = False, dampening: float = 0.0) -> GradientTransformation:
    """Momentum: ``t <- g`` on the first update, then ``t <- decay * t + (1 - dampening) * g``;
    ``u <- g + decay * t`` with ``nesterov``, else ``u <- t``.

    With ``dampening=0`` this is optax's ``trace`` (``t`` starts at 0, so the first ``t`` is
    ``g``); with dampening it is torch's SGD momentum, whose first step is undamped. See
    :func:`sgd`.
    """
    check(NON_NEGATIVE, decay=decay, dampening=dampening)
    if nesterov and (decay <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum (decay > 0) and zero dampening")
    decay, keep = float(decay), 1.0 - float(dampening)

    def host_step(state: TraceState, **_: Any):
        first = 1.0 if state.count == 0 else 0.0
        return (decay, keep, first), state._replace(count=state.count + 1)

    fragment = Fragment(
        "trace_nesterov" if nesterov else "trace",
        _TRACE_NESTEROV if nesterov else _TRACE,
        slots=("trace",),
        scalars=("decay", "one_minus_dampening", "first"),
        host_step=host_step,
    )
    return elementwise(fragment, init=lambda t: TraceState(count=0, trace=t))
