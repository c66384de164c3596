"""Weight averaging: optax's ``incremental_update`` and ``periodic_update``, and torch's
``swa_utils`` counterparts (``AveragedParams``, the averaging functions, ``SWALR``): float64
numpy references, parity with optax and torch 2.13, launches, resume, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from jax_x64 import jax_x64

import netcl_optim as no
from netcl_optim.stateful._swa import (
    SWALR,
    AveragedParams,
    get_ema_avg_fn,
    get_ema_multi_avg_fn,
    get_swa_avg_fn,
    get_swa_multi_avg_fn,
)
from netcl_optim.transforms._averaging import incremental_update, periodic_update

SHAPES = {"w": (6, 5), "b": (7,), "s": ()}
STEPS = 100


def _trajectory(dtype=np.float32, steps=STEPS, seed=0):
    """A sequence of parameter values (a noisy walk)."""
    rng = np.random.default_rng(seed)
    p = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    out = []
    for _ in range(steps):
        p = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(dtype) for k, v in p.items()}
        out.append(p)
    return out


# ---------------------------------------------------------------------------- incremental_update


def test_incremental_update_matches_float64_reference(cl_queue):
    traj = _trajectory(np.float64)
    avg = no.pack(no.to_device(traj[0], cl_queue))
    ref = {k: v.copy() for k, v in traj[0].items()}
    for t, p in enumerate(traj[1:]):
        a = 0.1 + 0.8 * (t % 7) / 7
        avg = incremental_update(no.pack(no.to_device(p, cl_queue)), avg, a)
        ref = {k: a * p[k] + (1 - a) * ref[k] for k in p}
    got = no.to_host(avg)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_incremental_update_matches_optax(cl_queue, dtype):
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    traj = _trajectory(dtype)
    avg = no.pack(no.to_device(traj[0], cl_queue))
    with jax_x64(dtype == np.float64):
        oavg = {k: jnp.asarray(v) for k, v in traj[0].items()}
        for p in traj[1:]:
            avg = incremental_update(no.pack(no.to_device(p, cl_queue)), avg, 0.01)
            oavg = optax.incremental_update({k: jnp.asarray(v) for k, v in p.items()}, oavg, 0.01)
        want = {k: np.asarray(v) for k, v in oavg.items()}
    got = no.to_host(avg)
    for k in SHAPES:
        assert got[k].dtype == dtype
        if dtype == np.float32:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-14, atol=1e-15)


def test_incremental_update_is_one_launch_per_packed_tree_and_pure(cl_queue):
    traj = _trajectory(steps=2)
    new = no.pack(no.to_device(traj[1], cl_queue))
    old = no.pack(no.to_device(traj[0], cl_queue))
    with no.count_launches() as c:
        out = incremental_update(new, old, 0.25)
    assert c.launches == 1
    got = no.to_host(out)
    for k in SHAPES:
        np.testing.assert_array_equal(no.to_host(old)[k], traj[0][k])
        np.testing.assert_array_equal(no.to_host(new)[k], traj[1][k])
        want = np.float32(0.25) * traj[1][k] + np.float32(0.75) * traj[0][k]
        np.testing.assert_array_equal(got[k], want)


def test_incremental_update_keeps_none_leaves(cl_queue):
    x = no.to_device(np.ones(3, np.float32), cl_queue)
    y = no.to_device(np.zeros(3, np.float32), cl_queue)
    out = incremental_update({"a": x, "b": None}, {"a": y, "b": None}, 0.5)
    assert out["b"] is None
    np.testing.assert_array_equal(out["a"].get(), np.full(3, 0.5, np.float32))


def test_incremental_update_bad_input(cl_queue):
    traj = _trajectory(steps=1)
    new = no.to_device(traj[0], cl_queue)
    old = no.to_device(traj[0], cl_queue)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="Invalid step_size"):
            incremental_update(new, old, bad)
    with pytest.raises(TypeError, match="Invalid step_size: a device array"):
        incremental_update(new, old, no.to_device(np.float32(0.5), cl_queue))
    with pytest.raises(ValueError, match="differ in structure"):
        incremental_update(new, {"w": old["w"], "b": old["b"]}, 0.5)
    wrong = dict(old, b=no.to_device(np.zeros(3, np.float32), cl_queue))
    with pytest.raises(ValueError, match=r"leaf 0 is float32\[7\] in new_tensors"):
        incremental_update(new, wrong, 0.5)
    wrong = dict(old, b=no.to_device(traj[0]["b"].astype(np.float64), cl_queue))
    with pytest.raises(ValueError, match="float64"):
        incremental_update(new, wrong, 0.5)


# ---------------------------------------------------------------------------- periodic_update


def test_periodic_update_matches_optax_and_reference(cl_queue):
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    traj = _trajectory()
    target = no.to_device(traj[0], cl_queue)
    otarget = {k: jnp.asarray(v) for k, v in traj[0].items()}
    ref = traj[0]
    for t, p in enumerate(traj[1:], start=1):
        online = no.to_device(p, cl_queue)
        with no.count_launches() as c:
            target = periodic_update(online, target, t, 7)
        assert c.launches == 0
        assert target is (online if t % 7 == 0 else target)
        otarget = optax.periodic_update({k: jnp.asarray(v) for k, v in p.items()}, otarget, t, 7)
        ref = p if t % 7 == 0 else ref
    got = no.to_host(target)
    for k in SHAPES:
        np.testing.assert_array_equal(got[k], np.asarray(otarget[k]))
        np.testing.assert_array_equal(got[k], ref[k])


def test_periodic_update_bad_input(cl_queue):
    traj = _trajectory(steps=1)
    a = no.to_device(traj[0], cl_queue)
    with pytest.raises(ValueError, match="Invalid update_period"):
        periodic_update(a, a, 3, 0)
    with pytest.raises(ValueError, match="Invalid steps"):
        periodic_update(a, a, -1, 2)
    with pytest.raises(TypeError, match="Invalid steps: a device array"):
        periodic_update(a, a, no.to_device(np.int32(2), cl_queue), 2)
    with pytest.raises(ValueError, match="differ in structure"):
        periodic_update(a, {"w": a["w"]}, 2, 2)
    assert periodic_update(a, a, np.int64(4), np.array(2)) is a


# ---------------------------------------------------------------------------- AveragedParams


def _ours(values, queue):
    return [no.Parameter(no.to_device(v, queue)) for v in values.values()]


def _set(params, values):
    for p, v in zip(params, values.values(), strict=True):
        p.data.set(np.array(v, copy=True))


def _torch_model(torch, values):
    return torch.nn.ParameterList(
        [torch.nn.Parameter(torch.from_numpy(np.array(v, copy=True))) for v in values.values()]
    )


def _torch_set(torch, model, values):
    with torch.no_grad():
        for tp, v in zip(model, values.values(), strict=True):
            tp.copy_(torch.from_numpy(np.array(v, copy=True)))


KINDS = {
    "default": (lambda m: {}, None),
    "ema_multi": (lambda m: {"multi_avg_fn": m.get_ema_multi_avg_fn(0.9)}, "ema"),
    "swa_multi": (lambda m: {"multi_avg_fn": m.get_swa_multi_avg_fn()}, "swa"),
    "ema_avg": (lambda m: {"avg_fn": m.get_ema_avg_fn(0.95)}, "ema"),
    "swa_avg": (lambda m: {"avg_fn": m.get_swa_avg_fn()}, "swa"),
}


class _SwaUtils:
    """Our averaging functions under torch's names (for KINDS)."""

    get_ema_multi_avg_fn = staticmethod(get_ema_multi_avg_fn)
    get_swa_multi_avg_fn = staticmethod(get_swa_multi_avg_fn)
    get_ema_avg_fn = staticmethod(get_ema_avg_fn)
    get_swa_avg_fn = staticmethod(get_swa_avg_fn)


def _reference(kind, traj):
    """float64 numpy: the first value, then the average of each later one."""
    decay = {"ema_multi": 0.9, "ema_avg": 0.95}.get(kind)
    avg = {k: v.astype(np.float64) for k, v in traj[0].items()}
    for n, p in enumerate(traj[1:], start=1):
        for k in avg:
            if decay is None:
                avg[k] = avg[k] + (p[k] - avg[k]) / (n + 1)
            else:
                avg[k] = decay * avg[k] + (1 - decay) * p[k]
    return avg


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_averaged_params_matches_reference_and_torch(cl_queue, kind, dtype):
    torch = pytest.importorskip("torch")
    from torch.optim import swa_utils

    traj = _trajectory(dtype)
    params = _ours(traj[0], cl_queue)
    averaged = AveragedParams(params, **KINDS[kind][0](_SwaUtils))
    model = _torch_model(torch, traj[0])
    tavg = swa_utils.AveragedModel(model, **KINDS[kind][0](swa_utils))
    for p in traj:
        _set(params, p)
        averaged.update_parameters(params)
        _torch_set(torch, model, p)
        tavg.update_parameters(model)
    assert averaged.n_averaged == int(tavg.n_averaged) == STEPS
    ref = _reference(kind, traj)
    rtol = 2e-6 if dtype == np.float32 else 1e-13
    # torch's SWA lerp weight 1 / (n_averaged + 1) is a float32 tensor (n_averaged is a long
    # tensor), also for float64 params; ours is the float64 weight
    torch_rtol = 1e-6 if kind == "swa_multi" else rtol
    for k, mine, theirs in zip(SHAPES, averaged.params, tavg.module, strict=True):
        got = mine.data.get()
        assert got.dtype == dtype
        want = theirs.detach().numpy()
        np.testing.assert_allclose(got, want, rtol=torch_rtol, atol=torch_rtol, err_msg=k)
        np.testing.assert_allclose(got, ref[k], rtol=10 * rtol, atol=10 * rtol, err_msg=k)
    # its own copy: the given params are untouched
    for p, v in zip(params, traj[-1].values(), strict=True):
        np.testing.assert_array_equal(p.data.get(), v)


@pytest.mark.parametrize("kind", ["default", "swa_avg", "ema_avg"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_avg_fn_rules_are_torchs_cpu_rules_bit_for_bit(cl_queue, kind, dtype):
    torch = pytest.importorskip("torch")
    from torch.optim import swa_utils

    traj = _trajectory(dtype, steps=30)
    params = _ours(traj[0], cl_queue)
    averaged = AveragedParams(params, **KINDS[kind][0](_SwaUtils))
    model = _torch_model(torch, traj[0])
    tavg = swa_utils.AveragedModel(model, **KINDS[kind][0](swa_utils))
    for p in traj:
        _set(params, p)
        averaged.update_parameters(params)
        _torch_set(torch, model, p)
        tavg.update_parameters(model)
    for mine, theirs in zip(averaged.params, tavg.module, strict=True):
        np.testing.assert_array_equal(mine.data.get(), theirs.detach().numpy())


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_launch_per_packed_group(cl_queue, kind):
    traj = _trajectory(steps=3)
    params = _ours(traj[0], cl_queue)
    no.SGD(params, lr=0.1)  # packs them: one buffer
    averaged = AveragedParams(params, **KINDS[kind][0](_SwaUtils))
    for p in traj:
        _set(params, p)
        with no.count_launches() as c:
            averaged.update_parameters(params)
        assert c.launches == (0 if averaged.n_averaged == 1 else 1), c.kernels
    two = _ours(traj[0], cl_queue)
    no.SGD([{"params": two[:1]}, {"params": two[1:]}], lr=0.1)  # two buffers
    averaged = AveragedParams(two, **KINDS[kind][0](_SwaUtils))
    averaged.update_parameters(two)
    with no.count_launches() as c:
        averaged.update_parameters(two)
    assert c.launches == 2


def test_user_functions_are_called_the_torch_way(cl_queue):
    traj = _trajectory(steps=3)
    params = _ours(traj[0], cl_queue)
    calls = []

    def multi(avg_list, cur_list, n):
        calls.append((len(avg_list), n))
        for a, c in zip(avg_list, cur_list, strict=True):
            a.set(((a.get() + c.get()) / 2).astype(a.dtype))

    averaged = AveragedParams(params, multi_avg_fn=multi)
    for p in traj:
        _set(params, p)
        averaged.update_parameters(params)
    assert calls == [(3, 1), (3, 2)]
    want = (((traj[0]["w"] + traj[1]["w"]) / 2) + traj[2]["w"]) / 2
    np.testing.assert_allclose(averaged.params[0].data.get(), want, rtol=1e-6)

    averaged = AveragedParams(params, avg_fn=lambda a, c, n: (a.get() * n + c.get()) / (n + 1))
    for p in traj:
        _set(params, p)
        averaged.update_parameters(params)
    want = (traj[0]["w"] + traj[1]["w"] + traj[2]["w"]) / 3
    np.testing.assert_allclose(averaged.params[0].data.get(), want, rtol=1e-6)


def test_functions_are_callable_the_torch_way(cl_queue):
    torch = pytest.importorskip("torch")
    from torch.optim import swa_utils

    traj = _trajectory(steps=2)
    avg = [no.to_device(v, cl_queue) for v in traj[0].values()]
    cur = [no.to_device(v, cl_queue) for v in traj[1].values()]
    tavg = [torch.from_numpy(np.array(v, copy=True)) for v in traj[0].values()]
    tcur = [torch.from_numpy(np.array(v, copy=True)) for v in traj[1].values()]
    assert get_ema_multi_avg_fn(0.8)(avg, cur, 3) is None
    swa_utils.get_ema_multi_avg_fn(0.8)(tavg, tcur, 3)
    for a, t in zip(avg, tavg, strict=True):
        np.testing.assert_allclose(a.get(), t.numpy(), rtol=1e-6, atol=1e-7)
    for ours, theirs in ((get_ema_avg_fn(0.8), swa_utils.get_ema_avg_fn(0.8)),
                         (get_swa_avg_fn(), swa_utils.get_swa_avg_fn())):  # fmt: skip
        got = ours(avg[0], cur[0], 4)
        want = theirs(tavg[0], tcur[0], torch.tensor(4))
        np.testing.assert_allclose(got.get(), want.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_averaged_params_resume_is_bit_for_bit(cl_queue, tmp_path, via):
    traj = _trajectory(steps=10)
    params = _ours(traj[0], cl_queue)
    straight = AveragedParams(params, multi_avg_fn=get_ema_multi_avg_fn(0.7))
    first = AveragedParams(params, multi_avg_fn=get_ema_multi_avg_fn(0.7))
    for p in traj:
        _set(params, p)
        straight.update_parameters(params)
    for p in traj[:4]:
        _set(params, p)
        first.update_parameters(params)
    resumed = AveragedParams(params, multi_avg_fn=get_ema_multi_avg_fn(0.7))
    if via == "state_dict":
        resumed.load_state_dict(first.state_dict())
    else:
        no.save(tmp_path / "avg.npz", first)
        no.load(tmp_path / "avg.npz", resumed)
    assert resumed.n_averaged == 4
    for p in traj[4:]:
        _set(params, p)
        resumed.update_parameters(params)
    for a, b in zip(straight.params, resumed.params, strict=True):
        np.testing.assert_array_equal(a.data.get(), b.data.get())


def test_averaged_params_bad_input_changes_nothing(cl_queue):
    traj = _trajectory(steps=2)
    params = _ours(traj[0], cl_queue)
    with pytest.raises(ValueError, match="not both"):
        AveragedParams(params, avg_fn=get_swa_avg_fn(), multi_avg_fn=get_swa_multi_avg_fn())
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="Invalid decay"):
            get_ema_multi_avg_fn(bad)
        with pytest.raises(ValueError, match="Invalid decay"):
            get_ema_avg_fn(bad)
    with pytest.raises(TypeError, match="avg_fn"):
        AveragedParams(params, avg_fn=3)
    averaged = AveragedParams(params)
    averaged.update_parameters(params)
    before = [p.data.get() for p in averaged.params]
    with pytest.raises(ValueError, match="2 params, the average holds 3"):
        averaged.update_parameters(params[:2])
    other = _ours(dict(traj[1], b=np.zeros(4, np.float32)), cl_queue)
    with pytest.raises(ValueError, match=r"leaf 1 is float32\[4\] in params"):
        averaged.update_parameters(other)
    with pytest.raises(TypeError, match="not a Parameter"):
        averaged.update_parameters([1, 2, 3])
    sd = averaged.state_dict()
    sd["state"][1] = {"averaged_param": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"state\[1\]"):
        averaged.load_state_dict(sd)
    assert averaged.n_averaged == 1
    for a, p in zip(before, averaged.params, strict=True):
        np.testing.assert_array_equal(a, p.data.get())


# ---------------------------------------------------------------------------- SWALR


def _torch_lrs(torch, lrs, steps, **kwargs):
    from torch.optim import swa_utils

    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    opt = torch.optim.SGD(groups, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = swa_utils.SWALR(opt, **kwargs)
        out = [sched.get_last_lr()]
        for _ in range(steps):
            opt.step()
            sched.step()
            out.append(sched.get_last_lr())
    return out


def _our_lrs(queue, lrs, steps, **kwargs):
    groups = [{"params": [no.Parameter(no.to_device(np.zeros(1, np.float32), queue))], "lr": lr}
              for lr in lrs]  # fmt: skip
    opt = no.SGD(groups, lr=0.1)
    sched = SWALR(opt, **kwargs)
    out = [sched.get_last_lr()]
    for _ in range(steps):
        sched.step()
        out.append(sched.get_last_lr())
    assert [g["lr"] for g in opt.param_groups] == out[-1]
    return out


SWALR_CASES = [
    {"swa_lr": 0.05},
    {"swa_lr": 0.05, "anneal_epochs": 5, "anneal_strategy": "linear"},
    {"swa_lr": [0.01, 0.2], "anneal_epochs": 3},
    {"swa_lr": 0.3, "anneal_epochs": 0},
    {"swa_lr": 0.3, "anneal_epochs": 1, "anneal_strategy": "linear"},
]


@pytest.mark.parametrize("kwargs", SWALR_CASES)
def test_swalr_matches_torch_exactly(cl_queue, kwargs):
    torch = pytest.importorskip("torch")
    lrs = [0.5, 0.02]
    assert _our_lrs(cl_queue, lrs, 25, **kwargs) == _torch_lrs(torch, lrs, 25, **kwargs)


def test_swalr_resume(cl_queue):
    p = no.Parameter(no.to_device(np.zeros(1, np.float32), cl_queue))
    opt = no.SGD([p], lr=0.5)
    sched = SWALR(opt, swa_lr=0.05, anneal_epochs=6)
    for _ in range(3):
        sched.step()
    sd, opt_sd = sched.state_dict(), opt.state_dict()
    rest = []
    for _ in range(5):
        sched.step()
        rest.append(sched.get_last_lr())
    q = no.Parameter(no.to_device(np.zeros(1, np.float32), cl_queue))
    opt2 = no.SGD([q], lr=0.5)
    opt2.load_state_dict(opt_sd)
    sched2 = SWALR(opt2, swa_lr=0.05, anneal_epochs=6)
    sched2.load_state_dict(sd)
    again = []
    for _ in range(5):
        sched2.step()
        again.append(sched2.get_last_lr())
    assert again == rest


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"swa_lr": -1.0}, "Invalid swa_lr"),
        ({"swa_lr": [0.1, 0.2]}, "Invalid swa_lr"),
        ({"swa_lr": 0.1, "anneal_epochs": -1}, "Invalid anneal_epochs"),
        ({"swa_lr": 0.1, "anneal_epochs": 2.5}, "Invalid anneal_epochs"),
        ({"swa_lr": 0.1, "anneal_strategy": "exp"}, "Invalid anneal_strategy"),
        ({"swa_lr": 0.1, "last_epoch": -2}, "Invalid last_epoch"),
    ],
)
def test_swalr_bad_input_changes_nothing(cl_queue, kwargs, match):
    p = no.Parameter(no.to_device(np.zeros(1, np.float32), cl_queue))
    opt = no.SGD([p], lr=0.5)
    with pytest.raises(ValueError, match=match):
        SWALR(opt, **kwargs)
    assert (
        opt.param_groups[0].keys()
        == no.SGD([no.Parameter(no.to_device(np.zeros(1, np.float32), cl_queue))], lr=0.5)
        .param_groups[0]
        .keys()
    )
    assert opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(KeyError, match="initial_lr"):
        SWALR(opt, swa_lr=0.1, last_epoch=3)
    assert "swa_lr" not in opt.param_groups[0]
