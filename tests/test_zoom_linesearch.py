"""optax's zoom line search (``scale_by_zoom_linesearch``): parity with optax 0.2.8 (the same
learning rates, values, gradients and infos, step by step) on a 10-D Rosenbrock, a least
squares problem and a small MLP, both guess strategies, a capped learning rate, failures
(too few steps, an ascent direction, a trial outside the domain) and the safe-step path;
``lbfgs()`` (whose default line search this is) vs ``optax.lbfgs()``; without an oracle: the
strong Wolfe conditions at accepted steps (float64 numpy), the stored value and gradient
being those at the new params (bit for bit), packed = separate leaves = a device value (bit
for bit), host reads and launches per update, the verbose diagnostics, and bad input."""

from __future__ import annotations

import contextlib
import functools
import io

import numpy as np
import optree
import pyopencl.array as cla
import pytest
from jax_x64 import jax_x64

import netcl_optim as no
from netcl_optim.fusion._vectors import Vectors
from netcl_optim.optimizers import linesearch
from netcl_optim.optimizers import zoom_linesearch as zl
from netcl_optim.optimizers.zoom_linesearch import (
    ScaleByZoomLinesearchState,
    ZoomLinesearchInfo,
    scale_by_zoom_linesearch,
)

STEPS = 20
# Relative errors (to the largest element) against optax. float64: the trial points differ
# from optax's by XLA's fma (p + s u rounded once there, twice here) and the slopes by the
# order of the dot's sum; measured worst over the cases: 1.4e-13 (learning rates), 2.2e-13
# (params after 20 steps)
F64 = 1e-10
# float32: the same differences, each ~6e-8 relative; measured worst: 1.9e-5 (learning
# rates), 1.5e-4 (params)
F32 = 1e-3
# L-BFGS in float64: its memory carries the rounding differences from step to step and the
# ill-conditioned least squares amplifies them; measured worst: 2.5e-10 (its gradients)
LBFGS_F64 = 1e-8

# ---------------------------------------------------------------------------- problems (jax)


def _jax_problem(name: str):
    """``(f, p0)``: a jax objective of a dict of arrays and its start (float64 numpy)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    if name == "rosenbrock":

        def f(p):
            x = p["x"]
            return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)

        return f, {"x": np.array([-1.2, 1.0] * 5)}
    if name == "least_squares":
        # ill-conditioned enough that L-BFGS does not converge in STEPS steps (a converged
        # search is decided by rounding noise), scaled so that sgd's steps are O(0.1): an
        # exact quadratic makes the cubic fit's leading coefficient rounding noise, so a zoom
        # that needs it (long bisections from a guess far too large) picks a point that
        # depends on the last bit of the slopes, here as in optax
        a = rng.standard_normal((40, 20)) * np.logspace(-1.25, 0.25, 20)
        y = rng.standard_normal(40)

        def f(p):
            dtype = p["w"].dtype
            r = jnp.asarray(a, dtype) @ p["w"] + p["b"] - jnp.asarray(y, dtype)
            return 0.5 * jnp.mean(r * r)

        return f, {"w": np.zeros(20), "b": np.array(0.5)}
    if name == "mlp":
        x = rng.standard_normal((16, 3))
        t = np.sin(x.sum(1))
        p0 = {"w1": rng.standard_normal((3, 5)) * 0.5, "b1": np.zeros(5),
              "w2": rng.standard_normal(5) * 0.5, "b2": np.array(0.0)}  # fmt: skip

        def f(p):
            dtype = p["w1"].dtype
            h = jnp.tanh(jnp.asarray(x, dtype) @ p["w1"] + p["b1"])
            r = h @ p["w2"] + p["b2"] - jnp.asarray(t, dtype)
            return jnp.mean(r * r)

        return f, p0
    assert name == "barrier"  # finite only for |x| < 1: a step too long is nan

    weights = np.array([1.0, 10.0, 100.0])  # ill-conditioned: sgd zig-zags, 20 steps in

    def f(p):
        x = p["x"]
        pull = jnp.asarray(weights, x.dtype) * (x - 0.9) ** 2
        return jnp.sum(pull) - jnp.sum(jnp.log(1.0 - x * x))

    return f, {"x": np.array([0.3, -0.2, 0.4])}


@functools.cache
def _optax_zoom(name: str):
    """optax's ``chain(scale(direction), scale_by_zoom_linesearch(...))`` update, jitted once
    per problem: the hyperparameters that vary between the cases are traced arguments (so
    one compilation serves them all), and ``"one"`` is ``"keep"`` from a learning rate of 1
    (optax's guess is then 1 either way)."""
    import jax
    import jax.numpy as jnp
    import optax

    f, _ = _jax_problem(name)

    def update(g, s, p, v, hp):
        lr = s[1].learning_rate
        s = (s[0], s[1]._replace(learning_rate=jnp.where(hp["one"], jnp.ones_like(lr), lr)))
        zoom = optax.scale_by_zoom_linesearch(
            max_linesearch_steps=hp["steps"], max_learning_rate=hp["max_learning_rate"],
            curv_rtol=hp["curv_rtol"], stepsize_precision=hp["stepsize_precision"],
            approx_dec_rtol=hp["approx_dec_rtol"], initial_guess_strategy="keep",
        )  # fmt: skip
        solver = optax.chain(optax.scale(hp["direction"]), zoom)
        return solver.update(g, s, p, value=v, grad=g, value_fn=f)

    init = optax.chain(optax.scale(-1.0), optax.scale_by_zoom_linesearch(1)).init
    return _strong(init), jax.jit(update), jax.jit(jax.value_and_grad(f))


def _strong(init):
    """``init`` with its state's weakly typed scalars (optax's info) made strong, as
    ``update`` returns them: else the second step compiles the update again."""
    import jax
    import jax.numpy as jnp

    return lambda params: jax.tree.map(lambda x: jnp.asarray(x, x.dtype), init(params))


@functools.cache
def _optax_lbfgs(name: str):
    import jax
    import optax

    f, _ = _jax_problem(name)
    solver = optax.lbfgs()

    def update(g, s, p, v):
        return solver.update(g, s, p, value=v, grad=g, value_fn=f)

    return _strong(solver.init), jax.jit(update), jax.jit(jax.value_and_grad(f))


def _x64(dtype):
    return jax_x64(np.dtype(dtype) == np.float64)


def _device_value_fn(value_and_grad, queue):
    """Our value_fn: jax's value and gradient at the device params (on host copies), the
    gradient back on the device, packed."""
    import jax.numpy as jnp

    def value_fn(params):
        host = optree.tree_map(jnp.asarray, no.to_host(params))
        value, grad = value_and_grad(host)
        grad = optree.tree_map(np.asarray, dict(grad))
        return np.asarray(value)[()], no.pack(no.to_device(grad, queue))

    return value_fn


def _host(tree):
    return {k: np.asarray(v) for k, v in tree.items()}


def _record(state):
    """What a step's line search state says, as host numbers and arrays."""
    info = state.info
    return (
        float(state.learning_rate),
        float(state.value),
        int(info.num_linesearch_steps),
        float(info.decrease_error),
        float(info.curvature_error),
        _host(no.to_host(state.grad) if _is_device(state.grad) else state.grad),
    )


def _is_device(tree):
    return isinstance(optree.tree_leaves(tree)[0], cla.Array)


def _rel(a, b):
    """``max |a - b| / max |b|`` (0 where they are equal, infinities and nans included)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.array_equal(a, b, equal_nan=True):
        return 0.0
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def _compare(ours, theirs, rtol, where):
    """One step's records agree: the same number of trials, the learning rate, value and
    gradient to ``rtol`` (relative to the largest element), the errors to ``rtol`` of the
    scale of their terms (they are differences of nearby numbers)."""
    lr, value, steps, dec, curv, grad = ours
    lr_o, value_o, steps_o, dec_o, curv_o, grad_o = theirs
    assert steps == steps_o, (where, ours[:5], theirs[:5])
    pairs = [("learning_rate", lr, lr_o), ("value", value, value_o)]
    flat = [np.concatenate([np.ravel(g[k]) for k in sorted(g)]) for g in (grad, grad_o)]
    pairs.append(("grad", *flat))  # relative to the largest element of the whole tree
    for what, a, b in pairs:
        assert _rel(a, b) <= rtol, (what, where, a, b)
    for what, a, b in (("decrease_error", dec, dec_o), ("curvature_error", curv, curv_o)):
        scale = max(1.0, abs(value), abs(b)) if np.isfinite(b) else 1.0
        assert _rel(a, b) == 0 or abs(a - b) <= rtol * scale, (what, where, a, b)


# one row per case: the problem and the hyperparameters (``direction``: the updates are
# direction * grad, -1 by default)
CASES = {
    "rosenbrock-keep": ("rosenbrock", {}),
    "rosenbrock-one": ("rosenbrock", {"initial_guess_strategy": "one"}),
    "least_squares-keep": ("least_squares", {}),
    "least_squares-one": ("least_squares", {"initial_guess_strategy": "one"}),
    "mlp-keep": ("mlp", {}),
    "mlp-one": ("mlp", {"initial_guess_strategy": "one"}),
    # Hager & Zhang's approximate decrease accepts trials Armijo's condition refuses
    "mlp-approximate-decrease": ("mlp", {"approx_dec_rtol": 0.5,
                                         "initial_guess_strategy": "one"}),
    # every step reaches the cap before an interval is found: the cap is taken
    "least_squares-capped": ("least_squares", {"max_learning_rate": 0.05}),
    # the curvature condition is out of reach in 4 trials: the safe step (decrease only)
    "mlp-safe-step": ("mlp", {"max_linesearch_steps": 4, "curv_rtol": 1e-3}),
    # ... or the interval shrinks below stepsize_precision first
    "mlp-interval-too-small": ("mlp", {"curv_rtol": 1e-3, "stepsize_precision": 0.5}),
    # 2 trials are not enough: the last trial, then steps that blow up (inf and nan values)
    "rosenbrock-too-few-steps": ("rosenbrock", {"max_linesearch_steps": 2,
                                                "initial_guess_strategy": "one"}),
    # ascent: no decrease anywhere, the last trial is taken
    "rosenbrock-ascent": ("rosenbrock", {"max_linesearch_steps": 5, "direction": 1.0}),
    # the first trial is outside the domain (nan): learning rate 0, the start kept
    "barrier-outside-domain": ("barrier", {"max_linesearch_steps": 1,
                                           "initial_guess_strategy": "one"}),
    "barrier-back-inside": ("barrier", {"initial_guess_strategy": "one"}),
}  # fmt: skip
F32_CASES = [k for k in CASES if k.endswith(("-keep", "-one"))]


def _run_parity(case, dtype, cl_queue):
    """STEPS steps of ours and optax's, side by side from the same start; each step's
    records and the final params of both."""
    import jax
    import jax.numpy as jnp
    import optax

    name, kw = CASES[case]
    kw = dict(kw)
    direction = kw.pop("direction", -1.0)
    kw.setdefault("max_linesearch_steps", 15)
    hp = {
        "one": kw.get("initial_guess_strategy") == "one",
        "steps": kw["max_linesearch_steps"],
        "max_learning_rate": kw.get("max_learning_rate", np.inf),
        "curv_rtol": kw.get("curv_rtol", 0.9),
        "stepsize_precision": kw.get("stepsize_precision", 1e-5),
        "approx_dec_rtol": kw.get("approx_dec_rtol", 1e-6),
        "direction": direction,
    }
    init, update, value_and_grad = _optax_zoom(name)
    _, p0 = _jax_problem(name)
    p0 = {k: v.astype(dtype) for k, v in p0.items()}
    p = optree.tree_map(jnp.asarray, p0)
    s = init(p)
    tx = no.chain(no.scale(direction), scale_by_zoom_linesearch(**kw))
    value_fn = _device_value_fn(value_and_grad, cl_queue)
    q = no.pack(no.to_device(p0, cl_queue))
    t = tx.init(q)
    records = []
    for _ in range(STEPS):
        v, g = value_and_grad(p)
        u, s = update(g, s, p, v, hp)
        p = optax.apply_updates(p, u)
        value, grad = value_fn(q)
        reads = Vectors.reads
        u_ours, t = tx.update(grad, t, q, value=value, grad=grad, value_fn=value_fn)
        reads = Vectors.reads - reads
        q = no.apply_updates(q, u_ours)
        records.append((_record(t[1]), _record(jax.device_get(s[1])), reads))
    return records, _host(no.to_host(q)), _host(jax.device_get(p))


def _check_parity(records, ours, theirs, tol):
    for i, (mine, oracle, reads) in enumerate(records):
        _compare(mine, oracle, tol, f"at step {i}")
        assert reads == mine[2]  # one host read per trial
    for k in ours:
        assert _rel(ours[k], theirs[k]) <= tol, ("params", k)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_optax_float64(case, cl_queue):
    pytest.importorskip("optax")
    with _x64(np.float64):
        records, ours, theirs = _run_parity(case, np.float64, cl_queue)
    _check_parity(records, ours, theirs, F64)
    steps = [r[0][2] for r in records]
    lrs = [r[0][0] for r in records]
    if case == "rosenbrock-one":
        assert max(steps) > 2  # the zoom ran
    if case == "least_squares-capped":
        assert all(lr == np.float64(0.05) for lr in lrs)
    if case == "barrier-outside-domain":
        assert all(lr == 0.0 for lr in lrs) and all(r[0][3] == np.inf for r in records)
    if case in ("mlp-safe-step", "mlp-interval-too-small"):
        # some searches ended at a safe step: sufficient decrease, not curvature
        assert any(r[0][3] == 0 and r[0][4] > 0 for r in records)


@pytest.mark.parametrize("case", F32_CASES)
def test_parity_with_optax_float32(case, cl_queue):
    pytest.importorskip("optax")
    records, ours, theirs = _run_parity(case, np.float32, cl_queue)
    _check_parity(records, ours, theirs, F32)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("rosenbrock", np.float64), ("least_squares", np.float64), ("mlp", np.float64),
     ("mlp", np.float32)],
)  # fmt: skip
def test_lbfgs_parity_with_optax(name, dtype, cl_queue):
    """Our ``lbfgs()`` (its default line search: this one) vs ``optax.lbfgs()``."""
    pytest.importorskip("optax")
    lbfgs_module = pytest.importorskip("netcl_optim.optimizers.lbfgs")
    import jax
    import jax.numpy as jnp
    import optax

    tol = LBFGS_F64 if dtype == np.float64 else F32
    with _x64(dtype):
        init, update, value_and_grad = _optax_lbfgs(name)
        _, p0 = _jax_problem(name)
        p0 = {k: v.astype(dtype) for k, v in p0.items()}
        p = optree.tree_map(jnp.asarray, p0)
        s = init(p)
        tx = lbfgs_module.lbfgs()
        value_fn = _device_value_fn(value_and_grad, cl_queue)
        q = no.pack(no.to_device(p0, cl_queue))
        t = tx.init(q)
        for i in range(STEPS):
            v, g = value_and_grad(p)
            u, s = update(g, s, p, v)
            p = optax.apply_updates(p, u)
            value, grad = value_fn(q)
            u_ours, t = tx.update(grad, t, q, value=value, grad=grad, value_fn=value_fn)
            q = no.apply_updates(q, u_ours)
            assert isinstance(t[-1], ScaleByZoomLinesearchState)
            _compare(_record(t[-1]), _record(jax.device_get(s[-1])), tol, f"at step {i}")
        ours, theirs = _host(no.to_host(q)), _host(jax.device_get(p))
    for k in ours:
        assert _rel(ours[k], theirs[k]) <= tol, ("params", k)


# ---------------------------------------------------------------------------- numpy problems


def _rosenbrock(x):
    """Value and gradient of the Rosenbrock function (float64 numpy)."""
    a, b = x[1:] - x[:-1] ** 2, 1.0 - x[:-1]
    g = np.zeros_like(x)
    g[:-1] = -400.0 * a * x[:-1] - 2.0 * b
    g[1:] += 200.0 * a
    return np.sum(100.0 * a * a + b * b), g


_RNG = np.random.default_rng(1)
_A, _Y = _RNG.standard_normal((12, 5)), _RNG.standard_normal(12)


def _least_squares(p):
    """``0.5 |A w + b - y|^2`` over ``{"w": (5,), "b": ()}``, and its gradient."""
    r = _A @ p["w"] + p["b"] - _Y
    return 0.5 * r @ r, {"w": _A.T @ r, "b": np.array(r.sum())}


def _np_value_fn(queue, problem="rosenbrock", packed=True, device_value=False):
    """value_fn over device params, computed on the host in float64 (values as numpy
    scalars, or 0-d device arrays with ``device_value``)."""

    def value_fn(params):
        host = no.to_host(params)
        if problem == "rosenbrock":
            value, grad = _rosenbrock(host["x"])
            grad = {"x": grad}
        else:
            value, grad = _least_squares(host)
        grad = no.to_device(grad, queue)
        if device_value:
            value = cla.to_device(queue, np.asarray(value))
        return value, (no.pack(grad) if packed else grad)

    return value_fn


def _start(problem):
    if problem == "rosenbrock":
        return {"x": np.array([-1.2, 1.0] * 5)}
    return {"w": np.zeros(5), "b": np.array(0.3)}


def _run_ours(tx, problem, queue, steps=STEPS, packed=True, device_value=False):
    """``steps`` steps of ``tx``; per step: the params before, the update, the state."""
    value_fn = _np_value_fn(queue, problem, packed, device_value)
    params = no.to_device(_start(problem), queue)
    params = no.pack(params) if packed else params
    state = tx.init(params)
    out = []
    for _ in range(steps):
        value, grad = value_fn(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad,
                                   value_fn=value_fn)  # fmt: skip
        out.append((no.to_host(params), no.to_host(updates), state))
        params = no.apply_updates(params, updates)
    return out, params


def _evaluate_np(problem, p):
    if problem == "rosenbrock":
        value, grad = _rosenbrock(p["x"])
        return value, {"x": grad}
    return _least_squares(p)


def _vdot(a, b):
    return sum(float(np.vdot(a[k], b[k])) for k in a)


@pytest.mark.parametrize("strategy", ["one", "keep"])
@pytest.mark.parametrize("problem", ["rosenbrock", "least_squares"])
def test_strong_wolfe_conditions_hold_at_accepted_steps(problem, strategy, cl_queue):
    """Where the info says both errors are 0, the step meets sufficient decrease (Armijo,
    or Hager & Zhang's approximate form) and the curvature condition, checked in float64
    numpy from the params alone; and the state's value and grad are those at the new params,
    bit for bit (so ``value_and_grad_from_state`` may reuse them)."""
    c1, c2 = 1e-4, 0.9
    tx = no.chain(no.sgd(1.0), scale_by_zoom_linesearch(30, initial_guess_strategy=strategy))
    steps, _ = _run_ours(tx, problem, cl_queue)
    accepted = 0
    for p0, u, state in steps:
        zoom = state[1]
        p1 = {k: p0[k] + u[k] for k in p0}
        f0, g0 = _evaluate_np(problem, p0)
        f1, g1 = _evaluate_np(problem, p1)
        assert zoom.value == f1
        for k in g1:
            assert np.array_equal(no.to_host(zoom.grad)[k], g1[k])
        if zoom.info.decrease_error != 0 or zoom.info.curvature_error != 0:
            continue
        accepted += 1
        s = float(zoom.learning_rate)
        direction = {k: -g0[k] for k in g0}  # sgd(1.0)'s update
        for k in u:
            np.testing.assert_array_equal(u[k], s * direction[k])
        slope0, slope1 = _vdot(g0, direction), _vdot(g1, direction)
        slack = 1e-12 * (abs(f0) + abs(slope0))
        armijo = f1 <= f0 + c1 * s * slope0 + slack
        approx = f1 <= f0 + 1e-6 * abs(f0) + slack and slope1 <= (2 * c1 - 1) * slope0 + slack
        assert armijo or approx, (f0, f1, s, slope0, slope1)
        assert abs(slope1) <= c2 * abs(slope0) + slack, (slope0, slope1)
        assert s > 0
    assert accepted >= STEPS // 2, accepted


def _results(steps):
    return [
        (float(state[-1].learning_rate), state[-1].info, {k: v.tobytes() for k, v in u.items()})
        for _, u, state in steps
    ]


def test_packed_separate_and_device_values_agree_bit_for_bit(cl_queue, monkeypatch):
    """Separate leaves (gathered) and a device value (read with the slope, never on its
    own) give the packed tree's learning rates and updates, bit for bit, with the same host
    reads."""
    host_values, original = [], linesearch.host_loss

    def host_loss(value, who):
        host_values.append(type(value))
        return original(value, who)

    monkeypatch.setattr(linesearch, "host_loss", host_loss)  # the values' one reader
    tx = no.chain(no.sgd(1.0), scale_by_zoom_linesearch(15, initial_guess_strategy="one"))
    runs = {}
    for key, kw in {"packed": {}, "separate": {"packed": False},
                    "device value": {"device_value": True}}.items():  # fmt: skip
        reads = Vectors.reads
        steps, _ = _run_ours(tx, "least_squares", cl_queue, steps=8, **kw)
        runs[key] = (_results(steps), Vectors.reads - reads)
    assert cla.Array not in host_values and host_values
    assert runs["separate"] == runs["packed"]
    assert runs["device value"] == runs["packed"]
    trials = sum(info.num_linesearch_steps for _, info, _ in runs["packed"][0])
    assert runs["packed"][1] == trials > 8


def test_reads_and_launches_per_update(cl_queue):
    """A packed tree: one host read per trial (the first also brings the slope at the
    start), 2 launches for the start's slope, 3 per trial (the point, the slope's dot), 1
    for the returned updates. A tree of two dtypes: a read per dtype per trial."""
    tx = scale_by_zoom_linesearch(15, initial_guess_strategy="one")
    value_fn = _np_value_fn(cl_queue)
    params = no.pack(no.to_device(_start("rosenbrock"), cl_queue))
    state = tx.init(params)
    for _ in range(5):
        value, grad = value_fn(params)
        updates = no.pack(no.to_device({"x": -no.to_host(grad)["x"]}, cl_queue))
        reads = Vectors.reads
        with no.count_launches() as c:
            u, state = tx.update(updates, state, params, value=value, grad=grad,
                                 value_fn=value_fn)  # fmt: skip
        trials = state.info.num_linesearch_steps
        assert Vectors.reads - reads == trials
        assert c.launches == 2 + 3 * trials + 1, c.kernels
        params = no.apply_updates(params, u)

    def mixed_fn(p):
        h = no.to_host(p)
        grad = no.to_device({"a": 2 * h["a"], "b": 2 * h["b"]})
        return float(h["a"] @ h["a"] + h["b"] @ h["b"]), grad

    mixed = no.pack(no.to_device({"a": np.ones(4), "b": np.ones(3, np.float32)}, cl_queue))
    value, grad = mixed_fn(mixed)
    direction = no.to_device({"a": -2 * np.ones(4), "b": -2 * np.ones(3, np.float32)})
    reads = Vectors.reads
    u, state = tx.update(direction, tx.init(mixed), mixed, value=value, grad=grad,
                         value_fn=mixed_fn)  # fmt: skip
    assert Vectors.reads - reads == 2 * state.info.num_linesearch_steps
    assert float(state.learning_rate) == 0.5  # the exact minimiser along -g
    assert state.value == 0.0 and state.value.dtype == np.float64
    assert no.to_host(u)["b"].dtype == np.float32


def test_init_and_state(cl_queue):
    params = no.pack(no.to_device({"x": np.ones(3), "y": np.ones((2, 2))}, cl_queue))
    state = scale_by_zoom_linesearch(5).init(params)
    assert isinstance(state, ScaleByZoomLinesearchState)
    assert isinstance(state.info, ZoomLinesearchInfo)
    assert state.learning_rate == 1.0 and state.learning_rate.dtype == np.float64
    assert state.value == np.inf
    assert state.info == (0, np.inf, np.inf)
    grad = no.to_host(state.grad)
    assert all(np.array_equal(grad[k], np.zeros_like(v)) for k, v in no.to_host(params).items())
    f32 = scale_by_zoom_linesearch(5).init(no.to_device({"x": np.ones(3, np.float32)}))
    assert f32.learning_rate.dtype == np.float32 and f32.value.dtype == np.float32


def test_state_params_and_updates_are_not_changed(cl_queue):
    tx = scale_by_zoom_linesearch(15, initial_guess_strategy="keep")
    value_fn = _np_value_fn(cl_queue)
    params = no.pack(no.to_device(_start("rosenbrock"), cl_queue))
    state = tx.init(params)
    for _ in range(3):
        value, grad = value_fn(params)
        updates = no.to_device({"x": -no.to_host(grad)["x"]}, cl_queue)
        before = (no.to_host(params)["x"], no.to_host(updates)["x"], no.to_host(state.grad)["x"],
                  state.learning_rate, state.value, state.info)  # fmt: skip
        u, new_state = tx.update(updates, state, params, value=value, grad=grad,
                                 value_fn=value_fn)  # fmt: skip
        after = (no.to_host(params)["x"], no.to_host(updates)["x"], no.to_host(state.grad)["x"],
                 state.learning_rate, state.value, state.info)  # fmt: skip
        for a, b in zip(before, after, strict=True):
            assert np.array_equal(a, b)
        assert new_state.learning_rate != state.learning_rate or new_state.value != state.value
        params, state = no.apply_updates(params, u), new_state


VERBOSE_CASES = {
    # (problem, direction, hyperparameters): messages expected
    "capped": ("least_squares", -1.0, {"max_learning_rate": 0.001},
               [zl.FLAG_INTERVAL_NOT_FOUND, zl.FLAG_CURVATURE_COND_NOT_SATISFIED]),
    "ascent": ("rosenbrock", 1.0, {"max_linesearch_steps": 3},
               [zl.FLAG_NO_STEPSIZE_FOUND, zl.FLAG_NOT_A_DESCENT_DIRECTION]),
    "too few steps": ("rosenbrock", -1.0, {"max_linesearch_steps": 1,
                                           "initial_guess_strategy": "one"},
                      [zl.FLAG_NO_STEPSIZE_FOUND, "Consider augmenting", "unsafe step"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(VERBOSE_CASES))
def test_verbose_diagnostics(case, cl_queue):
    problem, direction, kw, expected = VERBOSE_CASES[case]
    value_fn = _np_value_fn(cl_queue, problem)
    params = no.pack(no.to_device(_start(problem), cl_queue))
    value, grad = value_fn(params)
    updates = no.to_device(optree.tree_map(lambda g: direction * g, no.to_host(grad)))
    results = []
    for verbose in (False, True):
        tx = scale_by_zoom_linesearch(**{"max_linesearch_steps": 15, **kw}, verbose=verbose)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            _, state = tx.update(updates, tx.init(params), params, value=value, grad=grad,
                                 value_fn=value_fn)  # fmt: skip
        results.append((state.learning_rate, state.info, out.getvalue()))
    assert results[0][:2] == results[1][:2]
    assert results[0][2] == ""
    for message in expected:
        assert message in results[1][2], results[1][2]


def test_extra_arguments_go_to_value_fn(cl_queue):
    """Extra keyword arguments that value_fn names are passed on (optax's rule); any other
    is a TypeError."""
    calls = []

    def value_fn(params, scale):
        calls.append(scale)
        x = no.to_host(params)["x"]
        return scale * float(x @ x), no.to_device({"x": 2 * scale * x})

    tx = scale_by_zoom_linesearch(10)
    params = no.to_device({"x": np.ones(3)}, cl_queue)
    value, grad = value_fn(params, 3.0)
    updates = no.to_device({"x": -np.ones(3)}, cl_queue)
    run = {"value": value, "grad": grad, "value_fn": value_fn}
    _, state = tx.update(updates, tx.init(params), params, **run, scale=3.0)
    assert set(calls) == {3.0} and len(calls) == 1 + state.info.num_linesearch_steps
    assert float(state.learning_rate) == 1.0  # x - 1 = 0: the minimum
    with pytest.raises(TypeError, match=r"not consumed by `value_fn`: \['batch'\]"):
        tx.update(updates, tx.init(params), params, **run, scale=3.0, batch=1)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_linesearch_steps", 0), ("max_linesearch_steps", 2.5), ("max_learning_rate", 0.0),
     ("max_learning_rate", -1.0), ("tol", -1e-3), ("tol", np.nan), ("increase_factor", 1.0),
     ("increase_factor", np.inf), ("slope_rtol", 1.0), ("slope_rtol", -0.1), ("curv_rtol", 0.0),
     ("approx_dec_rtol", -1e-6), ("stepsize_precision", -1.0), ("initial_guess_strategy", "two"),
     ("initial_guess_strategy", None)],
)  # fmt: skip
def test_bad_hyperparameters(name, value):
    kw = {"max_linesearch_steps": 5, name: value}
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        scale_by_zoom_linesearch(**kw)


def test_accepted_edge_hyperparameters():
    for kw in ({"max_learning_rate": np.inf}, {"curv_rtol": np.inf}, {"approx_dec_rtol": None},
               {"slope_rtol": 0.0}, {"tol": 0.0, "stepsize_precision": 0.0}):  # fmt: skip
        scale_by_zoom_linesearch(3, **kw)
    with pytest.raises(ValueError, match="Invalid verbose"):
        scale_by_zoom_linesearch(3, verbose=1)


def _snapshot(params, state):
    return [x.tobytes() for x in optree.tree_leaves(no.to_host((params, state.grad)))] + [
        state.learning_rate,
        state.value,
        state.info,
    ]


def test_bad_input_raises_and_changes_nothing(cl_queue):
    tx = scale_by_zoom_linesearch(10)
    value_fn = _np_value_fn(cl_queue)
    params = no.pack(no.to_device(_start("rosenbrock"), cl_queue))
    state = tx.init(params)
    value, grad = value_fn(params)
    updates = no.to_device({"x": -no.to_host(grad)["x"]}, cl_queue)
    before = _snapshot(params, state)
    good = {"value": value, "grad": grad, "value_fn": value_fn}

    def call(**changes):
        return tx.update(changes.pop("updates", updates), changes.pop("state", state),
                         changes.pop("params", params), **{**good, **changes})  # fmt: skip

    for missing in ("value", "grad", "value_fn"):
        with pytest.raises(TypeError, match=f"needs {missing}"):
            call(**{missing: None})
    with pytest.raises(TypeError, match="needs params"):
        call(params=None)
    with pytest.raises(TypeError, match="value_fn is a int"):
        call(value_fn=3)
    with pytest.raises(TypeError, match="value_fn must return \\(value, grad\\)"):
        call(value_fn=lambda p: float(no.to_host(p)["x"].sum()))
    with pytest.raises(ValueError, match="the gradient from value_fn"):
        call(value_fn=lambda p: (1.0, no.to_device({"x": np.ones(3)})))
    with pytest.raises(TypeError, match="Invalid value"):
        call(value="one")
    with pytest.raises(ValueError, match="Invalid value"):
        call(value=np.ones(2))
    with pytest.raises(ValueError, match="Invalid value"):
        call(value=cla.zeros(cl_queue, (2,), np.float64))
    with pytest.raises(TypeError, match="value returned by value_fn"):
        call(value_fn=lambda p: ("nan?", value_fn(p)[1]))
    with pytest.raises(ValueError, match="grad and params differ"):
        call(grad={"y": grad["x"]})
    with pytest.raises(ValueError, match="updates"):
        call(updates=no.to_device({"x": np.ones(4)}))
    with pytest.raises(ValueError, match="state does not match"):
        call(state=no.sgd(0.1).init(params))
    with pytest.raises(ValueError, match=r"Invalid state\.learning_rate"):
        call(state=state._replace(learning_rate="fast"))
    assert _snapshot(params, state) == before
    with pytest.raises(TypeError, match="int32"):
        tx.init(no.to_device({"x": np.ones(3, np.int32)}, cl_queue))
    with pytest.raises(ValueError, match="no leaves"):
        tx.init({})


def test_value_and_grad_from_state_reuses_the_search(cl_queue):
    """The peer module's ``value_and_grad_from_state`` finds our state in a chain: it calls
    the function before the first search (value inf) and reuses the search's last value and
    gradient after."""
    calls = []
    inner = _np_value_fn(cl_queue)

    def value_fn(params):
        calls.append(1)
        return inner(params)

    value_and_grad = linesearch.value_and_grad_from_state(value_fn)
    tx = no.chain(no.sgd(1.0), scale_by_zoom_linesearch(15))
    params = no.pack(no.to_device(_start("rosenbrock"), cl_queue))
    state = tx.init(params)
    for step in range(4):
        n = len(calls)
        value, grad = value_and_grad(params, state=state)
        assert len(calls) == n + (1 if step == 0 else 0)
        u, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
        params = no.apply_updates(params, u)
    value, grad = inner(params)
    assert state[1].value == value
