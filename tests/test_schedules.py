"""Functional schedules: hand formulas at the boundaries, properties, errors, optax parity.

Host only: no pyopencl, no device.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netcl_optim.schedules import _schedules as S

FAST = settings(max_examples=50, deadline=None)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-13, abs_tol=1e-15)


def cos_factor(pct: float) -> float:
    """(1 + cos(pi * pct)) / 2, the textbook form."""
    return (1 + math.cos(math.pi * pct)) / 2


# ---------------------------------------------------------------------------- hand formulas


def test_constant_schedule_returns_python_float():
    s = S.constant_schedule(3)
    assert s(0) == 3.0 and s(10**9) == 3.0
    assert type(s(5)) is float


def test_linear_schedule_boundaries():
    s = S.linear_schedule(1.0, 0.1, transition_steps=10, transition_begin=5)
    assert s(0) == 1.0 and s(5) == 1.0  # held until transition_begin
    assert close(s(6), 1.0 - 0.9 * 1 / 10)
    assert close(s(10), 0.55)
    assert close(s(15), 0.1) and close(s(1000), 0.1)  # end, then clamped


def test_polynomial_schedule_boundaries():
    s = S.polynomial_schedule(1.0, 0.01, power=2, transition_steps=100, transition_begin=5)
    assert s(0) == 1.0 and s(5) == 1.0
    assert close(s(6), 0.99 * (1 - 1 / 100) ** 2 + 0.01)
    assert close(s(105), 0.01) and close(s(110), 0.01)


def test_non_positive_transition_steps_is_constant_init():  # optax: annealing disabled
    assert S.polynomial_schedule(2.0, 0.0, 1, transition_steps=0)(50) == 2.0
    assert S.linear_schedule(2.0, 0.0, transition_steps=-3)(50) == 2.0
    assert S.exponential_decay(2.0, transition_steps=0, decay_rate=0.5)(50) == 2.0


def test_exponential_decay_continuous_and_staircase():
    s = S.exponential_decay(0.5, transition_steps=10, decay_rate=0.1, transition_begin=3)
    assert s(0) == 0.5 and s(3) == 0.5
    assert close(s(8), 0.5 * 0.1**0.5)
    assert close(s(23), 0.5 * 0.1**2)
    st_ = S.exponential_decay(0.5, 10, 0.1, transition_begin=3, staircase=True)
    assert st_(12) == 0.5 and close(st_(13), 0.05) and close(st_(22), 0.05)


def test_exponential_decay_end_value_bounds():
    down = S.exponential_decay(1.0, 1, 0.5, end_value=0.1)  # rate < 1: lower bound
    assert close(down(3), 0.125) and down(4) == 0.1 and down(100) == 0.1
    up = S.exponential_decay(1.0, 1, 2.0, end_value=5.0)  # rate > 1: upper bound
    assert up(2) == 4.0 and up(3) == 5.0
    assert S.exponential_decay(1.0, 1, 0.0)(5) == 1.0  # rate 0: constant (optax)


def test_piecewise_constant_schedule():
    s = S.piecewise_constant_schedule(1.0, {200: 0.01, 100: 0.1})  # order does not matter
    assert s(0) == 1.0 and s(99) == 1.0
    assert s(100) == 0.1 and s(199) == 0.1
    assert close(s(200), 0.001) and close(s(10**6), 0.001)
    assert S.piecewise_constant_schedule(0.3)(7) == 0.3


def test_cosine_decay_schedule_boundaries_and_clamp():
    s = S.cosine_decay_schedule(0.1, decay_steps=100, alpha=0.1)
    assert close(s(0), 0.1)
    assert close(s(50), 0.1 * (0.9 * 0.5 + 0.1))
    assert close(s(100), 0.01)
    assert close(s(150), 0.01) and close(s(10**6), 0.01)  # clamps after decay_steps
    e = S.cosine_decay_schedule(2.0, decay_steps=10, exponent=2.0)
    assert close(e(3), 2.0 * cos_factor(0.3) ** 2)


def test_warmup_cosine_decay_schedule_boundaries():
    s = S.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=110, end_value=0.1)
    assert s(0) == 0.0
    assert close(s(5), 0.5)
    assert close(s(10), 1.0)  # warmup end: peak
    assert close(s(60), 0.1 + 0.9 * 0.5)
    assert close(s(110), 0.1) and close(s(500), 0.1)  # decay end, then clamped
    pure = S.warmup_cosine_decay_schedule(0.3, 1.0, warmup_steps=0, decay_steps=20)
    assert close(pure(0), 1.0) and close(pure(10), 0.5)  # warmup 0: pure cosine from peak


def test_warmup_constant_schedule():
    s = S.warmup_constant_schedule(0.1, 1.0, warmup_steps=9)
    assert close(s(0), 0.1) and close(s(3), 0.4) and close(s(9), 1.0) and close(s(99), 1.0)
    # Deliberate departure from optax (which would hold init_value for ever): no warmup.
    assert S.warmup_constant_schedule(0.1, 1.0, warmup_steps=0)(0) == 1.0


def test_piecewise_interpolate_schedule_linear_and_cosine():
    lin = S.piecewise_interpolate_schedule("linear", 1.0, {4: 0.1, 8: 0.01})
    expected = {0: 1.0, 2: 0.55, 4: 0.1, 6: 0.0505, 8: 0.001, 10: 0.001}  # optax's docstring
    for count, value in expected.items():
        assert close(lin(count), value), count
    cos = S.piecewise_interpolate_schedule("cosine", 1.0, {10: 0.5})
    assert close(cos(0), 1.0) and close(cos(5), 0.75) and close(cos(10), 0.5)
    assert close(cos(3), 0.5 + 0.5 * cos_factor(0.3))
    assert lin(-1) == 1.0  # negative counts: init_value (optax: 0)


def test_cosine_onecycle_schedule_boundaries():
    s = S.cosine_onecycle_schedule(100, 1.0, pct_start=0.3, div_factor=25, final_div_factor=1e4)
    assert close(s(0), 1 / 25)
    assert close(s(15), 1.0 + (1 / 25 - 1.0) * cos_factor(0.5))
    assert close(s(30), 1.0)
    assert close(s(100), 1 / 25 / 1e4) and close(s(200), 1 / 25 / 1e4)


def test_linear_onecycle_schedule_boundaries():
    s = S.linear_onecycle_schedule(100, 2.0, pct_start=0.25, pct_final=0.75)
    init = 2.0 / 25
    assert close(s(0), init) and close(s(25), 2.0) and close(s(75), init)
    assert close(s(50), (2.0 + init) / 2)
    assert close(s(100), init / 1e4) and close(s(150), init / 1e4)


def test_join_schedules_feeds_count_since_boundary():
    s = S.join_schedules(
        [S.constant_schedule(1.0), lambda c: 10.0 + c, lambda c: 100.0 + c], [5, 8]
    )
    assert [s(c) for c in (0, 4, 5, 7, 8, 9)] == [1.0, 1.0, 10.0, 12.0, 100.0, 101.0]


def test_sgdr_schedule_restarts():
    kw = dict(init_value=0.0, peak_value=1.0, warmup_steps=2, decay_steps=10)
    s = S.sgdr_schedule([kw, dict(kw, peak_value=0.5)])
    assert s(0) == 0.0 and close(s(2), 1.0) and close(s(10), 0.0)
    assert s(10) == S.warmup_cosine_decay_schedule(**kw)(10)
    assert close(s(12), 0.5) and close(s(16), 0.25)  # second cycle, count since 10
    assert close(s(100), 0.0)


# ---------------------------------------------------------------------------- properties

values = st.floats(1e-6, 10.0)
counts = st.integers(0, 10_000)


@FAST
@given(init=values, alpha=st.floats(0.0, 1.0), steps=st.integers(1, 1000), count=counts)
def test_cosine_decay_between_alpha_init_and_init(init, alpha, steps, count):
    v = S.cosine_decay_schedule(init, steps, alpha=alpha)(count)
    assert alpha * init * (1 - 1e-12) <= v <= init * (1 + 1e-12)


@FAST
@given(
    init=st.floats(0.0, 1.0),
    peak=st.floats(1.0, 10.0),
    warmup=st.integers(1, 200),
    decay=st.integers(1, 200),
    end=st.floats(0.0, 1.0),
)
def test_warmup_is_monotone_then_decay_is_monotone(init, peak, warmup, decay, end):
    s = S.warmup_cosine_decay_schedule(init, peak, warmup, warmup + decay, end_value=end)
    up = [s(c) for c in range(warmup + 1)]
    down = [s(c) for c in range(warmup, warmup + decay + 5)]
    assert all(a <= b * (1 + 1e-12) for a, b in itertools.pairwise(up))
    assert all(a * (1 + 1e-12) >= b for a, b in itertools.pairwise(down))
    assert math.isclose(up[-1], peak, rel_tol=1e-12)
    assert math.isclose(down[-1], end, abs_tol=1e-12)


@FAST
@given(
    init=values,
    items=st.dictionaries(st.integers(0, 500), st.just(0.0) | st.floats(1e-3, 3.0), max_size=5),
    count=st.integers(0, 600),
)
def test_piecewise_constant_is_product_of_passed_scales(init, items, count):
    expected = init * math.prod(s for b, s in items.items() if b <= count)
    assert math.isclose(S.piecewise_constant_schedule(init, items)(count), expected, rel_tol=1e-12)


@FAST
@given(
    init=values,
    end=values,
    power=st.floats(0.0, 4.0),
    steps=st.integers(1, 500),
    begin=st.integers(0, 50),
    count=st.integers(0, 1000),
)
def test_polynomial_stays_between_init_and_end(init, end, power, steps, begin, count):
    v = S.polynomial_schedule(init, end, power, steps, begin)(count)
    lo, hi = min(init, end), max(init, end)
    assert lo - 1e-12 * hi <= v <= hi * (1 + 1e-12)  # (init - end) * f + end: absolute error


@FAST
@given(init=values, rate=st.floats(0.01, 0.99), steps=st.integers(1, 50), count=counts)
def test_staircase_is_constant_within_a_period(init, rate, steps, count):
    s = S.exponential_decay(init, steps, rate, staircase=True)
    start = count - count % steps
    assert s(count) == s(start)


# ---------------------------------------------------------------------------- errors

ERRORS = [
    (S.cosine_decay_schedule, dict(init_value=1.0, decay_steps=0), "decay_steps"),
    (S.cosine_decay_schedule, dict(init_value=1.0, decay_steps=-5), "decay_steps"),
    (S.polynomial_schedule, dict(init_value=1, end_value=0, power=-1, transition_steps=5), "power"),
    (
        S.polynomial_schedule,
        dict(init_value=1, end_value=0, power=1, transition_steps=5, transition_begin=-1),
        "transition_begin",
    ),
    (
        S.linear_schedule,
        dict(init_value=1, end_value=0, transition_steps=5, transition_begin=-2),
        "transition_begin",
    ),
    (S.exponential_decay, dict(init_value=1, transition_steps=5, decay_rate=-0.5), "decay_rate"),
    (
        S.exponential_decay,
        dict(init_value=1, transition_steps=5, decay_rate=0.5, transition_begin=-1),
        "transition_begin",
    ),
    (
        S.exponential_decay,
        dict(init_value=1, transition_steps=5, decay_rate=math.nan),
        "decay_rate",
    ),
    (S.piecewise_constant_schedule, dict(init_value=1, boundaries_and_scales={5: -0.1}), "scales"),
    (
        S.piecewise_constant_schedule,
        dict(init_value=1, boundaries_and_scales={-5: 0.1}),
        "boundary",
    ),
    (S.piecewise_interpolate_schedule, dict(interpolate_type="cubic", init_value=1), "interpolate"),
    (
        S.piecewise_interpolate_schedule,
        dict(interpolate_type="linear", init_value=1, boundaries_and_scales={5: -1.0}),
        "scales",
    ),
    (
        S.warmup_cosine_decay_schedule,
        dict(init_value=0, peak_value=1, warmup_steps=10, decay_steps=10),
        "decay_steps",
    ),
    (
        S.warmup_cosine_decay_schedule,
        dict(init_value=0, peak_value=1, warmup_steps=-1, decay_steps=10),
        "warmup_steps",
    ),
    (S.warmup_constant_schedule, dict(init_value=0, peak_value=1, warmup_steps=-1), "warmup_steps"),
    (S.cosine_onecycle_schedule, dict(transition_steps=0, peak_value=1), "transition_steps"),
    (
        S.cosine_onecycle_schedule,
        dict(transition_steps=10, peak_value=1, pct_start=1.5),
        "pct_start",
    ),
    (
        S.cosine_onecycle_schedule,
        dict(transition_steps=10, peak_value=1, div_factor=0),
        "div_factor",
    ),
    (
        S.cosine_onecycle_schedule,
        dict(transition_steps=10, peak_value=1, final_div_factor=-1),
        "final_div_factor",
    ),
    (S.linear_onecycle_schedule, dict(transition_steps=-1, peak_value=1), "transition_steps"),
    (
        S.linear_onecycle_schedule,
        dict(transition_steps=10, peak_value=1, pct_start=0.5, pct_final=0.4),
        "pct_final",
    ),
    (
        S.linear_onecycle_schedule,
        dict(transition_steps=10, peak_value=1, pct_start=-0.1),
        "pct_start",
    ),
    (S.join_schedules, dict(schedules=[], boundaries=[]), "schedules"),
    (S.join_schedules, dict(schedules=[S.constant_schedule(1.0)] * 2, boundaries=[]), "boundaries"),
    (S.sgdr_schedule, dict(cosine_kwargs=[]), "cosine_kwargs"),
    (
        S.sgdr_schedule,
        dict(cosine_kwargs=[dict(init_value=0, peak_value=1, warmup_steps=5, decay_steps=3)]),
        "decay_steps",
    ),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"), ERRORS, ids=[f"{f.__name__}-{n}" for f, _, n in ERRORS]
)
def test_invalid_arguments_raise_value_error_naming_them(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


# ---------------------------------------------------------------------------- optax parity

_WC = dict(init_value=0.0, peak_value=1.0, warmup_steps=10, decay_steps=150)
OPTAX_CASES = [
    ("constant_schedule", dict(value=0.3)),
    ("linear_schedule", dict(init_value=1.0, end_value=0.01, transition_steps=100)),
    (
        "linear_schedule",
        dict(init_value=0.2, end_value=1.0, transition_steps=50, transition_begin=20),
    ),
    (
        "polynomial_schedule",
        dict(init_value=1.0, end_value=0.01, power=2.5, transition_steps=90, transition_begin=7),
    ),
    ("polynomial_schedule", dict(init_value=1.0, end_value=0.5, power=1, transition_steps=0)),
    ("exponential_decay", dict(init_value=0.5, transition_steps=13, decay_rate=0.7)),
    (
        "exponential_decay",
        dict(
            init_value=0.5,
            transition_steps=13,
            decay_rate=0.7,
            transition_begin=4,
            staircase=True,
            end_value=0.01,
        ),
    ),
    ("exponential_decay", dict(init_value=0.5, transition_steps=13, decay_rate=1.3, end_value=3)),
    (
        "piecewise_constant_schedule",
        dict(init_value=1.0, boundaries_and_scales={50: 0.1, 20: 0.5, 150: 2.0}),
    ),
    ("piecewise_constant_schedule", dict(init_value=1.0)),
    ("cosine_decay_schedule", dict(init_value=0.1, decay_steps=120)),
    ("cosine_decay_schedule", dict(init_value=0.1, decay_steps=120, alpha=0.05, exponent=2.0)),
    ("warmup_cosine_decay_schedule", dict(_WC, end_value=0.1)),
    ("warmup_cosine_decay_schedule", dict(_WC, warmup_steps=0, init_value=0.5, exponent=1.5)),
    ("warmup_constant_schedule", dict(init_value=0.1, peak_value=1.0, warmup_steps=30)),
    ("cosine_onecycle_schedule", dict(transition_steps=150, peak_value=1.0)),
    ("cosine_onecycle_schedule", dict(transition_steps=77, peak_value=2.0, pct_start=0.5)),
    ("linear_onecycle_schedule", dict(transition_steps=150, peak_value=1.0)),
    (
        "linear_onecycle_schedule",
        dict(transition_steps=99, peak_value=3.0, pct_start=0.2, pct_final=0.6, div_factor=10),
    ),
    (
        "piecewise_interpolate_schedule",
        dict(interpolate_type="linear", init_value=1.0, boundaries_and_scales={40: 0.1, 90: 0.5}),
    ),
    (
        "piecewise_interpolate_schedule",
        dict(interpolate_type="cosine", init_value=1.0, boundaries_and_scales={40: 0.1, 90: 0.5}),
    ),
    (
        "sgdr_schedule",
        dict(
            cosine_kwargs=[
                _WC | dict(decay_steps=50),
                dict(
                    init_value=0.1, peak_value=0.5, warmup_steps=3, decay_steps=60, end_value=0.01
                ),
            ]
        ),
    ),
]


def _x64():
    """jax's float64 mode for the comparison only (optax computes in float32 otherwise)."""
    import jax

    enable = getattr(jax, "enable_x64", None)
    if enable is None:  # older jax
        enable = getattr(jax.experimental, "enable_x64", None)
    return enable(True) if enable is not None else contextlib.nullcontext()


@pytest.mark.parametrize(
    ("name", "kwargs"), OPTAX_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPTAX_CASES)]
)
def test_matches_optax_over_0_to_200(name, kwargs):
    optax = pytest.importorskip("optax")
    ours = getattr(S, name)(**kwargs)
    with _x64():
        theirs = getattr(optax, name)(**kwargs)
        expected = [float(theirs(c)) for c in range(201)]
        x64 = theirs(0.0).dtype.itemsize == 8 if hasattr(theirs(0.0), "dtype") else True
    # Both compute the same float64 expressions (bitwise equal here); 1e-12 leaves room for
    # another libm's pow/cos. Without x64, optax rounds to float32: 1e-6.
    rtol = 1e-12 if x64 else 1e-6
    for c, want in enumerate(expected):
        got = ours(c)
        assert type(got) is float
        assert math.isclose(got, want, rel_tol=rtol, abs_tol=1e-300), (c, got, want)
