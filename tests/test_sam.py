"""SAM: the functional ``sam`` and ``normalize`` (optax.contrib 0.2.8's semantics) and the
stateful ``SAM`` (davda54/sam's algorithm): float64 numpy references, parity with
optax.contrib.sam, packed vs separate bit for bit, exact restoring of the params, state
dicts, launch counts and bad input (nothing changed)."""

from __future__ import annotations

import numpy as np
import pytest
from jax_x64 import jax_x64

import netcl_optim as no
from netcl_optim.optimizers.sam import SAM, SAMState, normalize, sam

SHAPES = {"b": (5,), "w": (4, 3)}  # (sorted: the tree order of a dict)
STEPS = 20
LR, RHO, MOMENTUM = 0.1, 0.05, 0.9
F32 = {"rtol": 2e-5, "atol": 2e-6}
F64 = {"rtol": 1e-10, "atol": 1e-12}


# ---------------------------------------------------------------------------- the problem


def _problem(seed=0):
    """Per leaf a least-squares loss 0.5 ||A x - y||^2 (x: the leaf, flattened)."""
    rng = np.random.default_rng(seed)
    p0, mats = {}, {}
    for k, shape in SHAPES.items():
        n = int(np.prod(shape))
        mats[k] = (rng.standard_normal((n + 2, n)) / np.sqrt(n), rng.standard_normal(n + 2))
        p0[k] = rng.standard_normal(shape)
    return p0, mats


def _grads(params, mats, dtype):
    """The gradient at ``params`` (host arrays), in float64, cast to ``dtype``."""
    out = {}
    for k, x in params.items():
        a, y = mats[k]
        xf = np.asarray(x, np.float64).ravel()
        out[k] = (a.T @ (a @ xf - y)).reshape(x.shape).astype(dtype)
    return out


def _close(a, b, dtype):
    tol = F64 if dtype == np.float64 else F32
    for k in a:
        np.testing.assert_allclose(a[k], b[k], **tol)


def _max_rel(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]) / (np.abs(b[k]) + 1e-30))) for k in a)


# ---------------------------------------------------------------------------- references


def _ref_functional(p0, mats, period, reset, adv_momentum, steps=STEPS):
    """optax.contrib.sam(sgd(LR, MOMENTUM), chain(normalize(), sgd(RHO, adv_momentum)))
    in float64 numpy, transparent mode: the params after each step."""
    params = {k: v.astype(np.float64) for k, v in p0.items()}
    cache = {k: v.copy() for k, v in params.items()}
    outer = {k: np.zeros_like(v) for k, v in params.items()}
    adv = {k: np.zeros_like(v) for k, v in params.items()}
    since, out = 0, []
    for _ in range(steps):
        g = _grads(params, mats, np.float64)
        first, last = since == 0, since == period - 1
        if last:
            outer = {k: g[k] + MOMENTUM * outer[k] for k in g}
            new = {k: cache[k] - params[k] + (-LR * outer[k]) for k in g}
            if reset:
                adv = {k: np.zeros_like(v) for k, v in adv.items()}
        else:
            norm = np.sqrt(sum(float(np.sum(v * v)) for v in g.values()))
            adv = {k: g[k] / norm + adv_momentum * adv[k] for k in g}
            new = {k: RHO * adv[k] for k in g}
        if first:
            cache = {k: v.copy() for k, v in params.items()}
        params = {k: params[k] + new[k] for k in params}
        since = (since + 1) % period
        out.append(params)
    return out


class _NumpySAM:
    """davda54/sam's ``SAM`` around torch's SGD with momentum, in float64 numpy."""

    def __init__(self, params, rho, adaptive, lr=LR, momentum=MOMENTUM):
        self.params = {k: v.astype(np.float64) for k, v in params.items()}
        self.rho, self.adaptive, self.lr, self.momentum = rho, adaptive, lr, momentum
        self.buf = {}
        self.old = {}

    def first_step(self, grads):
        norms = [
            np.linalg.norm(((np.abs(self.params[k]) if self.adaptive else 1.0) * g).ravel())
            for k, g in grads.items()
        ]
        scale = self.rho / (np.linalg.norm(np.array(norms)) + 1e-12)
        for k, g in grads.items():
            p = self.params[k]
            self.old[k] = p.copy()
            self.params[k] = p + (p * p if self.adaptive else 1.0) * g * scale

    def second_step(self, grads):
        for k, g in grads.items():
            p = self.old[k]
            b = self.buf.get(k)
            b = g.copy() if b is None else self.momentum * b + g
            self.buf[k] = b
            self.params[k] = p - self.lr * b


def _ref_stateful(p0, mats, rho, adaptive, steps=STEPS):
    ref = _NumpySAM(p0, rho, adaptive)
    out = []
    for _ in range(steps):
        ref.first_step(_grads(ref.params, mats, np.float64))
        ref.second_step(_grads(ref.params, mats, np.float64))
        out.append(dict(ref.params))
    return out


# ---------------------------------------------------------------------------- functional runs


def _ours_functional(p0, mats, dtype, period, reset, adv_momentum, *, packed=True, steps=STEPS):
    adv = no.chain(normalize(), no.sgd(RHO, momentum=adv_momentum))
    tx = sam(no.sgd(LR, momentum=MOMENTUM), adv, sync_period=period, reset_state=reset)

    def device(tree):
        tree = no.to_device({k: v.astype(dtype) for k, v in tree.items()})
        return no.pack(tree) if packed else tree

    params = device(p0)
    state = tx.init(params)
    out = []
    for _ in range(steps):
        grads = device(_grads(no.to_host(params), mats, dtype))
        updates, state = tx.update(grads, state, params)
        params = no.apply_updates(params, updates)
        out.append(no.to_host(params))
    return out


def _optax_functional(p0, mats, dtype, period, reset, adv_momentum, steps=STEPS):
    optax = pytest.importorskip("optax")
    contrib = pytest.importorskip("optax.contrib")
    jnp = pytest.importorskip("jax.numpy")
    with jax_x64(dtype == np.float64):
        adv = optax.chain(contrib.normalize(), optax.sgd(RHO, momentum=adv_momentum or None))
        tx = contrib.sam(
            optax.sgd(LR, momentum=MOMENTUM), adv, sync_period=period, reset_state=reset
        )
        params = {k: jnp.asarray(v.astype(dtype)) for k, v in p0.items()}
        state = tx.init(params)
        out = []
        for _ in range(steps):
            host = {k: np.asarray(v) for k, v in params.items()}
            grads = {k: jnp.asarray(v) for k, v in _grads(host, mats, dtype).items()}
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            out.append({k: np.asarray(v) for k, v in params.items()})
    return out


CASES = [(2, True, 0.0), (3, True, 0.5), (3, False, 0.5), (1, True, 0.0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("period", "reset", "adv_momentum"), CASES)
def test_functional_matches_the_float64_reference(cl_queue, dtype, period, reset, adv_momentum):
    p0, mats = _problem()
    ours = _ours_functional(p0, mats, dtype, period, reset, adv_momentum)
    ref = _ref_functional(
        {k: v.astype(dtype) for k, v in p0.items()}, mats, period, reset, adv_momentum
    )
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert {k: v.dtype for k, v in a.items()} == dict.fromkeys(a, np.dtype(dtype)), t
        _close(a, b, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("period", "reset", "adv_momentum"), CASES)
def test_functional_matches_optax_contrib_sam(cl_queue, dtype, period, reset, adv_momentum):
    p0, mats = _problem(seed=1)
    theirs = _optax_functional(p0, mats, dtype, period, reset, adv_momentum)
    ours = _ours_functional(p0, mats, dtype, period, reset, adv_momentum)
    for a, b in zip(ours, theirs, strict=True):
        _close(a, b, dtype)


@pytest.mark.parametrize("period", [2, 3])
def test_functional_packed_and_separate_give_the_same_bits(cl_queue, period):
    p0, mats = _problem(seed=2)
    packed = _ours_functional(p0, mats, np.float32, period, True, 0.5, steps=8)
    separate = _ours_functional(p0, mats, np.float32, period, True, 0.5, packed=False, steps=8)
    for a, b in zip(packed, separate, strict=True):
        for k in a:
            assert np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32))


def test_step_pure_and_donated_give_the_bits_of_update_then_apply(cl_queue):
    p0, mats = _problem(seed=11)

    def run(mode):
        adv = no.chain(normalize(), no.sgd(RHO))
        tx = sam(no.sgd(LR, momentum=MOMENTUM), adv, sync_period=3)
        params = no.pack(no.to_device({k: v.astype(np.float32) for k, v in p0.items()}))
        state = tx.init(params)
        for _ in range(7):
            grads = no.pack(no.to_device(_grads(no.to_host(params), mats, np.float32)))
            if mode == "update":
                updates, state = tx.update(grads, state, params)
                params = no.apply_updates(params, updates)
            else:
                params, state = no.step(tx, params, grads, state, donate=mode == "donate")
        return no.to_host(params)

    base = run("update")
    for mode in ("step", "donate"):
        other = run(mode)
        for k in base:
            assert np.array_equal(base[k].view(np.uint32), other[k].view(np.uint32)), mode


def test_functional_state_follows_optax(cl_queue):
    """Which state advances when: the outer optimizer's at the outer steps only, the
    adversarial one's at the others (and reset after an outer step), the cache at the
    period's first step."""
    p0, mats = _problem()
    adv = no.chain(normalize(), no.sgd(RHO, momentum=0.5))
    tx = sam(no.sgd(LR, momentum=MOMENTUM), adv, sync_period=3)
    params = no.pack(no.to_device({k: v.astype(np.float32) for k, v in p0.items()}))
    state = tx.init(params)
    assert isinstance(state, SAMState) and state.steps_since_sync == 0
    _close(no.to_host(state.cache), no.to_host(params), np.float32)
    start = no.to_host(params)
    for t in range(3):
        grads = no.to_device(_grads(no.to_host(params), mats, np.float32))
        new_params_updates, new = tx.update(grads, state, params)
        assert new.steps_since_sync == (t + 1) % 3
        if t < 2:
            assert new.opt_state is state.opt_state  # not advanced
            for k in start:
                assert np.array_equal(no.to_host(new.cache)[k], start[k])
        else:
            assert new.opt_state is not state.opt_state
            before, after = _arrays(no.to_host(state.adv_state)), _arrays(no.to_host(new.adv_state))
            assert len(after) == 2 and any(np.any(leaf) for leaf in before)
            assert all(not np.any(leaf) for leaf in after)  # reset
        state, params = new, no.apply_updates(params, new_params_updates)


def _arrays(tree):
    import optree

    return [x for x in optree.tree_leaves(tree) if isinstance(x, np.ndarray)]


@pytest.mark.parametrize("period", [2, 3])
def test_opaque_mode_matches_optax(cl_queue, period):
    optax = pytest.importorskip("optax")
    contrib = pytest.importorskip("optax.contrib")
    jnp = pytest.importorskip("jax.numpy")
    p0, mats = _problem(seed=3)
    steps = 6

    adv = optax.chain(contrib.normalize(), optax.sgd(RHO, momentum=0.5))
    tx = contrib.sam(
        optax.sgd(LR, momentum=MOMENTUM),
        adv,
        sync_period=period,
        opaque_mode=True,
        reset_state=False,
    )
    params = {k: jnp.asarray(v.astype(np.float32)) for k, v in p0.items()}
    state = tx.init(params)

    def their_grad_fn(x, i):
        host = {k: np.asarray(v) for k, v in x.items()}
        return {k: jnp.asarray(v) for k, v in _grads(host, mats, np.float32).items()}

    ours_tx = sam(
        no.sgd(LR, momentum=MOMENTUM),
        no.chain(normalize(), no.sgd(RHO, momentum=0.5)),
        sync_period=period,
        opaque_mode=True,
        reset_state=False,
    )
    mine = no.pack(no.to_device({k: v.astype(np.float32) for k, v in p0.items()}))
    my_state = ours_tx.init(mine)
    assert my_state.cache is None
    calls = []

    def my_grad_fn(x, i):
        calls.append(i)
        return no.pack(no.to_device(_grads(no.to_host(x), mats, np.float32)))

    for _ in range(steps):
        g = _grads({k: np.asarray(v) for k, v in params.items()}, mats, np.float32)
        updates, state = tx.update(
            {k: jnp.asarray(v) for k, v in g.items()}, state, params, grad_fn=their_grad_fn
        )
        params = optax.apply_updates(params, updates)
        grads = no.pack(no.to_device(_grads(no.to_host(mine), mats, np.float32)))
        updates, my_state = ours_tx.update(grads, my_state, mine, grad_fn=my_grad_fn)
        mine = no.apply_updates(mine, updates)
        _close(no.to_host(mine), {k: np.asarray(v) for k, v in params.items()}, np.float32)
    assert calls == list(range(period - 1)) * steps


def test_normalize_matches_optax(cl_queue):
    pytest.importorskip("optax")
    contrib = pytest.importorskip("optax.contrib")
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(4)
    g = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    tx = normalize()
    ours, _ = tx.update(no.pack(no.to_device(g)), tx.init(None))
    theirs, _ = contrib.normalize().update({k: jnp.asarray(v) for k, v in g.items()}, None)
    _close(no.to_host(ours), {k: np.asarray(v) for k, v in theirs.items()}, np.float32)
    norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in g.values()))
    _close(no.to_host(ours), {k: v / norm for k, v in g.items()}, np.float32)


def test_functional_launches(cl_queue):
    """Packed: an ascent is the normalisation's reduction (2 launches) and one fused kernel;
    an outer step one fused kernel."""
    p0, mats = _problem()
    tx = sam(no.sgd(LR, momentum=MOMENTUM), no.chain(normalize(), no.sgd(RHO)))
    params = no.pack(no.to_device({k: v.astype(np.float32) for k, v in p0.items()}))
    state = tx.init(params)
    counts = []
    for _ in range(4):
        grads = no.pack(no.to_device(_grads(no.to_host(params), mats, np.float32)))
        with no.count_launches() as c:
            updates, state = tx.update(grads, state, params)
        counts.append(c.launches)
        params = no.apply_updates(params, updates)
    assert counts == [3, 1, 3, 1]


# ---------------------------------------------------------------------------- functional errors


def test_functional_bad_arguments():
    with pytest.raises(ValueError, match="sync_period"):
        sam(no.sgd(LR), no.sgd(RHO), sync_period=0)
    with pytest.raises(ValueError, match="reset_state"):
        sam(no.sgd(LR), no.sgd(RHO), reset_state="yes")
    with pytest.raises(ValueError, match="opaque_mode"):
        sam(no.sgd(LR), no.sgd(RHO), opaque_mode=1.5)
    with pytest.raises(TypeError, match="adv_optimizer"):
        sam(no.sgd(LR), 3)


def test_functional_bad_input_changes_nothing(cl_queue):
    p0, mats = _problem()
    params = no.pack(no.to_device({k: v.astype(np.float32) for k, v in p0.items()}))
    grads = no.to_device(_grads(p0, mats, np.float32))
    tx = sam(no.sgd(LR, momentum=MOMENTUM), no.chain(normalize(), no.sgd(RHO)))
    state = tx.init(params)
    cache = no.to_host(state.cache)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, state)
    with pytest.raises(ValueError, match="state does not match"):
        tx.update(grads, no.adam(0.1).init(params), params)
    with pytest.raises(ValueError, match="steps_since_sync"):
        tx.update(grads, state._replace(steps_since_sync=2), params)
    wrong = {"b": grads["b"], "w": no.to_device(np.zeros((3, 4), np.float32))}
    with pytest.raises(ValueError, match="leaf 1"):
        tx.update(wrong, state, params)
    assert state.steps_since_sync == 0
    for k in cache:
        assert np.array_equal(no.to_host(state.cache)[k], cache[k])
        assert np.array_equal(no.to_host(params)[k], p0[k].astype(np.float32))
    opaque = sam(no.sgd(LR), no.chain(normalize(), no.sgd(RHO)), opaque_mode=True)
    with pytest.raises(ValueError, match="grad_fn"):
        opaque.update(grads, opaque.init(params), params)
    with pytest.raises(ValueError, match="grad_fn"):
        opaque.update(grads, opaque.init(params), params, grad_fn=lambda x, i: {"b": x["b"]})


# ---------------------------------------------------------------------------- stateful


def _params(p0, dtype):
    return {k: no.Parameter(no.to_device(v.astype(dtype))) for k, v in p0.items()}


def _set_grads(params, mats, dtype, packed_opt=None):
    grads = _grads({k: p.data.get() for k, p in params.items()}, mats, dtype)
    if packed_opt is None:
        for k, p in params.items():
            p.grad = no.to_device(grads[k])
        return
    for k, p in params.items():  # into the optimizer's packed grad buffer, in place
        p.grad.set(grads[k])


def _ours_stateful(
    p0, mats, dtype, rho, adaptive, *, packed_grads=False, closure=True, steps=STEPS
):
    params = _params(p0, dtype)
    opt = SAM(list(params.values()), no.SGD, rho=rho, adaptive=adaptive, lr=LR, momentum=MOMENTUM)
    packed = opt if packed_grads else None
    if packed_grads:
        opt.zero_grad(set_to_none=False)
    out = []
    for _ in range(steps):
        _set_grads(params, mats, dtype, packed)
        if closure:

            def again():
                if packed_grads:
                    opt.zero_grad(set_to_none=False)
                _set_grads(params, mats, dtype, packed)
                return 0.0

            opt.step(again)
        else:
            opt.first_step(zero_grad=not packed_grads)
            if packed_grads:
                opt.zero_grad(set_to_none=False)
            _set_grads(params, mats, dtype, packed)
            opt.second_step()
        out.append({k: p.data.get() for k, p in params.items()})
    return out


RHOS = [(0.05, False), (0.5, True)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("rho", "adaptive"), RHOS)
def test_stateful_matches_davda54_float64_reference(cl_queue, dtype, rho, adaptive):
    p0, mats = _problem(seed=5)
    ours = _ours_stateful(p0, mats, dtype, rho, adaptive)
    ref = _ref_stateful({k: v.astype(dtype) for k, v in p0.items()}, mats, rho, adaptive)
    for a, b in zip(ours, ref, strict=True):
        _close(a, b, dtype)


@pytest.mark.parametrize(("rho", "adaptive"), RHOS)
def test_stateful_packed_and_separate_grads_and_step_forms_give_the_same_bits(
    cl_queue, rho, adaptive
):
    p0, mats = _problem(seed=6)
    runs = [
        _ours_stateful(p0, mats, np.float32, rho, adaptive, steps=6),
        _ours_stateful(p0, mats, np.float32, rho, adaptive, packed_grads=True, steps=6),
        _ours_stateful(p0, mats, np.float32, rho, adaptive, closure=False, steps=6),
        _ours_stateful(
            p0, mats, np.float32, rho, adaptive, packed_grads=True, closure=False, steps=6
        ),
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            for k in a:
                assert np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32))


@pytest.mark.parametrize("adaptive", [False, True])
def test_second_step_restores_the_params_bit_for_bit(cl_queue, adaptive):
    """The base step starts from the saved params exactly, where ``(p + e) - e`` would not
    give them back."""
    rng = np.random.default_rng(7)
    # small params, a large perturbation: p + e_w loses low bits of p
    p0 = {k: (1e-3 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    params = _params(p0, np.float32)
    rho = 4.0 if adaptive else 0.7
    opt = SAM(list(params.values()), no.SGD, rho=rho, adaptive=adaptive, lr=LR)
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    for k, p in params.items():
        p.grad = no.to_device(grads[k])
    seen = []
    opt.base_optimizer.step = lambda closure=None: seen.append(
        {k: p.data.get() for k, p in params.items()}
    )
    opt.first_step()
    perturbed = {k: p.data.get() for k, p in params.items()}
    moved = [k for k in p0 if not np.array_equal(perturbed[k], p0[k])]
    assert moved == list(p0)
    w = {k: np.abs(p0[k]) if adaptive else np.float32(1) for k in p0}
    norm = np.sqrt(sum(np.sum((w[k] * grads[k]).astype(np.float64) ** 2) for k in p0))
    scale = np.float32(rho / norm)
    e_w = {k: (p0[k] * p0[k] if adaptive else np.float32(1)) * grads[k] * scale for k in p0}
    inexact = sum(int(np.sum((p0[k] + e_w[k]) - e_w[k] != p0[k])) for k in p0)
    assert inexact > 0  # subtracting the perturbation would not restore these
    opt.second_step()
    assert len(seen) == 1
    for k in p0:
        assert np.array_equal(seen[0][k].view(np.uint32), p0[k].view(np.uint32))


def test_mixed_dtypes_are_restored_bit_for_bit(cl_queue):
    rng = np.random.default_rng(12)
    params = {
        "h": no.Parameter(no.to_device(rng.standard_normal((4, 3)).astype(np.float16))),
        "f": no.Parameter(no.to_device(rng.standard_normal(5).astype(np.float32))),
    }
    start = {k: p.data.get() for k, p in params.items()}
    opt = SAM(list(params.values()), no.SGD, rho=0.5, lr=LR)
    for k, p in params.items():
        p.grad = no.to_device(np.ones_like(start[k]))
    seen = []
    opt.base_optimizer.step = lambda closure=None: seen.append(
        {k: p.data.get() for k, p in params.items()}
    )
    opt.first_step()
    scale = 0.5 / np.sqrt(17.0)
    for k, p in params.items():
        expected = (start[k].astype(np.float32) + np.float32(scale)).astype(start[k].dtype)
        assert np.array_equal(p.data.get(), expected), k
    opt.second_step()
    for k in start:
        assert seen[0][k].dtype == start[k].dtype
        assert np.array_equal(seen[0][k], start[k])


def test_params_without_grad_are_left_alone(cl_queue):
    p0, mats = _problem(seed=8)
    params = _params(p0, np.float64)
    opt = SAM(list(params.values()), no.SGD, rho=RHO, lr=LR)
    params["w"].grad = no.to_device(_grads(p0, mats, np.float64)["w"])
    opt.first_step()
    assert np.array_equal(params["b"].data.get(), p0["b"])
    g = _grads(p0, mats, np.float64)["w"]
    expected = p0["w"] + g * (RHO / (np.linalg.norm(g) + 1e-12))
    np.testing.assert_allclose(params["w"].data.get(), expected, **F64)
    opt.second_step()
    assert np.array_equal(params["b"].data.get(), p0["b"])


def test_several_groups_share_the_norm(cl_queue):
    """Two groups (different lr, same rho): the norm runs over both, as davda54's."""
    p0, mats = _problem(seed=9)
    params = _params(p0, np.float64)
    opt = SAM(
        [{"params": [params["b"]], "lr": 0.05}, {"params": [params["w"]]}], no.SGD, rho=RHO, lr=LR
    )
    g = _grads(p0, mats, np.float64)
    for k, p in params.items():
        p.grad = no.to_device(g[k])
    opt.first_step()
    norm = np.sqrt(sum(np.sum(v * v) for v in g.values()))
    for k in p0:
        np.testing.assert_allclose(params[k].data.get(), p0[k] + g[k] * (RHO / norm), **F64)
    opt.second_step()
    np.testing.assert_allclose(params["b"].data.get(), p0["b"] - 0.05 * g["b"], **F64)
    np.testing.assert_allclose(params["w"].data.get(), p0["w"] - LR * g["w"], **F64)
    assert [g["rho"] for g in opt.param_groups] == [RHO, RHO]


def test_add_param_group(cl_queue):
    p0, mats = _problem(seed=13)
    params = _params(p0, np.float64)
    opt = SAM([params["b"]], no.SGD, rho=RHO, lr=LR)
    before = _data(params)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [params["w"]], "rho": -1.0})
    _unchanged(params, before)
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [params["w"]], "lr": 0.05})
    assert opt.param_groups[1]["rho"] == RHO and opt.param_groups[1]["adaptive"] is False
    g = _grads(p0, mats, np.float64)
    for k, p in params.items():
        p.grad = no.to_device(g[k])
    opt.first_step()
    norm = np.sqrt(sum(np.sum(v * v) for v in g.values()))
    for k in p0:
        np.testing.assert_allclose(params[k].data.get(), p0[k] + g[k] * (RHO / norm), **F64)
    with pytest.raises(RuntimeError, match="between first_step and second_step"):
        opt.add_param_group({"params": [no.Parameter(no.to_device(np.zeros(2)))]})
    opt.second_step()
    np.testing.assert_allclose(params["b"].data.get(), p0["b"] - LR * g["b"], **F64)
    np.testing.assert_allclose(params["w"].data.get(), p0["w"] - 0.05 * g["w"], **F64)


def test_lr_scheduler_drives_the_base_optimizer(cl_queue):
    p0, _ = _problem()
    opt = SAM(list(_params(p0, np.float32).values()), no.SGD, rho=RHO, lr=LR)
    scheduler = no.StepLR(opt, step_size=1, gamma=0.5)
    scheduler.step()
    assert opt.lr == opt.base_optimizer.param_groups[0]["lr"] == LR * 0.5
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.defaults["rho"] == RHO and opt.defaults["adaptive"] is False


def test_first_step_launches(cl_queue):
    """One packed group: a pre-pass, a finish and one fused kernel."""
    p0, mats = _problem()
    params = _params(p0, np.float32)
    opt = SAM(list(params.values()), no.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    opt.zero_grad(set_to_none=False)
    for _ in range(2):
        _set_grads(params, mats, np.float32, opt)
        with no.count_launches() as c:
            opt.first_step()
        assert c.launches == 3, c.kernels
        opt.second_step()


def test_state_dict_resumes_bit_for_bit(cl_queue):
    p0, mats = _problem(seed=10)

    def run(opt, params, steps):
        for _ in range(steps):
            _set_grads(params, mats, np.float32)
            opt.first_step(zero_grad=True)
            _set_grads(params, mats, np.float32)
            opt.second_step()

    straight_params = _params(p0, np.float32)
    straight = SAM(list(straight_params.values()), no.SGD, rho=0.1, lr=LR, momentum=MOMENTUM)
    run(straight, straight_params, 3)
    saved = straight.state_dict()
    host = {k: p.data.get() for k, p in straight_params.items()}
    assert saved["param_groups"][0]["rho"] == 0.1
    run(straight, straight_params, 3)

    resumed_params = _params(host, np.float32)
    resumed = SAM(list(resumed_params.values()), no.SGD, rho=0.3, lr=0.5, momentum=MOMENTUM)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["rho"] == 0.1 and resumed.param_groups[0]["lr"] == LR
    run(resumed, resumed_params, 3)
    for k in p0:
        assert np.array_equal(straight_params[k].data.get(), resumed_params[k].data.get())


# ---------------------------------------------------------------------------- stateful errors


def _data(params):
    return {k: (p.data, p.data.get()) for k, p in params.items()}


def _unchanged(params, before):
    for k, p in params.items():
        assert p.data is before[k][0]
        assert np.array_equal(p.data.get(), before[k][1])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"base_optimizer": no.SGD, "rho": -0.1}, ValueError, "rho"),
        ({"base_optimizer": no.SGD, "rho": float("nan")}, ValueError, "rho"),
        ({"base_optimizer": no.SGD, "adaptive": "yes"}, ValueError, "adaptive"),
        ({"base_optimizer": "SGD"}, TypeError, "base_optimizer"),
        ({"base_optimizer": no.sgd}, TypeError, "base_optimizer"),
        ({"base_optimizer": int}, TypeError, "base_optimizer"),
        ({"base_optimizer": no.Adadelta}, TypeError, "clash"),
        ({"base_optimizer": no.SGD, "lr": -1.0}, ValueError, "lr"),
        ({"base_optimizer": no.SGD, "betas": (0.9, 0.99)}, TypeError, "betas"),
    ],
)
def test_bad_construction_changes_nothing(cl_queue, kwargs, error, match):
    p0, _ = _problem()
    params = _params(p0, np.float32)
    before = _data(params)
    with pytest.raises(error, match=match):
        SAM(list(params.values()), **kwargs)
    _unchanged(params, before)


def test_bad_group_rho_changes_nothing(cl_queue):
    p0, _ = _problem()
    params = _params(p0, np.float32)
    before = _data(params)
    groups = [{"params": [params["b"]]}, {"params": [params["w"]], "rho": -0.5}]
    with pytest.raises(ValueError, match=r"rho: -0.5 .* in param_groups\[1\]"):
        SAM(groups, no.SGD, lr=LR)
    _unchanged(params, before)


def test_base_optimizer_instance_is_refused(cl_queue):
    p0, _ = _problem()
    params = _params(p0, np.float32)
    instance = no.SGD(list(params.values()), lr=LR)
    before = _data(params)
    with pytest.raises(TypeError, match="must be a netcl_optim stateful optimizer class"):
        SAM(list(params.values()), instance)
    _unchanged(params, before)


def _stepped_optimizer(p0, mats, **kwargs):
    params = _params(p0, np.float32)
    opt = SAM(list(params.values()), no.SGD, lr=LR, momentum=MOMENTUM, **kwargs)
    _set_grads(params, mats, np.float32)
    opt.first_step()
    _set_grads(params, mats, np.float32)
    opt.second_step()
    _set_grads(params, mats, np.float32)
    return params, opt


def test_step_without_closure_changes_nothing(cl_queue):
    p0, mats = _problem()
    params, opt = _stepped_optimizer(p0, mats)
    before, grads = _data(params), {k: p.grad for k, p in params.items()}
    state = opt.state_dict()
    for bad in (None, 3):
        with pytest.raises(ValueError, match="requires closure"):
            opt.step(bad)
    with pytest.raises(ValueError, match="requires closure"):
        opt.step()
    _unchanged(params, before)
    assert all(p.grad is grads[k] for k, p in params.items())
    after = opt.state_dict()
    for i, entry in state["state"].items():
        assert np.array_equal(entry["momentum_buffer"], after["state"][i]["momentum_buffer"])


def test_bad_steps_change_nothing(cl_queue):
    p0, mats = _problem()
    params, opt = _stepped_optimizer(p0, mats)
    before = _data(params)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    opt.param_groups[0]["rho"] = -1.0
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()
    opt.param_groups[0]["rho"] = RHO
    good = params["w"].grad
    params["w"].grad = no.to_device(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError):
        opt.first_step()
    _unchanged(params, before)
    params["w"].grad = good
    for p in params.values():
        p.grad = None
    with pytest.raises(ValueError, match="no parameter has a grad"):
        opt.first_step()
    _unchanged(params, before)
    _set_grads(params, mats, np.float32)
    opt.first_step()  # still usable
    perturbed = _data(params)
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    _unchanged(params, perturbed)
    opt.second_step()


def test_groups_with_different_rho_are_refused(cl_queue):
    p0, mats = _problem()
    params = _params(p0, np.float32)
    opt = SAM([{"params": [params["b"]], "rho": 0.1}, {"params": [params["w"]]}], no.SGD, lr=LR)
    _set_grads(params, mats, np.float32)
    before = _data(params)
    with pytest.raises(ValueError, match="same rho and adaptive"):
        opt.first_step()
    _unchanged(params, before)


def test_closure_error_restores_the_params(cl_queue):
    p0, mats = _problem()
    params, opt = _stepped_optimizer(p0, mats)
    before = _data(params)

    def broken():
        raise KeyError("forward failed")

    with pytest.raises(KeyError):
        opt.step(broken)
    _unchanged(params, before)
    _set_grads(params, mats, np.float32)
    opt.first_step()  # not left half-way
    opt.second_step()


def test_bad_state_dict_changes_nothing(cl_queue):
    p0, mats = _problem()
    _, opt = _stepped_optimizer(p0, mats)
    saved = opt.state_dict()
    bad = {**saved, "param_groups": [{**saved["param_groups"][0], "rho": -1.0}]}
    with pytest.raises(ValueError, match="rho"):
        opt.load_state_dict(bad)
    bad = {**saved, "param_groups": [{**saved["param_groups"][0], "lr": -1.0}]}
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == saved["param_groups"]
    for i, entry in saved["state"].items():
        assert np.array_equal(entry["momentum_buffer"], after["state"][i]["momentum_buffer"])
