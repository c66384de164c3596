"""The argument checks of netcl_optim._validation: rules, conversions, error types, and the one
message style ``Invalid <name>: <value> (must be <what>)[ in <where>]``."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from netcl_optim import _validation as V
from netcl_optim._validation import (
    BOOL,
    CLOSED_UNIT,
    FINITE,
    NON_NEGATIVE,
    OPEN_UNIT,
    POSITIVE,
    UNIT,
    Rule,
    ScheduledValue,
    at_least,
    check,
    greater_than,
    int_in,
    interval,
    invalid,
    learning_rate,
    number,
    one_of,
    pair,
    real,
    require,
    step_count,
)

STYLE = re.compile(
    r"^Invalid (?P<name>\S+): (?P<value>.+) \(must be (?P<what>.+)\)(?P<where> in .+)?$"
)

# ---------------------------------------------------------------------------- message format


def test_message_format_without_and_with_a_place():
    err = invalid("lr", -1.0, "a finite number > 0")
    assert isinstance(err, ValueError)
    assert str(err) == "Invalid lr: -1.0 (must be a finite number > 0)"
    err = invalid("lr", -1.0, "a finite number > 0", "param_groups[1]", TypeError)
    assert isinstance(err, TypeError)
    assert str(err) == "Invalid lr: -1.0 (must be a finite number > 0) in param_groups[1]"


def test_require_names_the_param_group():
    with pytest.raises(ValueError) as info:
        require("weight_decay", -0.5, NON_NEGATIVE, "param_groups[1]")
    assert str(info.value) == (
        "Invalid weight_decay: -0.5 (must be a finite number >= 0) in param_groups[1]"
    )
    match = STYLE.match(str(info.value))
    assert match and match["where"] == " in param_groups[1]"


@pytest.mark.parametrize(
    "rule, bad",
    [
        (POSITIVE, 0.0),
        (NON_NEGATIVE, -1),
        (FINITE, math.inf),
        (UNIT, 1.0),
        (OPEN_UNIT, 0),
        (CLOSED_UNIT, 1.5),
        (BOOL, 1),
        (at_least(1), 0),
        (int_in(0, 4), 4),
        (step_count(0), -1),
        (greater_than(1.0), 1.0),
        (interval(0, 1, "(]"), 0.0),
        (one_of("min", "max"), "mx"),
        (pair(UNIT, "a pair (beta1, beta2), each in [0, 1)"), (0.9, 1.0)),
        (number("a number > 0, or inf", lambda f: f > 0), -math.inf),
    ],
)
def test_every_rule_speaks_the_one_style(rule, bad):
    with pytest.raises((ValueError, TypeError)) as info:
        require("x", bad, rule)
    match = STYLE.match(str(info.value))
    assert match, str(info.value)
    assert match["name"] == "x" and match["value"] == repr(bad) and match["what"] == rule.what


# ---------------------------------------------------------------------------- numbers


def test_number_rules_convert_to_float():
    assert require("x", 2, POSITIVE) == 2.0 and type(require("x", 2, POSITIVE)) is float
    assert require("x", np.float32(0.5), UNIT) == 0.5
    assert require("x", np.array(0.25), CLOSED_UNIT) == 0.25  # a 0-d array is a number
    assert require("x", 0, NON_NEGATIVE) == 0.0
    assert require("x", -3.5, FINITE) == -3.5


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -1e-300, 10**400])
def test_positive_refuses_zero_negative_nan_and_inf(value):
    with pytest.raises(ValueError, match=r"^Invalid x: .* \(must be a finite number > 0\)$"):
        require("x", value, POSITIVE)


@pytest.mark.parametrize("value", ["1.0", None, 1j, np.complex64(1), [1.0], np.ones(2), object()])
def test_a_non_number_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"^Invalid x: .* \(must be a finite number >= 0\)$"):
        require("x", value, NON_NEGATIVE)


@pytest.mark.parametrize("value", [True, False, np.True_])
def test_a_bool_is_not_a_number_but_a_value_error(value):
    with pytest.raises(ValueError, match=r"^Invalid x: "):
        require("x", value, NON_NEGATIVE)


def test_interval_bounds():
    assert UNIT.what == "a number in [0, 1)" and OPEN_UNIT.what == "a number in (0, 1)"
    assert CLOSED_UNIT.what == "a number in [0, 1]"
    half_open = interval(0, 1, "(]")
    assert half_open.what == "a number in (0, 1]"
    assert require("x", 1, half_open) == 1.0
    for bad in (0, 1.5, math.nan):
        with pytest.raises(ValueError):
            require("x", bad, half_open)


def test_real():
    assert real(3) == 3.0 and real(np.int64(3)) == 3.0 and real(np.array(2.5)) == 2.5
    assert math.isnan(real(math.nan))
    assert real(10**400) == math.inf and real(-(10**400)) == -math.inf
    for value in (True, np.bool_(False), "1", b"1", 1j, np.ones(1), None):
        assert real(value) is None


# ---------------------------------------------------------------------------- ints and counts


def test_at_least_takes_python_and_numpy_ints_only():
    assert require("n", 3, at_least(1)) == 3
    assert type(require("n", np.int64(3), at_least(1))) is int
    assert require("n", np.array(2), at_least(0)) == 2  # a 0-d array, as in a state dict
    for bad in (0, 1.0, 2.5, True, np.float64(2.0)):
        with pytest.raises(ValueError, match=r"^Invalid n: .* \(must be an int >= 1\)$"):
            require("n", bad, at_least(1))
    with pytest.raises(TypeError, match=r"\(must be an int >= 1\)"):
        require("n", "3", at_least(1))


def test_int_in():
    assert require("root", 3, int_in(0, 4)) == 3
    for bad in (-1, 4, True, 1.0):
        with pytest.raises(ValueError, match=r"^Invalid root: .* \(must be an int in \[0, 4\)\)$"):
            require("root", bad, int_in(0, 4))


def test_step_count_keeps_the_value_as_given():
    assert (
        require("steps", 5, step_count(0)) == 5 and type(require("steps", 5, step_count(0))) is int
    )
    assert require("steps", 2.5, step_count(0)) == 2.5  # optax accepts floats
    for bad in (-1, math.inf, math.nan, True):
        with pytest.raises(ValueError, match=r"\(must be a step count >= 0\)"):
            require("steps", bad, step_count(0))


# ---------------------------------------------------------------------------- other kinds


def test_bool_rule():
    assert require("flag", np.True_, BOOL) is True
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match=r"^Invalid flag: .* \(must be a bool\)$"):
            require("flag", bad, BOOL)
    with pytest.raises(TypeError, match=r"^Invalid flag: 1 \(must be a bool\)$"):
        require("flag", 1, BOOL.type_errors())


def test_one_of_compares_by_value_and_never_crashes():
    rule = one_of("min", "max")
    assert rule.what == "one of 'min', 'max'"
    assert require("mode", "max", rule) == "max"
    for bad in ("maximum", None, 3, np.array(["min", "max"])):
        with pytest.raises(ValueError, match=r"^Invalid mode: .* \(must be one of 'min', 'max'\)$"):
            require("mode", bad, rule)


def test_pair():
    betas = pair(UNIT, "a pair (beta1, beta2), each in [0, 1)")
    assert require("betas", [0.9, np.float32(0.5)], betas) == (0.9, 0.5)
    for bad in ((0.9, 1.0), (0.9,), (0.1, 0.2, 0.3), 0.9):
        with pytest.raises(ValueError, match=r"^Invalid betas: .* \(must be a pair"):
            require("betas", bad, betas)
    with pytest.raises(TypeError, match=r"^Invalid betas: "):
        require("betas", "ab", betas)


def test_value_errors_turns_every_failure_into_a_value_error():
    with pytest.raises(ValueError, match=r"^Invalid x: '2.0' \(must be a finite number > 0\)$"):
        require("x", "2.0", POSITIVE.value_errors())


def test_a_rule_is_callable_like_require():
    assert POSITIVE("lr", 0.5) == 0.5
    with pytest.raises(ValueError, match=r"in param_groups\[0\]$"):
        POSITIVE("lr", 0, "param_groups[0]")


def test_custom_rule():
    even = Rule("an even int", lambda v: v if isinstance(v, int) and v % 2 == 0 else None)
    assert require("n", 4, even) == 4
    with pytest.raises(ValueError, match=r"^Invalid n: 3 \(must be an even int\)$"):
        require("n", 3, even)


# ---------------------------------------------------------------------------- check, learning_rate


def test_check_skips_schedules_and_names_the_first_bad_keyword():
    check(NON_NEGATIVE, a=0.0, b=lambda count: -1.0)  # a schedule is checked when evaluated
    with pytest.raises(ValueError, match=r"^Invalid b: -1 \(must be a finite number >= 0\) in g$"):
        check(NON_NEGATIVE, "g", a=1, b=-1, c=-2)


def test_learning_rate_is_positive_unless_scheduled():
    assert learning_rate("lr", 0.1) == 0.1
    schedule = lambda count: 0.0  # noqa: E731
    assert learning_rate("lr", schedule) is schedule
    assert learning_rate("lr", ScheduledValue(0.0)) == 0.0  # a warmup's start
    with pytest.raises(ValueError, match=r"^Invalid lr: 0.0 \(must be a finite number > 0\)$"):
        learning_rate("lr", 0.0)
    with pytest.raises(ValueError, match=r"\(must be a finite number >= 0\) in param_groups\[2\]$"):
        learning_rate("lr", ScheduledValue(-1.0), "param_groups[2]")


# ---------------------------------------------------------------------------- users


def test_the_library_uses_the_one_style():
    """One example per former validator family (transforms, schedules, schedulers, scalers,
    clipping, wrappers, plateau): each message follows the style."""
    import netcl_optim as no
    from netcl_optim.amp import dynamic_loss_scale
    from netcl_optim.schedules import _schedules as S
    from netcl_optim.stateful import OneCycleLR, StepLR, _clip

    class Opt:
        param_groups = [{"lr": 0.1}, {"lr": 0.2}]  # noqa: RUF012

    calls = [
        lambda: no.adam(b1=1.0),
        lambda: no.scale(math.nan),
        lambda: S.polynomial_schedule(1.0, 0.0, -1.0, 10),
        lambda: S.exponential_decay(1.0, 10, 0.5, transition_begin=-1),
        lambda: StepLR(Opt(), step_size=0),
        lambda: OneCycleLR(Opt(), max_lr=[1.0, -1.0], total_steps=10),
        lambda: dynamic_loss_scale(init_scale=0.0),
        lambda: _clip.clip_grad_norm([], -1.0),
        lambda: no.apply_if_finite(no.sgd(0.1), -1),
        lambda: no.MultiSteps(no.sgd(0.1), 0),
        lambda: no.reduce_on_plateau(factor=1.0),
    ]
    for call in calls:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert STYLE.match(str(info.value)), str(info.value)
    with pytest.raises(ValueError) as info:
        OneCycleLR(Opt(), max_lr=[1.0, -1.0], total_steps=10)
    assert str(info.value).endswith("(must be a finite number > 0) in param_groups[1]")


def test_the_module_is_the_only_home_of_scheduled_value():
    import netcl_optim._base as base

    assert not hasattr(base, "ScheduledValue") and not hasattr(base, "check_positive")
    assert V.ScheduledValue is ScheduledValue


@pytest.mark.parametrize(
    "key, value", [("mode", "maximum"), ("threshold", -1.0), ("threshold_mode", "relative")]
)
def test_plateau_scheduler_checks_a_loaded_state_dict_before_changing_anything(key, value):
    from netcl_optim.stateful import ReduceLROnPlateau

    class Opt:
        param_groups = [{"lr": 0.1}]  # noqa: RUF012

    sched = ReduceLROnPlateau(Opt(), patience=0)
    sched.step(1.0)
    before = sched.state_dict()
    saved = {**ReduceLROnPlateau(Opt(), mode="max").state_dict(), key: value}
    with pytest.raises(ValueError, match=rf"^Invalid {key}: .* in the loaded state_dict$"):
        sched.load_state_dict(saved)
    assert sched.state_dict() == before
