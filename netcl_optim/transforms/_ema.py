"""ema: optax's exponential moving average of the updates, with its bias correction."""

from __future__ import annotations

from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation
from .._validation import BOOL, UNIT, check, invalid, require
from ._combining import elementwise

# optax (update_moment, order 1): ema <- (1 - decay) u + decay ema; debias: u <- ema / (1 -
# decay^t), a division as optax's bias_correction (the host computes 1 - decay^t)
_EMA = """
ema = one_minus_decay * u + decay * ema;
u = ema;
"""
_EMA_DEBIAS = """
ema = one_minus_decay * u + decay * ema;
u = ema / bias_correction;
"""


class EmaState(NamedTuple):
    """optax's ``EmaState``: the number of updates and the moving average ``ema`` (shaped like
    the params)."""

    count: int
    ema: Any


def ema(decay: float, debias: bool = True, accumulator_dtype: Any = None) -> GradientTransformation:
    """An exponential moving average of the updates (optax's ``ema``, same signature)::

        ema <- (1 - decay) u + decay ema;  t <- t + 1
        u <- ema / (1 - decay^t)        (debias; else u <- ema)

    ``ema`` starts at zero; ``decay`` in [0, 1). Unlike :func:`trace` (``t <- decay t + u``)
    the new update is weighted by ``1 - decay``. ``accumulator_dtype`` must be None: the state
    is float32 (float64 for float64 params). The state is optax's ``EmaState(count, ema)``.

    Device: one slot (``ema``); ``1 - decay^t`` comes from the host.
    """
    check(UNIT, decay=decay)
    debias = require("debias", debias, BOOL)
    if accumulator_dtype is not None:
        raise invalid(
            "accumulator_dtype", accumulator_dtype,
            "None: the state is float32, float64 for float64 params",
        )  # fmt: skip
    decay = float(decay)

    def host_step(state: EmaState, **_: Any):
        t = state.count + 1
        return (1.0 - decay, decay, 1.0 - decay**t), state._replace(count=t)

    fragment = Fragment(
        "ema_debias" if debias else "ema",
        _EMA_DEBIAS if debias else _EMA,
        slots=("ema",),
        scalars=("one_minus_decay", "decay", "bias_correction"),
        host_step=host_step,
    )
    return elementwise(fragment, init=lambda e: EmaState(count=0, ema=e))
