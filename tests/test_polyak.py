"""SGD with Polyak's step size (optax's ``polyak_sgd``, ``scale_by_polyak``; the stateful
``PolyakSGD``): against the float64 reference of ``reference_polyak`` and optax, every
branch of the step size (the cap, eps, ``sps+``, the zero step of a tiny gradient, a nan
loss), the loss as a number or a device array, packed = separate leaves and stateful =
functional (bit for bit), the launches per step, and bad input with nothing changed."""

from __future__ import annotations

import numpy as np
import optree
import pyopencl.array as cla
import pytest
import reference_polyak as ref
from jax_x64 import jax_x64

import netcl_optim as no
from netcl_optim.optimizers.polyak import (
    PolyakSGD,
    ScaleByPolyakState,
    polyak_sgd,
    scale_by_polyak,
)
from netcl_optim.stateful import Parameter

STEPS = 60
OPTAX_STEPS = 100
# "v": 9000 elements, more than one chunk (8192) of the sums
SHAPES = {"b": (7,), "s": (), "v": (9000,), "w": (16, 9)}
FLOOR = 1.0  # the problem's smallest loss


def _sched(count):
    """A schedule as a python callable (optax gets the same formula in its float dtype)."""
    return 1.0 - count / 200


CASES = {
    "sps": {},
    # the cap binds at every step: (f - 0) / ||g||^2 > 0.3 near the floor
    "sps-capped": {"max_learning_rate": 0.3},
    "sps-eps-scaling": {"eps": 0.5, "scaling": 0.5, "max_learning_rate": 4.0},
    "sps-fmin": {"f_min": FLOOR, "max_learning_rate": 10.0},
    # f_min above the floor, steps lengthened by scaling < 1 (the step size divides by
    # scaling^2): the loss overshoots below f_min, the gap turns negative (sps: a step uphill;
    # sps+: no more steps)
    "sps-fmin-above": {"f_min": FLOOR + 0.5, "scaling": 0.5, "max_learning_rate": 100.0},
    "sps+-fmin-above": {
        "f_min": FLOOR + 0.5,
        "scaling": 0.5,
        "max_learning_rate": 100.0,
        "variant": "sps+",
    },
    "sps+-schedule": {"variant": "sps+", "scaling": _sched, "f_min": 0.5},
}


def _problem(dtype, shapes=SHAPES):
    return ref.least_squares(shapes, dtype, floor=FLOOR)


def _core(state):
    found = [s for s in state if isinstance(s, ScaleByPolyakState)]
    assert len(found) == 1, state
    return found[0]


def _scalar(tree):
    """A tree of 0-d device arrays, every leaf holding the same value: that value."""
    values = {np.asarray(leaf.get()).tobytes() for leaf in optree.tree_leaves(tree)}
    assert len(values) == 1, values
    leaf = optree.tree_leaves(tree)[0].get()
    return float(leaf)


def _run(tx, p0, grad, loss, steps, queue, packed=True, grads=None):
    """``steps`` steps of ``tx`` from ``p0`` at the gradients (``grads``, else ``grad`` at
    the params reached) and the loss there (float64, on the host): returns (params on the
    host, state, the gradients, the losses, the step sizes)."""
    params = no.to_device(p0, queue)
    params = no.pack(params) if packed else params
    state = tx.init(params)
    used, values, steps_taken = [], [], []
    for t in range(steps):
        x = no.to_host(params)
        g = grads[t] if grads is not None else grad(x)
        value = loss(x)
        used.append(g)
        values.append(value)
        g = no.to_device(g, queue)
        params, state = no.step(tx, params, no.pack(g) if packed else g, state, value=value)
        steps_taken.append(_scalar(_core(state).step_size))
    return no.to_host(params), state, used, values, steps_taken


def _assert_close(got, want, rtol, atol, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


def _same(a, b, what=""):
    for k in a:
        assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), (what, k)


def _state_bytes(state):
    return [np.asarray(x.get() if hasattr(x, "get") else x).tobytes()
            for x in optree.tree_leaves(state)]  # fmt: skip


# ============================================================================ reference


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES)
def test_functional_matches_float64_reference(cl_queue, case, dtype):
    """60 steps; the reference fed the gradients and losses our run used."""
    h = CASES[case]
    p0, grad, loss = _problem(dtype)
    got, _, used, values, steps = _run(polyak_sgd(**h), p0, grad, loss, STEPS, cl_queue)
    want, want_steps = ref.polyak_sgd(p0, used, values, **h)
    # float64: the same operations, ||u||^2 summed in another order. float32: the update,
    # the step size and the params round to float32 at every step.
    rtol, atol = (1e-12, 1e-13) if dtype == np.float64 else (1e-5, 1e-5)
    for k in SHAPES:
        _assert_close(got[k], want[k], rtol, atol, k)
    _assert_close(steps, want_steps, 1e-12 if dtype == np.float64 else 1e-6, 0.0, "steps")
    if case == "sps-capped":
        assert all(s == np.asarray(0.3, dtype) for s in steps[5:])
    if case == "sps+-fmin-above":  # below f_min: no more moves
        assert steps[-1] == 0.0 and values[-1] == values[-2] < h["f_min"]
    if case == "sps-fmin-above":
        assert min(steps) < 0 < max(steps)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("scale", "eps", "want"), [
    (0.0, 0.0, 0.0),        # zero gradients: ||u||^2 + eps = 0 <= 2^-52: step 0
    (1e-10, 0.0, 0.0),      # ||u||^2 = 7e-20 <= 2^-52: step 0 (not the cap)
    (1e-10, 1e-12, 1.0),    # eps lifts it above: min(gap / 1e-12, 1) = the cap
    (0.0, 1e-17, 0.0),      # eps alone below 2^-52
])  # fmt: skip
def test_the_zero_step_branch(cl_queue, dtype, scale, eps, want):
    """optax's ``where(||u||^2 + eps <= finfo(float).eps, 0, ...)``: the step size is 0
    (params unchanged, bit for bit) where the sum is below float64's epsilon."""
    shapes = {"a": (3,), "b": (2, 2)}
    p0, _, _ = ref.least_squares(shapes, dtype)
    grads = [{k: np.full(s, scale, dtype) for k, s in shapes.items()}] * 3
    tx = polyak_sgd(eps=eps)
    got, _, _, values, steps = _run(tx, p0, None, lambda x: 2.0, 3, cl_queue, grads=grads)
    want_x, want_steps = ref.polyak_sgd(p0, grads, values, eps=eps)
    assert steps == [want] * 3 == want_steps
    if want == 0.0:
        _same(got, p0, "params")
    _assert_close(got["a"], want_x["a"], 1e-7, 0.0)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_loss_that_is_not_finite_propagates_as_in_jnp(cl_queue, value):
    """nan: a nan step (jnp.minimum keeps nan), nan params; +inf: the cap; -inf: -inf
    steps (an inf update)."""
    p0, grad, _ = _problem(np.float32, {"a": (5,)})
    _, _, _, _, steps = _run(polyak_sgd(), p0, grad, lambda x: value, 1, cl_queue)
    want = ref.polyak_step(1.0, value, 0.0, 1.0, 0.0, "sps")
    assert np.isnan(steps[0]) if np.isnan(want) else steps[0] == want
    _, _, _, _, steps = _run(polyak_sgd(variant="sps+"), p0, grad, lambda x: value, 1,
                                cl_queue)  # fmt: skip
    want = ref.polyak_step(1.0, value, 0.0, 1.0, 0.0, "sps+")
    assert np.isnan(steps[0]) if np.isnan(want) else steps[0] == want


# ============================================================================ optax


def _optax_run(h, p0, grads, values, x64):
    """optax's polyak_sgd over the same gradients and losses (Python floats)."""
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")

    with jax_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        if h.get("scaling") is _sched:  # jax: int32 / int is float32 even under x64
            h = {**h, "scaling": lambda c: 1.0 - jnp.asarray(c, dtype) / 200}
        tx = optax.polyak_sgd(**h)
        params = {k: jnp.asarray(v) for k, v in p0.items()}
        state = tx.init(params)
        for g, value in zip(grads, values, strict=True):
            g = {k: jnp.asarray(v) for k, v in g.items()}
            u, state = tx.update(g, state, params, value=value)
            params = optax.apply_updates(params, u)
        got = {k: np.asarray(v, np.float64) for k, v in params.items()}
        assert all(np.asarray(v).dtype == dtype for v in params.values())
    return got


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_functional_matches_optax(cl_queue, case, x64):
    """100 steps on the least squares problem, optax fed the gradients and losses our run
    used (the loss computed on the host at each step's params)."""
    h = CASES[case]
    dtype = np.float64 if x64 else np.float32
    p0, grad, loss = _problem(dtype)
    got, _, used, values, _ = _run(polyak_sgd(**h), p0, grad, loss, OPTAX_STEPS, cl_queue)
    want = _optax_run(h, p0, used, values, x64)
    # float32: optax sums ||u||^2 in float32 (9000+ elements), we in double
    rtol, atol = (1e-12, 1e-13) if x64 else (2e-6, 2e-6)
    for k in SHAPES:
        _assert_close(got[k], want[k], rtol, atol, k)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("eps", [0.0, 1e-12])
def test_the_zero_step_branch_matches_optax(cl_queue, x64, eps):
    dtype = np.float64 if x64 else np.float32
    shapes = {"a": (3,), "b": (2, 2)}
    p0, _, _ = ref.least_squares(shapes, dtype)
    grads = [{k: np.full(s, 1e-10, dtype) for k, s in shapes.items()}] * 2
    tx = polyak_sgd(eps=eps)
    got, _, _, values, _ = _run(tx, p0, None, lambda x: 2.0, 2, cl_queue, grads=grads)
    want = _optax_run({"eps": eps}, p0, grads, values, x64)
    _same(got, {k: np.asarray(v, dtype) for k, v in want.items()}, "params")


# ============================================================================ our own paths


@pytest.mark.parametrize("case", CASES)
def test_packed_equals_separate_and_launches(cl_queue, case):
    """A packed tree (one buffer, 4 leaves): 3 launches a step (sums, finish, fused), the
    same bits as separate leaves; update + apply_updates = step."""
    h = CASES[case]
    p0, grad, loss = _problem(np.float32)
    tx = polyak_sgd(**h)
    packed = no.pack(no.to_device(p0, cl_queue))
    loose = no.to_device(p0, cl_queue)
    s_packed, s_loose = tx.init(packed), tx.init(loose)
    for _ in range(12):
        x = no.to_host(loose)
        g, value = grad(x), loss(x)
        g_packed = no.pack(no.to_device(g, cl_queue))
        with no.count_launches() as c:
            packed, s_packed = no.step(tx, packed, g_packed, s_packed, value=value)
        assert c.launches == 3, c.kernels
        loose, s_loose = no.step(tx, loose, no.to_device(g, cl_queue), s_loose, value=value)
        _same(no.to_host(packed), no.to_host(loose), "params")
    assert _state_bytes(s_packed) == _state_bytes(s_loose)
    x = no.to_host(loose)
    g, value = no.to_device(grad(x), cl_queue), loss(x)
    u, s2 = tx.update(g, s_loose, loose, value=value)
    stepped, s3 = no.step(tx, loose, g, s_loose, value=value)
    _same(no.to_host(no.apply_updates(loose, u)), no.to_host(stepped), "update+apply")
    assert _state_bytes(s2) == _state_bytes(s3)


def test_scale_by_polyak_alone(cl_queue):
    """``scale_by_polyak`` scales the updates it gets: ``sgd(1) + scale_by_polyak`` =
    ``polyak_sgd``, bit for bit."""
    p0, grad, loss = _problem(np.float32)
    tx = no.chain(no.scale_by_learning_rate(0.7), scale_by_polyak(f_min=0.5, eps=1e-3))
    a = _run(tx, p0, grad, loss, 5, cl_queue)
    b = _run(polyak_sgd(scaling=0.7, f_min=0.5, eps=1e-3), p0, grad, loss, 5, cl_queue)
    _same(a[0], b[0], "params")
    assert a[4] == b[4]


def test_the_loss_as_a_number_or_a_device_array(cl_queue):
    """A Python float, numpy scalars and 0-d / one-element device arrays (read back: one
    sync) give the same bits; a float32 loss's gap is computed in float32 (as optax)."""
    p0, grad, _ = _problem(np.float32, {"a": (5,), "b": (3, 2)})
    tx = polyak_sgd(f_min=0.25)
    value = 3.0  # exact in every precision, as value - f_min
    kinds = [value, np.float64(value), np.float32(value), np.array([value]),
             cla.to_device(cl_queue, np.array(value, np.float32)),
             cla.to_device(cl_queue, np.array([value], np.float64))]  # fmt: skip
    runs = [_run(tx, p0, grad, lambda x, v=v: v, 3, cl_queue) for v in kinds]
    for r in runs[1:]:
        _same(r[0], runs[0][0], "params")
        assert r[4] == runs[0][4]


SHAPES_LIST = list(SHAPES)
STATEFUL_CASES = [c for c, h in CASES.items() if not callable(h.get("scaling"))]


def _torch_kwargs(h):
    return {("lr" if k == "scaling" else k): v for k, v in h.items()}


def _parameters(p0, queue, packed=False):
    arrays = no.to_device([p0[k].copy() for k in SHAPES_LIST], queue)
    return [Parameter(a) for a in (no.pack(arrays) if packed else arrays)]


def _host(params):
    return {k: p.data.get() for k, p in zip(SHAPES_LIST, params, strict=True)}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", STATEFUL_CASES)
def test_stateful_equals_functional(cl_queue, case, packed):
    """The class over Parameters (separate or packed; the loss from a closure, or given
    with ``value=``) = the functional alias over the same tree, bit for bit: params and
    ``state[p]["step_size"]``."""
    h = CASES[case]
    p0, grad, loss = _problem(np.float32)
    by_closure = _parameters(p0, cl_queue, packed)
    by_value = _parameters(p0, cl_queue, packed)
    opt_c = PolyakSGD(by_closure, **_torch_kwargs(h))
    opt_v = PolyakSGD(by_value, **_torch_kwargs(h))
    tx = polyak_sgd(**h)
    tree = no.to_device([p0[k].copy() for k in SHAPES_LIST], cl_queue)
    tree = no.pack(tree) if packed else tree
    state = tx.init(tree)

    def set_grads(params):
        x = _host(params)
        gs = no.to_device([grad(x)[k] for k in SHAPES_LIST], cl_queue)
        for p, a in zip(params, no.pack(gs) if packed else gs, strict=True):
            p.grad = a
        return loss(x)

    for _ in range(10):
        opt_c.step(lambda: set_grads(by_closure))
        opt_v.step(value=set_grads(by_value))
        x = dict(zip(SHAPES_LIST, no.to_host(tree), strict=True))
        g = no.to_device([grad(x)[k] for k in SHAPES_LIST], cl_queue)
        tree, state = no.step(tx, tree, no.pack(g) if packed else g, state, value=loss(x))
    want = dict(zip(SHAPES_LIST, no.to_host(tree), strict=True))
    _same(_host(by_closure), want, "params (closure)")
    _same(_host(by_value), want, "params (value)")
    leaves = optree.tree_leaves(_core(state).step_size)
    for opt, params in ((opt_c, by_closure), (opt_v, by_value)):
        for p, leaf in zip(params, leaves, strict=True):
            got = opt.state[p]["step_size"]
            assert got.shape == () and got.get().tobytes() == leaf.get().tobytes()
            assert "step" not in opt.state[p]


def test_stateful_step_returns_the_closures_loss(cl_queue):
    p0, grad, loss = _problem(np.float32, {"a": (4,)})
    params = [Parameter(no.to_device(p0["a"].copy(), cl_queue))]
    opt = PolyakSGD(params, max_learning_rate=0.5)

    def closure():
        x = {"a": params[0].data.get()}
        params[0].grad = no.to_device(grad(x)["a"], cl_queue)
        return np.float32(loss(x))

    first = closure()
    assert opt.step(closure) == first
    assert opt.step(value=loss({"a": params[0].data.get()})) is None


def test_stateful_resume_bit_for_bit(cl_queue, tmp_path):
    """Straight 8 steps = 3 steps, a state dict loaded into a new optimizer, 5 more."""
    h = {"max_learning_rate": 0.4, "eps": 1e-3, "variant": "sps+", "f_min": 0.5}
    p0, grad, loss = _problem(np.float32)

    def steps(opt, params, n):
        for _ in range(n):
            x = _host(params)
            for p, k in zip(params, SHAPES_LIST, strict=True):
                p.grad = no.to_device(grad(x)[k], cl_queue)
            opt.step(value=loss(x))

    straight = _parameters(p0, cl_queue)
    steps(PolyakSGD(straight, **h), straight, 8)
    first = _parameters(p0, cl_queue)
    opt1 = PolyakSGD(first, **h)
    steps(opt1, first, 3)
    saved, state = _host(first), opt1.state_dict()
    second = _parameters(saved, cl_queue)
    opt2 = PolyakSGD(second, **h)
    opt2.load_state_dict(state)
    steps(opt2, second, 5)
    _same(_host(second), _host(straight), "params")


# ============================================================================ bad input

BAD_FUNCTIONAL = [
    (polyak_sgd, {"variant": "sps-"}, "variant"),
    (polyak_sgd, {"variant": None}, "variant"),
    (polyak_sgd, {"max_learning_rate": -1.0}, "max_learning_rate"),
    (polyak_sgd, {"max_learning_rate": float("nan")}, "max_learning_rate"),
    (polyak_sgd, {"eps": -1e-8}, "eps"),
    (polyak_sgd, {"eps": float("inf")}, "eps"),
    (polyak_sgd, {"f_min": float("nan")}, "f_min"),
    (polyak_sgd, {"f_min": -float("inf")}, "f_min"),
    (polyak_sgd, {"scaling": 0.0}, "learning_rate"),
    (polyak_sgd, {"scaling": -1.0}, "learning_rate"),
    (scale_by_polyak, {"variant": "SPS"}, "variant"),
    (scale_by_polyak, {"max_learning_rate": -0.1}, "max_learning_rate"),
    (scale_by_polyak, {"f_min": "0"}, "f_min"),
]


@pytest.mark.parametrize(("fn", "kwargs", "name"), BAD_FUNCTIONAL)
def test_bad_hyperparameters(fn, kwargs, name):
    """Checked when the transform is built (optax checks ``variant`` at the first update,
    the others never)."""
    with pytest.raises((ValueError, TypeError), match=f"Invalid {name}: "):
        fn(**kwargs)


def test_max_learning_rate_inf_is_no_cap(cl_queue):
    p0, grad, _ = _problem(np.float64, {"a": (3,)})
    _, _, used, values, steps = _run(polyak_sgd(max_learning_rate=np.inf), p0, grad,
                                     lambda x: 1e6, 2, cl_queue)  # fmt: skip
    _, want = ref.polyak_sgd(p0, used, values, max_learning_rate=np.inf)
    _assert_close(steps, want, 1e-12, 0.0)
    assert steps[0] > 1.0


@pytest.mark.parametrize(("extra", "error", "match"), [
    ({}, TypeError, "polyak_sgd needs value: update"),
    ({"value": None}, TypeError, "polyak_sgd needs value: update"),
    ({"value": "1.0"}, TypeError, "Invalid value: '1.0'"),
    ({"value": np.ones(2)}, ValueError, "Invalid value: array"),
    ({"value": 1 + 2j}, TypeError, "Invalid value: "),
])  # fmt: skip
def test_a_missing_or_bad_loss_changes_nothing(cl_queue, extra, error, match):
    """A step (donated, pure and ``update``) without a usable ``value`` raises before
    anything is launched: params and state as they were."""
    p0, grad, _ = _problem(np.float32, {"a": (5,), "b": (2, 3)})
    tx = polyak_sgd()
    params = no.pack(no.to_device(p0, cl_queue))
    state = tx.init(params)
    g = no.pack(no.to_device(grad(p0), cl_queue))
    before, state_before = no.to_host(params), _state_bytes(state)
    with no.count_launches() as c:
        with pytest.raises(error, match=match):
            no.step(tx, params, g, state, donate=True, **extra)
        with pytest.raises(error, match=match):
            no.step(tx, params, g, state, **extra)
        with pytest.raises(error, match=match):
            tx.update(g, state, params, **extra)
    assert c.launches == 0
    _same(no.to_host(params), before, "params")
    assert _state_bytes(state) == state_before


BAD_STATEFUL = [
    ({"lr": 0.0}, "lr"),
    ({"max_learning_rate": -1.0}, "max_learning_rate"),
    ({"eps": -1.0}, "eps"),
    ({"f_min": float("nan")}, "f_min"),
    ({"variant": "polyak"}, "variant"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_STATEFUL)
def test_bad_hyperparameters_stateful(cl_queue, kwargs, name):
    params = [Parameter(no.to_device(np.ones(3, np.float32), cl_queue))]
    with pytest.raises(ValueError, match=f"Invalid {name}: "):
        PolyakSGD(params, **kwargs)


def test_stateful_step_without_the_loss_changes_nothing(cl_queue):
    """step() (no closure, no value), both, a bad value or a closure returning None raise
    TypeError; params and state unchanged, no launch."""
    params = [Parameter(no.to_device(np.arange(4, dtype=np.float32), cl_queue))]
    opt = PolyakSGD(params)
    params[0].grad = no.to_device(np.ones(4, np.float32), cl_queue)
    opt.step(value=2.0)
    before = params[0].data.get()
    step_size = opt.state[params[0]]["step_size"].get().tobytes()
    calls = []

    def closure():
        calls.append(1)
        return 1.0

    with no.count_launches() as c:
        for call in (lambda: opt.step(), lambda: opt.step(closure, value=1.0),
                     lambda: opt.step(value="x"), lambda: opt.step(lambda: None)):  # fmt: skip
            with pytest.raises(TypeError, match=r"PolyakSGD\.step"):
                call()
        with pytest.raises(TypeError, match="needs the loss"):
            opt._check_step()  # what ZeroRedundancyOptimizer asks before its step
    assert c.launches == 0 and not calls
    assert params[0].data.get().tobytes() == before.tobytes()
    assert opt.state[params[0]]["step_size"].get().tobytes() == step_size


def test_the_gap_takes_the_losss_precision(cl_queue):
    """optax: ``jnp.array(value - f_min)``, ``f_min`` in the value's dtype: a float32 loss
    gives a float32 gap, a Python float a float64 one, whatever the params' dtype."""
    p0, grad, _ = _problem(np.float64, {"a": (4,)})
    g = [grad(p0)]
    runs = {}
    for kind in (np.float32, float):
        value = kind(1.0)
        tx = polyak_sgd(f_min=1e-9, max_learning_rate=1e9)
        runs[kind] = _run(tx, p0, None, lambda x, v=value: v, 1, cl_queue, grads=g)
        _, want = ref.polyak_sgd(p0, g, [float(kind(1.0) - kind(1e-9))], f_min=0.0,
                                 max_learning_rate=1e9)  # fmt: skip
        _assert_close(runs[kind][4], want, 1e-13, 0.0)
        h = {"f_min": 1e-9, "max_learning_rate": 1e9}
        if kind is np.float32:  # (optax under x64: a float32 loss, float64 params)
            _assert_close(runs[kind][0]["a"], _optax_run(h, p0, g, [value], True)["a"], 1e-13, 0)
    assert runs[np.float32][4] != runs[float][4]


def test_a_torch_loss(cl_queue):
    """A torch loss that requires grad (what a torch closure returns): read without a
    warning, in its precision."""
    torch = pytest.importorskip("torch")
    p0, grad, _ = _problem(np.float32, {"a": (5,)})
    loss = (torch.ones(3, requires_grad=True) * 0.75).sum()
    got = _run(polyak_sgd(), p0, grad, lambda x: loss, 2, cl_queue)
    want = _run(polyak_sgd(), p0, grad, lambda x: np.float32(2.25), 2, cl_queue)
    _same(got[0], want[0], "params")
