"""Argument checks, one message style for the whole library::

    Invalid <name>: <value> (must be <what>)[ in <where>]

``where`` names the place when there is one (``param_groups[1]``, a loaded state dict).
A :class:`Rule` says what a value must be; :func:`require` checks one value against it and
returns it converted (a float, an int, a bool, a pair), :func:`check` checks keyword values
(skipping schedules, which are checked when evaluated). Errors are ``ValueError``, or
``TypeError`` where the value is not even of the rule's kind (a string for a number); a rule
made with :meth:`Rule.value_errors` raises ``ValueError`` for every invalid value (torch's
convention for hyperparameters).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np


class ScheduledValue(float):
    """A hyperparameter value that came from a schedule or from the optimizer's state, not
    from the user's constructor call: a learning rate there may be 0 (a warmup starts at 0),
    while a constructor rejects it."""


def invalid(
    name: str, value: Any, must: str, where: str = "", error: type[Exception] = ValueError
) -> Exception:
    """The library's error for an invalid argument (to raise)."""
    place = f" in {where}" if where else ""
    return error(f"Invalid {name}: {value!r} (must be {must}){place}")


def _scalar(value: Any) -> Any:
    """A 0-d numpy array's item; any other value as it is."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


def real(value: Any) -> float | None:
    """``value`` as a float if it is a real number (Python, numpy, a 0-d array, or anything
    with ``__float__`` but a bool, a string or a complex), else ``None``; nan stays nan, an
    int too large for a float is +-inf."""
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_, str, bytes, complex, np.complexfloating, np.ndarray)):
        return None
    if isinstance(value, (numbers.Real, np.generic)) or hasattr(value, "__float__"):
        try:
            return float(value)
        except OverflowError:
            return math.inf if cast(Any, value) > 0 else -math.inf
        except (TypeError, ValueError):
            return None
    return None


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _numeric(value: Any) -> bool:
    return real(value) is not None or _is_bool(value)


def _anything(value: Any) -> bool:
    return True


def _nothing(value: Any) -> bool:
    return False


@dataclass(frozen=True)
class Rule:
    """What a value must be: ``what`` (for the message) and ``convert``, which returns the
    value converted or ``None`` when it is invalid. ``kind`` tells whether a value is at
    least of the rule's kind: an invalid value of that kind raises ``ValueError``, any other
    ``TypeError`` (default: a real number or a bool)."""

    what: str
    convert: Callable[[Any], Any]
    kind: Callable[[Any], bool] = _numeric
    optional: bool = False  # None is valid too (and stays None)

    def __call__(self, name: str, value: Any, where: str = "") -> Any:
        return require(name, value, self, where)

    def value_errors(self) -> Rule:
        """This rule raising ``ValueError`` for every invalid value, of any kind."""
        return replace(self, kind=_anything)

    def type_errors(self) -> Rule:
        """This rule raising ``TypeError`` for every invalid value (for a rule about a type,
        such as :data:`BOOL`)."""
        return replace(self, kind=_nothing)


def require(name: str, value: Any, rule: Rule, where: str = "") -> Any:
    """``value`` converted by ``rule``; raises ``invalid(...)`` if it breaks the rule
    (``TypeError`` when it is not even of the rule's kind, see :class:`Rule`)."""
    if value is None and rule.optional:
        return None
    converted = rule.convert(value)
    if converted is None:
        error = ValueError if rule.kind(value) else TypeError
        raise invalid(name, value, rule.what, where, error)
    return converted


def check(rule: Rule, where: str = "", **values: Any) -> None:
    """:func:`require` for each keyword; callables (schedules) are checked when evaluated."""
    for name, value in values.items():
        if not callable(value):
            require(name, value, rule, where)


def optional(rule: Rule) -> Rule:
    """``rule``, or ``None``."""
    return replace(rule, what=f"None or {rule.what}", optional=True)


def number(what: str, ok: Callable[[float], bool]) -> Rule:
    """A real number (not nan, not a bool) for which ``ok`` holds; returned as a float."""

    def convert(value: Any) -> float | None:
        f = real(value)
        return f if f is not None and not math.isnan(f) and ok(f) else None

    return Rule(what, convert)


def interval(low: float, high: float, bounds: str = "[]") -> Rule:
    """A number between ``low`` and ``high``, each end included (``[``, ``]``) or not
    (``(``, ``)``) as ``bounds`` says."""
    closed_low, closed_high = bounds[0] == "[", bounds[1] == "]"

    def ok(f: float) -> bool:
        above = f >= low if closed_low else f > low
        below = f <= high if closed_high else f < high
        return above and below

    return number(f"a number in {bounds[0]}{low:g}, {high:g}{bounds[1]}", ok)


def _bool(value: Any) -> bool | None:
    return bool(value) if _is_bool(value) else None


POSITIVE = number("a finite number > 0", lambda f: 0 < f < math.inf)
NON_NEGATIVE = number("a finite number >= 0", lambda f: 0 <= f < math.inf)
FINITE = number("a finite number", math.isfinite)
UNIT = interval(0, 1, "[)")
OPEN_UNIT = interval(0, 1, "()")
CLOSED_UNIT = interval(0, 1, "[]")
BOOL = Rule("a bool", _bool, _anything)


def _integer(value: Any) -> int | None:
    value = _scalar(value)
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def at_least(k: int) -> Rule:
    """An int (Python or numpy, not a bool) >= ``k``; returned as an int."""

    def convert(value: Any) -> int | None:
        i = _integer(value)
        return i if i is not None and i >= k else None

    return Rule(f"an int >= {k}", convert)


def int_in(low: int, high: int) -> Rule:
    """An int (Python or numpy, not a bool) in ``[low, high)``; returned as an int."""

    def convert(value: Any) -> int | None:
        i = _integer(value)
        return i if i is not None and low <= i < high else None

    return Rule(f"an int in [{low}, {high})", convert)


def step_count(k: int) -> Rule:
    """A step count >= ``k``: an int or, as optax allows, a float (not a bool, not inf);
    returned as it is, so an int stays an int."""

    def convert(value: Any) -> Any:
        f = real(value)
        return value if f is not None and k <= f < math.inf else None

    return Rule(f"a step count >= {k}", convert)


def greater_than(bound: float) -> Rule:
    """A finite number > ``bound``."""
    return number(f"a finite number > {bound:g}", lambda f: bound < f < math.inf)


def pair(rule: Rule, what: str) -> Rule:
    """A pair (tuple or list of 2) whose items each follow ``rule``, described as ``what``
    (e.g. ``"a pair (beta1, beta2), each in [0, 1)"``); returned as a tuple."""
    return tuple_of(2, rule, what)


def tuple_of(n: int, rule: Rule, what: str) -> Rule:
    """A tuple or list of ``n`` items that each follow ``rule``, described as ``what`` (e.g.
    ``"a triple (beta1, beta2, beta3), each in [0, 1)"``); returned as a tuple."""

    def convert(value: Any) -> tuple[Any, ...] | None:
        if not isinstance(value, (tuple, list)) or len(value) != n:
            return None
        items = tuple(rule.convert(v) for v in value)
        return None if None in items else items

    return Rule(what, convert, lambda v: isinstance(v, (tuple, list)) or _numeric(v))


def one_of(*choices: Any) -> Rule:
    """One of ``choices`` (compared with ``==``); returned as it is."""

    def convert(value: Any) -> Any:
        try:
            return value if any(value == c for c in choices) else None
        except (TypeError, ValueError):  # an array, say
            return None

    return Rule(f"one of {', '.join(map(repr, choices))}", convert, _anything)


def learning_rate(name: str, value: Any, where: str = "") -> Any:
    """A learning rate: > 0 when the user gives it, >= 0 when it is a :class:`ScheduledValue`
    (a scheduler's or a schedule's value: a warmup starts at 0); a schedule (callable) is
    returned as it is."""
    if callable(value):
        return value
    rule = NON_NEGATIVE if isinstance(value, ScheduledValue) else POSITIVE
    require(name, value, rule, where)
    return value
