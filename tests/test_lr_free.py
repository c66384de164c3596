"""The learning-rate-free rules (Prodigy, D-Adaptation AdamW, DoG, DoWG; optax.contrib's):
against the float64 numpy references of ``reference_lr_free`` and against optax.contrib,
packed = separate leaves, stateful = functional, resumed = straight (bit for bit), the
launches per step, bad input, and the step size estimate readable from the state."""

from __future__ import annotations

import numpy as np
import optree
import pyopencl.array as cla
import pytest
import reference_lr_free as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from jax_x64 import jax_x64

import netcl_optim as no
from netcl_optim.optimizers.dadapt import DAdaptAdamWState
from netcl_optim.optimizers.dog import DoGState, DoWGState
from netcl_optim.optimizers.prodigy import ProdigyState
from netcl_optim.stateful import Parameter

STEPS = 60
# "v": 9000 elements, more than one chunk (8192) of the sums
SHAPES = {"b": (7,), "s": (), "v": (9000,), "w": (16, 9)}


def _sched(count):
    """A schedule as a python callable (optax gets the same formula in its float dtype)."""
    return 1.0 - count / 200


FUNCTIONAL = {"prodigy": no.prodigy, "dadapt": no.dadapt_adamw, "dog": no.dog, "dowg": no.dowg}
STATE_TYPES = {"prodigy": ProdigyState, "dadapt": DAdaptAdamWState, "dog": DoGState,
               "dowg": DoWGState}  # fmt: skip
SCALARS = {"prodigy": ("estim_lr", "numerator_weighted"),
           "dadapt": ("estim_lr", "numerator_weighted"),
           "dog": ("max_dist", "sum_sq_norm_grads"),
           "dowg": ("weighted_sq_norm_grads", "estim_sq_dist")}  # fmt: skip

CASES = {
    "prodigy": ("prodigy", {}),
    "prodigy-sched-wd-beta3": ("prodigy", {"learning_rate": _sched, "weight_decay": 0.01,
                                           "beta3": 0.95}),
    "prodigy-safeguard": ("prodigy", {"safeguard_warmup": True, "weight_decay": 0.1,
                                      "betas": (0.8, 0.99), "estim_lr_coef": 2.0,
                                      "eps": 1e-6}),
    "dadapt": ("dadapt", {}),
    "dadapt-sched-wd": ("dadapt", {"learning_rate": _sched, "weight_decay": 0.05,
                                   "betas": (0.85, 0.99)}),
    "dog-heuristic": ("dog", {}),
    "dog-distance-wd": ("dog", {"init_step": ("distance", 0.1), "weight_decay": 0.01}),
    "dog-lr-sched": ("dog", {"init_step": ("learning_rate", 0.05), "learning_rate": _sched,
                             "eps": 1e-6}),
    "dowg": ("dowg", {}),
    "dowg-init-wd": ("dowg", {"init_estim_sq_dist": 0.5, "weight_decay": 0.01, "eps": 1e-6}),
}  # fmt: skip
# the reference only: no.linear_schedule as the learning rate
REF_ONLY = {
    "prodigy-linear-warmup": ("prodigy", {"learning_rate": no.linear_schedule(0.1, 1.0, 20),
                                          "weight_decay": 0.01}),
    "dog-heuristic-linear": ("dog", {"learning_rate": no.linear_schedule(0.5, 1.0, 30),
                                     "init_step": ("heuristic", 1e-3), "weight_decay": 0.1}),
}  # fmt: skip


def _problem(dtype, shapes=SHAPES, seed=0):
    """Start params far from a target, and a least squares gradient ``a (x - target)`` (a
    per-element curvature): the distance from the start grows, and so does ``d``. The start
    is near 0, so the first steps' tiny moves (``d`` from 1e-6) are exact in float32: far
    from 0, ``x0 - x`` would be a few ulps of ``x`` and float32 (ours and optax's alike)
    would lose ``d``'s first digits, whatever the implementation."""
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(1e-6 * rng.standard_normal(s), dtype) for k, s in shapes.items()}
    target = {k: np.asarray(rng.standard_normal(s) + 3.0, dtype) for k, s in shapes.items()}
    curv = {k: np.asarray(rng.uniform(0.5, 2.0, s), dtype) for k, s in shapes.items()}

    def grad(x):
        return {k: np.asarray(curv[k] * (np.asarray(x[k], dtype) - target[k]), dtype)
                for k in shapes}  # fmt: skip

    return p0, grad


def _core(state, cls):
    """The rule's state inside a chain's state (DoG, DoWG: a chain)."""
    if isinstance(state, cls):
        return state
    found = [s for s in state if isinstance(s, cls)] if isinstance(state, tuple) else []
    assert len(found) == 1, state
    return found[0]


def _scalar(tree):
    """A tree of 0-d device arrays, every leaf holding the same value: that value."""
    values = {float(leaf.get()) for leaf in optree.tree_leaves(tree)}
    assert len(values) == 1, values
    return values.pop()


def _run(tx, p0, grad, steps, queue, packed=True):
    """``steps`` steps of ``tx`` from ``p0`` with the gradients at the params reached:
    returns (params on the host, state, the gradients used)."""
    params = no.to_device(p0, queue)
    params = no.pack(params) if packed else params
    state = tx.init(params)
    used = []
    for _ in range(steps):
        g = grad(no.to_host(params))
        used.append(g)
        g = no.to_device(g, queue)
        params, state = no.step(tx, params, no.pack(g) if packed else g, state)
    return no.to_host(params), state, used


def _assert_close(got, want, rtol, atol, what=""):
    """Returns the largest relative error (over elements whose size exceeds atol)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)
    big = np.abs(want) > atol
    return float(np.max(np.abs(got - want)[big] / np.abs(want)[big], initial=0.0))


def _same(a, b, what=""):
    for k in a:
        assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), (what, k)


# ============================================================================ reference


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", [*CASES, *REF_ONLY])
def test_functional_matches_float64_reference(cl_queue, case, dtype):
    rule, h = {**CASES, **REF_ONLY}[case]
    p0, grad = _problem(dtype)
    got, state, used = _run(FUNCTIONAL[rule](**h), p0, grad, STEPS, cl_queue)
    want, scalars = ref.RULES[rule](p0, used, **h)
    # float64: the same operations, the tree's sums in another order (double partials per
    # chunk, added in the tree's order): observed <= 4e-12 on the params, 5e-14 on the
    # scalars after 60 steps.
    # float32: the sums run in double (as exact as the reference's), but every element-wise
    # operation and the stored params, slots and scalars round to float32 (6e-8 relative),
    # and that rounding feeds back: through the next step's <g, x0 - x> and ||x - x0|| into
    # the scalars, and through Adam's division by sqrt(v) near the minimum (d ~ 1 there, the
    # params oscillate about it). Observed: the scalars within 4e-6, the params within 1e-4
    # relative (more only at elements near zero, within the 1e-5 absolute floor).
    rtol, atol = (1e-10, 1e-12) if dtype == np.float64 else (1e-4, 1e-5)
    for k in SHAPES:
        _assert_close(got[k], want[k], rtol, atol, k)
    core = _core(state, STATE_TYPES[rule])
    for name, value in scalars.items():
        _assert_close(_scalar(getattr(core, name)), value, rtol, 0.0, name)

    if rule in ("prodigy", "dadapt"):
        assert core.count == STEPS
        assert scalars["estim_lr"] > 100 * h.get("estim_lr0", 1e-6)  # d grew


@settings(max_examples=8, deadline=None)
@given(
    rule=st.sampled_from(sorted(FUNCTIONAL)),
    sizes=st.lists(st.sampled_from([0, 1, 2, 3, 17, 64, 255, 1000, 3000]), min_size=1,
                   max_size=5),
    lr=st.sampled_from([1.0, 0.5]),
    wd=st.sampled_from([0.0, 0.02]),
    flag=st.booleans(),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_functional_matches_reference_over_shapes(cl_queue, rule, sizes, lr, wd, flag, seed):
    """Trees of 1-5 leaves (size 0: a 0-d leaf), packed or not, float64, 12 steps."""
    shapes = {f"l{i}": (() if n == 0 else (n,)) for i, n in enumerate(sizes)}
    h = {"learning_rate": lr}
    if rule == "prodigy":
        h.update(weight_decay=wd, safeguard_warmup=flag)
    elif rule == "dadapt":
        h.update(weight_decay=wd, betas=(0.9, 0.99) if flag else (0.9, 0.999))
    elif rule == "dog":
        h.update(weight_decay=wd or None, init_step=("distance", 1e-3) if flag else
                 ("heuristic", 1e-4))  # fmt: skip
    else:
        h.update(weight_decay=wd or None, init_estim_sq_dist=1e-3 if flag else None)
    p0, grad = _problem(np.float64, shapes, seed)
    got, state, used = _run(FUNCTIONAL[rule](**h), p0, grad, 12, cl_queue, packed=flag)
    want, scalars = ref.RULES[rule](p0, used, **h)
    for k in shapes:
        _assert_close(got[k], want[k], 1e-10, 1e-12, k)
    core = _core(state, STATE_TYPES[rule])
    for name, value in scalars.items():
        _assert_close(_scalar(getattr(core, name)), value, 1e-10, 0.0, name)


def test_dog_heuristic_takes_the_params_of_the_first_step(cl_queue):
    """The documented difference from optax: ``("heuristic", a)`` computes ``r0 = a (1 +
    ||x||)`` from the params of the first step (optax: those given to init); x0 is the
    params given to init. Identical when they are the same (the tests above)."""
    a = 0.01
    p_init = {"u": np.linspace(-1, 1, 6), "w": np.full(3, 0.5)}
    p_first = {k: v + 0.25 for k, v in p_init.items()}
    g = {k: np.linspace(0.1, 0.3, v.size) for k, v in p_init.items()}
    tx = no.dog(init_step=("heuristic", a))
    state = tx.init(no.to_device(p_init, cl_queue))
    params, state = no.step(tx, no.to_device(p_first, cl_queue), no.to_device(g, cl_queue), state)
    core = _core(state, DoGState)
    norm = np.sqrt(sum(np.sum(v * v) for v in p_first.values()))
    dist = np.sqrt(sum(np.sum((p_first[k] - p_init[k]) ** 2) for k in p_init))
    r = max(a * (1 + norm), dist)
    G = sum(np.sum(v * v) for v in g.values())
    np.testing.assert_allclose(_scalar(core.max_dist), r, rtol=1e-14)
    np.testing.assert_allclose(_scalar(core.sum_sq_norm_grads), G, rtol=1e-14)
    got = no.to_host(params)
    for k in p_init:
        np.testing.assert_allclose(got[k], p_first[k] - r / np.sqrt(G + 1e-8) * g[k],
                                   rtol=1e-14, atol=1e-15)  # fmt: skip


# ============================================================================ optax


def _optax_tx(optax, rule, h):
    return {"prodigy": optax.contrib.prodigy, "dadapt": optax.contrib.dadapt_adamw,
            "dog": optax.contrib.dog, "dowg": optax.contrib.dowg}[rule](**h)  # fmt: skip


def _optax_run(rule, h, p0, grads, x64):
    """optax.contrib's rule over the same gradients: (params, the rule's scalars)."""
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")

    with jax_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        if h.get("learning_rate") is _sched:  # jax: int32 / int is float32 even under x64
            h = {**h, "learning_rate": lambda c: 1.0 - jnp.asarray(c, dtype) / 200}
        tx = _optax_tx(optax, rule, h)
        params = {k: jnp.asarray(v) for k, v in p0.items()}
        state = tx.init(params)
        for g in grads:
            u, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
            params = optax.apply_updates(params, u)
        leaves = [s for s in (state if isinstance(state, tuple) and not hasattr(state, "_fields")
                              else (state,)) if hasattr(s, SCALARS[rule][0])]  # fmt: skip
        assert len(leaves) == 1
        scalars = {n: float(getattr(leaves[0], n)) for n in SCALARS[rule]}
        got = {k: np.asarray(v, np.float64) for k, v in params.items()}
        assert all(np.asarray(v).dtype == (np.float64 if x64 else np.float32)
                   for v in params.values())  # fmt: skip
    return got, scalars


OPTAX_STEPS = 100


def _optax_params():
    out = []
    for case in CASES:
        out.append(pytest.param(case, False, id=f"{case}-float32"))
        out.append(pytest.param(case, True, id=f"{case}-float64"))
    return out


@pytest.mark.parametrize(("case", "x64"), _optax_params())
def test_functional_matches_optax(cl_queue, case, x64):
    """100 steps, optax.contrib fed the gradients our run used (the same inputs)."""
    rule, h = CASES[case]
    dtype = np.float64 if x64 else np.float32
    p0, grad = _problem(dtype)
    got, state, used = _run(FUNCTIONAL[rule](**h), p0, grad, OPTAX_STEPS, cl_queue)
    want, scalars = _optax_run(rule, h, p0, used, x64)
    if x64:  # the same operations, the sums in another order
        rtol, atol = 1e-10, 1e-12
    elif rule in ("dog", "dowg"):  # observed <= 1e-6
        rtol, atol = 1e-5, 1e-6
    else:
        # Prodigy, D-Adaptation: optax sums the tree (9000+ elements) in float32, we in
        # double: optax's d and numerator drift up to 1e-4 from the float64 reference (ours
        # stay within 4e-6, see the reference test), and d feeds back through Adam's steps
        # around the minimum: observed 1.1e-4 between the scalars and 1e-3 relative between
        # the params (at elements near zero: within the absolute floor) after 100 steps.
        rtol, atol = 1e-3, 1e-4
    for k in SHAPES:
        _assert_close(got[k], want[k], rtol, atol, k)
    core = _core(state, STATE_TYPES[rule])
    for name, value in scalars.items():
        _assert_close(_scalar(getattr(core, name)), value, rtol, 0.0, name)


# ============================================================================ our own paths

LAUNCHES = {"prodigy": 3, "dadapt": 2, "dog": 3, "dowg": 3}


def _state_bytes(state):
    return [np.asarray(x.get() if hasattr(x, "get") else x).tobytes()
            for x in optree.tree_leaves(state)]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_functional_packed_equals_separate_and_launches(cl_queue, case):
    """A packed tree (one buffer, 4 leaves): 3 launches a step (sums, finish, fused; D-
    Adaptation 2: the fused kernel sums, then the finish), the same bits as separate leaves;
    update + apply_updates = step."""
    rule, h = CASES[case]
    p0, grad = _problem(np.float32)
    tx = FUNCTIONAL[rule](**h)
    packed = no.pack(no.to_device(p0, cl_queue))
    loose = no.to_device(p0, cl_queue)
    s_packed, s_loose = tx.init(packed), tx.init(loose)
    for _ in range(12):
        g = grad(no.to_host(loose))
        g_packed = no.pack(no.to_device(g, cl_queue))
        with no.count_launches() as c:
            packed, s_packed = no.step(tx, packed, g_packed, s_packed)
        # (DoG/DoWG with weight_decay: the decay runs in the pre-pass and the fused kernel)
        assert c.launches == LAUNCHES[rule]
        loose, s_loose = no.step(tx, loose, no.to_device(g, cl_queue), s_loose)
        _same(no.to_host(packed), no.to_host(loose), "params")
    assert _state_bytes(s_packed) == _state_bytes(s_loose)
    d = _scalar(getattr(_core(s_packed, STATE_TYPES[rule]), SCALARS[rule][0]))
    assert d > 0
    g = grad(no.to_host(loose))
    u, s2 = tx.update(no.to_device(g, cl_queue), s_loose, loose)
    stepped, s3 = no.step(tx, loose, no.to_device(g, cl_queue), s_loose)
    _same(no.to_host(no.apply_updates(loose, u)), no.to_host(stepped), "update+apply")
    assert _state_bytes(s2) == _state_bytes(s3)


STATEFUL = {"prodigy": no.Prodigy, "dadapt": no.DAdaptAdamW, "dog": no.DoG, "dowg": no.DoWG}
# the functional state's fields -> the stateful class' keys
TORCH_KEYS = {
    "prodigy": {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "grad_sum": "s",
                "params0": "p0", "estim_lr": "d", "numerator_weighted": "d_numerator"},
    "dadapt": {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "grad_sum": "s",
               "estim_lr": "d", "numerator_weighted": "numerator_weighted"},
    "dog": {"init_params": "x0", "max_dist": "rbar", "sum_sq_norm_grads": "G"},
    "dowg": {"init_params": "x0", "weighted_sq_norm_grads": "v", "estim_sq_dist": "rbar_sq"},
}  # fmt: skip
# the cases whose learning rate is a number (the classes take lr as a number)
STATEFUL_CASES = [c for c, (_, h) in CASES.items() if not callable(h.get("learning_rate"))]


def _torch_kwargs(h):
    kw = {("lr" if k == "learning_rate" else k): v for k, v in h.items()}
    if kw.get("weight_decay", 0) is None:
        kw["weight_decay"] = 0.0
    return kw


def _parameters(p0, queue, packed=False):
    arrays = no.to_device([p0[k].copy() for k in SHAPES], queue)
    return [Parameter(a) for a in (no.pack(arrays) if packed else arrays)]


def _stateful_step(opt, params, grad, queue, packed=False):
    x = {k: p.data.get() for k, p in zip(SHAPES, params, strict=True)}
    g = grad(x)
    gs = no.to_device([g[k] for k in SHAPES], queue)
    for p, a in zip(params, no.pack(gs) if packed else gs, strict=True):
        p.grad = a
    opt.step()


def _host(params):
    return {k: p.data.get() for k, p in zip(SHAPES, params, strict=True)}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", STATEFUL_CASES)
def test_stateful_equals_functional(cl_queue, case, packed):
    """The class over Parameters (separate or packed) = the functional alias over the same
    tree, bit for bit: params and every state key; ``state[p]["d"]`` (Prodigy, D-Adaptation)
    is a 0-d device array holding the functional ``estim_lr``."""
    rule, h = CASES[case]
    p0, grad = _problem(np.float32)
    params = _parameters(p0, cl_queue, packed)
    opt = STATEFUL[rule](params, **_torch_kwargs(h))
    tx = FUNCTIONAL[rule](**h)
    tree = no.to_device([p0[k].copy() for k in SHAPES], cl_queue)
    tree = no.pack(tree) if packed else tree
    state = tx.init(tree)
    for _ in range(10):
        _stateful_step(opt, params, grad, cl_queue, packed)
        g = grad(dict(zip(SHAPES, no.to_host(tree), strict=True)))
        g = no.to_device([g[k] for k in SHAPES], cl_queue)
        tree, state = no.step(tx, tree, no.pack(g) if packed else g, state)
    _same(_host(params), dict(zip(SHAPES, no.to_host(tree), strict=True)), "params")
    core = _core(state, STATE_TYPES[rule])
    for field, key in TORCH_KEYS[rule].items():
        for p, leaf in zip(params, optree.tree_leaves(getattr(core, field)), strict=True):
            assert opt.state[p][key].get().tobytes() == leaf.get().tobytes(), (field, key)
    for p in params:
        assert opt.state[p]["step"] == 10
    if rule in ("prodigy", "dadapt"):
        for p in params:  # one read each, the group's value
            d = opt.state[p]["d"]
            assert isinstance(d, cla.Array) and d.shape == () and d.dtype == np.float32
            assert float(d.get()) == _scalar(core.estim_lr) > 1e-6


@pytest.mark.parametrize("case", STATEFUL_CASES)
def test_stateful_resume_bit_for_bit(cl_queue, case, tmp_path):
    """Straight 10 steps = 4 steps, then a new optimizer that loads the state dict (and one
    that loads a no.save checkpoint) and goes on: the same bits."""
    rule, h = CASES[case]
    cls, kw = STATEFUL[rule], _torch_kwargs(h)
    p0, grad = _problem(np.float32)
    straight = _parameters(p0, cl_queue)
    opt = cls(straight, **kw)
    for _ in range(10):
        _stateful_step(opt, straight, grad, cl_queue)

    first = _parameters(p0, cl_queue)
    opt1 = cls(first, **kw)
    for _ in range(4):
        _stateful_step(opt1, first, grad, cl_queue)
    saved_params, saved_state = _host(first), opt1.state_dict()
    no.save(tmp_path / "opt.npz", opt1)
    for how in ("state_dict", "checkpoint"):
        resumed = _parameters(saved_params, cl_queue)
        if how == "state_dict":
            opt2 = cls(resumed, **kw)
            opt2.load_state_dict(saved_state)
        else:
            opt2 = no.load(tmp_path / "opt.npz", cls(resumed, **kw))
        for _ in range(6):
            _stateful_step(opt2, resumed, grad, cl_queue)
        _same(_host(resumed), _host(straight), how)
        s1, s2 = opt.state_dict(), opt2.state_dict()
        assert s1["param_groups"] == s2["param_groups"]
        for i in range(len(SHAPES)):
            assert set(s1["state"][i]) == set(s2["state"][i])
            for key, v in s1["state"][i].items():
                assert np.asarray(v).tobytes() == np.asarray(s2["state"][i][key]).tobytes(), key


@pytest.mark.parametrize("case", CASES)
def test_functional_checkpoint_resume_bit_for_bit(cl_queue, case, tmp_path):
    rule, h = CASES[case]
    p0, grad = _problem(np.float32)
    tx = FUNCTIONAL[rule](**h)
    straight, s_straight, _ = _run(tx, p0, grad, 9, cl_queue)
    params = no.pack(no.to_device(p0, cl_queue))
    state = tx.init(params)
    for _ in range(4):
        params, state = no.step(tx, params, no.pack(no.to_device(grad(no.to_host(params)),
                                                                 cl_queue)), state)  # fmt: skip
    no.save(tmp_path / "ck.npz", {"params": params, "state": state})
    loaded = no.load(tmp_path / "ck.npz", queue=cl_queue)
    params, state = loaded["params"], loaded["state"]
    assert optree.tree_structure(state) == optree.tree_structure(s_straight)
    for _ in range(5):
        params, state = no.step(tx, params, no.pack(no.to_device(grad(no.to_host(params)),
                                                                 cl_queue)), state)  # fmt: skip
    _same(no.to_host(params), straight, "params")
    assert _state_bytes(state) == _state_bytes(s_straight)


# ============================================================================ bad input


@pytest.mark.parametrize("rule", sorted(FUNCTIONAL))
def test_mixed_dtypes_share_one_step_size(cl_queue, rule):
    """A float32 + float64 tree: the sums run over both dtype groups, every leaf of a scalar
    field holds one number (in float32, the tree's lowest precision, as optax keeps it), and
    the stateful class equals the functional alias bit for bit."""
    rng = np.random.default_rng(3)
    p0 = {"a": rng.standard_normal(500).astype(np.float32), "b": rng.standard_normal(30)}
    grads = [{k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in p0.items()}
             for _ in range(4)]  # fmt: skip
    tx = FUNCTIONAL[rule]()
    params = no.to_device(p0, cl_queue)
    state = tx.init(params)
    for g in grads:
        params, state = no.step(tx, params, no.to_device(g, cl_queue), state)
    core = _core(state, STATE_TYPES[rule])
    for name in SCALARS[rule]:
        values = {float(x.get()) for x in optree.tree_leaves(getattr(core, name))}
        assert len(values) == 1, (name, values)
        (value,) = values
        assert value == float(np.float32(value)), (name, value)
    ps = [Parameter(no.to_device(v.copy(), cl_queue)) for v in p0.values()]
    opt = STATEFUL[rule](ps)
    for g in grads:
        for p, x in zip(ps, g.values(), strict=True):
            p.grad = no.to_device(x, cl_queue)
        opt.step()
    got = no.to_host(params)
    for p, k in zip(ps, p0, strict=True):
        assert p.data.get().tobytes() == got[k].tobytes(), k


def _pick(state, keep):
    """``state`` with every list of per-parameter leaves cut to the indices ``keep``."""
    if isinstance(state, list):
        return [state[i] for i in keep]
    if isinstance(state, tuple):
        return type(state)(*(_pick(x, keep) for x in state)) if hasattr(state, "_fields") \
            else tuple(_pick(x, keep) for x in state)  # fmt: skip
    return state


@pytest.mark.parametrize("rule", sorted(FUNCTIONAL))
def test_none_grads_step_the_parameters_that_have_one(cl_queue, rule):
    """A stateful step where a grad is None sums over the parameters that step (as torch's
    optimizers skip it): bit for bit the functional step of that sub-tree from their state,
    the skipped parameter left as it was."""
    rng = np.random.default_rng(4)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in ((40,), (3, 5), (7,))]
    g1, g2 = ([rng.standard_normal(x.shape).astype(np.float32) for x in p0] for _ in range(2))
    ps = [Parameter(no.to_device(x.copy(), cl_queue)) for x in p0]
    opt = STATEFUL[rule](ps)
    for p, g in zip(ps, g1, strict=True):
        p.grad = no.to_device(g, cl_queue)
    opt.step()  # all three
    for p, g in zip(ps, g2, strict=True):
        p.grad = no.to_device(g, cl_queue)
    ps[1].grad = None
    opt.step()  # parameters 0 and 2
    tx = FUNCTIONAL[rule]()
    params = no.to_device(p0, cl_queue)
    params, state = no.step(tx, params, no.to_device(g1, cl_queue), tx.init(params))
    skipped = params[1].get()
    sub, _ = no.step(tx, [params[0], params[2]], no.to_device([g2[0], g2[2]], cl_queue),
                     _pick(state, [0, 2]))  # fmt: skip
    assert ps[1].data.get().tobytes() == skipped.tobytes()
    assert ps[0].data.get().tobytes() == sub[0].get().tobytes()
    assert ps[2].data.get().tobytes() == sub[1].get().tobytes()


@pytest.mark.parametrize("rule", sorted(FUNCTIONAL))
def test_8bit_state_refused_before_anything_changes(cl_queue, rule):
    p0 = np.linspace(-1, 1, 5000, dtype=np.float32)
    ps = [Parameter(no.to_device(p0.copy(), cl_queue))]
    ps[0].grad = no.to_device(np.ones_like(p0), cl_queue)
    opt = STATEFUL[rule](ps, state_bits=8)
    with pytest.raises(ValueError, match="8-bit state serves element-wise rules"):
        opt.step()
    assert ps[0].data.get().tobytes() == p0.tobytes()
    assert not opt.state and opt.state_dict()["state"] == {}
    tx = no.low_precision_state(FUNCTIONAL[rule](), state_bits=8, min_8bit_size=1)
    params = no.to_device({"a": p0}, cl_queue)
    state = tx.init(params)
    before = _state_bytes(state)
    with pytest.raises(ValueError, match="8-bit state serves element-wise rules"):
        no.step(tx, params, no.to_device({"a": np.ones_like(p0)}, cl_queue), state)
    assert params["a"].get().tobytes() == p0.tobytes()
    assert _state_bytes(state) == before


BAD_FUNCTIONAL = [
    (no.prodigy, {"betas": (1.5, 0.9)}, "b1"),
    (no.prodigy, {"betas": (0.9, 1.0)}, "b2"),
    (no.prodigy, {"beta3": 1.0}, "beta3"),
    (no.prodigy, {"eps": 0.0}, "eps"),
    (no.prodigy, {"estim_lr0": -1.0}, "estim_lr0"),
    (no.prodigy, {"estim_lr_coef": 0.0}, "estim_lr_coef"),
    (no.prodigy, {"weight_decay": -0.1}, "weight_decay"),
    (no.prodigy, {"safeguard_warmup": "yes"}, "safeguard_warmup"),
    (no.prodigy, {"learning_rate": -1.0}, "learning_rate"),
    (no.dadapt_adamw, {"betas": (0.9, -0.1)}, "b2"),
    (no.dadapt_adamw, {"estim_lr0": 0.0}, "estim_lr0"),
    (no.dadapt_adamw, {"weight_decay": float("nan")}, "weight_decay"),
    (no.dog, {"init_step": ("foo", 1.0)}, "init_step"),
    (no.dog, {"init_step": ("distance", -1.0)}, "init_step"),
    (no.dog, {"init_step": ("heuristic", 0.0)}, "init_step"),
    (no.dog, {"init_step": "heuristic"}, "init_step"),
    (no.dog, {"eps": 0.0}, "eps"),
    (no.dog, {"weight_decay": -1.0}, "weight_decay"),
    (no.scale_by_dog, {"init_step": ("learning_rate", float("inf"))}, "init_step"),
    (no.dowg, {"init_estim_sq_dist": -1.0}, "init_estim_sq_dist"),
    (no.dowg, {"eps": -1e-4}, "eps"),
    (no.scale_by_dowg, {"eps": 0.0}, "eps"),
]


@pytest.mark.parametrize(("fn", "kwargs", "name"), BAD_FUNCTIONAL)
def test_bad_hyperparameters(fn, kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}: "):
        fn(**kwargs)


BAD_STATEFUL = [
    (no.Prodigy, {"betas": (0.9, 1.0)}, "betas"),
    (no.Prodigy, {"beta3": -0.5}, "beta3"),
    (no.Prodigy, {"lr": -1.0}, "lr"),
    (no.DAdaptAdamW, {"eps": 0.0}, "eps"),
    (no.DoG, {"init_step": ("distance", -1)}, "init_step"),
    (no.DoG, {"init_step": ("bar", 1.0)}, "init_step"),
    (no.DoWG, {"init_estim_sq_dist": -1.0}, "init_estim_sq_dist"),
    (no.DoWG, {"weight_decay": -1.0}, "weight_decay"),
]


@pytest.mark.parametrize(("cls", "kwargs", "name"), BAD_STATEFUL)
def test_bad_hyperparameters_stateful(cl_queue, cls, kwargs, name):
    ps = [Parameter(no.to_device(np.ones(3, np.float32), cl_queue))]
    with pytest.raises(ValueError, match=f"Invalid {name}: "):
        cls(ps, **kwargs)


@pytest.mark.parametrize("rule", ["prodigy", "dadapt"])
def test_all_zero_gradients_keep_d(cl_queue, rule):
    """Where ||s||_1 is 0 (every gradient so far zero) d stays as it was: optax's 0 / 0 makes
    it NaN for good; the next real gradient steps as from the start."""
    p0 = {"a": np.linspace(-1.0, 1.0, 50, dtype=np.float32)}
    tx = FUNCTIONAL[rule]()
    params = no.to_device(p0, cl_queue)
    state = tx.init(params)
    params, state = no.step(tx, params, no.to_device({"a": np.zeros(50, np.float32)}), state)
    core = _core(state, STATE_TYPES[rule])
    assert _scalar(core.estim_lr) == float(np.float32(1e-6))
    params, state = no.step(tx, params, no.to_device({"a": p0["a"].copy()}), state)
    assert np.isfinite(params["a"].get()).all()
    assert np.isfinite(_scalar(_core(state, STATE_TYPES[rule]).estim_lr))


@pytest.mark.parametrize("rule", sorted(FUNCTIONAL))
def test_donated_steps_after_another_part_equal_plain_steps(cl_queue, rule):
    """``no.step(..., donate=True)`` (its launches cached and moved to the new arrays) with
    the rule after another fused part: bit for bit the plain steps."""
    rng = np.random.default_rng(5)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in ((50,), (4, 5))]
    grads = [[rng.standard_normal(x.shape).astype(np.float32) for x in p0] for _ in range(4)]
    tx = no.chain(no.scale(-0.5), FUNCTIONAL[rule]())
    a = no.pack(no.to_device(p0, cl_queue))
    b = no.pack(no.to_device(p0, cl_queue))
    sa, sb = tx.init(a), tx.init(b)
    for g in grads:
        g = no.pack(no.to_device(g, cl_queue))
        a, sa = no.step(tx, a, g, sa)
        b, sb = no.step(tx, b, g, sb, donate=True)
    assert [x.get().tobytes() for x in a] == [y.get().tobytes() for y in b]
    assert _state_bytes(sa) == _state_bytes(sb)


def test_parts_before_the_sums_run_in_the_pre_pass(cl_queue):
    """chain(trace, scale_by_dog, lr): the momentum's code runs in the pre-pass too (its
    slot read, not written) and in the fused kernel (written once): 3 launches, and the
    float64 reference's numbers."""
    import reference as base_ref
    import reference_tree_sums as rts

    rng = np.random.default_rng(6)
    p0 = {"a": rng.standard_normal(300), "b": rng.standard_normal((4, 5))}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(6)]
    tx = no.chain(no.trace(0.9), no.scale_by_dog(("distance", 0.1)), no.scale_by_learning_rate(0.5))
    want = base_ref.chain(base_ref.trace(0.9), rts.scale_by_dog(("distance", 0.1)),
                          base_ref.scale_by_learning_rate(0.5))  # fmt: skip
    params = no.pack(no.to_device(p0, cl_queue))
    state = tx.init(params)
    x, ref_state = dict(p0), want.init(p0)
    for g in grads:
        with no.count_launches() as c:
            params, state = no.step(tx, params, no.pack(no.to_device(g, cl_queue)), state)
        assert c.launches == 3
        u, ref_state = want.update(g, ref_state, x)
        x = {k: x[k] + u[k] for k in x}
    got = no.to_host(params)
    for k in p0:
        np.testing.assert_allclose(got[k], x[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rule", sorted(FUNCTIONAL))
def test_donated_steps_equal_plain_steps(cl_queue, rule):
    """``no.step(..., donate=True)`` over a packed tree, many steps (from the second, its
    cached launches are moved to the donated arrays): bit for bit the plain steps."""
    rng = np.random.default_rng(7)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in ((40,), (3, 5), (9,))]
    tx = FUNCTIONAL[rule]()
    a = no.pack(no.to_device(p0, cl_queue))
    b = no.pack(no.to_device(p0, cl_queue))
    sa, sb = tx.init(a), tx.init(b)
    g = no.pack(no.to_device([rng.standard_normal(x.shape).astype(np.float32) for x in p0]))
    for _ in range(5):
        a, sa = no.step(tx, a, g, sa)
        b, sb = no.step(tx, b, g, sb, donate=True)
    assert [x.get().tobytes() for x in a] == [y.get().tobytes() for y in b]
    assert _state_bytes(sa) == _state_bytes(sb)
