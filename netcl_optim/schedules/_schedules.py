"""Schedules: pure host functions of the integer step count, with optax's names and semantics.

Each factory validates its arguments and returns a :data:`Schedule`, a callable
``count -> float`` evaluated on the host in float64 (Python floats, the ``math`` module). The
count starts at 0 and the first update uses ``schedule(0)``. Nothing here touches a device:
an optimizer evaluates the schedule once per step and passes the value to its kernel as a
scalar argument, so a changing value never rebuilds a kernel.

Where optax silently accepts a nonsensical argument (a negative ``transition_begin``, a
negative ``decay_rate`` or ``power``, a ``pct_start`` outside [0, 1]), we raise a
``ValueError`` naming it instead. The two deliberate departures from optax for accepted
arguments are documented where they occur: :func:`warmup_constant_schedule` with
``warmup_steps=0`` holds ``peak_value`` (optax holds ``init_value``), and
:func:`piecewise_interpolate_schedule` gives ``init_value`` for negative counts (optax: 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .._validation import (
    CLOSED_UNIT,
    NON_NEGATIVE,
    POSITIVE,
    invalid,
    number,
    one_of,
    require,
    step_count,
)

Schedule = Callable[[int], float]
"""A schedule maps the integer step count (from 0) to a Python float."""

_STEPS = number("a number > 0", lambda f: f > 0)


def _scales(name: str, boundaries_and_scales: Mapping[int, float] | None) -> list:
    """Sorted ``(boundary, scale)`` items; scales finite and >= 0, boundaries counts >= 0."""
    if boundaries_and_scales is None:
        return []
    items = sorted(boundaries_and_scales.items())
    for boundary, scale in items:
        require(f"{name} boundary", boundary, step_count(0))
        require(f"{name}[{boundary}]", scale, NON_NEGATIVE)
    return [(b, float(s)) for b, s in items]


# ---------------------------------------------------------------------------- interpolation


def _linear_interpolate(start: float, end: float, pct: float) -> float:
    """``start + (end - start) * pct``, as optax and torch's OneCycleLR write it."""
    return (end - start) * pct + start


def _cosine_interpolate(start: float, end: float, pct: float) -> float:
    """``end + (start - end) * (1 + cos(pi * pct)) / 2``: ``start`` at 0, ``end`` at 1.

    Periodic in ``pct`` with period 2; used by torch's CosineAnnealingLR closed form.
    """
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


# ---------------------------------------------------------------------------- schedules


def constant_schedule(value: float) -> Schedule:
    """Constant schedule: ``value`` at every count.

    Args:
      value: the value to hold.

    Returns:
      A schedule ``count -> float(value)``.
    """
    v = float(value)
    return lambda count: v


def polynomial_schedule(
    init_value: float,
    end_value: float,
    power: float,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Polynomial transition from ``init_value`` to ``end_value``.

    ``c = clip(count - transition_begin, 0, transition_steps)``;
    ``value = (init_value - end_value) * (1 - c / transition_steps) ** power + end_value``.

    Args:
      init_value: value up to ``transition_begin``.
      end_value: value from ``transition_begin + transition_steps`` on.
      power: exponent of the polynomial, >= 0.
      transition_steps: length of the transition; ``<= 0`` gives the constant ``init_value``
        (as optax).
      transition_begin: count at which the transition starts, >= 0 (default 0).

    Returns:
      A schedule ``count -> float``.

    Raises:
      ValueError: ``power < 0`` or ``transition_begin < 0``.
    """
    init = float(init_value)
    end = float(end_value)
    p = require("power", power, NON_NEGATIVE)
    begin = require("transition_begin", transition_begin, step_count(0))
    if transition_steps <= 0:
        return constant_schedule(init)
    steps = transition_steps

    def schedule(count: int) -> float:
        c = min(max(count - begin, 0), steps)
        return (init - end) * (1.0 - c / steps) ** p + end

    return schedule


def linear_schedule(
    init_value: float,
    end_value: float,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Linear transition: :func:`polynomial_schedule` with ``power=1``.

    ``value = init_value + (end_value - init_value) * c / transition_steps`` with
    ``c = clip(count - transition_begin, 0, transition_steps)``.

    Args:
      init_value: value up to ``transition_begin``.
      end_value: value from ``transition_begin + transition_steps`` on.
      transition_steps: length of the transition; ``<= 0`` gives the constant ``init_value``.
      transition_begin: count at which the transition starts, >= 0 (default 0).

    Returns:
      A schedule ``count -> float``.
    """
    return polynomial_schedule(init_value, end_value, 1, transition_steps, transition_begin)


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """Exponential decay.

    ``d = count - transition_begin``, ``p = d / transition_steps`` (floored if ``staircase``);
    ``value = init_value`` if ``d <= 0`` else ``init_value * decay_rate ** p``, then bounded
    by ``end_value`` (a lower bound if ``decay_rate < 1``, an upper bound otherwise).

    Args:
      init_value: the initial value.
      transition_steps: the decay period; ``<= 0`` gives the constant ``init_value`` (optax).
      decay_rate: factor per ``transition_steps``, >= 0; 0 gives the constant ``init_value``
        (optax).
      transition_begin: count at which the decay starts, >= 0 (default 0).
      staircase: decay in discrete jumps every ``transition_steps`` (default False).
      end_value: optional bound on the value (default None).

    Returns:
      A schedule ``count -> float``.

    Raises:
      ValueError: ``decay_rate < 0`` or ``transition_begin < 0``.
    """
    init = float(init_value)
    rate = require("decay_rate", decay_rate, NON_NEGATIVE)
    begin = require("transition_begin", transition_begin, step_count(0))
    if transition_steps <= 0 or rate == 0:
        return constant_schedule(init)
    steps = transition_steps
    end = None if end_value is None else float(end_value)
    clip = max if rate < 1.0 else min

    def schedule(count: int) -> float:
        d = count - begin
        p = d / steps
        if staircase:
            p = math.floor(p)
        value = init if d <= 0 else init * rate**p
        if end is not None:
            value = clip(value, end)
        return float(value)

    return schedule


def piecewise_constant_schedule(
    init_value: float, boundaries_and_scales: Mapping[int, float] | None = None
) -> Schedule:
    """Piecewise constant: ``init_value`` times every ``scale`` whose ``boundary <= count``.

    Args:
      init_value: the value before the first boundary.
      boundaries_and_scales: ``{boundary: scale}``, boundaries integers >= 0, scales >= 0
        (default None: constant).

    Returns:
      A schedule ``count -> float``.

    Raises:
      ValueError: a negative or non-finite scale, or a negative boundary.
    """
    init = float(init_value)
    items = _scales("boundaries_and_scales", boundaries_and_scales)

    def schedule(count: int) -> float:
        v = init
        for boundary, scale in items:
            if count >= boundary:
                v = v * scale
        return v

    return schedule


def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value``, then constant.

    ``c = min(count, decay_steps)``, ``cd = (1 + cos(pi * c / decay_steps)) / 2``;
    ``value = init_value * ((1 - alpha) * cd ** exponent + alpha)``. Clamps after
    ``decay_steps`` (torch's CosineAnnealingLR rises again instead).

    Args:
      init_value: the value at count 0.
      decay_steps: length of the decay, > 0.
      alpha: final value as a fraction of ``init_value`` (default 0).
      exponent: exponent applied to the cosine factor (default 1).

    Returns:
      A schedule ``count -> float``.

    Raises:
      ValueError: ``decay_steps <= 0``.
    """
    require("decay_steps", decay_steps, _STEPS)
    init = float(init_value)
    a = float(alpha)
    e = float(exponent)
    steps = float(decay_steps)

    def schedule(count: int) -> float:
        c = min(count, steps)
        cd = 0.5 * (1.0 + math.cos(math.pi * c / steps))
        return init * ((1.0 - a) * cd**e + a)

    return schedule


def piecewise_interpolate_schedule(
    interpolate_type: str,
    init_value: float,
    boundaries_and_scales: Mapping[int, float] | None = None,
) -> Schedule:
    """Interpolation between accumulated scaled values at boundaries.

    With boundaries ``b_0 = 0 < b_1 < ...`` and values ``v_0 = init_value``,
    ``v_i = v_{i-1} * scale_i``: for ``b_i <= count < b_{i+1}`` the value interpolates from
    ``v_i`` to ``v_{i+1}`` at ``pct = (count - b_i) / max(b_{i+1} - b_i, 1)``, linearly
    (``v_i + (v_{i+1} - v_i) * pct``) or by cosine (``v_{i+1} + (v_i - v_{i+1}) *
    (1 + cos(pi * pct)) / 2``); from the last boundary on it is the last value. A negative
    count gives ``init_value`` (optax gives 0 there).

    Args:
      interpolate_type: ``"linear"`` or ``"cosine"``.
      init_value: the value at count 0.
      boundaries_and_scales: ``{boundary: scale}``, boundaries integers >= 0, scales >= 0
        (default None: constant).

    Returns:
      A schedule ``count -> float``.

    Raises:
      ValueError: an unknown ``interpolate_type``, a negative scale or boundary.
    """
    require("interpolate_type", interpolate_type, one_of("linear", "cosine"))
    interpolate = _linear_interpolate if interpolate_type == "linear" else _cosine_interpolate
    items = _scales("boundaries_and_scales", boundaries_and_scales)
    bounds = [0] + [b for b, _ in items]
    values = [float(init_value)]
    for _, scale in items:
        values.append(values[-1] * scale)

    def schedule(count: int) -> float:
        if count < 0:
            return values[0]
        if count >= bounds[-1]:
            return values[-1]
        for i in range(len(bounds) - 1):
            if bounds[i] <= count < bounds[i + 1]:
                pct = (count - bounds[i]) / max(bounds[i + 1] - bounds[i], 1)
                return float(interpolate(values[i], values[i + 1], pct))
        raise AssertionError("unreachable: boundaries are sorted")  # pragma: no cover

    return schedule


def _onecycle_args(
    transition_steps: int, div_factor: float, final_div_factor: float, pct_start: float
) -> None:
    require("transition_steps", transition_steps, _STEPS)
    require("div_factor", div_factor, POSITIVE)
    require("final_div_factor", final_div_factor, POSITIVE)
    require("pct_start", pct_start, CLOSED_UNIT)


def linear_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    pct_final: float = 0.85,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """Three linear phases: up to the peak, back down, then to the final value.

    With ``init = peak_value / div_factor``: linear from ``init`` to ``peak_value`` over
    ``[0, int(pct_start * T))``, back to ``init`` until ``int(pct_final * T)``, then to
    ``init / final_div_factor`` at ``T = transition_steps``, constant after. This is
    :func:`piecewise_interpolate_schedule` ``("linear", init, {int(pct_start * T): div_factor,
    int(pct_final * T): 1 / div_factor, T: 1 / final_div_factor})``, as in optax.

    Args:
      transition_steps: length of the cycle ``T``, > 0.
      peak_value: the maximum value.
      pct_start: fraction of the cycle spent rising (default 0.3).
      pct_final: fraction of the cycle at which the value is back to ``init`` (default 0.85).
      div_factor: ``init = peak_value / div_factor`` (default 25).
      final_div_factor: final value ``init / final_div_factor`` (default 1e4).

    Returns:
      A schedule ``count -> float``.

    Raises:
      ValueError: ``transition_steps <= 0``, not ``0 <= pct_start <= pct_final <= 1``,
        ``div_factor <= 0`` or ``final_div_factor <= 0``.
    """
    _onecycle_args(transition_steps, div_factor, final_div_factor, pct_start)
    after_start = number(
        f"a number in [pct_start, 1] = [{pct_start:g}, 1]", lambda f: pct_start <= f <= 1
    )
    require("pct_final", pct_final, after_start)
    return piecewise_interpolate_schedule(
        "linear",
        peak_value / div_factor,
        {
            int(pct_start * transition_steps): div_factor,
            int(pct_final * transition_steps): 1.0 / div_factor,
            transition_steps: 1.0 / final_div_factor,
        },
    )


def cosine_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """One cycle: cosine rise to ``peak_value``, then cosine decay to the final value.

    With ``init = peak_value / div_factor``: cosine from ``init`` to ``peak_value`` over
    ``[0, int(pct_start * T))``, then cosine to ``init / final_div_factor`` at
    ``T = transition_steps``, constant after (optax's schedule; torch's
    :class:`~netcl_optim.stateful.OneCycleLR` places its phase ends one step
    earlier).

    Args:
      transition_steps: length of the cycle ``T``, > 0.
      peak_value: the maximum value.
      pct_start: fraction of the cycle spent rising, in [0, 1] (default 0.3).
      div_factor: ``init = peak_value / div_factor`` (default 25).
      final_div_factor: final value ``init / final_div_factor`` (default 1e4).

    Returns:
      A schedule ``count -> float``.

    Raises:
      ValueError: ``transition_steps <= 0``, ``pct_start`` outside [0, 1], ``div_factor <= 0``
        or ``final_div_factor <= 0``.
    """
    _onecycle_args(transition_steps, div_factor, final_div_factor, pct_start)
    return piecewise_interpolate_schedule(
        "cosine",
        peak_value / div_factor,
        {
            int(pct_start * transition_steps): div_factor,
            int(transition_steps): 1.0 / (div_factor * final_div_factor),
        },
    )


def warmup_constant_schedule(init_value: float, peak_value: float, warmup_steps: int) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then constant.

    ``value = init_value + (peak_value - init_value) * min(count, warmup_steps) / warmup_steps``.
    With ``warmup_steps=0`` the value is ``peak_value`` from count 0 (optax would hold
    ``init_value`` forever, which contradicts the name).

    Args:
      init_value: the value at count 0.
      peak_value: the value from ``warmup_steps`` on.
      warmup_steps: length of the warmup, >= 0.

    Returns:
      A schedule ``count -> float``.

    Raises:
      ValueError: ``warmup_steps < 0``.
    """
    warmup = require("warmup_steps", warmup_steps, step_count(0))
    if warmup == 0:
        return constant_schedule(peak_value)
    return linear_schedule(init_value, peak_value, warmup)


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Sequence of schedules: past ``boundaries[i]``, ``schedules[i + 1](count - boundaries[i])``.

    Before ``boundaries[0]`` the value is ``schedules[0](count)``. Each later schedule sees the
    count since its boundary. With unsorted boundaries the last boundary (in list order) that
    ``count`` has reached wins, as in optax.

    Args:
      schedules: the schedules, at least one.
      boundaries: the counts at which to switch, ``len(schedules) - 1`` of them.

    Returns:
      A schedule ``count -> float``.

    Raises:
      ValueError: no schedules, or ``len(boundaries) != len(schedules) - 1``.
    """
    schedules = list(schedules)
    boundaries = list(boundaries)
    if not schedules:
        raise invalid("schedules", schedules, "a non-empty sequence")
    if len(boundaries) != len(schedules) - 1:
        raise invalid("boundaries", boundaries, f"{len(schedules) - 1} values, one per switch")
    pieces = list(zip(boundaries, schedules[1:], strict=True))[::-1]
    first = schedules[0]

    def schedule(count: int) -> float:
        for boundary, piece in pieces:
            if count >= boundary:
                return float(piece(count - boundary))
        return float(first(count))

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup to ``peak_value``, then cosine decay to ``end_value``; constant after.

    ``join_schedules([linear_schedule(init_value, peak_value, warmup_steps),
    cosine_decay_schedule(peak_value, decay_steps - warmup_steps, end_value / peak_value,
    exponent)], [warmup_steps])``. For ``count < warmup_steps``:
    ``init_value + (peak_value - init_value) * count / warmup_steps``; then with
    ``prog = min(count - warmup_steps, D) / D``, ``D = decay_steps - warmup_steps``:
    ``end_value + (peak_value - end_value) * ((1 + cos(pi * prog)) / 2)`` (for
    ``exponent=1``). ``decay_steps`` includes the warmup.

    Args:
      init_value: the value at count 0.
      peak_value: the value at ``warmup_steps``.
      warmup_steps: length of the warmup, >= 0 (0: pure cosine decay).
      decay_steps: total length of warmup plus decay, > ``warmup_steps``.
      end_value: the value from ``decay_steps`` on (default 0).
      exponent: exponent applied to the cosine factor (default 1).

    Returns:
      A schedule ``count -> float``.

    Raises:
      ValueError: ``warmup_steps < 0`` or ``decay_steps <= warmup_steps``.
    """
    warmup = require("warmup_steps", warmup_steps, step_count(0))
    after_warmup = number(f"a number > warmup_steps = {warmup!r}", lambda f: f > warmup)
    require("decay_steps", decay_steps, after_warmup)
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, warmup),
            cosine_decay_schedule(peak_value, decay_steps - warmup, alpha, exponent),
        ],
        [warmup],
    )


def sgdr_schedule(cosine_kwargs: Iterable[Mapping[str, Any]]) -> Schedule:
    """SGD with warm restarts: consecutive :func:`warmup_cosine_decay_schedule` cycles.

    Cycle ``i`` runs ``warmup_cosine_decay_schedule(**cosine_kwargs[i])`` on the count since
    the cycle's start; each lasts its ``decay_steps``.

    Args:
      cosine_kwargs: one dict of :func:`warmup_cosine_decay_schedule` arguments per cycle.

    Returns:
      A schedule ``count -> float``.

    Raises:
      ValueError: no cycles, or invalid arguments in a cycle.
    """
    schedules: list[Schedule] = []
    boundaries: list[int] = []
    step = 0
    for kwargs in cosine_kwargs:
        schedules.append(warmup_cosine_decay_schedule(**kwargs))
        step += kwargs["decay_steps"]
        boundaries.append(step)
    if not schedules:
        raise invalid("cosine_kwargs", cosine_kwargs, "at least one cycle")
    return join_schedules(schedules, boundaries[:-1])
