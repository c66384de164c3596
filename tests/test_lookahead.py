"""Lookahead: the functional ``lookahead`` (optax 0.2.8's semantics) and the stateful
``Lookahead`` (the paper's schedule, torch-optimizer's signature): float64 numpy references,
parity with optax and with a torch-optimizer-style wrapper around torch.optim, stateful vs
functional, resume bit for bit, bad input."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import netcl_optim as no
from netcl_optim.optimizers.lookahead import Lookahead, LookaheadParams, lookahead

SHAPES = {"w": (6, 5), "b": (7,)}
STEPS = 100


def _problem(dtype=np.float32, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    p0 = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    target = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    noise = [
        {k: (0.1 * rng.standard_normal(s)).astype(dtype) for k, s in SHAPES.items()}
        for _ in range(steps)
    ]
    return p0, target, noise


def _grad(params, target, noise):
    return {k: (params[k] - target[k] + noise[k]).astype(params[k].dtype) for k in params}


def _x64():
    import jax

    enable = getattr(jax, "enable_x64", None)
    if enable is None:
        enable = getattr(jax.experimental, "enable_x64", None)
    return enable(True) if enable is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------- references


def _ref_functional(p0, target, noise, k, a, lr, momentum=0.0, reset=False):
    """optax's lookahead around SGD with momentum (float64 numpy)."""
    fast = {n: v.astype(np.float64) for n, v in p0.items()}
    slow = {n: v.copy() for n, v in fast.items()}
    trace = {n: np.zeros_like(v) for n, v in fast.items()}
    since = 0
    for t in range(len(noise)):
        g = _grad(fast, target, noise[t])
        sync = since == k - 1
        for n in fast:
            trace[n] = g[n] + momentum * trace[n]
            u = -lr * trace[n]
            d = fast[n] + u - slow[n]
            slow_u = a * d if sync else 0.0
            fast_u = u - (1 - a) * d if sync else u
            fast[n] = fast[n] + fast_u
            slow[n] = slow[n] + slow_u
            if sync and reset:
                trace[n] = np.zeros_like(trace[n])
        since = (since + 1) % k
    return fast, slow


class _NumpyLookahead:
    """torch-optimizer's ``Lookahead`` in numpy, with the paper's schedule (sync at steps k,
    2k, ...; slow weights a copy of the initial params): the reference of the stateful
    class. Inner: SGD with momentum (torch's)."""

    def __init__(self, params, lr, momentum, k, alpha):
        self.params = params  # dict name -> array (the fast weights), updated in place
        self.lr, self.momentum, self.k, self.alpha = lr, momentum, k, alpha
        self.buf = {}
        self.slow = {n: v.copy() for n, v in params.items()}
        self.counter = 0

    def step(self, grads):
        for n, p in self.params.items():
            g = grads[n]
            if self.momentum:
                self.buf[n] = g.copy() if n not in self.buf else self.momentum * self.buf[n] + g
                g = self.buf[n]
            p -= self.lr * g
        self.counter += 1
        if self.counter == self.k:
            self.counter = 0
            for n, fast in self.params.items():
                self.slow[n] += self.alpha * (fast - self.slow[n])
                fast[...] = self.slow[n]


# ---------------------------------------------------------------------------- functional


def _run_functional(tx, p0, target, noise, dtype, queue, packed_grads=False):
    params = LookaheadParams.init_synced(no.pack(no.to_device(p0, queue)))
    state = tx.init(params)
    for t in range(len(noise)):
        g = _grad(no.to_host(params.fast), target, noise[t])
        grads = no.to_device(g, queue)
        grads = no.pack(grads) if packed_grads else grads
        updates, state = tx.update(grads, state, params)
        params = no.apply_updates(params, updates)
    return no.to_host(params.fast), no.to_host(params.slow), state


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_functional_matches_float64_reference(cl_queue, k, reset):
    p0, target, noise = _problem(np.float64, steps=40)
    tx = lookahead(no.sgd(0.1, momentum=0.9), k, 0.4, reset_state=reset)
    fast, slow, state = _run_functional(tx, p0, target, noise, np.float64, cl_queue)
    want_fast, want_slow = _ref_functional(p0, target, noise, k, 0.4, 0.1, 0.9, reset)
    for n in SHAPES:
        np.testing.assert_allclose(fast[n], want_fast[n], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(slow[n], want_slow[n], rtol=1e-12, atol=1e-13)
    assert state.steps_since_sync == 40 % k


def _optax_run(optax, jnp, otx, p0, target, noise, dtype):
    params = optax.LookaheadParams.init_synced({k: jnp.asarray(v, dtype) for k, v in p0.items()})
    state = otx.init(params)
    for t in range(len(noise)):
        g = _grad({k: np.asarray(v) for k, v in params.fast.items()}, target, noise[t])
        updates, state = otx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
    return {k: np.asarray(v) for k, v in params.fast.items()}, {
        k: np.asarray(v) for k, v in params.slow.items()
    }


CASES = [
    ("sgd", lambda m: m.sgd(0.05, momentum=0.9), 5, 0.5, False),
    ("adam", lambda m: m.adam(0.01), 4, 0.3, False),
    ("adam-reset", lambda m: m.adam(0.01), 3, 0.8, True),
]


@pytest.mark.parametrize(("name", "make", "k", "a", "reset"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_matches_optax(cl_queue, name, make, k, a, reset, dtype):
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    p0, target, noise = _problem(dtype)
    tx = lookahead(make(no), k, a, reset_state=reset)
    fast, slow, _ = _run_functional(tx, p0, target, noise, dtype, cl_queue)
    with _x64() if dtype == np.float64 else contextlib.nullcontext():
        otx = optax.lookahead(make(optax), k, a, reset_state=reset)
        ofast, oslow = _optax_run(optax, jnp, otx, p0, target, noise, dtype)
    rtol, atol = (1e-5, 1e-5) if dtype == np.float32 else (1e-12, 1e-12)
    for n in SHAPES:
        assert fast[n].dtype == dtype
        np.testing.assert_allclose(fast[n], ofast[n], rtol=rtol, atol=atol, err_msg=n)
        np.testing.assert_allclose(slow[n], oslow[n], rtol=rtol, atol=atol, err_msg=n)


def test_functional_is_one_launch_per_step_for_packed_trees(cl_queue):
    p0, target, noise = _problem(steps=6)
    tx = lookahead(no.adam(0.01), 3, 0.5)
    params = LookaheadParams.init_synced(no.pack(no.to_device(p0, cl_queue)))
    state = tx.init(params)
    for t in range(6):
        grads = no.pack(no.to_device(_grad(p0, target, noise[t]), cl_queue))
        with no.count_launches() as c:
            updates, state = tx.update(grads, state, params)
        assert c.launches == 1, (t, c.kernels)
        params = no.apply_updates(params, updates)


def test_init_accepts_the_fast_params_alone(cl_queue):
    p0, _, _ = _problem()
    tx = lookahead(no.adam(0.01), 3, 0.5)
    a = tx.init(no.to_device(p0, cl_queue))
    b = tx.init(LookaheadParams.init_synced(no.to_device(p0, cl_queue)))
    assert a.steps_since_sync == b.steps_since_sync == 0
    assert type(a.fast_state) is type(b.fast_state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sync_period": 0}, "sync_period"),
        ({"sync_period": -2}, "sync_period"),
        ({"slow_step_size": -0.1}, "slow_step_size"),
        ({"slow_step_size": 1.5}, "slow_step_size"),
        ({"slow_step_size": float("nan")}, "slow_step_size"),
    ],
)
def test_functional_bad_arguments(kwargs, match):
    args = {"sync_period": 5, "slow_step_size": 0.5, **kwargs}
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        lookahead(no.sgd(0.1), **args)


def test_functional_mismatched_trees_change_nothing(cl_queue):
    p0, target, noise = _problem()
    tx = lookahead(no.sgd(0.1), 2, 0.5)
    fast = no.to_device(p0, cl_queue)
    slow = no.to_device({"w": p0["w"]}, cl_queue)
    state = tx.init(fast)
    grads = no.to_device(_grad(p0, target, noise[0]), cl_queue)
    with pytest.raises(ValueError, match=r"params\.fast and params\.slow differ"):
        tx.update(grads, state, LookaheadParams(fast, slow))
    bad_slow = no.to_device({"w": p0["w"], "b": p0["b"][:3]}, cl_queue)
    with pytest.raises(ValueError, match=r"leaf 0 is float32\[7\] in params\.fast"):
        tx.update(grads, state, LookaheadParams(fast, bad_slow))
    with pytest.raises(ValueError, match="LookaheadParams"):
        tx.update(grads, state, fast)
    synced = LookaheadParams.init_synced(fast)
    with pytest.raises(ValueError, match=r"updates and params\.fast differ in structure"):
        tx.update({"w": grads["w"]}, state, synced)
    short = dict(grads, b=no.to_device(np.zeros(3, np.float32), cl_queue))
    with pytest.raises(ValueError, match=r"leaf 0 is float32\[3\] in updates"):
        tx.update(short, state, synced)
    assert state.steps_since_sync == 0
    np.testing.assert_array_equal(no.to_host(fast)["w"], p0["w"])


# ---------------------------------------------------------------------------- stateful


def _params(p0, queue):
    return [no.Parameter(no.to_device(v, queue)) for v in p0.values()]


def _set_grads(opt, params, grads):
    opt.zero_grad(set_to_none=False)
    for p, g in zip(params, grads.values(), strict=True):
        p.grad.set(np.ascontiguousarray(g))


def _host(params):
    return {n: p.data.get() for n, p in zip(SHAPES, params, strict=True)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("k", "alpha"), [(1, 0.5), (5, 0.5), (3, 0.0), (4, 1.0)])
def test_stateful_matches_numpy_reference(cl_queue, dtype, k, alpha):
    p0, target, noise = _problem(dtype)
    params = _params(p0, cl_queue)
    opt = Lookahead(no.SGD(params, lr=0.05, momentum=0.9), k=k, alpha=alpha)
    ref = _NumpyLookahead({n: v.astype(np.float64) for n, v in p0.items()}, 0.05, 0.9, k, alpha)
    for t in range(STEPS):
        g = _grad(_host(params), target, noise[t])
        _set_grads(opt, params, g)
        opt.step()
        ref.step(_grad(ref.params, target, noise[t]))
    rtol, atol = (2e-5, 2e-5) if dtype == np.float32 else (1e-12, 1e-12)
    got = _host(params)
    slow = dict(zip(SHAPES, [x.get() for x in opt.slow_params], strict=True))
    for n in SHAPES:
        np.testing.assert_allclose(got[n], ref.params[n], rtol=rtol, atol=atol, err_msg=n)
        np.testing.assert_allclose(slow[n], ref.slow[n], rtol=rtol, atol=atol, err_msg=n)
    assert opt.steps_since_sync == STEPS % k


def test_stateful_matches_torch_optimizer_style_wrapper_around_torch_adam(cl_queue):
    torch = pytest.importorskip("torch")
    p0, target, noise = _problem()
    k, alpha = 5, 0.5
    params = _params(p0, cl_queue)
    opt = Lookahead(no.Adam(params, lr=0.01), k=k, alpha=alpha)
    tparams = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in p0.values()]
    topt = torch.optim.Adam(tparams, lr=0.01, foreach=False)
    tslow = [p.detach().clone() for p in tparams]
    counter = 0
    for t in range(STEPS):
        _set_grads(opt, params, _grad(_host(params), target, noise[t]))
        opt.step()
        tg = _grad(
            {n: p.detach().numpy() for n, p in zip(SHAPES, tparams, strict=True)}, target, noise[t]
        )
        for p, g in zip(tparams, tg.values(), strict=True):
            p.grad = torch.from_numpy(g)
        topt.step()
        counter += 1
        if counter == k:  # torch-optimizer's _update, at the paper's steps
            counter = 0
            with torch.no_grad():
                for fast, slow in zip(tparams, tslow, strict=True):
                    slow.add_(fast - slow, alpha=alpha)
                    fast.copy_(slow)
    got = _host(params)
    for n, p, s, x in zip(SHAPES, tparams, tslow, opt.slow_params, strict=True):
        np.testing.assert_allclose(got[n], p.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(x.get(), s.numpy(), rtol=1e-5, atol=1e-5)


def test_stateful_equals_functional_where_they_coincide(cl_queue):
    """Bit for bit up to the first sync and for the slow params at it; afterwards optax's
    fast params (``fast + fast_u``) differ from the copied slow ones by rounding."""
    p0, _, noise = _problem(steps=12)
    k = 4
    params = _params(p0, cl_queue)
    opt = Lookahead(no.SGD(params, lr=0.1), k=k, alpha=0.5)
    tx = lookahead(no.sgd(0.1), k, 0.5)
    fparams = LookaheadParams.init_synced(no.pack(no.to_device(p0, cl_queue)))
    state = tx.init(fparams)
    for t in range(12):
        g = noise[t]  # gradients that do not depend on the params
        _set_grads(opt, params, g)
        opt.step()
        updates, state = tx.update(no.to_device(g, cl_queue), state, fparams)
        fparams = no.apply_updates(fparams, updates)
        fast, slow = no.to_host(fparams.fast), no.to_host(fparams.slow)
        mine = _host(params)
        mine_slow = dict(zip(SHAPES, [x.get() for x in opt.slow_params], strict=True))
        for n in SHAPES:
            if t < k - 1:
                np.testing.assert_array_equal(mine[n], fast[n])
            if t <= k - 1:
                np.testing.assert_array_equal(mine_slow[n], slow[n])
            np.testing.assert_allclose(mine[n], fast[n], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(mine_slow[n], slow[n], rtol=1e-6, atol=1e-6)


def _stateful_run(queue, p0, target, noise, start, stop, opt=None, params=None):
    if opt is None:
        params = _params(p0, queue)
        opt = Lookahead(no.Adam(params, lr=0.01), k=3, alpha=0.5)
    for t in range(start, stop):
        _set_grads(opt, params, _grad(_host(params), target, noise[t]))
        opt.step()
    return opt, params


@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_stateful_resume_is_bit_for_bit(cl_queue, tmp_path, via):
    p0, target, noise = _problem(steps=20)
    straight, sp = _stateful_run(cl_queue, p0, target, noise, 0, 20)
    first, fp = _stateful_run(cl_queue, p0, target, noise, 0, 8)  # 8 % 3: mid-period
    assert first.steps_since_sync == 2
    params = [no.Parameter(no.to_device(p.data.get(), cl_queue)) for p in fp]
    resumed = Lookahead(no.Adam(params, lr=0.5), k=7, alpha=0.1)
    if via == "state_dict":
        resumed.load_state_dict(first.state_dict())
    else:
        no.save(tmp_path / "la.npz", first)
        no.load(tmp_path / "la.npz", resumed)
    assert (resumed.k, resumed.alpha, resumed.steps_since_sync) == (3, 0.5, 2)
    _stateful_run(cl_queue, p0, target, noise, 8, 20, resumed, params)
    for a, b in zip(sp, params, strict=True):
        np.testing.assert_array_equal(a.data.get(), b.data.get())
    for a, b in zip(straight.slow_params, resumed.slow_params, strict=True):
        np.testing.assert_array_equal(a.get(), b.get())


def test_stateful_bad_state_dict_changes_nothing(cl_queue):
    p0, target, noise = _problem(steps=5)
    opt, _ = _stateful_run(cl_queue, p0, target, noise, 0, 5)
    sd = opt.state_dict()
    other, _ = _stateful_run(cl_queue, p0, target, noise, 0, 1)
    before = [x.get() for x in other.slow_params], other.state_dict()
    bad = dict(sd)
    bad["lookahead"] = {**sd["lookahead"], "slow": {0: sd["lookahead"]["slow"][0]}}
    with pytest.raises(ValueError, match="one array per parameter"):
        other.load_state_dict(bad)
    bad["lookahead"] = {**sd["lookahead"], "steps_since_sync": 3}
    with pytest.raises(ValueError, match="Invalid steps_since_sync"):
        other.load_state_dict(bad)
    bad["lookahead"] = {**sd["lookahead"], "slow": {0: np.zeros(3), 1: np.zeros(7)}}
    with pytest.raises(ValueError, match=r"\['slow'\]\[0\]"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="'lookahead'"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "lookahead"})
    after = [x.get() for x in other.slow_params], other.state_dict()
    for a, b in zip(before[0], after[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert before[1]["lookahead"]["steps_since_sync"] == other.steps_since_sync == 1
    np.testing.assert_array_equal(before[1]["state"][0]["exp_avg"], after[1]["state"][0]["exp_avg"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "Invalid k"),
        ({"alpha": -0.1}, "Invalid alpha"),
        ({"alpha": 1.01}, "Invalid alpha"),
    ],
)
def test_stateful_bad_arguments(cl_queue, kwargs, match):
    p0, _, _ = _problem()
    params = _params(p0, cl_queue)
    inner = no.SGD(params, lr=0.1)
    with pytest.raises(ValueError, match=match):
        Lookahead(inner, **kwargs)
    with pytest.raises(TypeError, match="stateful optimizer"):
        Lookahead(object())


def test_stateful_surface(cl_queue):
    p0, target, noise = _problem(steps=2)
    params = _params(p0, cl_queue)
    inner = no.SGD(params[:1], lr=0.1)
    opt = Lookahead(inner, k=2, alpha=0.5)
    assert opt.param_groups is inner.param_groups
    assert opt.defaults["k"] == 2 and opt.defaults["lr"] == 0.1
    opt.add_param_group({"params": params[1:], "lr": 0.2})
    assert len(opt.slow_params) == 2
    np.testing.assert_array_equal(opt.slow_params[1].get(), p0["b"])
    sched = no.StepLR(opt, step_size=1, gamma=0.5)
    _set_grads(opt, params, _grad(p0, target, noise[0]))
    assert opt.step(lambda: 3.0) == 3.0
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    _set_grads(opt, params, _grad(p0, target, noise[1]))
    opt.step()  # a sync: fast == slow
    for p, s in zip(params, opt.slow_params, strict=True):
        np.testing.assert_array_equal(p.data.get(), s.get())


def test_stateful_launches(cl_queue):
    """One packed group: the inner step is one launch, a sync one more (and a device copy)."""
    p0, target, noise = _problem(steps=4)
    params = _params(p0, cl_queue)
    opt = Lookahead(no.Adam(params, lr=0.01), k=2, alpha=0.5)
    for t in range(4):
        _set_grads(opt, params, _grad(p0, target, noise[t]))
        with no.count_launches() as c:
            opt.step()
        assert c.launches == (2 if t % 2 else 1), c.kernels


def test_stateful_inner_error_changes_nothing(cl_queue):
    p0, _, _ = _problem(steps=1)
    params = _params(p0, cl_queue)
    opt = Lookahead(no.SGD(params, lr=0.1), k=1, alpha=0.5)
    params[0].grad = no.to_device(np.zeros((2, 2), np.float32), cl_queue)
    params[1].grad = no.to_device(np.zeros(7, np.float32), cl_queue)
    with pytest.raises(ValueError):
        opt.step()
    assert opt.steps_since_sync == 0
    for p, s, v in zip(params, opt.slow_params, p0.values(), strict=True):
        np.testing.assert_array_equal(p.data.get(), v)
        np.testing.assert_array_equal(s.get(), v)
