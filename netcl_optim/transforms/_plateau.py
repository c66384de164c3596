"""reduce_on_plateau: scale updates down when a metric stops improving (optax semantics)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .._base import Fragment, GradientTransformation
from .._validation import NON_NEGATIVE, OPEN_UNIT, at_least, interval, invalid, number, require
from ._combining import elementwise

_METRIC = number("a finite number, the metric", math.isfinite)


class ReduceLROnPlateauState(NamedTuple):
    """Host numbers: the current ``scale``, the best averaged metric, the counters."""

    scale: float
    best_value: float
    plateau_count: int
    cooldown_count: int
    count: int
    avg_value: float


def _plateau_step(
    state: ReduceLROnPlateauState,
    value: float,
    *,
    factor: float,
    patience: int,
    rtol: float,
    atol: float,
    cooldown: int,
    accumulation_size: int,
    min_scale: float,
) -> ReduceLROnPlateauState:
    count = state.count + 1
    avg = (state.count * state.avg_value + value) / count
    state = state._replace(avg_value=avg, count=count)
    if count != accumulation_size:
        return state
    improved = avg < (1 - rtol) * state.best_value - atol
    best = avg if improved else state.best_value
    plateau = 0 if improved else state.plateau_count + 1
    if state.cooldown_count > 0:
        plateau, scale, cool = 0, state.scale, state.cooldown_count - 1
    else:
        hit = plateau == patience
        scale = max(state.scale * factor if hit else state.scale, min_scale)
        plateau, cool = (0 if hit else plateau), (cooldown if hit else 0)
    return ReduceLROnPlateauState(scale, best, plateau, cool, 0, 0.0)


def reduce_on_plateau(
    factor: float = 0.1,
    patience: int = 10,
    rtol: float = 1e-4,
    atol: float = 0.0,
    cooldown: int = 0,
    accumulation_size: int = 1,
    min_scale: float = 0.0,
) -> GradientTransformation:
    """Multiply updates by ``scale``, which drops by ``factor`` after ``patience`` evaluations
    without improvement (``avg < (1 - rtol) * best - atol``), optax's algorithm: the metric
    goes in through ``update(updates, state, params, value=metric)``, averaged over
    ``accumulation_size`` calls; ``cooldown`` evaluations follow a reduction; ``scale`` never
    drops below ``min_scale``. A non-finite metric is a ``ValueError`` (nothing changes).

    Device: the scaling is fused into its neighbours; the plateau logic runs on the host on
    the metric the caller passes (no device read).
    """
    options = dict(
        factor=require("factor", factor, OPEN_UNIT),
        patience=require("patience", patience, at_least(0)),
        rtol=require("rtol", rtol, interval(0, 1)),
        atol=require("atol", atol, NON_NEGATIVE),
        cooldown=require("cooldown", cooldown, at_least(0)),
        accumulation_size=require("accumulation_size", accumulation_size, at_least(1)),
        min_scale=require("min_scale", min_scale, NON_NEGATIVE),
    )
    if options["rtol"] == 0.0 and options["atol"] == 0.0:
        raise invalid("rtol", rtol, "> 0 when atol is 0")

    def host_step(state: ReduceLROnPlateauState, value: Any = None, **_: Any):
        if value is None:
            raise TypeError("reduce_on_plateau: pass the metric as update(..., value=metric)")
        new = _plateau_step(state, require("value", value, _METRIC), **options)
        return (new.scale,), new

    fragment = Fragment(
        "reduce_on_plateau", "u = u * scale;", scalars=("scale",), host_step=host_step
    )
    return elementwise(fragment, init=lambda: ReduceLROnPlateauState(1.0, math.inf, 0, 0, 0, 0.0))
