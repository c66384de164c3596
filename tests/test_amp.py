"""Loss scaling: the fused unscale-and-check kernel, AMPGradScaler (torch.amp.GradScaler
semantics) and the functional dynamic_loss_scale, against float64 references and torch."""

from __future__ import annotations

import math

import numpy as np
import optree
import pyopencl.array as cla
import pytest
import reference as ref
import reference_extra as rx
from hypothesis import given, settings
from hypothesis import strategies as st

import netcl_optim as no
from netcl_optim.amp import (
    AMPGradScaler,
    DynamicLossScaleState,
    dynamic_loss_scale,
    loss_scale_of,
    scale_loss,
    unscale_grads,
)
from netcl_optim.amp._loss_scale import new_flag, next_scale, scale_outputs, unscale_grads_
from netcl_optim.fusion import count_launches
from netcl_optim.stateful._clip import clip_grad_norm_device

SHAPES = [(3, 5), (7,), (), (0,), (4000,), (9000,)]  # > one chunk, a 0-d and an empty leaf


@pytest.fixture(scope="module")
def q(cl_queue):
    return cl_queue


def _grads(seed: int, dtype=np.float32, shapes=SHAPES, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.array(rng.standard_normal(s) * scale, dtype) for s in shapes]


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _assert_bitwise(got, want) -> None:
    """Bit for bit, except that any NaN equals any NaN (payloads differ between the device
    and numpy)."""
    for g, w in zip(optree.tree_leaves(got), optree.tree_leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        nan = np.isnan(w)
        np.testing.assert_array_equal(np.isnan(g), nan)
        np.testing.assert_array_equal(_bits(g)[~nan], _bits(w)[~nan])


def _unscaled_ref(x: np.ndarray, scale: float) -> np.ndarray:
    """torch: x * float32(1 / float64(scale)), computed in float (double for float64)."""
    inv = np.float32(1.0 / np.float64(scale))
    compute = np.float64 if x.dtype == np.float64 else np.float32
    with np.errstate(all="ignore"):
        return (x.astype(compute) * compute(inv)).astype(x.dtype)


class _CountGets:
    """Counts (and allows) ``pyopencl.array.Array.get`` calls: host reads."""

    def __init__(self, monkeypatch) -> None:
        self.n = 0
        real = cla.Array.get

        def get(arr, *a, **k):
            self.n += 1
            return real(arr, *a, **k)

        monkeypatch.setattr(cla.Array, "get", get)


# ---------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("bad_at", [None, (0, 0), (5, 4095), (5, 8999), (4, 3999), (2, ())])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "leaves"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_unscale_grads_values_and_flag(q, dtype, packed, bad_at):
    host = _grads(0, dtype, scale=1000.0 if dtype != np.float16 else 30.0)
    if bad_at is not None:
        leaf, idx = bad_at
        host[leaf][idx] = np.nan if leaf % 2 else -np.inf
    dev = no.to_device(host, q)
    if packed:
        dev = no.pack(dev, q)
    out, found = unscale_grads(dev, 1024.0)
    assert isinstance(found, cla.Array) and found.dtype == np.float32
    assert found.get()[0] == (0.0 if bad_at is None else 1.0)
    _assert_bitwise(no.to_host(out), [_unscaled_ref(h, 1024.0) for h in host])
    _assert_bitwise(no.to_host(dev), host)  # pure: inputs untouched


@pytest.mark.parametrize("scale", [2.0**16, 3.0, 0.25, 1e-30])
def test_unscale_grads_multiplier_is_torch_inverse(q, scale):
    host = _grads(1)
    out, found = unscale_grads(no.to_device(host, q), scale)
    _assert_bitwise(no.to_host(out), [_unscaled_ref(h, scale) for h in host])
    # torch checks the incoming (scaled) values: a finite overflow after unscaling is no error
    assert found.get()[0] == 0.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_unscale_in_place_one_launch_no_sync(q, dtype, monkeypatch):
    host = _grads(2, dtype)
    host[4][17] = np.inf
    dev = no.pack(no.to_device(host, q), q)
    found = new_flag(q)

    def no_get(*a, **k):
        raise AssertionError("host read")

    monkeypatch.setattr(cla.Array, "get", no_get)
    with count_launches() as c:
        unscale_grads_(dev, np.float32(1 / 8.0), found)
    monkeypatch.undo()
    assert c.launches == 1, c.kernels
    assert found.get()[0] == 1.0
    _assert_bitwise(no.to_host(dev), [_unscaled_ref(h, 8.0) for h in host])


def test_unscale_grads_structure_and_empty(q):
    tree = {"w": no.to_device(np.ones((2, 3), np.float32), q), "b": None, "e": []}
    out, found = unscale_grads(tree, 2.0)
    assert optree.tree_structure(out) == optree.tree_structure(tree)
    np.testing.assert_array_equal(out["w"].get(), 0.5)
    assert found.get()[0] == 0.0
    out, found = unscale_grads({}, 2.0)
    assert out == {} and found.get()[0] == 0.0


def test_scale_outputs_kinds(q):
    tree = {
        "f": 1.5,
        "n32": np.array([1.0, -2.0], np.float32),
        "n16": np.array([1.0, 3.0], np.float16),
        "s64": np.float64(0.25),
        "d": no.to_device(np.array([1.0, 2.0, 3.0], np.float32), q),
        "dh": no.to_device(np.array([0.5], np.float16), q),
        "list": [no.to_device(np.array(4.0, np.float64), q)],
    }
    out = scale_outputs(tree, 8.0)
    assert out["f"] == 12.0
    assert out["n32"].dtype == np.float32 and list(out["n32"]) == [8.0, -16.0]
    assert out["n16"].dtype == np.float16 and list(out["n16"]) == [8.0, 24.0]
    assert out["s64"] == 2.0
    assert out["d"] is not tree["d"] and list(out["d"].get()) == [8.0, 16.0, 24.0]
    assert out["dh"].dtype == np.float16 and out["dh"].get()[0] == 4.0
    assert out["list"][0].get() == 32.0
    assert list(tree["d"].get()) == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="outputs must be"):
        scale_outputs("loss", 2.0)
    with pytest.raises(ValueError, match="floating point"):
        scale_outputs(np.array([1, 2]), 2.0)


# ---------------------------------------------------------------------------- the scale rule


@settings(max_examples=40)
@given(
    flags=st.lists(st.booleans(), min_size=1, max_size=40),
    interval=st.integers(1, 4),
    init=st.sampled_from([1.0, 2.0**16, 3.0, 2.0**126]),
)
def test_next_scale_matches_torch_rule(flags, interval, init):
    r = rx.GradScalerRef(init, 2.0, 0.5, interval)
    scale, tracker = float(np.float32(init)), 0
    for found in flags:
        scale, tracker = next_scale(scale, tracker, found, 2.0, 0.5, interval)
        r.iteration(found)
        assert (scale, tracker) == (r.scale, r.growth_tracker)


def test_next_scale_never_overflows():
    big = float(np.finfo(np.float32).max) / 1.5
    assert next_scale(big, 0, False, 2.0, 0.5, 1) == (big, 0)
    assert next_scale(3.0, 0, True, 2.0, 0.1, 5) == (float(np.float32(0.3)), 0)


# ---------------------------------------------------------------------------- AMPGradScaler


class DuckParam:
    def __init__(self, data: cla.Array) -> None:
        self.data = data
        self.grad: cla.Array | None = None


class DuckSGD:
    """The optimizer interface the scaler relies on: ``param_groups`` and ``step()``.
    ``p <- p - lr * g`` on the host (float32), so nothing here depends on our optimizers."""

    def __init__(self, params: list[DuckParam], lr: float = 0.1) -> None:
        self.param_groups = [{"params": params, "lr": lr}]
        self.steps = 0

    def step(self, *args, **kwargs):
        self.steps += 1
        lr = np.float32(self.param_groups[0]["lr"])
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                p.data.set(p.data.get() - lr * p.grad.get())
        return ("stepped", args, kwargs)


def _duck(q, shapes=((3, 4), (5,)), seed=0):
    return [DuckParam(no.to_device(h, q)) for h in _grads(seed, shapes=list(shapes))]


SEQUENCE = [False, False, True, False, False, False, True, True, False, False, False, False]


def test_scaler_sequence_matches_reference(q):
    params = _duck(q)
    opt = DuckSGD(params, lr=0.5)
    scaler = AMPGradScaler(init_scale=2.0**10, growth_interval=3)
    r = rx.GradScalerRef(2.0**10, 2.0, 0.5, 3)
    for it, bad in enumerate(SEQUENCE):
        assert scaler.get_scale() == r.scale
        loss = scaler.scale(no.to_device(np.array([1.5], np.float32), q))
        assert loss.get()[0] == 1.5 * r.scale
        before = [p.data.get() for p in params]
        true = _grads(100 + it, shapes=[p.data.shape for p in params])
        scaled = [np.float32(r.scale) * g for g in true]
        if bad:
            scaled[it % 2].flat[it % 3] = np.inf if it % 2 else np.nan
        for p, g in zip(params, scaled, strict=True):
            p.grad = no.to_device(g, q)
        out = scaler.step(opt, it, key="v")
        ran = r.iteration(bad)
        if ran:
            assert out == ("stepped", (it,), {"key": "v"})
            for p, b, g in zip(params, before, scaled, strict=True):
                unscaled = _unscaled_ref(g, scaler.get_scale())
                np.testing.assert_array_equal(p.grad.get(), unscaled)  # power of 2: exact
                np.testing.assert_array_equal(p.data.get(), b - np.float32(0.5) * unscaled)
        else:
            assert out is None
            for p, b in zip(params, before, strict=True):
                _assert_bitwise(p.data.get(), b)
        scaler.update()
        assert scaler.get_scale() == r.scale
        assert scaler._get_growth_tracker() == r.growth_tracker
    assert opt.steps == SEQUENCE.count(False)


def test_scaler_error_states(q):
    params = _duck(q)
    opt = DuckSGD(params)
    scaler = AMPGradScaler()
    for p in params:
        p.grad = no.to_device(np.ones(p.data.shape, np.float32), q)
    with pytest.raises(RuntimeError, match="No inf checks were recorded prior to update"):
        scaler.update()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) is being called after step\(\)"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"step\(\) has already been called"):
        scaler.step(opt)
    scaler.update()
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: 0.0)
    for p in params:
        p.grad = None
    with pytest.raises(RuntimeError, match="No inf checks were recorded for this optimizer"):
        scaler.step(opt)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(growth_factor=1.0), "growth_factor"),
        (dict(backoff_factor=1.0), "backoff_factor"),
        (dict(backoff_factor=0.0), "backoff_factor"),
        (dict(init_scale=0.0), "init_scale"),
        (dict(init_scale=math.inf), "init_scale"),
        (dict(growth_interval=0), "growth_interval"),
        (dict(growth_interval=2.5), "growth_interval"),
    ],
)
def test_scaler_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AMPGradScaler(**kwargs)
    AMPGradScaler(enabled=False, **kwargs)  # torch checks only when enabled


def test_one_host_read_per_iteration(q, monkeypatch):
    params = _duck(q)
    opt = DuckSGD(params)
    opt.step = lambda: None  # no host work in the optimizer
    scaler = AMPGradScaler(init_scale=4.0)
    gets = _CountGets(monkeypatch)
    for variant in ("step", "unscale+clip+step", "unscale+update"):
        for p in params:
            p.grad = no.to_device(np.ones(p.data.shape, np.float32), q)
        gets.n = 0
        scaler.scale(no.to_device(np.ones(1, np.float32), q))
        if variant != "step":
            scaler.unscale_(opt)
            assert gets.n == 0
        if "clip" in variant:
            clip_grad_norm_device(params, 1.0)
        if variant != "unscale+update":
            scaler.step(opt)
            assert gets.n == 1
        scaler.update()
        assert gets.n == 1, variant


def test_unscale_is_one_launch_for_packed_grads(q):
    stateful = pytest.importorskip("netcl_optim.stateful")
    params = [stateful.Parameter(no.to_device(h, q)) for h in _grads(3, shapes=[(8, 8), (64,)])]
    opt = stateful.SGD(params, lr=0.1)
    opt.zero_grad(set_to_none=False)  # grads: views of one packed buffer
    scaler = AMPGradScaler()
    with count_launches() as c:
        scaler.unscale_(opt)
    assert c.launches == 1, c.kernels


def test_two_optimizers_share_the_update(q):
    pa, pb = _duck(q, seed=1), _duck(q, seed=2)
    oa, ob = DuckSGD(pa), DuckSGD(pb)
    scaler = AMPGradScaler(init_scale=8.0, growth_interval=1)
    for p in pa + pb:
        p.grad = no.to_device(np.ones(p.data.shape, np.float32), q)
    pb[0].grad = no.to_device(np.full(pb[0].data.shape, np.inf, np.float32), q)
    assert scaler.step(oa) is not None
    assert scaler.step(ob) is None
    scaler.update()
    assert (oa.steps, ob.steps) == (1, 0)
    assert scaler.get_scale() == 4.0 and scaler._get_growth_tracker() == 0


def test_disabled_scaler(q):
    params = _duck(q)
    opt = DuckSGD(params)
    scaler = AMPGradScaler(enabled=False)
    loss = no.to_device(np.ones(2, np.float32), q)
    assert scaler.scale(loss) is loss
    for p in params:
        p.grad = no.to_device(np.full(p.data.shape, np.inf, np.float32), q)
    scaler.unscale_(opt)
    assert scaler.step(opt, closure=None) == ("stepped", (), {"closure": None})
    scaler.update()
    assert not scaler.is_enabled() and scaler.get_scale() == 1.0 and scaler.state_dict() == {}
    assert np.all(np.isinf(params[0].grad.get()))  # untouched
    scaler.load_state_dict({})  # no-op


def test_state_dict_round_trip_and_setters():
    a = AMPGradScaler(init_scale=3.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=7)
    a._growth_tracker = 5
    sd = a.state_dict()
    assert sd == {
        "scale": 3.0,
        "growth_factor": 4.0,
        "backoff_factor": 0.25,
        "growth_interval": 7,
        "_growth_tracker": 5,
    }
    b = AMPGradScaler()
    b.load_state_dict(sd)
    assert b.state_dict() == sd
    with pytest.raises(RuntimeError, match="state dict is empty"):
        b.load_state_dict({})
    b.set_growth_factor(3.0)
    b.set_backoff_factor(0.125)
    b.set_growth_interval(9)
    assert (b.get_growth_factor(), b.get_backoff_factor(), b.get_growth_interval()) == (
        3.0,
        0.125,
        9,
    )


def test_update_with_new_scale(q):
    scaler = AMPGradScaler(init_scale=8.0)
    scaler.update(0.1)
    assert scaler.get_scale() == float(np.float32(0.1))
    scaler.update(no.to_device(np.array([64.0], np.float32), q))
    assert scaler.get_scale() == 64.0 and scaler._get_growth_tracker() == 0
    scaler.update(np.array([2.0]))
    assert scaler.get_scale() == 2.0
    with pytest.raises(ValueError, match="new_scale"):
        scaler.update(np.ones(2))
    assert AMPGradScaler(init_scale=np.float32(8.0)).get_scale() == 8.0


# ---------------------------------------------------------------------------- real optimizers


def _stateful():
    return pytest.importorskip("netcl_optim.stateful")


def _host_state(opt) -> list[np.ndarray]:
    """Every state value of ``opt`` (torch-style state_dict), as numpy arrays in key order."""
    sd = opt.state_dict()["state"]
    return [np.asarray(e[k]) for _, e in sorted(sd.items()) for k in sorted(e)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_real_optimizer_skip_is_bitwise_and_steps_match_plain_run(q, name, dtype):
    """Scaled training with skipped steps == the same optimizer fed only the finite,
    unscaled gradients (power-of-two scales: unscaling is exact). Half params keep float32
    state; a skipped step writes nothing."""
    stateful = _stateful()
    cls = getattr(stateful, name)
    kw = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    p0 = _grads(4, dtype, shapes=[(6, 3), (5,)])
    amp_params = [stateful.Parameter(no.to_device(h, q)) for h in p0]
    ref_params = [stateful.Parameter(no.to_device(h, q)) for h in p0]
    amp_opt, ref_opt = cls(amp_params, **kw), cls(ref_params, **kw)
    scaler = AMPGradScaler(init_scale=2.0**8, growth_interval=2)
    for it, bad in enumerate([False, True, False, False, True, False]):
        true = _grads(50 + it, dtype, shapes=[(6, 3), (5,)])
        scaled = [np.array(g.astype(np.float32) * scaler.get_scale(), dtype) for g in true]
        if bad:
            scaled[1][2] = np.inf
        for p, g in zip(amp_params, scaled, strict=True):
            p.grad = no.to_device(g, q)
        before = ([p.data.get() for p in amp_params], _host_state(amp_opt))
        scaler.step(amp_opt)
        scaler.update()
        if bad:
            _assert_bitwise([p.data.get() for p in amp_params], before[0])
            _assert_bitwise(_host_state(amp_opt), before[1])
            continue
        for p, g in zip(ref_params, true, strict=True):
            p.grad = no.to_device(g, q)
        ref_opt.step()
        _assert_bitwise([p.data.get() for p in amp_params], [p.data.get() for p in ref_params])
        assert all(np.all(np.isfinite(p.data.get())) for p in amp_params)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_matches_torch_grad_scaler(q, name):
    torch = pytest.importorskip("torch")
    stateful = _stateful()
    kw = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    p0 = _grads(5, shapes=[(4, 3), (6,)])
    tparams = [torch.nn.Parameter(torch.from_numpy(h.copy())) for h in p0]
    topt = getattr(torch.optim, name)(tparams, **kw)
    tscaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    params = [stateful.Parameter(no.to_device(h, q)) for h in p0]
    opt = getattr(stateful, name)(params, **kw)
    scaler = AMPGradScaler(init_scale=2.0**12, growth_interval=3)
    seq = [False, False, False, True, False, True, True, False, False, False, False]
    for it, bad in enumerate(seq):
        tscaler.scale(torch.tensor(1.0))
        np.testing.assert_equal(scaler.scale(1.0), tscaler.get_scale())
        true = _grads(70 + it, shapes=[(4, 3), (6,)], scale=3.0)
        scaled = [g * np.float32(scaler.get_scale()) for g in true]
        if bad:
            scaled[it % 2].flat[1] = np.nan if it % 2 else -np.inf
        for t, p, g in zip(tparams, params, scaled, strict=True):
            t.grad = torch.from_numpy(g.copy())
            p.grad = no.to_device(g, q)
        before = [t.detach().clone() for t in tparams]
        tscaler.step(topt)
        scaler.step(opt)
        t_stepped = any(not torch.equal(t, b) for t, b in zip(tparams, before, strict=True))
        assert t_stepped == (not bad)
        tscaler.update()
        scaler.update()
        assert scaler.get_scale() == tscaler.get_scale()
        assert scaler._get_growth_tracker() == tscaler._get_growth_tracker()
        for p, t in zip(params, tparams, strict=True):
            np.testing.assert_allclose(p.data.get(), t.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert scaler.state_dict() == tscaler.state_dict()


# ---------------------------------------------------------------------------- functional


def _tree(q, seed=0, dtype=np.float32, scale=1.0):
    host = {
        "w": np.array(np.random.default_rng(seed).standard_normal((5, 4)) * scale, dtype),
        "b": np.array(np.random.default_rng(seed + 1).standard_normal(7) * scale, dtype),
    }
    return host, no.pack(no.to_device(host, q), q)


def test_dynamic_loss_scale_with_inner_adam(q):
    _, params = _tree(q, 0)
    tx = dynamic_loss_scale(2.0**6, growth_interval=2, inner=no.adam(1e-2))
    plain = no.adam(1e-2)
    state, pstate = tx.init(params), plain.init(params)
    r = rx.GradScalerRef(2.0**6, 2.0, 0.5, 2)
    for it, bad in enumerate([False, True, True, False, False, False, True, False]):
        assert loss_scale_of(state) == r.scale
        true_h, _ = _tree(q, 10 + it)
        scaled_h = {k: v * np.float32(r.scale) for k, v in true_h.items()}
        if bad:
            scaled_h["b"][3] = np.nan
        grads = no.to_device(scaled_h, q)
        inner_before = no.to_host(state.inner_state)
        u, state = tx.update(grads, state, params)
        ran = r.iteration(bad)
        assert state.last_finite == ran
        assert (state.scale, state.growth_tracker) == (r.scale, r.growth_tracker)
        if not ran:  # zero (-0.0) updates, inner state bit-identical
            for leaf in optree.tree_leaves(no.to_host(u)):
                assert np.all(leaf == 0) and np.all(np.signbit(leaf))
            _assert_bitwise(no.to_host(state.inner_state), inner_before)
            continue
        want, pstate = plain.update(no.to_device(true_h, q), pstate, params)
        _assert_bitwise(no.to_host(u), no.to_host(want))
        _assert_bitwise(no.to_host(state.inner_state), no.to_host(pstate))


def test_dynamic_loss_scale_bare_in_chain(q):
    _, params = _tree(q, 0)
    tx = no.chain(dynamic_loss_scale(4.0, growth_interval=1), no.scale(-0.5))
    state = tx.init(params)
    g_h, _ = _tree(q, 3)
    u, state = tx.update(no.to_device({k: v * 4 for k, v in g_h.items()}, q), state)
    _assert_bitwise(no.to_host(u), {k: (v * np.float32(-0.5)) for k, v in g_h.items()})
    assert loss_scale_of(state) == 8.0  # grown after one finite step (interval 1)
    assert scale_loss(2.0, state) == 16.0
    g_h["w"][0, 0] = np.inf
    u, state = tx.update(no.to_device(g_h, q), state)
    assert all(np.all(x == 0) for x in optree.tree_leaves(no.to_host(u)))
    assert loss_scale_of(state) == 4.0 and not state[0].last_finite


def test_scale_loss_and_loss_scale_of(q):
    st_ = DynamicLossScaleState(32.0, 0, True, ())
    assert loss_scale_of(st_) == 32.0 and loss_scale_of(5) == 5.0
    assert loss_scale_of((no.EmptyState(), {"a": st_})) == 32.0
    out = scale_loss(no.to_device(np.array([0.5], np.float32), q), st_)
    assert out.get()[0] == 16.0
    with pytest.raises(ValueError, match="no DynamicLossScaleState"):
        loss_scale_of((no.EmptyState(),))
    with pytest.raises(ValueError, match="several"):
        loss_scale_of((st_, st_))
    with pytest.raises(ValueError, match="growth_factor"):
        dynamic_loss_scale(growth_factor=0.5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_functional_step_skip_keeps_params_bitwise(q, dtype):
    """``step`` (update + apply) on a skipped step: p + (-0.0) == p bit for bit, also for
    -0.0, inf and subnormal params; half params keep float32 Adam state."""
    host = {
        "w": np.array([[-0.0, 0.0, np.inf], [1e-7, -3.0, 2.5]], dtype),
        "b": np.array([-np.inf, 7.0], dtype),
    }
    params = no.pack(no.to_device(host, q), q)
    tx = dynamic_loss_scale(2.0**4, inner=no.adam(1e-2))
    state = tx.init(params)
    assert optree.tree_leaves(state.inner_state)[1].dtype == np.float32
    g = {"w": np.ones((2, 3), dtype), "b": np.array([np.nan, 1.0], dtype)}
    new_params, new_state = no.step(tx, params, no.to_device(g, q), state)
    _assert_bitwise(no.to_host(new_params), host)
    _assert_bitwise(no.to_host(new_state.inner_state), no.to_host(state.inner_state))
    assert new_state.scale == 8.0


_val = st.floats(-1e3, 1e3, width=32)


@settings(max_examples=20)
@given(
    sizes=st.lists(st.sampled_from([1, 2, 7, 64, 67, 1031]), min_size=1, max_size=3),
    data=st.data(),
    bad=st.sampled_from([np.inf, -np.inf, np.nan]),
)
def test_property_skipped_steps_leave_params_and_state_bitwise(q, sizes, data, bad):
    params_h = [
        np.array(data.draw(st.lists(_val, min_size=n, max_size=n)), np.float32) for n in sizes
    ]
    grads_h = [
        np.array(data.draw(st.lists(_val, min_size=n, max_size=n)), np.float32) for n in sizes
    ]
    leaf = data.draw(st.integers(0, len(sizes) - 1))
    grads_h[leaf][data.draw(st.integers(0, sizes[leaf] - 1))] = bad
    params = no.to_device(params_h, q)
    tx = dynamic_loss_scale(2.0**10, inner=no.adam(1e-3))
    state = tx.init(params)
    # one finite step first, so that the state is not trivially zero
    params, state = no.step(tx, params, no.to_device([np.ones_like(g) for g in grads_h], q), state)
    p_before, s_before = no.to_host(params), no.to_host(state.inner_state)
    new_params, new_state = no.step(tx, params, no.to_device(grads_h, q), state)
    _assert_bitwise(no.to_host(new_params), p_before)
    _assert_bitwise(no.to_host(new_state.inner_state), s_before)
    assert new_state.scale == state.scale / 2 and not new_state.last_finite
    # and through the stateful scaler with a duck optimizer
    duck = [DuckParam(no.to_device(p, q)) for p in p_before]
    opt = DuckSGD(duck)
    for d, g in zip(duck, grads_h, strict=True):
        d.grad = no.to_device(g, q)
    scaler = AMPGradScaler()
    assert scaler.step(opt) is None
    _assert_bitwise([d.data.get() for d in duck], p_before)


def test_reference_sanity():
    # the float64 references used above agree with a hand computation
    r = rx.GradScalerRef(4.0, 2.0, 0.5, 2)
    assert [r.iteration(f) for f in (False, False, True)] == [True, True, False]
    assert (r.scale, r.growth_tracker) == (4.0, 0)
    assert ref.tree_leaves({"a": None, "b": 1}) == [1]
