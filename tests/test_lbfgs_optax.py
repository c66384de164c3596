"""optax's functional L-BFGS (``scale_by_lbfgs``, ``lbfgs``) and backtracking line search
(``scale_by_backtracking_linesearch``, ``value_and_grad_from_state``) on the device: against
the float64 numpy reference of ``reference_lbfgs_optax`` and against optax (float64 and
float32), trees of several leaves and two dtypes, pure = in place (bit for bit), the old
state untouched, host reads, and bad input with nothing changed."""

from __future__ import annotations

import functools

import numpy as np
import optree
import pyopencl.array as cla
import pytest
import reference_lbfgs_optax as ref
from jax_x64 import jax_x64

import netcl_optim as no
from netcl_optim.fusion._vectors import Vectors
from netcl_optim.optimizers import linesearch
from netcl_optim.optimizers.lbfgs import ScaleByLBFGSState, lbfgs, scale_by_lbfgs
from netcl_optim.optimizers.linesearch import (
    BacktrackingLinesearchInfo,
    ScaleByBacktrackingLinesearchState,
    evaluate,
    host_value,
    scale_by_backtracking_linesearch,
    value_and_grad_from_state,
)
from netcl_optim.transforms._combining import chain
from netcl_optim.transforms._scaling import scale

ITERATIONS = 22

# ---------------------------------------------------------------------------- problems
# each: (params as a dict of numpy arrays, f(xp, params) -> value); xp is numpy or jax.numpy


def _rosenbrock(xp, p):
    x = xp.concatenate([p["a"].ravel(), p["b"].ravel()])
    return xp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


_RNG = np.random.default_rng(0)
_A = _RNG.standard_normal((12, 6))
_B = _RNG.standard_normal(12)
_X = _RNG.standard_normal((16, 3))
_Y = np.sin(_X @ np.array([1.0, -2.0, 0.5]))[:, None]


def _least_squares(xp, p):
    r = xp.asarray(_A, p["w"].dtype) @ p["w"] - xp.asarray(_B, p["w"].dtype)
    return 0.5 * xp.sum(r * r)


def _mlp(xp, p):
    dt = p["w1"].dtype
    h = xp.tanh(xp.asarray(_X, dt) @ p["w1"] + p["b1"])
    out = h @ p["w2"] + p["b2"]
    return 0.5 * xp.mean((out - xp.asarray(_Y, dt)) ** 2)


PROBLEMS = {
    "rosenbrock": (
        lambda: {"a": np.linspace(-1.2, 1.0, 4), "b": np.linspace(0.5, -0.5, 6).reshape(2, 3)},
        _rosenbrock,
    ),
    "least_squares": (lambda: {"w": np.linspace(-1.0, 1.0, 6)}, _least_squares),
    "mlp": (
        lambda: {
            "b1": np.linspace(-0.1, 0.1, 5),
            "b2": np.array([0.05]),
            "w1": np.random.default_rng(1).standard_normal((3, 5)) * 0.5,
            "w2": np.random.default_rng(2).standard_normal((5, 1)) * 0.5,
        },
        _mlp,
    ),
}


def _device(tree, dtype):
    return optree.tree_map(lambda x: cla.to_device(no.default_queue(), np.asarray(x, dtype)), tree)


def _host(tree):
    return optree.tree_map(lambda x: x.get(), tree)


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in optree.tree_leaves(tree)])


# ---------------------------------------------------------------------------- reference


def _rosen_flat(x):
    v = np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
    g = np.zeros_like(x)
    g[:-1] += -400.0 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * (x[1:] - x[:-1] ** 2)
    return v, g


def _lsq_flat(x):
    r = _A @ x - _B
    return 0.5 * r @ r, _A.T @ r


def _tree_fns(flat_fn, like):
    """``value_fn(params) -> (value, grad)`` over device trees shaped like ``like``, from a
    float64 function of the flat vector."""
    split = _splitter(like)

    def value_and_grad(params):
        v, g = flat_fn(_flat(_host(params)).astype(np.float64))
        return float(v), _device(split(g), None)

    return value_and_grad


def _run(tx, params, value_and_grad, iterations, *, value_only=False):
    state, out = tx.init(params), []
    fn = (lambda p: value_and_grad(p)[0]) if value_only else value_and_grad
    for _ in range(iterations):
        value, grad = value_and_grad(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=fn)
        params = no.apply_updates(params, updates)
        out.append(_flat(_host(params)))
    return out, state


@pytest.mark.parametrize(
    "case", ["rosenbrock-backtracking", "least_squares-lr", "least_squares-backtracking"]
)
def test_matches_float64_reference(case):
    name, mode = case.split("-")
    init, _ = PROBLEMS[name]
    flat_fn = _rosen_flat if name == "rosenbrock" else _lsq_flat
    params = _device(init(), np.float64)
    vg = _tree_fns(flat_fn, init())
    w0 = _flat(init())
    if mode == "lr":
        tx = lbfgs(learning_rate=0.7, memory_size=4, linesearch=None)
        want = ref.run_lbfgs(w0, flat_fn, ITERATIONS, memory_size=4, learning_rate=0.7)
    else:
        tx = lbfgs(memory_size=5, linesearch=scale_by_backtracking_linesearch(25))
        ls = ref.BacktrackingRef(25)
        want = ref.run_lbfgs(w0, flat_fn, ITERATIONS, memory_size=5, linesearch=ls)
    got, state = _run(tx, params, vg, ITERATIONS, value_only=True)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-11, err_msg=f"iteration {k}")
    assert state[0].count == ITERATIONS


def test_mixed_dtypes_match_reference():
    """A tree of float32 and float64 leaves runs in float64: each leaf's direction is the
    float64 reference's, rounded to its dtype."""
    rng = np.random.default_rng(3)
    like = {"h": np.zeros((2, 3), np.float32), "d": np.zeros(4), "z": np.zeros((), np.float32)}
    leaves = optree.tree_leaves(like)
    n = sum(x.size for x in leaves)
    tx, opt = scale_by_lbfgs(memory_size=3), ref.LBFGSRef(n, 3)
    state = tx.init(_device(like, None))
    for _ in range(7):
        w = rng.standard_normal(n).astype(np.float32).astype(np.float64)
        u = rng.standard_normal(n).astype(np.float32).astype(np.float64)
        split = _splitter(like)
        out, state = tx.update(_device(split(u), None), state, _device(split(w), None))
        want = split(opt.update(u, w))
        for key in like:
            assert out[key].dtype == like[key].dtype
            tol = 1e-12 if key == "d" else 1e-6  # float32 leaves: the float64 result rounded
            np.testing.assert_allclose(out[key].get(), want[key], rtol=tol)


def _splitter(like):
    leaves, treedef = optree.tree_flatten(like)

    def split(x):
        out, start = [], 0
        for leaf in leaves:
            out.append(x[start : start + leaf.size].reshape(leaf.shape).astype(leaf.dtype))
            start += leaf.size
        return optree.tree_unflatten(treedef, out)

    return split


# ---------------------------------------------------------------------------- optax


def _x64(dtype):
    """jax's float64 switch: on for float64, off for float32."""
    return jax_x64(np.dtype(dtype) == np.float64)


def _jax_fns(f, jnp, jax):
    value = jax.jit(functools.partial(f, jnp))
    value_and_grad = jax.jit(jax.value_and_grad(functools.partial(f, jnp)))
    return value, value_and_grad


def _ours_fns(value, value_and_grad):
    """Our ``value_fn``s over device trees, evaluating jax's functions on the host."""

    def ours_value(params):
        return float(value(_host(params)))

    def ours_value_and_grad(params):
        v, g = value_and_grad(_host(params))
        return float(v), _device(optree.tree_map(np.asarray, g), None)

    return ours_value, ours_value_and_grad


def _optax_iterates(opt, params, value, value_and_grad, iterations, jax):
    update = jax.jit(functools.partial(opt.update, value_fn=value))
    state, out = opt.init(params), []
    for _ in range(iterations):
        v, g = value_and_grad(params)
        updates, state = update(g, state, params, value=v, grad=g)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        out.append(_flat(jax.tree.map(np.asarray, params)))
    return out


# (problem, learning rate or None for the backtracking line search)
OPTAX_CASES = [
    ("rosenbrock", None),
    ("rosenbrock", 0.05),
    ("least_squares", None),
    ("least_squares", 0.7),
    ("mlp", None),
    ("mlp", 0.8),
]
# float32: our dots add in double and round once, XLA's add in float32: the iterates drift
# apart by a few float32 ulps a step, amplified by the line search's accepted steps
TOLERANCE = {np.float64: (1e-9, 1e-10), np.float32: (2e-3, 2e-4)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", OPTAX_CASES, ids=[f"{p}-{lr or 'bt'}" for p, lr in OPTAX_CASES])
def test_lbfgs_matches_optax(case, dtype):
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    name, lr = case
    init, f = PROBLEMS[name]
    with _x64(dtype):
        jnp = jax.numpy
        value, value_and_grad = _jax_fns(f, jnp, jax)
        if lr is None:
            opt = optax.lbfgs(memory_size=5,
                              linesearch=optax.scale_by_backtracking_linesearch(30))  # fmt: skip
            tx = lbfgs(memory_size=5, linesearch=scale_by_backtracking_linesearch(30))
        else:
            opt = optax.lbfgs(learning_rate=lr, memory_size=5, linesearch=None)
            tx = lbfgs(learning_rate=lr, memory_size=5, linesearch=None)
        start = optree.tree_map(lambda x: jnp.asarray(x, dtype), init())
        want = _optax_iterates(opt, start, value, value_and_grad, ITERATIONS, jax)
        ours_value, ours_value_and_grad = _ours_fns(value, value_and_grad)
        params = _device(init(), dtype)
        state, got = tx.init(params), []
        for _ in range(ITERATIONS):
            v, g = ours_value_and_grad(params)
            updates, state = tx.update(g, state, params, value=v, grad=g, value_fn=ours_value)
            params = no.apply_updates(params, updates)
            got.append(_flat(_host(params)))
    rtol, atol = TOLERANCE[dtype]
    for k, (g_, w_) in enumerate(zip(got, want, strict=True)):
        assert g_.dtype == dtype
        np.testing.assert_allclose(g_, w_, rtol=rtol, atol=atol, err_msg=f"iteration {k}")
    assert np.all(np.isfinite(got[-1]))
    assert not np.allclose(got[-1], _flat(init()))  # it moved


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("scale_init", [True, False])
def test_scale_by_lbfgs_matches_optax(dtype, scale_init):
    """Given sequences of params and updates (the memory wraps around: 12 steps, m = 4)."""
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(4)
    like = {"a": np.zeros((3, 4)), "b": np.zeros(5)}
    split = _splitter(like)
    n = 17
    tx = scale_by_lbfgs(memory_size=4, scale_init_precond=scale_init)
    state = tx.init(_device(like, dtype))
    with _x64(dtype):
        opt = optax.scale_by_lbfgs(memory_size=4, scale_init_precond=scale_init)
        ostate = opt.init(optree.tree_map(lambda x: jax.numpy.asarray(x, dtype), like))
        update = jax.jit(opt.update)
        for k in range(12):
            w = (rng.standard_normal(n) + 0.1 * k).astype(dtype)
            u = (w * rng.uniform(0.5, 2.0, n)).astype(dtype)  # positive curvature mostly
            want, ostate = update(split(u), ostate, split(w))
            got, state = tx.update(_device(split(u), dtype), state, _device(split(w), dtype))
            tol = 1e-12 if dtype == np.float64 else 2e-5
            for key in like:
                np.testing.assert_allclose(
                    got[key].get(), np.asarray(want[key]), rtol=tol, atol=tol, err_msg=f"{k}"
                )
        np.testing.assert_allclose(
            state.weights_memory.get(), np.asarray(ostate.weights_memory), rtol=tol
        )


# ------------------------------------------------------------------ value_and_grad_from_state


def _sum_squares(counter):
    def value_and_grad(params):
        counter.append(1)
        x = params.get()
        return float(np.sum(x * x)), cla.to_device(no.default_queue(), 2.0 * x)

    return value_and_grad


def test_value_and_grad_from_state_docs_loop():
    """optax's docstring example (sgd(1) + backtracking, store_grad): the same objective
    values, and value_and_grad_fn runs only before the first step."""
    calls, trials = [], []
    fn = _sum_squares(calls)

    def value_fn(params):
        trials.append(1)
        return fn(params)

    solver = chain(scale(-1.0), scale_by_backtracking_linesearch(15, store_grad=True))
    value_and_grad = value_and_grad_from_state(fn)
    params = cla.to_device(no.default_queue(), np.array([1.0, 2.0, 3.0]))
    state = solver.init(params)
    assert np.isinf(state[1].value)
    objective = []
    for _ in range(5):
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(
            grad, state, params, value=value, grad=grad, value_fn=value_fn
        )
        params = no.apply_updates(params, updates)
        objective.append(float(np.sum(params.get() ** 2)))
    assert [f"{v:.2E}" for v in objective] == [
        "5.04E+00", "1.81E+00", "6.53E-01", "2.35E-01", "8.47E-02"
    ]  # fmt: skip
    assert len(calls) - len(trials) == 1  # value_and_grad_fn itself: the first step only
    assert state[1].info.num_linesearch_steps >= 1


def test_value_and_grad_from_state_lbfgs_same_iterates():
    """lbfgs + backtracking(store_grad): reusing the stored value and grad gives the same
    iterates, bit for bit, as evaluating at every step (the stored grad is at the same
    params: ``w + lr u`` rounds as ``apply_updates`` does)."""
    init, _ = PROBLEMS["rosenbrock"]
    vg = _tree_fns(_rosen_flat, init())
    runs = []
    for reuse in (False, True):
        tx = lbfgs(memory_size=4, linesearch=scale_by_backtracking_linesearch(20, store_grad=True))
        params = _device(init(), np.float64)
        state = tx.init(params)
        value_and_grad = value_and_grad_from_state(vg)
        for _ in range(12):
            value, grad = value_and_grad(params, state=state) if reuse else vg(params)
            updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=vg)
            params = no.apply_updates(params, updates)
        runs.append(_flat(_host(params)))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_value_and_grad_from_state_errors():
    vg = value_and_grad_from_state(_sum_squares([]))
    params = cla.to_device(no.default_queue(), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="not found in the state"):
        vg(params, state=scale_by_lbfgs().init(params))
    no_grad = scale_by_backtracking_linesearch(3).init(params)  # store_grad=False: grad None
    with pytest.raises(ValueError, match="not found in the state"):
        vg(params, state=(no_grad,))
    two = scale_by_backtracking_linesearch(3, store_grad=True).init(params)
    with pytest.raises(ValueError, match="found 2"):
        vg(params, state=(two, two))


# ---------------------------------------------------------------------------- purity, in place


def _arrays(tree):
    return [x for x in optree.tree_leaves(tree) if isinstance(x, cla.Array)]


def _values(tree):
    return [x.get().copy() for x in _arrays(tree)]


def _lbfgs_bt():
    return lbfgs(memory_size=3, linesearch=scale_by_backtracking_linesearch(20))


def test_update_leaves_old_state_untouched():
    init, _ = PROBLEMS["rosenbrock"]
    vg = _tree_fns(_rosen_flat, init())
    tx = _lbfgs_bt()
    params = _device(init(), np.float64)
    state = tx.init(params)
    for _ in range(4):  # fill the memory past a wrap-around
        value, grad = vg(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=vg)
        params = no.apply_updates(params, updates)
    before, before_params = _values(state), _values(params)
    value, grad = vg(params)
    _, new_state = tx.update(grad, state, params, value=value, grad=grad, value_fn=vg)
    for old, new in zip(_values(state), before, strict=True):
        np.testing.assert_array_equal(old, new)
    for old, new in zip(_values(params), before_params, strict=True):
        np.testing.assert_array_equal(old, new)
    assert not {id(x) for x in _arrays(new_state[0])} & {id(x) for x in _arrays(state[0])}
    assert new_state[0].count == state[0].count + 1


def test_pure_donated_and_in_place_agree_bitwise():
    """update + apply_updates, step(donate=True) (scale_by_lbfgs writes its slot in place)
    and step_ give the same params and memory, bit for bit; packed and separate leaves too."""
    from netcl_optim.transforms._update import step_

    init, _ = PROBLEMS["mlp"]
    vg = _tree_fns(lambda x: (0.5 * x @ x + np.sum(np.sin(x)), x + np.cos(x)), init())
    results = []
    for mode in ("pure", "donate", "inplace", "packed", "chain-inplace"):
        tx = _lbfgs_bt()
        if mode == "chain-inplace":  # scale_by_lbfgs alone, in place in a chain
            parts = (scale_by_lbfgs(3), scale(-1.0), scale_by_backtracking_linesearch(20))
            tx = chain(*parts)
        params = _device(init(), np.float64)
        if mode == "packed":
            params = no.pack(params)
        state = tx.init(params)
        memory = state[0].diff_params_memory
        for _ in range(6):
            value, grad = vg(params)
            args = {"value": value, "grad": grad, "value_fn": vg}
            if mode == "donate":
                params, state = no.step(tx, params, grad, state, donate=True, **args)
            elif mode.endswith("inplace"):
                state = step_(tx, params, grad, state, **args)
            else:
                updates, state = tx.update(grad, state, params, **args)
                params = no.apply_updates(params, updates)
        in_place = mode in ("donate", "inplace", "chain-inplace")
        assert (state[0].diff_params_memory is memory) == in_place, mode
        results.append((_flat(_host(params)), state[0].diff_params_memory.get()))
    for flat, memory in results[1:]:
        np.testing.assert_array_equal(flat, results[0][0])
        np.testing.assert_array_equal(memory, results[0][1])


# ---------------------------------------------------------------------------- host reads


def test_host_reads_per_update():
    """scale_by_lbfgs reads nothing back; the backtracking search reads the slope once per
    update (value_fn returns host floats here, so its values cost no read of ours)."""
    init, _ = PROBLEMS["mlp"]
    vg = _tree_fns(lambda x: (0.5 * x @ x, x), init())
    params = _device(init(), np.float64)
    tx = scale_by_lbfgs(memory_size=4)
    state = tx.init(params)
    reads = Vectors.reads
    for _ in range(3):
        _, grad = vg(params)
        _, state = tx.update(grad, state, params)
    assert Vectors.reads == reads
    tx = _lbfgs_bt()
    state = tx.init(params)
    for k in range(3):
        value, grad = vg(params)
        reads = Vectors.reads
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=vg)
        assert Vectors.reads - reads == 1, k
        params = no.apply_updates(params, updates)


def test_device_values_come_back_with_the_slope(monkeypatch):
    """Device values (0-d arrays of the params' dtype): the start's value and the first
    trial's come back in the slope's one read; each later trial's is read on its own (one
    host read each, not counted in Vectors.reads). Same iterates as host values."""
    init, _ = PROBLEMS["rosenbrock"]
    host_vg = _tree_fns(_rosen_flat, init())

    def device_vg(params):
        value, grad = host_vg(params)
        return cla.to_device(no.default_queue(), np.asarray(value, np.float64)), grad

    read_alone, original = [], linesearch.host_loss

    def host_loss(value, who):
        read_alone.append(isinstance(value, cla.Array))
        return original(value, who)

    monkeypatch.setattr(linesearch, "host_loss", host_loss)
    runs = {}
    for name, vg in (("host", host_vg), ("device", device_vg)):
        tx = scale_by_backtracking_linesearch(20, decrease_factor=0.5, increase_factor=4.0)
        params = _device(init(), np.float64)
        state = tx.init(params)
        run = []
        for _ in range(4):
            direction = _device(optree.tree_map(np.negative, _host(host_vg(params)[1])), None)
            value, _ = vg(params)
            del read_alone[:]
            reads = Vectors.reads
            updates, state = tx.update(direction, state, params, value=value,
                                       grad=host_vg(params)[1], value_fn=vg)  # fmt: skip
            trials = state.info.num_linesearch_steps
            assert Vectors.reads - reads == 1
            if name == "device":
                assert sum(read_alone) == trials - 1, (read_alone, trials)
            params = no.apply_updates(params, updates)
            run.append((float(state.learning_rate), float(state.value), trials,
                        _flat(_host(params)).tobytes()))  # fmt: skip
        runs[name] = run
    assert runs["device"] == runs["host"]
    assert any(t > 1 for _, _, t, _ in runs["host"])  # later trials were read


# ---------------------------------------------------------------------------- errors


def test_bad_arguments():
    with pytest.raises(ValueError, match="memory_size"):
        scale_by_lbfgs(memory_size=0)
    with pytest.raises(ValueError, match="memory_size"):
        lbfgs(memory_size=0, linesearch=None)
    with pytest.raises(ValueError, match="max_backtracking_steps"):
        scale_by_backtracking_linesearch(-1)
    with pytest.raises(ValueError, match="decrease_factor"):
        scale_by_backtracking_linesearch(3, decrease_factor=0.0)


def _bad_calls(vg):
    value_only = lambda p: vg(p)[0]  # noqa: E731
    return {
        "no value": ({"value_fn": vg}, TypeError, "needs value"),
        "no value_fn": ({"value": 1.0}, TypeError, "needs value_fn"),
        "value only": ({"value": 1.0, "value_fn": value_only}, TypeError, "value_fn returned"),
        "extra kwarg": ({"value": 1.0, "value_fn": vg, "batch": 3}, TypeError, "batch"),
    }


@pytest.mark.parametrize("case", ["no value", "no value_fn", "value only", "extra kwarg"])
@pytest.mark.parametrize("in_place", [False, True])
def test_bad_update_changes_nothing(case, in_place):
    """A missing value or value_fn, a value_fn returning only a value where the grad is
    needed (store_grad), a stray keyword: a TypeError naming it, params and state (all of
    lbfgs' memory, in place too) unchanged."""
    from netcl_optim.transforms._update import step_

    init, _ = PROBLEMS["rosenbrock"]
    vg = _tree_fns(_rosen_flat, init())
    tx = lbfgs(memory_size=3, linesearch=scale_by_backtracking_linesearch(5, store_grad=True))
    params = _device(init(), np.float64)
    state = tx.init(params)
    for _ in range(2):
        value, grad = vg(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=vg)
        params = no.apply_updates(params, updates)
    kwargs, error, match = _bad_calls(vg)[case]
    _, grad = vg(params)
    kwargs = {"grad": grad, **kwargs}
    before, before_params = _values(state), _values(params)
    with pytest.raises(error, match=match):
        if in_place:
            step_(tx, params, grad, state, **kwargs)
        else:
            tx.update(grad, state, params, **kwargs)
    for old, new in zip(_values(state), before, strict=True):
        np.testing.assert_array_equal(old, new)
    for old, new in zip(_values(params), before_params, strict=True):
        np.testing.assert_array_equal(old, new)
    assert state[0].count == 2


def test_bad_state_and_trees():
    params = _device({"a": np.zeros(3), "b": np.zeros(2)}, np.float64)
    tx = scale_by_lbfgs(memory_size=2)
    other = scale_by_lbfgs(memory_size=3).init(params)
    with pytest.raises(ValueError, match="memory_size 2"):
        tx.update(params, other, params)
    with pytest.raises(ValueError, match="structure"):
        tx.update({"a": params["a"]}, tx.init(params), params)
    with pytest.raises(TypeError, match="needs params"):
        tx.update(params, tx.init(params))
    with pytest.raises(TypeError, match="float32 or float64"):
        tx.init({"a": cla.zeros(no.default_queue(), 3, np.float16)})


def test_evaluate_forms():
    """value_fn's value as a float, a numpy scalar or a one-element device array, returned
    unread (a device array stays one); a pair with the grad."""
    q = no.default_queue()
    x = cla.to_device(q, np.array([1.0, 2.0]))
    for value in (
        3.5,
        np.float32(3.5),
        cla.to_device(q, np.array([3.5])),
        cla.to_device(q, np.float64(3.5)),
    ):
        v, g = evaluate(lambda p, value=value: value, x, {}, False)
        assert v is value and g is None
        assert host_value(v, np.float64, "test") == 3.5
    v, g = evaluate(lambda p: (1.0, p), x, {}, True)
    assert v == 1.0 and g is x
    with pytest.raises(TypeError, match="value_fn returned only a value"):
        evaluate(lambda p: 1.0, x, {}, True)
    with pytest.raises(ValueError):
        evaluate(lambda p: (1.0, cla.to_device(q, np.zeros(3))), x, {}, True)


def test_state_types():
    params = _device({"a": np.zeros(3)}, np.float32)
    state = scale_by_backtracking_linesearch(3).init(params)
    assert isinstance(state, ScaleByBacktrackingLinesearchState)
    assert isinstance(state.info, BacktrackingLinesearchInfo)
    assert state.value.dtype == np.float32 and np.isinf(state.value) and state.grad is None
    lb = scale_by_lbfgs(4).init(params)
    assert isinstance(lb, ScaleByLBFGSState) and lb.diff_params_memory.shape == (4, 3)


def test_default_linesearch_is_zoom():
    """The default line search (another module's): optax's defaults, float64 parity."""
    try:
        from netcl_optim.optimizers.zoom_linesearch import ScaleByZoomLinesearchState
    except ImportError:
        pytest.skip("zoom_linesearch.py is not there yet")
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    init, f = PROBLEMS["rosenbrock"]
    with _x64(np.float64):
        value, value_and_grad = _jax_fns(f, jax.numpy, jax)
        start = optree.tree_map(jax.numpy.asarray, init())
        opt = optax.lbfgs()
        update = jax.jit(functools.partial(opt.update, value_fn=value))
        ostate = opt.init(start)
        want = []
        for _ in range(ITERATIONS):
            v, g = value_and_grad(start)
            updates, ostate = update(g, ostate, start, value=v, grad=g)
            start = jax.tree.map(lambda p, u: p + u, start, updates)
            want.append(_flat(jax.tree.map(np.asarray, start)))
        _, ours = _ours_fns(value, value_and_grad)
        tx = lbfgs()
        params = _device(init(), np.float64)
        state = tx.init(params)
        assert isinstance(state[2], ScaleByZoomLinesearchState)
        for k in range(ITERATIONS):
            v, g = ours(params)
            updates, state = tx.update(g, state, params, value=v, grad=g, value_fn=ours)
            params = no.apply_updates(params, updates)
            np.testing.assert_allclose(_flat(_host(params)), want[k], rtol=1e-9, atol=1e-10)


def test_mixed_dtypes_lbfgs_backtracking():
    """lbfgs + backtracking over a float32 and a float64 leaf: the float64 reference's
    iterates up to the float32 leaf's rounding (8 steps of a 10-D Rosenbrock)."""
    init, _ = PROBLEMS["rosenbrock"]
    start = init()
    like = {"a": start["a"].astype(np.float32), "b": start["b"]}
    vg = _tree_fns(_rosen_flat, like)
    params = {"a": _device(like["a"], None), "b": _device(like["b"], None)}
    tx = lbfgs(memory_size=4, linesearch=scale_by_backtracking_linesearch(20))
    got, _ = _run(tx, params, vg, 8, value_only=True)
    want = ref.run_lbfgs(_flat(like), _rosen_flat, 8, memory_size=4,
                         linesearch=ref.BacktrackingRef(20))  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert _rosen_flat(got[-1])[0] < 0.5 * _rosen_flat(_flat(like))[0]
