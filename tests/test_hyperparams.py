"""inject_hyperparams and reduce_on_plateau: optax semantics, fused, no kernel rebuilds.

inject_hyperparams over every functional optimizer must give the numbers of the optimizer
built directly (bit for bit, float32): a float learning rate, a constant schedule and any
schedule (``no.adam(learning_rate=schedule)`` is the same chain) over 10 steps, and the
float64 numpy references of tests/reference.py. ``state.hyperparams`` follows optax (after
init: ``sched(0)``; after the n-th update: the value that update used, ``sched(n - 1)``),
writable between steps; non-numeric arguments are static. Changing a hyperparameter never
builds a kernel and a packed tree still steps in one launch. Moving a hyperparameter to or
from 0 where that changes the chain's structure is a ValueError. optax's inject_hyperparams
and optax.contrib.reduce_on_plateau are cross-checked when they import.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optree
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

no = pytest.importorskip("netcl_optim")
S = pytest.importorskip("netcl_optim.schedules")
programs = pytest.importorskip("netcl_optim.fusion._programs")

F32 = np.float32
STEPS = 10
SHAPES = {"w": (3, 5), "b": (7,), "c": (2, 3, 4)}  # 46 elements: one launch (no split)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def host_tree(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(F32) for k, s in SHAPES.items()}


def dev(tree: Any) -> Any:
    return no.pack(no.to_device(tree, no.default_queue()))


PARAMS0 = host_tree(0)
GRADS = [host_tree(100 + i) for i in range(STEPS)]


def bits(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def assert_bitwise(a: Any, b: Any, what: str = "") -> None:
    la, ta = optree.tree_flatten(no.to_host(a))
    lb, tb = optree.tree_flatten(no.to_host(b))
    assert ta == tb, what
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, what
        assert np.array_equal(bits(x), bits(y)), f"{what}: not bitwise equal\n{x}\n{y}"


def run_steps(tx, grads=GRADS, params0=PARAMS0, **extra) -> tuple[list[Any], Any]:
    """``no.step`` over ``grads`` from ``params0``: host params after each step, final state."""
    params = dev(params0)
    state = tx.init(params)
    out = []
    for g in grads:
        params, state = no.step(tx, params, dev(g), state, **extra)
        out.append(no.to_host(params))
    return out, state


def inject(factory):
    return no.inject_hyperparams(factory)


# (factory, numeric/static hyperparameters besides the learning rate, reference factory)
OPTIMIZERS = {
    "sgd": (no.sgd, {}, ref.functional.sgd),
    "sgd-momentum-wd": (
        no.sgd,
        {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2},
        ref.functional.sgd,
    ),
    "momentum-nesterov": (
        no.momentum,
        {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-3},
        ref.functional.momentum,
    ),
    "adam": (
        no.adam,
        {"b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 1e-2},
        ref.functional.adam,
    ),
    "adamw": (no.adamw, {"weight_decay": 0.05}, ref.functional.adamw),
    "rmsprop-centered": (
        no.rmsprop,
        {"alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 1e-3},
        ref.functional.rmsprop,
    ),
}
OPT_IDS = list(OPTIMIZERS)

SCHEDULES = {
    "constant": lambda: S.constant_schedule(0.03),
    "cosine": lambda: S.cosine_decay_schedule(0.05, 8, alpha=0.1),
    "exponential-staircase": lambda: S.exponential_decay(0.05, 3, 0.5, staircase=True),
    "piecewise": lambda: S.piecewise_constant_schedule(0.05, {3: 0.5, 6: 0.1}),
    "warmup-cosine": lambda: S.warmup_cosine_decay_schedule(0.01, 0.05, 3, 10, end_value=1e-3),
    "linear": lambda: S.linear_schedule(0.05, 0.005, 10),
}
SCHED_IDS = list(SCHEDULES)


# ---------------------------------------------------------------------------------------------
# numbers: equal to the optimizer built directly, and to the numpy references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPT_IDS)
def test_float_learning_rate_equals_plain_optimizer(cl_queue, name):
    factory, kw, _ = OPTIMIZERS[name]
    got, state = run_steps(inject(factory)(learning_rate=0.03, **kw))
    want, _ = run_steps(factory(0.03, **kw))
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_bitwise(g, w, f"{name} step {k + 1}")
    numeric = {k: float(v) for k, v in kw.items() if not isinstance(v, bool)}
    assert state.hyperparams == {**numeric, "learning_rate": 0.03}
    assert state.count == STEPS


@pytest.mark.parametrize("name", OPT_IDS)
def test_constant_schedule_equals_constant_learning_rate(cl_queue, name):
    factory, kw, _ = OPTIMIZERS[name]
    got, state = run_steps(inject(factory)(learning_rate=S.constant_schedule(0.03), **kw))
    want, _ = run_steps(factory(0.03, **kw))
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_bitwise(g, w, f"{name} step {k + 1}")
    assert state.hyperparams["learning_rate"] == 0.03


@pytest.mark.parametrize("sched_name", SCHED_IDS)
@pytest.mark.parametrize("name", OPT_IDS)
def test_schedule_equals_alias_with_schedule_and_reference(cl_queue, name, sched_name):
    """``inject(f)(learning_rate=s)`` == ``f(s)`` (a scale_by_schedule chain) bit for bit, and
    the float64 reference with the schedule evaluated at the update count."""
    factory, kw, ref_factory = OPTIMIZERS[name]
    sched = SCHEDULES[sched_name]()
    got, _ = run_steps(inject(factory)(learning_rate=sched, **kw))
    want, _ = run_steps(factory(sched, **kw))
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_bitwise(g, w, f"{name}/{sched_name} step {k + 1}")
    ref_params, _, _ = ref.run_transform(
        ref_factory(sched, **kw), PARAMS0, GRADS, storage_dtype=F32
    )
    for k, (g, r) in enumerate(zip(got, ref_params, strict=True)):
        for key in SHAPES:
            np.testing.assert_allclose(
                g[key], r[key], rtol=2e-5, atol=2e-6, err_msg=f"{name}/{sched_name} step {k + 1}"
            )


def test_schedule_is_evaluated_at_the_update_count(cl_queue):
    """By hand (SGD): the first update uses ``sched(0)``, the second ``sched(1)``."""
    sched = S.piecewise_constant_schedule(0.05, {1: 0.1})
    got, _ = run_steps(inject(no.sgd)(learning_rate=sched), grads=GRADS[:2])
    # the first update uses sched(0) = 0.05: p1 = p0 - 0.05 g0 (float32)
    p1 = (PARAMS0["w"] + F32(-0.05) * GRADS[0]["w"]).astype(F32)
    assert np.array_equal(got[0]["w"], p1)
    p2 = (p1 + F32(-0.005) * GRADS[1]["w"]).astype(F32)
    assert np.array_equal(got[1]["w"], p2)


# ---------------------------------------------------------------------------------------------
# state.hyperparams semantics (optax)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sched_name", SCHED_IDS)
def test_hyperparams_hold_the_value_used_by_the_last_update(cl_queue, sched_name):
    sched = SCHEDULES[sched_name]()
    tx = inject(no.adam)(learning_rate=sched, b1=0.85)
    params = dev(PARAMS0)
    state = tx.init(params)
    assert state.count == 0
    assert state.hyperparams == {"learning_rate": sched(0), "b1": 0.85}
    for n, g in enumerate(GRADS, start=1):
        params, state = no.step(tx, params, dev(g), state)
        assert state.count == n
        assert state.hyperparams == {"learning_rate": sched(n - 1), "b1": 0.85}, n
    # update() follows the same rule as step()
    _, state = tx.update(dev(GRADS[0]), state, params)
    assert state.hyperparams["learning_rate"] == sched(STEPS)
    assert state.count == STEPS + 1


@pytest.mark.parametrize("name", OPT_IDS)
def test_writing_a_hyperparameter_changes_the_next_update(cl_queue, name):
    """Writing ``state.hyperparams[k]`` between steps = continuing with ``factory(k=new)``."""
    factory, kw, _ = OPTIMIZERS[name]
    numeric = [k for k, v in kw.items() if not isinstance(v, bool) and v]
    tx = inject(factory)(learning_rate=0.03, **kw)
    plain = factory(0.03, **kw)
    params, pparams = dev(PARAMS0), dev(PARAMS0)
    state, pstate = tx.init(params), plain.init(pparams)
    for g in GRADS[:3]:
        params, state = no.step(tx, params, dev(g), state)
        pparams, pstate = no.step(plain, pparams, dev(g), pstate)
    assert_bitwise(params, pparams, "before the write")

    # the learning rate, then every other numeric hyperparameter in turn
    changes = [{"learning_rate": 0.007}] + [{k: kw[k] * 0.5} for k in numeric]
    current = {"learning_rate": 0.03, **kw}
    for k, change in enumerate(changes):
        state.hyperparams.update(change)
        current.update(change)
        lr = current.pop("learning_rate")
        plain = factory(lr, **current)
        current["learning_rate"] = lr
        g = dev(GRADS[3 + k % (STEPS - 3)])
        params, state = no.step(tx, params, g, state)
        pparams, pstate = no.step(plain, pparams, g, pstate)
        assert_bitwise(params, pparams, f"after writing {change}")
        for key, value in change.items():
            assert state.hyperparams[key] == value
    # a different value really gives different numbers (the comparison can fail)
    other = factory(0.5, **{k: v for k, v in current.items() if k != "learning_rate"})
    p_other, _ = no.step(other, pparams, dev(GRADS[0]), pstate)
    p_same, _ = no.step(tx, params, dev(GRADS[0]), state)
    assert not np.array_equal(no.to_host(p_other)["w"], no.to_host(p_same)["w"])


def test_writing_through_replace_changes_the_next_update(cl_queue):
    tx = inject(no.sgd)(learning_rate=0.1)
    params = dev(PARAMS0)
    state = tx.init(params)
    state = state._replace(hyperparams={"learning_rate": 0.25})
    params, state = no.step(tx, params, dev(GRADS[0]), state)
    want = (PARAMS0["b"] + F32(-0.25) * GRADS[0]["b"]).astype(F32)
    assert np.array_equal(no.to_host(params)["b"], want)
    assert state.hyperparams == {"learning_rate": 0.25}


def test_a_scheduled_hyperparameter_ignores_writes(cl_queue):
    """As optax: the schedule's value replaces whatever was written for that name."""
    sched = S.cosine_decay_schedule(0.05, 8)
    tx = inject(no.adam)(learning_rate=sched)
    params = dev(PARAMS0)
    state = tx.init(params)
    for g in GRADS[:4]:
        state.hyperparams["learning_rate"] = 123.0
        params, state = no.step(tx, params, dev(g), state)
    want, _ = run_steps(no.adam(sched), grads=GRADS[:4])
    assert_bitwise(params, want[-1])
    assert state.hyperparams["learning_rate"] == sched(3)


def test_non_numeric_arguments_are_static(cl_queue):
    tx = inject(no.sgd)(learning_rate=0.1, momentum=0.9, nesterov=True)
    params = dev(PARAMS0)
    state = tx.init(params)
    assert "nesterov" not in state.hyperparams
    assert state.hyperparams == {"learning_rate": 0.1, "momentum": 0.9}
    got, _ = run_steps(tx, grads=GRADS[:4])
    want, _ = run_steps(no.sgd(0.1, momentum=0.9, nesterov=True), grads=GRADS[:4])
    plain, _ = run_steps(no.sgd(0.1, momentum=0.9, nesterov=False), grads=GRADS[:4])
    assert_bitwise(got[-1], want[-1])
    assert not np.array_equal(got[-1]["w"], plain[-1]["w"])  # nesterov really is used

    # a static mask (adamw): a tree of bools is not a hyperparameter either
    mask = {"w": True, "b": False, "c": True}
    tx = inject(no.adamw)(learning_rate=0.01, weight_decay=0.1, mask=mask)
    state = tx.init(dev(PARAMS0))
    assert set(state.hyperparams) == {"learning_rate", "weight_decay"}
    got, _ = run_steps(tx, grads=GRADS[:3])
    want, _ = run_steps(no.adamw(0.01, weight_decay=0.1, mask=mask), grads=GRADS[:3])
    assert_bitwise(got[-1], want[-1])


def test_positional_arguments_are_refused():
    with pytest.raises(TypeError, match="keyword"):
        inject(no.sgd)(0.1)


def test_invalid_hyperparameters_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"b1|beta"):
        inject(no.adam)(learning_rate=0.1, b1=1.5)
    with pytest.raises(ValueError, match="learning_rate"):
        inject(no.adam)(learning_rate=-0.1)


# ---------------------------------------------------------------------------------------------
# kernels: no rebuilds, one launch per step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPT_IDS)
def test_changing_hyperparameters_never_rebuilds_a_kernel(cl_queue, name):
    factory, kw, _ = OPTIMIZERS[name]
    numeric = {k: v for k, v in kw.items() if not isinstance(v, bool) and v}
    sched = S.cosine_decay_schedule(0.05, 20, alpha=0.1)
    tx = inject(factory)(
        learning_rate=sched, **numeric, **{k: v for k, v in kw.items() if isinstance(v, bool)}
    )
    params, grads = dev(PARAMS0), dev(GRADS[0])
    state = tx.init(params)
    params, state = no.step(tx, params, grads, state)  # builds what it needs
    built = programs.build_count
    seen_lrs = set()
    for k in range(1, STEPS):
        for key, v in numeric.items():  # a new value of every numeric hyperparameter
            state.hyperparams[key] = v * (1.0 - 0.03 * k)
        with no.count_launches() as c:
            params, state = no.step(tx, params, dev(GRADS[k]), state)
        assert c.launches == 1, c.kernels
        assert len(c.kernels) == 1
        seen_lrs.add(state.hyperparams["learning_rate"])
        assert programs.build_count == built, f"step {k + 1} built a kernel"
    assert len(seen_lrs) == STEPS - 1  # the lr really changed every step


def test_inject_is_one_launch_per_step_with_update_too(cl_queue):
    tx = inject(no.adamw)(learning_rate=S.linear_schedule(0.05, 0.01, 5), weight_decay=0.1)
    params, grads = dev(PARAMS0), dev(GRADS[0])
    state = tx.init(params)
    for _ in range(3):
        with no.count_launches() as c:
            u, state = tx.update(grads, state, params)
        assert c.launches == 1
        with no.count_launches() as c:
            params = no.apply_updates(params, u)
        assert c.launches == 1


# ---------------------------------------------------------------------------------------------
# to / from 0: the structure of the chain changes
# ---------------------------------------------------------------------------------------------

ZERO_CASES = [
    # factory, constructor kwargs, name, new value
    (no.sgd, {"learning_rate": 0.1, "momentum": 0.9}, "momentum", 0.0),
    (no.sgd, {"learning_rate": 0.1, "momentum": 0.0}, "momentum", 0.9),
    (no.sgd, {"learning_rate": 0.1, "weight_decay": 0.0}, "weight_decay", 1e-2),
    (no.adam, {"learning_rate": 0.1, "weight_decay": 1e-2}, "weight_decay", 0.0),
    (no.adamw, {"learning_rate": 0.1, "weight_decay": 1e-2}, "weight_decay", 0.0),
    (no.rmsprop, {"learning_rate": 0.1, "momentum": 0.5}, "momentum", 0.0),
    (no.rmsprop, {"learning_rate": 0.1, "weight_decay": 0.0}, "weight_decay", 0.5),
]


@pytest.mark.parametrize(
    "factory,kwargs,name,value",
    ZERO_CASES,
    ids=[f"{c[0].__name__}-{c[2]}->{c[3]}" for c in ZERO_CASES],
)
def test_moving_a_hyperparameter_to_or_from_zero_raises(cl_queue, factory, kwargs, name, value):
    tx = inject(factory)(**kwargs)
    params, grads = dev(PARAMS0), dev(GRADS[0])
    state = tx.init(params)
    params, state = no.step(tx, params, grads, state)
    before = no.to_host(params)
    state.hyperparams[name] = value
    with no.count_launches() as c, pytest.raises(ValueError, match=rf"{name}.*\b0\b"):
        no.step(tx, params, grads, state)
    assert c.launches == 0
    assert state.count == 1
    assert_bitwise(params, before, "params after the refused step")
    # putting a nonzero value back works
    state.hyperparams[name] = kwargs[name]
    params, state = no.step(tx, params, grads, state)
    assert state.count == 2


def test_a_schedule_reaching_zero_for_a_structural_hyperparameter_raises(cl_queue):
    wd = S.piecewise_constant_schedule(0.01, {2: 0.0})
    tx = inject(no.adamw)(learning_rate=0.01, weight_decay=wd)
    params, grads = dev(PARAMS0), dev(GRADS[0])
    state = tx.init(params)
    for _ in range(2):
        params, state = no.step(tx, params, grads, state)
    with pytest.raises(ValueError, match="weight_decay"):
        no.step(tx, params, grads, state)


ZERO_LR_SCHEDULES = {
    "warmup-from-zero": lambda: S.warmup_cosine_decay_schedule(0.0, 0.05, 3, 10),
    "cosine-decay-to-zero": lambda: S.cosine_decay_schedule(0.05, 4),
    "linear-to-zero": lambda: S.linear_schedule(0.05, 0.0, 5),
}


@pytest.mark.parametrize(
    "sched_name,sched", list(ZERO_LR_SCHEDULES.items()), ids=list(ZERO_LR_SCHEDULES)
)
def test_a_learning_rate_schedule_may_reach_zero(cl_queue, sched_name, sched):
    """optax accepts a learning rate of 0 from a schedule (a warmup from 0 is the usual
    case), and so does ``no.adam(learning_rate=schedule)``; so must inject_hyperparams.
    The learning rate is not structural: 0 only scales the update by 0."""
    s = sched()
    got, state = run_steps(inject(no.adam)(learning_rate=s))
    want, _ = run_steps(no.adam(s))
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_bitwise(g, w, f"{sched_name} step {k + 1}")
    assert state.hyperparams["learning_rate"] == s(STEPS - 1)


# ---------------------------------------------------------------------------------------------
# optax's inject_hyperparams: the same hyperparams sequence
# ---------------------------------------------------------------------------------------------


def _optax_schedules(optax):
    return {
        "cosine": (
            S.cosine_decay_schedule(1e-2, 12, alpha=0.1),
            optax.schedules.cosine_decay_schedule(1e-2, 12, alpha=0.1),
            False,
        ),
        "piecewise-exact": (
            S.piecewise_constant_schedule(2.0**-6, {5: 0.5, 12: 0.25}),
            optax.schedules.piecewise_constant_schedule(2.0**-6, {5: 0.5, 12: 0.25}),
            True,
        ),
        "warmup-cosine": (
            S.warmup_cosine_decay_schedule(1e-3, 1e-2, 4, 16, end_value=1e-4),
            optax.schedules.warmup_cosine_decay_schedule(1e-3, 1e-2, 4, 16, end_value=1e-4),
            False,
        ),
        "exponential": (
            S.exponential_decay(1e-2, 3, 0.7, transition_begin=2),
            optax.schedules.exponential_decay(1e-2, 3, 0.7, transition_begin=2),
            False,
        ),
    }


@pytest.mark.parametrize(
    "sched_name", ["cosine", "piecewise-exact", "warmup-cosine", "exponential"]
)
def test_hyperparams_sequence_matches_optax(cl_queue, sched_name):
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    ours_sched, optax_sched, exact = _optax_schedules(optax)[sched_name]
    ours = inject(no.adam)(learning_rate=ours_sched, b1=0.85)
    theirs = optax.inject_hyperparams(optax.adam)(learning_rate=optax_sched, b1=0.85)
    shape = (5,)
    params = dev({"w": np.ones(shape, F32)})
    state = ours.init(params)
    o_params = {"w": jnp.ones(shape, jnp.float32)}
    o_state = theirs.init(o_params)
    o_update = jax.jit(theirs.update)

    def check(n: int) -> None:
        assert int(o_state.count) == state.count == n
        # ours holds only the hyperparameters passed; optax adds the factory's defaults
        assert set(state.hyperparams) <= set(o_state.hyperparams)
        for k, v in state.hyperparams.items():
            theirs_v = float(o_state.hyperparams[k])
            ours_v = float(F32(v))  # optax holds float32 values for float32 params
            if exact or k == "b1":
                assert ours_v == theirs_v, (n, k, v, theirs_v)
            else:
                assert ours_v == pytest.approx(theirs_v, rel=2e-6), (n, k, v, theirs_v)

    check(0)
    g_host = np.linspace(-1, 1, 5).astype(F32)
    for n in range(1, 21):
        if n == 10:  # a written numeric hyperparameter is used by the next update in both
            state.hyperparams["b1"] = 0.5
            o_state.hyperparams["b1"] = jnp.asarray(0.5, jnp.float32)
        params, state = no.step(ours, params, dev({"w": g_host}), state)
        _, o_state = o_update({"w": jnp.asarray(g_host)}, o_state, o_params)
        check(n)
    assert state.hyperparams["b1"] == 0.5


# ---------------------------------------------------------------------------------------------
# reduce_on_plateau
# ---------------------------------------------------------------------------------------------

PLATEAU_CONFIGS = [
    {},  # optax's defaults
    {"factor": 0.5, "patience": 0},
    {"factor": 0.5, "patience": 2, "cooldown": 1},
    {"factor": 0.3, "patience": 1, "cooldown": 2, "accumulation_size": 3},
    {"factor": 0.9, "patience": 3, "rtol": 0.0, "atol": 0.25, "min_scale": 0.6},
    {"factor": 0.2, "patience": 1, "rtol": 0.1, "atol": 0.05, "min_scale": 0.01},
    {"factor": 0.5, "patience": 0, "accumulation_size": 2, "min_scale": 0.1, "cooldown": 3},
]
PLATEAU_IDS = [",".join(f"{k}={v}" for k, v in c.items()) or "defaults" for c in PLATEAU_CONFIGS]

# metric sequences with plateaus: repeated small integers and any float, rounded to 6 decimals:
# XLA on CPU flushes subnormals to zero, which would make optax differ for no good reason
METRICS = st.lists(
    st.one_of(
        st.sampled_from([0.0, 0.5, 1.0, 1.0, 1.0, 2.0, 3.0]),
        st.integers(-3, 5).map(float),
        st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False).map(lambda x: round(x, 6)),
    ),
    min_size=1,
    max_size=40,
)

_OPTAX_PLATEAU: dict[int, Any] = {}


def _optax_plateau(index: int):
    """optax.contrib.reduce_on_plateau for a config: (init state, jitted update), float64."""
    if index not in _OPTAX_PLATEAU:
        jax = pytest.importorskip("jax")
        contrib = pytest.importorskip("optax.contrib")
        tx = contrib.reduce_on_plateau(**PLATEAU_CONFIGS[index])
        zero = jax.numpy.zeros((), jax.numpy.float64)

        def update(state, value):
            return tx.update(zero, state, value=value)[1]

        _OPTAX_PLATEAU[index] = (tx.init(zero), jax.jit(update))
    return _OPTAX_PLATEAU[index]


def _same_plateau_state(ours, theirs) -> None:
    assert ours.scale == float(theirs.scale)
    assert ours.best_value == float(theirs.best_value)
    assert ours.plateau_count == int(theirs.plateau_count)
    assert ours.cooldown_count == int(theirs.cooldown_count)
    assert ours.count == int(theirs.count)
    assert ours.avg_value == float(theirs.avg_value)


@pytest.mark.parametrize("index", range(len(PLATEAU_CONFIGS)), ids=PLATEAU_IDS)
@settings(max_examples=15, deadline=None)
@given(metrics=METRICS)
def test_reduce_on_plateau_matches_optax(cl_queue, index, metrics):
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax.contrib")
    tx = no.reduce_on_plateau(**PLATEAU_CONFIGS[index])
    g_host = np.array([1.0, -3.0, 0.1], F32)
    g = no.to_device(g_host, cl_queue)
    state = tx.init(g)
    with jax.enable_x64(True):  # optax in float64: the host arithmetic is ours exactly
        o_state, o_update = _optax_plateau(index)
        _same_plateau_state(state, o_state)
        for k, m in enumerate(metrics):
            u, state = tx.update(g, state, value=m)
            o_state = o_update(o_state, m)
            try:
                _same_plateau_state(state, o_state)
            except AssertionError:
                raise AssertionError(f"after metric {k}: ours {state}, optax {o_state}") from None
            # the update is scaled by the new state's scale (optax: new_state.scale * g)
            assert np.array_equal(u.get(), g_host * F32(state.scale))


def test_reduce_on_plateau_known_sequence(cl_queue):
    """Hand-computed: patience 1, factor 0.5, cooldown 1."""
    tx = no.reduce_on_plateau(factor=0.5, patience=1, cooldown=1)
    x = no.to_device(np.ones(2, F32), cl_queue)
    state = tx.init(x)
    assert (state.scale, state.best_value, state.plateau_count) == (1.0, math.inf, 0)
    scales = []
    for m in [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0]:
        _, state = tx.update(x, state, value=m)
        scales.append(state.scale)
    # 3, 2 improve; 2 (plateau 1 == patience): reduce, cooldown 1; 2: cooling; 2: plateau 1,
    # reduce again; 2: cooling; 1 improves; 1: plateau 1: reduce
    assert scales == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]
    assert state.best_value == 1.0


def test_reduce_on_plateau_accumulates_values(cl_queue):
    tx = no.reduce_on_plateau(factor=0.5, patience=0, accumulation_size=3)
    x = no.to_device(np.ones(2, F32), cl_queue)
    state = tx.init(x)
    for k, m in enumerate([1.0, 2.0, 6.0]):
        _, state = tx.update(x, state, value=m)
        if k < 2:
            assert state.count == k + 1 and state.scale == 1.0 and state.best_value == math.inf
    assert state.count == 0 and state.avg_value == 0.0
    assert state.best_value == 3.0  # the mean of the three values
    assert state.scale == 0.5  # patience 0: the plateau count (0) == patience


@pytest.mark.parametrize("metrics", [[1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5]])
def test_reduce_on_plateau_chained_after_adam(cl_queue, metrics):
    """``chain(adam, reduce_on_plateau)``: adam's update times ``state.scale``, one kernel."""
    tx = no.chain(no.adam(1e-2), no.reduce_on_plateau(factor=0.5, patience=1, cooldown=1))
    plain = no.adam(1e-2)
    params = dev(PARAMS0)
    state, pstate = tx.init(params), plain.init(params)
    scales = []
    for k, m in enumerate(metrics):
        g = dev(GRADS[k % STEPS])
        with no.count_launches() as c:
            u, state = tx.update(g, state, params, value=m)
        assert c.launches == 1
        pu, pstate = plain.update(g, pstate, params)
        scale = state[-1].scale
        scales.append(scale)
        hu, hp = no.to_host(u), no.to_host(pu)
        for key in SHAPES:
            assert np.array_equal(hu[key], hp[key] * F32(scale)), (k, key)
        params = no.apply_updates(params, u)  # the plain run sees the same params
    assert scales == [1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625]
    # step() passes value= through too, one launch for the update and the apply
    with no.count_launches() as c:
        _, state = no.step(tx, params, dev(GRADS[0]), state, value=0.5)
    assert c.launches == 1
    assert state[-1].scale == 0.03125


def test_reduce_on_plateau_with_inject_hyperparams(cl_queue):
    """The metric reaches a plateau transform inside an injected optimizer's chain."""

    def factory(learning_rate):
        return no.chain(no.sgd(learning_rate), no.reduce_on_plateau(factor=0.5, patience=0))

    tx = inject(factory)(learning_rate=0.1)
    params = dev(PARAMS0)
    state = tx.init(params)
    params, state = no.step(tx, params, dev(GRADS[0]), state, value=1.0)
    assert state.inner_state[-1].scale == 0.5
    want = (PARAMS0["w"] + (F32(-0.1) * GRADS[0]["w"]) * F32(0.5)).astype(F32)
    np.testing.assert_allclose(no.to_host(params)["w"], want, rtol=1e-6, atol=1e-7)


PLATEAU_INVALID = [
    ({"factor": 0.0}, "factor"),
    ({"factor": 1.0}, "factor"),
    ({"factor": -0.5}, "factor"),
    ({"factor": 1.5}, "factor"),
    ({"rtol": -1e-4}, "rtol"),
    ({"atol": -1.0}, "atol"),
    ({"rtol": 0.0, "atol": 0.0}, "rtol"),
    ({"rtol": 1.5}, "rtol"),
    ({"patience": -1}, "patience"),
    ({"patience": 1.5}, "patience"),
    ({"cooldown": -1}, "cooldown"),
    ({"cooldown": 0.5}, "cooldown"),
    ({"accumulation_size": 0}, "accumulation_size"),
    ({"accumulation_size": 1.5}, "accumulation_size"),
    ({"min_scale": -0.1}, "min_scale"),
]


@pytest.mark.parametrize(
    "kwargs,name",
    PLATEAU_INVALID,
    ids=[",".join(f"{k}={v}" for k, v in c[0].items()) for c in PLATEAU_INVALID],
)
def test_reduce_on_plateau_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        no.reduce_on_plateau(**kwargs)


@pytest.mark.parametrize("chained", [False, True])
def test_reduce_on_plateau_needs_the_metric(cl_queue, chained):
    tx = no.reduce_on_plateau()
    if chained:
        tx = no.chain(no.adam(1e-2), tx)
    params = dev(PARAMS0)
    state = tx.init(params)
    with no.count_launches() as c, pytest.raises(TypeError, match="value"):
        tx.update(dev(GRADS[0]), state, params)
    assert c.launches == 0
    with pytest.raises(TypeError, match="value"):
        no.step(tx, params, dev(GRADS[0]), state)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("chained", [False, True])
def test_reduce_on_plateau_non_finite_metric_changes_nothing(cl_queue, bad, chained):
    tx = no.reduce_on_plateau(factor=0.5, patience=1, accumulation_size=2)
    if chained:
        tx = no.chain(no.adam(1e-2), tx)
    params, g = dev(PARAMS0), dev(GRADS[0])
    state = tx.init(params)
    for m in [2.0, 1.0, 1.0]:  # mid-accumulation afterwards: count 1, avg 1.0
        _, state = tx.update(g, state, params, value=m)
    snapshot = no.to_host(state)
    g_before = no.to_host(g)
    with no.count_launches() as c, pytest.raises(ValueError, match="finite"):
        tx.update(g, state, params, value=bad)
    assert c.launches == 0
    # the state (host numbers and device slots) and the inputs are untouched
    assert_bitwise(g, g_before)
    la, ta = optree.tree_flatten(no.to_host(state))
    lb, tb = optree.tree_flatten(snapshot)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y)
        else:
            assert x == y
    # continuing gives what a run without the bad call gives
    u1, s1 = tx.update(g, state, params, value=1.0)
    fresh = tx.init(params)
    for m in [2.0, 1.0, 1.0, 1.0]:
        u2, fresh = tx.update(g, fresh, params, value=m)
    assert_bitwise(u1, u2)
    plateau1 = s1[-1] if chained else s1
    plateau2 = fresh[-1] if chained else fresh
    assert plateau1 == plateau2


PLATEAU_KWARGS = st.fixed_dictionaries(
    {
        "factor": st.floats(0.01, 0.99),
        "patience": st.integers(0, 4),
        "cooldown": st.integers(0, 3),
        "accumulation_size": st.integers(1, 3),
        "rtol": st.sampled_from([0.0, 1e-4, 0.1, 0.5]),
        "atol": st.sampled_from([0.0, 1e-3, 0.5]),
        "min_scale": st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    }
).filter(lambda kw: kw["rtol"] > 0 or kw["atol"] > 0)


@settings(max_examples=30, deadline=None)
@given(kwargs=PLATEAU_KWARGS, metrics=METRICS)
def test_plateau_scale_never_below_min_scale(cl_queue, kwargs, metrics):
    tx = no.reduce_on_plateau(**kwargs)
    x = no.to_device(np.array([1.0, -2.0], F32), cl_queue)
    state = tx.init(x)
    previous = state.scale
    reductions = 0
    for m in metrics:
        _, state = tx.update(x, state, value=m)
        assert state.scale >= kwargs["min_scale"]
        assert state.scale <= previous  # the scale never grows
        if state.scale < previous:
            reductions += 1
            # one step reduces by exactly factor, or stops at min_scale
            assert state.scale == max(previous * kwargs["factor"], kwargs["min_scale"])
        previous = state.scale
        assert 0 <= state.cooldown_count <= kwargs["cooldown"]
        assert 0 <= state.count < kwargs["accumulation_size"]
    assert reductions <= len(metrics) // kwargs["accumulation_size"]
