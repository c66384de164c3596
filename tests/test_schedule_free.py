"""Schedule-free training: the functional rules (optax.contrib's) and the stateful classes
(facebookresearch schedulefree's) against float64 numpy references and their oracles,
packed = separate leaves, resumed = straight (bit for bit), train()/eval(), bad input and
launch counts."""

from __future__ import annotations

import math

import numpy as np
import optree
import pytest

import netcl_optim as no
from netcl_optim.optimizers.schedule_free import (
    AdamWScheduleFree,
    RAdamScheduleFree,
    SGDScheduleFree,
    schedule_free_adamw,
    schedule_free_sgd,
)
from netcl_optim.stateful import Parameter
from netcl_optim.transforms._schedule_free import (
    ScheduleFreeState,
    schedule_free,
    schedule_free_eval_params,
)

STEPS = 100
SHAPES = {"w": (16, 9), "b": (7,), "s": ()}


def _problem(dtype=np.float32, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
             for _ in range(steps)]  # fmt: skip
    return p0, grads


def _same(a, b, what=""):
    for k in SHAPES:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.tobytes() == y.tobytes(), (what, k)


# ============================================================================ references


def _lr_fn(h):
    """optax's warmup_constant_schedule: float32 values (even under jax_enable_x64)."""
    lr, warm = h["learning_rate"], h.get("warmup_steps")
    if warm is None:
        return lambda c: lr
    f32 = np.float32

    def schedule(c):
        if c >= warm:
            return float(f32(lr))
        return float(f32(-lr) * (f32(1) - f32(c) / f32(warm)) + f32(lr))

    return schedule


def ref_optax(kind, h, p0, grads):
    """optax.contrib's schedule_free over ``kind``'s base optimizer ("adamw", "sgd", or
    "adam0": adam with b1=0), float64: returns (y, x)."""
    lr_fn, b1, power = _lr_fn(h), h.get("b1", 0.9), h.get("weight_lr_power", 2.0)
    wd = h.get("weight_decay") or 0.0
    b2, eps = h.get("b2", 0.999), h.get("eps", 1e-8)
    y = {k: v.astype(np.float64) for k, v in p0.items()}
    z = {k: v.copy() for k, v in y.items()}
    nu = {k: np.zeros_like(v) for k, v in y.items()}
    max_lr = weight_sum = 0.0
    for t, g in enumerate(grads):
        max_lr = max(max_lr, lr_fn(t + 1))
        w = max_lr**power
        weight_sum += w
        ck = w / weight_sum if weight_sum else 0.0
        for k in y:
            u = g[k].astype(np.float64)
            if kind in ("adamw", "adam0"):
                nu[k] = (1 - b2) * u * u + b2 * nu[k]
                u = u / (np.sqrt(nu[k] / (1 - b2 ** (t + 1))) + eps)
            u = u + wd * y[k]
            u = -lr_fn(t) * u
            z_new = z[k] + u
            x = (1 - ck) * (y[k] - (1 - b1) * z[k]) / b1 + ck * z_new
            y[k], z[k] = b1 * x + (1 - b1) * z_new, z_new
    return y, {k: (y[k] - (1 - b1) * z[k]) / b1 for k in y}


def ref_torch(kind, h, p0, grads):
    """schedulefree's AdamW / SGD / RAdam rule (torch-style names), float64: (y, x)."""
    lr0, wd, r = h.get("lr", 0.0025), h.get("weight_decay", 0.0), h.get("r", 0.0)
    power, warm = h.get("weight_lr_power", 2.0), h.get("warmup_steps", 0)
    b1, b2 = h.get("betas", (0.9, 0.999)) if kind != "sgd" else (h.get("momentum", 0.9), 0)
    eps = h.get("eps", 1e-8)
    y = {k: v.astype(np.float64) for k, v in p0.items()}
    z = {k: v.copy() for k, v in y.items()}
    v = {k: np.zeros_like(a) for k, a in y.items()}
    lr_max, weight_sum = -1.0, 0.0
    for k_step, g in enumerate(grads):
        t = k_step + 1
        adaptive = kind == "adamw"
        if kind == "radam":
            rho_inf = 2 / (1 - b2) - 1
            rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
            adaptive = rho_t > 4
            num, den = (rho_t - 4) * (rho_t - 2) * rho_inf, (rho_inf - 4) * (rho_inf - 2) * rho_t
            rect = math.sqrt(num / den) if adaptive else float(not h.get("silent_sgd_phase", True))
            lr = lr0 * rect
        else:
            lr = lr0 * (t / warm if k_step < warm else 1.0)
        lr_max = max(lr, lr_max)
        w = (t**r) * (lr_max**power)
        weight_sum += w
        ck = w / weight_sum if weight_sum else 0.0
        for key in y:
            gg = g[key].astype(np.float64)
            if kind != "sgd":
                v[key] = v[key] * b2 + (1 - b2) * gg * gg
                if adaptive:
                    gg = gg / (np.sqrt(v[key] / (1 - b2**t)) + eps)
            gg = gg + wd * y[key]
            y[key] = y[key] + ck * (z[key] - y[key]) + lr * (b1 * (1 - ck) - 1) * gg
            z[key] = z[key] - lr * gg
    return y, {k: y[k] + (1 - 1 / b1) * (z[k] - y[k]) for k in y}


# ============================================================================ functional

OPTAX_CASES = {
    "adamw": ("adamw", {"learning_rate": 0.01, "weight_decay": 0.01}),
    "adamw-warmup": ("adamw", {"learning_rate": 0.01, "warmup_steps": 10, "b1": 0.95}),
    "sgd": ("sgd", {"learning_rate": 0.1, "weight_decay": 0.01}),
    "sgd-warmup": ("sgd", {"learning_rate": 0.1, "warmup_steps": 5, "weight_lr_power": 1.0}),
    "adam0": ("adam0", {"learning_rate": 0.01}),
}


def _ours(kind, h):
    if kind == "adamw":
        return schedule_free_adamw(**h)
    if kind == "sgd":
        return schedule_free_sgd(**h)
    return schedule_free(no.adam(h["learning_rate"], b1=0.0), h["learning_rate"])


def _optax(optax, kind, h):
    if kind == "adamw":
        return optax.contrib.schedule_free_adamw(**h)
    if kind == "sgd":
        return optax.contrib.schedule_free_sgd(**h)
    lr = h["learning_rate"]
    return optax.contrib.schedule_free(optax.adam(lr, b1=0.0), lr)


def _run_functional(tx, p0, grads, queue, packed=True):
    params = no.to_device(p0, queue)
    params = no.pack(params) if packed else params
    state = tx.init(params)
    for g in grads:
        grads_d = no.to_device(g, queue)
        params, state = no.step(tx, params, no.pack(grads_d) if packed else grads_d, state)
    return params, state


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", OPTAX_CASES)
def test_functional_matches_float64_reference(cl_queue, case, dtype):
    kind, h = OPTAX_CASES[case]
    p0, grads = _problem(dtype)
    params, state = _run_functional(_ours(kind, h), p0, grads, cl_queue)
    want_y, want_x = ref_optax(kind, h, p0, grads)
    got_x = no.to_host(schedule_free_eval_params(state, params))
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for k in SHAPES:
        np.testing.assert_allclose(no.to_host(params)[k], want_y[k], rtol=tol, atol=tol)
        np.testing.assert_allclose(got_x[k], want_x[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("case", OPTAX_CASES)
def test_functional_matches_optax(cl_queue, case, x64):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    kind, h = OPTAX_CASES[case]
    dtype = np.float64 if x64 else np.float32
    p0, grads = _problem(dtype)
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", x64)
    try:
        otx = _optax(optax, kind, h)
        op = {k: jnp.asarray(v) for k, v in p0.items()}
        ost = otx.init(op)
        for g in grads:
            ou, ost = otx.update({k: jnp.asarray(v) for k, v in g.items()}, ost, op)
            op = optax.apply_updates(op, ou)
        oev = optax.contrib.schedule_free_eval_params(ost, op)
        want = {k: np.asarray(op[k]) for k in SHAPES}
        want_x = {k: np.asarray(oev[k]) for k in SHAPES}
        host = {f: float(getattr(ost, f)) for f in ("weight_sum", "max_lr", "b1")}
    finally:
        jax.config.update("jax_enable_x64", old)
    params, state = _run_functional(_ours(kind, h), p0, grads, cl_queue)
    got_x = no.to_host(schedule_free_eval_params(state, params))
    tol = 1e-12 if x64 else 1e-5
    for k in SHAPES:
        np.testing.assert_allclose(no.to_host(params)[k], want[k], rtol=tol, atol=tol)
        np.testing.assert_allclose(got_x[k], want_x[k], rtol=tol, atol=tol)
    assert state.step_count == STEPS + 1
    for f, v in host.items():
        np.testing.assert_allclose(getattr(state, f), v, rtol=1e-6 if not x64 else 1e-15)


@pytest.mark.parametrize("case", ["adamw", "sgd-warmup", "adam0"])
def test_functional_packed_equals_separate_and_one_launch(cl_queue, case):
    kind, h = OPTAX_CASES[case]
    p0, grads = _problem(steps=12)
    tx = _ours(kind, h)
    packed = no.pack(no.to_device(p0, cl_queue))
    loose = no.to_device(p0, cl_queue)
    s_packed, s_loose = tx.init(packed), tx.init(loose)
    for g in grads:
        with no.count_launches() as c:
            packed, s_packed = no.step(tx, packed, no.pack(no.to_device(g, cl_queue)), s_packed)
        assert c.launches == 1
        loose, s_loose = no.step(tx, loose, no.to_device(g, cl_queue), s_loose)
    _same(no.to_host(packed), no.to_host(loose), "params")
    _same(no.to_host(s_packed.z), no.to_host(s_loose.z), "z")
    with no.count_launches() as c:
        x_packed = schedule_free_eval_params(s_packed, packed)
    assert c.launches == 1
    _same(no.to_host(x_packed), no.to_host(schedule_free_eval_params(s_loose, loose)), "x")
    # update + apply_updates == step, bit for bit
    u, s2 = tx.update(no.pack(no.to_device(grads[0], cl_queue)), s_loose, loose)
    stepped, _ = no.step(tx, loose, no.to_device(grads[0], cl_queue), s_loose)
    _same(no.to_host(no.apply_updates(loose, u)), no.to_host(stepped), "update+apply")
    assert s2.step_count == s_loose.step_count + 1


def test_base_optimizer_that_is_not_fusible(cl_queue):
    """A base optimizer that runs its own update (apply_if_finite): the same bits as the
    fused step, in two launches (its update, then schedule-free's)."""
    p0, grads = _problem(steps=6)
    fused = schedule_free(no.sgd(0.1), 0.1)
    opaque = schedule_free(no.apply_if_finite(no.sgd(0.1), 3), 0.1)
    a, sa = _run_functional(fused, p0, grads, cl_queue)
    b, sb = _run_functional(opaque, p0, grads, cl_queue)
    _same(no.to_host(a), no.to_host(b), "params")
    _same(no.to_host(sa.z), no.to_host(sb.z), "z")
    assert sb.base_optimizer_state.notfinite_count == 0


def test_eval_params_is_pure(cl_queue):
    p0, grads = _problem(steps=3)
    params, state = _run_functional(schedule_free_sgd(0.1), p0, grads, cl_queue)
    before_p, before_z = no.to_host(params), no.to_host(state.z)
    x = schedule_free_eval_params(state, params)
    _same(no.to_host(params), before_p)
    _same(no.to_host(state.z), before_z)
    leaves = zip(optree.tree_leaves(x), optree.tree_leaves(params), strict=True)
    assert all(a is not b for a, b in leaves)


@pytest.mark.parametrize("case", ["adamw-warmup", "sgd-warmup"])
def test_functional_checkpoint_resume_mid_warmup(cl_queue, case, tmp_path):
    kind, h = OPTAX_CASES[case]
    p0, grads = _problem(steps=14)
    tx = _ours(kind, h)
    straight, s_straight = _run_functional(tx, p0, grads, cl_queue)
    params, state = _run_functional(tx, p0, grads[:3], cl_queue)  # mid-warmup
    no.save(tmp_path / "ck.npz", {"params": params, "state": state})
    loaded = no.load(tmp_path / "ck.npz")
    params, state = loaded["params"], loaded["state"]
    assert isinstance(state, ScheduleFreeState) and state.step_count == 4
    for g in grads[3:]:
        params, state = no.step(tx, params, no.pack(no.to_device(g, cl_queue)), state)
    _same(no.to_host(params), no.to_host(straight), "params")
    _same(no.to_host(state.z), no.to_host(s_straight.z), "z")
    assert (state.weight_sum, state.max_lr) == (s_straight.weight_sum, s_straight.max_lr)


def test_functional_bad_input(cl_queue):
    for b1 in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="Invalid b1"):
            schedule_free(no.sgd(0.1), 0.1, b1=b1)
    with pytest.raises(ValueError, match="Invalid b1"):
        schedule_free_adamw(b1=0.0)
    with pytest.raises(ValueError, match="Invalid weight_lr_power"):
        schedule_free_sgd(weight_lr_power=-1.0)
    with pytest.raises(ValueError, match="Invalid warmup_steps"):
        schedule_free_adamw(warmup_steps=0)
    with pytest.raises(ValueError, match="Invalid learning_rate"):
        schedule_free_sgd(learning_rate=-1.0)
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        schedule_free_adamw(weight_decay=-1.0)
    with pytest.raises(TypeError, match="base_optimizer"):
        schedule_free(3, 0.1)
    with pytest.raises(ValueError, match="state_dtype"):
        schedule_free_sgd(state_dtype="int8")
    with pytest.raises(ValueError, match="ScheduleFreeState"):
        schedule_free_eval_params(no.sgd(0.1).init(no.to_device({"a": np.ones(2, np.float32)})),
                                  {"a": 0})  # fmt: skip
    # another optimizer's state, or no params: refused before anything changes
    p0, grads = _problem(steps=1)
    tx = schedule_free_adamw(0.01)
    params = no.pack(no.to_device(p0, cl_queue))
    state = tx.init(params)
    z_before = no.to_host(state.z)
    g = no.pack(no.to_device(grads[0], cl_queue))
    with pytest.raises(ValueError, match="state does not match"):
        tx.update(g, schedule_free_sgd(0.1).init(params), params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(g, state, None)
    _same(no.to_host(state.z), z_before)
    assert state.step_count == 1


def test_functional_low_precision_z(cl_queue):
    """``state_dtype``: z stored as bfloat16; the step still one launch."""
    p0, grads = _problem(steps=5)
    tx = schedule_free_sgd(0.1, state_dtype="bfloat16")
    params = no.pack(no.to_device(p0, cl_queue))
    state = tx.init(params)
    assert all(str(x.dtype) == "bfloat16" for x in optree.tree_leaves(state.z))
    for g in grads:
        with no.count_launches() as c:
            params, state = no.step(tx, params, no.pack(no.to_device(g, cl_queue)), state)
        assert c.launches == 1
    want, want_x = ref_optax("sgd", {"learning_rate": 0.1}, p0, grads)
    with no.count_launches() as c:
        x = no.to_host(schedule_free_eval_params(state, params))  # (z read as a slot)
    assert c.launches == 1
    for k in SHAPES:
        np.testing.assert_allclose(no.to_host(params)[k], want[k], rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(x[k], want_x[k], rtol=5e-2, atol=5e-2)


def test_state_dtype_wrapper_stores_z_alias_stores_every_slot(cl_queue):
    """``schedule_free(..., state_dtype=)``: only z (optax's); the aliases' keyword-only
    ``state_dtype``/``state_bits``: every slot (z and nu), as every alias here."""
    p0, _ = _problem(steps=1)
    params = no.pack(no.to_device(p0, cl_queue))

    def dtypes(tree):
        return {str(x.dtype) for x in optree.tree_leaves(tree) if hasattr(x, "dtype")}

    wrapped = schedule_free(no.rmsprop(0.01), 0.01, state_dtype="bfloat16").init(params)
    assert dtypes(wrapped.z) == {"bfloat16"}
    assert dtypes(wrapped.base_optimizer_state) == {"float32"}
    alias = schedule_free_adamw(0.01, state_dtype="bfloat16").init(params)
    assert dtypes((alias.z, alias.base_optimizer_state)) == {"bfloat16"}
    tx = schedule_free_adamw(0.01, state_bits=8)
    big = no.pack(no.to_device({"w": np.linspace(-1, 1, 8192, dtype=np.float32)}, cl_queue))
    state = tx.init(big)
    for k in range(3):
        g = no.pack(no.to_device({"w": np.full(8192, 0.1 * (k + 1), np.float32)}, cl_queue))
        with no.count_launches() as c:
            big, state = no.step(tx, big, g, state)
        assert c.launches == 1
    assert np.all(np.isfinite(no.to_host(big)["w"]))


def test_functional_mixed_dtypes(cl_queue):
    """A tree of float32 and float64 leaves: the float64 leaf keeps float64's accuracy."""
    p0, grads = _problem(steps=20)
    p0["b"] = p0["b"].astype(np.float64)
    grads = [{**g, "b": g["b"].astype(np.float64)} for g in grads]
    h = {"learning_rate": 0.01, "warmup_steps": 5, "weight_decay": 0.01}
    params, state = _run_functional(schedule_free_adamw(**h), p0, grads, cl_queue)
    want_y, want_x = ref_optax("adamw", h, p0, grads)
    got_y, got_x = no.to_host(params), no.to_host(schedule_free_eval_params(state, params))
    for k in SHAPES:
        tol = 1e-12 if k == "b" else 2e-5
        np.testing.assert_allclose(got_y[k], want_y[k], rtol=tol, atol=tol)
        np.testing.assert_allclose(got_x[k], want_x[k], rtol=tol, atol=tol)


# ============================================================================ stateful

TORCH_CASES = {
    "adamw": (AdamWScheduleFree, "AdamWScheduleFree", {"lr": 0.01}),
    "adamw-all": (AdamWScheduleFree, "AdamWScheduleFree",
                  {"lr": 0.01, "betas": (0.95, 0.99), "weight_decay": 0.01,
                   "warmup_steps": 10, "r": 0.5, "weight_lr_power": 1.5}),
    "sgd": (SGDScheduleFree, "SGDScheduleFree", {"lr": 0.1}),
    "sgd-all": (SGDScheduleFree, "SGDScheduleFree",
                {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.01, "warmup_steps": 5,
                 "r": 1.0}),
    "radam": (RAdamScheduleFree, "RAdamScheduleFree", {"lr": 0.01}),
    "radam-all": (RAdamScheduleFree, "RAdamScheduleFree",
                  {"lr": 0.01, "weight_decay": 0.01, "r": 0.5, "betas": (0.9, 0.99)}),
    "radam-loud": (RAdamScheduleFree, "RAdamScheduleFree",
                   {"lr": 0.01, "silent_sgd_phase": False}),
}  # fmt: skip


def _kind(cls):
    return {AdamWScheduleFree: "adamw", SGDScheduleFree: "sgd", RAdamScheduleFree: "radam"}[cls]


def _params(p0, queue):
    return [Parameter(no.to_device(p0[k].copy(), queue)) for k in SHAPES]


def _set_grads(params, g, queue):
    for p, k in zip(params, SHAPES, strict=True):
        p.grad = no.to_device(g[k], queue)


def _host_params(params):
    return {k: p.data.get() for k, p in zip(SHAPES, params, strict=True)}


def _run_stateful(cls, kwargs, p0, grads, queue):
    params = _params(p0, queue)
    opt = cls(params, **kwargs)
    opt.train()
    for g in grads:
        _set_grads(params, g, queue)
        opt.step()
    y = _host_params(params)
    opt.eval()
    return opt, params, y, _host_params(params)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", TORCH_CASES)
def test_stateful_matches_float64_reference(cl_queue, case, dtype):
    cls, _, kwargs = TORCH_CASES[case]
    p0, grads = _problem(dtype)
    _, _, y, x = _run_stateful(cls, kwargs, p0, grads, cl_queue)
    want_y, want_x = ref_torch(_kind(cls), kwargs, p0, grads)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for k in SHAPES:
        np.testing.assert_allclose(y[k], want_y[k], rtol=tol, atol=tol)
        np.testing.assert_allclose(x[k], want_x[k], rtol=tol, atol=tol)


def _torch_run(torch, tcls, kwargs, p0, grads, foreach=False):
    tps = [torch.tensor(p0[k].copy(), requires_grad=True) for k in SHAPES]
    topt = tcls(tps, foreach=foreach, **kwargs)
    topt.train()
    for g in grads:
        for p, k in zip(tps, SHAPES, strict=True):
            p.grad = torch.tensor(g[k])
        topt.step()
    y = {k: p.detach().numpy().copy() for k, p in zip(SHAPES, tps, strict=True)}
    topt.eval()
    return topt, tps, y, {k: p.detach().numpy().copy() for k, p in zip(SHAPES, tps, strict=True)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", TORCH_CASES)
def test_stateful_matches_schedulefree(cl_queue, case, dtype):
    torch = pytest.importorskip("torch")
    schedulefree = pytest.importorskip("schedulefree")
    cls, name, kwargs = TORCH_CASES[case]
    p0, grads = _problem(dtype)
    opt, _, y, x = _run_stateful(cls, kwargs, p0, grads, cl_queue)
    topt, _, ty, tx = _torch_run(torch, getattr(schedulefree, name), kwargs, p0, grads)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for k in SHAPES:
        np.testing.assert_allclose(y[k], ty[k], rtol=tol, atol=tol)
        np.testing.assert_allclose(x[k], tx[k], rtol=tol, atol=tol)
    ours, theirs = opt.state_dict(), topt.state_dict()
    for key in ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode"):
        assert ours["param_groups"][0][key] == theirs["param_groups"][0][key], key
    for i in range(len(SHAPES)):
        assert set(ours["state"][i]) == set(theirs["state"][i])
        for key, v in theirs["state"][i].items():
            np.testing.assert_allclose(ours["state"][i][key], v.numpy(), rtol=tol, atol=tol)


def test_new_optimizer_is_in_eval_mode_and_step_refuses(cl_queue):
    p0, grads = _problem(steps=2)
    params = _params(p0, cl_queue)
    opt = AdamWScheduleFree(params, lr=0.01)
    assert opt.param_groups[0]["train_mode"] is False
    _set_grads(params, grads[0], cl_queue)
    with pytest.raises(RuntimeError, match=r"eval mode: call optimizer.train\(\)"):
        opt.step()
    _same(_host_params(params), p0)
    assert opt.param_groups[0]["k"] == 0 and opt.state_dict()["state"] == {}
    opt.train()  # no z yet: nothing to swap
    _same(_host_params(params), p0)
    opt.step()
    opt.eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    assert opt.param_groups[0]["k"] == 1
    state = opt.state_dict()
    assert state["param_groups"][0]["train_mode"] is False


@pytest.mark.parametrize("case", ["adamw-all", "sgd-all", "radam-all"])
def test_stateful_packed_equals_separate_and_launches(cl_queue, case):
    cls, _, kwargs = TORCH_CASES[case]
    p0, grads = _problem(steps=8)
    packed, loose = _params(p0, cl_queue), _params(p0, cl_queue)
    a, b = cls(packed, **kwargs), cls(loose, **kwargs)
    a.train()
    with no.count_launches() as c:
        b.train()  # no z yet: no launch
    assert c.launches == 0
    for i, g in enumerate(grads):
        packed_grads = no.pack(no.to_device([g[k] for k in SHAPES], cl_queue))
        for p, pg in zip(packed, packed_grads, strict=True):
            p.grad = pg
        _set_grads(loose, g, cl_queue)
        with no.count_launches() as c:
            a.step()
        assert c.launches == 1
        b.step()
        if i == 3:
            for opt in (a, b):
                with no.count_launches() as c:
                    opt.eval()
                assert c.launches == 1
            _same(_host_params(packed), _host_params(loose), "x")
            for opt in (a, b):
                opt.train()
    _same(_host_params(packed), _host_params(loose), "y")
    sa, sb = a.state_dict(), b.state_dict()
    for i in range(len(SHAPES)):
        for key in sa["state"][i]:
            assert sa["state"][i][key].tobytes() == sb["state"][i][key].tobytes()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", ["adamw-all", "sgd-all", "radam"])
def test_stateful_resume_bit_for_bit(cl_queue, case, mode, tmp_path):
    """Saved mid-warmup (after 3 steps), in train or eval mode, with the params; a new
    optimizer loads both and goes on: the same bits as a straight run with the same
    eval()/train() calls."""
    cls, _, kwargs = TORCH_CASES[case]
    p0, grads = _problem(steps=10)

    def run(params, opt, gs):
        for g in gs:
            _set_grads(params, g, cl_queue)
            opt.step()

    straight = _params(p0, cl_queue)
    opt = cls(straight, **kwargs)
    opt.train()
    run(straight, opt, grads[:3])
    if mode == "eval":
        opt.eval()
        opt.train()
    run(straight, opt, grads[3:])

    first = _params(p0, cl_queue)
    opt1 = cls(first, **kwargs)
    opt1.train()
    run(first, opt1, grads[:3])
    if mode == "eval":
        opt1.eval()
    no.save(tmp_path / "opt.npz", opt1)
    saved_params = _host_params(first)
    resumed = _params(saved_params, cl_queue)
    opt2 = no.load(tmp_path / "opt.npz", cls(resumed, **kwargs))
    assert opt2.param_groups[0]["train_mode"] is (mode == "train")
    assert opt2.param_groups[0]["k"] == 3
    if mode == "eval":
        opt2.train()
    run(resumed, opt2, grads[3:])
    _same(_host_params(resumed), _host_params(straight), "params")
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in range(len(SHAPES)):
        for key in s1["state"][i]:
            assert s1["state"][i][key].tobytes() == s2["state"][i][key].tobytes()


@pytest.mark.parametrize("case", ["adamw-all", "sgd-all", "radam-all"])
def test_state_dicts_load_both_ways(cl_queue, case):
    """schedulefree's state dict (saved in eval mode) loads into ours and ours into theirs;
    both go on as the other would (float64, tight)."""
    torch = pytest.importorskip("torch")
    schedulefree = pytest.importorskip("schedulefree")
    cls, name, kwargs = TORCH_CASES[case]
    tcls = getattr(schedulefree, name)
    p0, grads = _problem(np.float64, steps=12)
    topt, tps, _, tx = _torch_run(torch, tcls, kwargs, p0, grads[:6])
    # theirs -> ours
    params = _params(tx, cl_queue)
    opt = cls(params, **kwargs)
    opt.load_state_dict(topt.state_dict())
    assert opt.param_groups[0]["k"] == 6 and opt.param_groups[0]["train_mode"] is False
    # ours -> theirs
    sd = opt.state_dict()
    sd["state"] = {i: {k: torch.tensor(v) for k, v in e.items()} for i, e in sd["state"].items()}
    tps2 = [torch.tensor(tx[k].copy(), requires_grad=True) for k in SHAPES]
    topt2 = tcls(tps2, foreach=False, **kwargs)
    topt2.load_state_dict(sd)
    for o in (opt, topt, topt2):
        o.train()
    for g in grads[6:]:
        _set_grads(params, g, cl_queue)
        opt.step()
        for ps, o in ((tps, topt), (tps2, topt2)):
            for p, k in zip(ps, SHAPES, strict=True):
                p.grad = torch.tensor(g[k])
            o.step()
    ours = _host_params(params)
    for ps in (tps, tps2):
        for k, p in zip(SHAPES, ps, strict=True):
            np.testing.assert_allclose(ours[k], p.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_stateful_bad_input_changes_nothing(cl_queue):
    p0, grads = _problem(steps=2)
    params = _params(p0, cl_queue)
    bad = [
        (AdamWScheduleFree, {"betas": (0.0, 0.999)}, "Invalid betas"),
        (AdamWScheduleFree, {"betas": (0.9, 1.0)}, "Invalid betas"),
        (AdamWScheduleFree, {"warmup_steps": -1}, "Invalid warmup_steps"),
        (AdamWScheduleFree, {"weight_lr_power": -1.0}, "Invalid weight_lr_power"),
        (AdamWScheduleFree, {"r": -0.5}, "Invalid r"),
        (AdamWScheduleFree, {"eps": 0.0}, "Invalid eps"),
        (SGDScheduleFree, {"momentum": 1.0}, "Invalid momentum"),
        (SGDScheduleFree, {"momentum": 0.0}, "Invalid momentum"),
        (RAdamScheduleFree, {"silent_sgd_phase": 2}, "Invalid silent_sgd_phase"),
        (RAdamScheduleFree, {"lr": -1.0}, "Invalid lr"),
    ]
    for cls, kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            cls(params, **kwargs)
    _same(_host_params(params), p0)

    opt = AdamWScheduleFree(params, lr=0.01)
    opt.train()
    _set_grads(params, grads[0], cl_queue)
    opt.step()
    before, sd = _host_params(params), opt.state_dict()
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    _set_grads(params, grads[1], cl_queue)
    with pytest.raises(ValueError, match=r"Invalid betas.*param_groups\[0\]"):
        opt.step()
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    opt.param_groups[0]["k"] = -1
    with pytest.raises(ValueError, match="Invalid k"):
        opt.step()
    opt.param_groups[0]["k"] = 1
    opt.param_groups[0]["betas"] = (0.0, 0.999)  # eval() would divide by b1
    with pytest.raises(ValueError, match="Invalid betas"):
        opt.eval()
    assert opt.param_groups[0]["train_mode"] is True
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    _same(_host_params(params), before)
    assert opt.state_dict()["param_groups"] == sd["param_groups"]
    # a bad loaded host entry: refused, nothing changed
    for key, value in (("k", 1.5), ("train_mode", "yes"), ("weight_sum", -1.0)):
        broken = {**sd, "param_groups": [{**sd["param_groups"][0], key: value}]}
        with pytest.raises(ValueError, match=f"Invalid {key}.*loaded param_groups"):
            opt.load_state_dict(broken)
    assert opt.state_dict()["param_groups"] == sd["param_groups"]
    # another schedule-free class's state dict
    other = SGDScheduleFree(_params(p0, cl_queue), lr=0.1)
    with pytest.raises(ValueError, match="SGDScheduleFree"):
        opt.load_state_dict(other.state_dict())


def test_stateful_skipped_param_and_added_group(cl_queue):
    """A parameter without a grad keeps no state and is not swapped; k counts the group's
    steps (schedulefree's); an added group starts in eval mode."""
    torch = pytest.importorskip("torch")
    schedulefree = pytest.importorskip("schedulefree")
    p0, grads = _problem(np.float64, steps=4)
    params = _params(p0, cl_queue)
    tps = [torch.tensor(p0[k].copy(), requires_grad=True) for k in SHAPES]
    opt = SGDScheduleFree(params, lr=0.1)
    topt = schedulefree.SGDScheduleFree(tps, lr=0.1, foreach=False)
    for g in grads:
        for o in (opt, topt):
            o.train()
        for i, k in enumerate(SHAPES):
            params[i].grad = no.to_device(g[k], cl_queue) if k != "b" else None
            tps[i].grad = torch.tensor(g[k]) if k != "b" else None
        opt.step()
        topt.step()
        for o in (opt, topt):
            o.eval()
    for p, t in zip(params, tps, strict=True):
        np.testing.assert_allclose(p.data.get(), t.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert sorted(opt.state_dict()["state"]) == [0, 2]  # "b" never had a grad: no state
    assert params[1].data.get().tobytes() == p0["b"].tobytes()
    extra = Parameter(no.to_device(np.ones(3), cl_queue))
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[1]["train_mode"] is False and opt.param_groups[1]["k"] == 0
    opt.param_groups[0]["train_mode"] = True  # (as if train() had run before the new group)
    extra.grad = no.to_device(np.ones(3), cl_queue)
    with pytest.raises(RuntimeError, match=r"param_groups\[1\] in eval mode"):
        opt.step()
    assert opt.param_groups[0]["k"] == len(grads)


@pytest.mark.parametrize("storage", [{"state_dtype": "bfloat16"},
                                     {"state_bits": 8, "min_8bit_size": 16}])  # fmt: skip
def test_stateful_low_precision_state(cl_queue, storage):
    """16-bit and 8-bit state: one launch per step and per swap; a swap leaves z's stored
    bits as they are."""
    p0, grads = _problem(steps=4)
    params = _params(p0, cl_queue)
    opt = AdamWScheduleFree(params, lr=0.01, **storage)
    opt.train()
    for g in grads:
        packed = no.pack(no.to_device([g[k] for k in SHAPES], cl_queue))
        for p, pg in zip(params, packed, strict=True):
            p.grad = pg
        with no.count_launches() as c:
            opt.step()
        assert c.launches == 1
    before = opt.state_dict()["state"]
    for swap in (opt.eval, opt.train):
        with no.count_launches() as c:
            swap()
        assert c.launches == 1
    after = opt.state_dict()["state"]
    for i, entry in before.items():
        for key, value in entry.items():
            assert np.asarray(value).tobytes() == np.asarray(after[i][key]).tobytes(), key
    assert all(np.all(np.isfinite(v)) for v in _host_params(params).values())


@pytest.mark.parametrize("rank", [0, 1])
def test_zero_redundancy_schedule_free_equals_unsharded(rank):
    """ZeroRedundancyOptimizer(AdamWScheduleFree): train()/eval() swap every rank's slice
    (then the gather), the group entries (k, train_mode, ...) follow the local optimizer's,
    and each rank's slice steps bit for bit as the unsharded optimizer's (two ranks
    simulated: the peer's part of a gather stays NaN)."""
    pytest.importorskip("mpi4py.MPI")
    from test_distributed import FakeComm

    import netcl_optim.distributed as dist

    rng = np.random.default_rng(5)
    host = [rng.standard_normal(s).astype(np.float32) for s in [(30, 20), (20,), (7,)]]
    ref_ps = [no.Parameter(no.to_device(h)) for h in host]
    zero_ps = [no.Parameter(no.to_device(h)) for h in host]
    kwargs = {"lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.01}
    ref = no.AdamWScheduleFree(ref_ps, **kwargs)
    zero = dist.ZeroRedundancyOptimizer(no.AdamWScheduleFree, zero_ps, comm=FakeComm(rank=rank),
                                        **kwargs)  # fmt: skip
    sizes = [h.size for h in host]
    lo, hi = dist.shard_bounds(sum(sizes), 2, sizes)[rank]

    def check(what: str) -> None:
        want = np.concatenate([p.data.get().ravel() for p in ref_ps])
        got = np.concatenate([p.data.get().ravel() for p in zero_ps])
        assert got[lo:hi].tobytes() == want[lo:hi].tobytes(), what
        assert np.isnan(np.delete(got, np.arange(lo, hi))).all(), what
        for p, q in zip(ref_ps, zero_ps, strict=True):  # the peer's part, as a real gather
            q.data.set(p.data.get())

    for opt in (ref, zero):
        opt.train()
    check("train")
    for t in range(4):
        g = [rng.standard_normal(h.shape).astype(np.float32) for h in host]
        for p, q, x in zip(ref_ps, zero_ps, g, strict=True):
            p.grad, q.grad = no.to_device(x), no.to_device(x)
        ref.step()
        zero.step()
        check(f"step {t}")
        assert zero.param_groups[0]["k"] == ref.param_groups[0]["k"] == t + 1
    for opt in (ref, zero):
        opt.eval()
    check("eval")
    assert zero.param_groups[0]["train_mode"] is False
    with pytest.raises(RuntimeError, match="eval mode"):  # before anything moves
        zero.step()
    assert "Abort" not in zero.comm.calls
