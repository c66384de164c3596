"""Stateful LR schedulers driving real stateful optimizers.

A scheduler writes ``param_groups[i]["lr"]``; the optimizer must use exactly that value for
every group on its next ``step()``. Checked three ways: plain SGD, where each step's
parameter change is ``-lr * grad`` bit for bit (float32) for two groups with different base
learning rates under every scheduler; AdamW/Adam under CosineAnnealingLR/WarmupCosine, which
must equal the functional ``no.adamw(learning_rate=schedule)`` / ``no.adam(...)`` driven by
the same closed form, bit for bit; and ``state_dict`` round trips of optimizer and scheduler
(through pickle), after which a resumed run continues identically. A learning rate that
changes every step never builds a kernel.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

no = pytest.importorskip("netcl_optim")
S = pytest.importorskip("netcl_optim.schedules")
programs = pytest.importorskip("netcl_optim.fusion._programs")
stateful = pytest.importorskip("netcl_optim.stateful")

F32 = np.float32
SHAPES = ([(3, 5), (7,)], [(4,), (2, 3)])  # two param groups
BASE_LRS = (0.1, 0.02)
STEPS = 12


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def host_arrays(seed: int, shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(F32) for s in shapes]


PARAMS0 = [host_arrays(10 + gi, shapes) for gi, shapes in enumerate(SHAPES)]
GRADS = [[host_arrays(1000 + 10 * k + gi, shapes) for gi, shapes in enumerate(SHAPES)]
         for k in range(STEPS)]  # fmt: skip


def make_params(values=PARAMS0) -> list[list[Any]]:
    q = no.default_queue()
    return [[stateful.Parameter(no.to_device(a.copy(), q)) for a in group] for group in values]


def set_grads(groups: list[list[Any]], k: int) -> None:
    q = no.default_queue()
    for params, grads in zip(groups, GRADS[k], strict=True):
        for p, g in zip(params, grads, strict=True):
            p.grad = no.to_device(g, q)


def host(groups: list[list[Any]]) -> list[list[np.ndarray]]:
    return [[p.data.get() for p in params] for params in groups]


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint32)


def assert_bitwise(a: list, b: list, what: str) -> None:
    for gi, (ga, gb) in enumerate(zip(a, b, strict=True)):
        for i, (x, y) in enumerate(zip(ga, gb, strict=True)):
            x, y = np.asarray(x), np.asarray(y)
            assert x.shape == y.shape and x.dtype == y.dtype == F32
            assert np.array_equal(bits(x), bits(y)), f"{what}: group {gi} param {i}\n{x}\n{y}"


def two_groups(groups: list[list[Any]], **per_group: Any) -> list[dict[str, Any]]:
    out = []
    for gi, params in enumerate(groups):
        group = {"params": params, "lr": BASE_LRS[gi]}
        group.update({k: v[gi] for k, v in per_group.items()})
        out.append(group)
    return out


def cosine_annealing(base: float, T_max: float, eta_min: float) -> Callable[[int], float]:
    """CosineAnnealingLR's closed form as a functional schedule of the update count:
    ``eta_min + (base - eta_min) / 2 * (cos(pi * count / T_max) + 1)`` (periodic)."""
    T_max = float(T_max)
    return lambda count: (
        eta_min + (base - eta_min) / 2.0 * (math.cos(math.pi * (count / T_max)) + 1.0)
    )


# scheduler factory, and the independent closed form of the lr at epoch e for base lr b (and
# group index gi)
SCHEDULERS: dict[str, tuple[Callable[[Any], Any], Callable[[float, int, int], float]]] = {
    "CosineAnnealingLR": (
        lambda opt: stateful.CosineAnnealingLR(opt, T_max=5, eta_min=1e-3),
        lambda b, e, gi: 1e-3 + (b - 1e-3) * (1 + math.cos(math.pi * e / 5)) / 2,
    ),
    "StepLR": (
        lambda opt: stateful.StepLR(opt, step_size=3, gamma=0.5),
        lambda b, e, gi: b * 0.5 ** (e // 3),
    ),
    "MultiStepLR": (
        lambda opt: stateful.MultiStepLR(opt, milestones=[2, 5, 5], gamma=0.3),
        lambda b, e, gi: b * 0.3 ** sum(e >= m for m in (2, 5, 5)),
    ),
    "ExponentialLR": (
        lambda opt: stateful.ExponentialLR(opt, gamma=0.8),
        lambda b, e, gi: b * 0.8**e,
    ),
    "LinearLR": (
        lambda opt: stateful.LinearLR(opt, start_factor=0.25, end_factor=1.0, total_iters=4),
        lambda b, e, gi: b * (0.25 + 0.75 * min(e, 4) / 4),
    ),
    "WarmupCosine": (
        lambda opt: stateful.WarmupCosine(opt, warmup_steps=3, total_steps=9, eta_min=1e-3),
        lambda b, e, gi: (
            b * e / 3
            if e < 3
            else 1e-3 + (b - 1e-3) * (1 + math.cos(math.pi * min(e - 3, 6) / 6)) / 2
        ),
    ),
    "LambdaLR": (
        lambda opt: stateful.LambdaLR(opt, lambda e: 1.0 / (1.0 + e)),
        lambda b, e, gi: b / (1.0 + e),
    ),
    "OneCycleLR-linear": (
        lambda opt: stateful.OneCycleLR(
            opt, max_lr=[0.2, 0.05], total_steps=STEPS, pct_start=0.25, anneal_strategy="linear"
        ),
        None,  # checked against get_last_lr only (the max_lr is per group)
    ),
}


# ---------------------------------------------------------------------------------------------
# every param group gets its scheduled lr
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_lr_reaches_every_param_group(cl_queue, name):
    """SGD without momentum: each step moves every parameter by exactly ``-lr_i * grad``
    (float32), with ``lr_i`` what the scheduler wrote into group i."""
    make_sched, formula = SCHEDULERS[name]
    groups = make_params()
    opt = stateful.SGD(two_groups(groups), lr=0.5)
    sched = make_sched(opt)
    distinct = set()
    for k in range(STEPS):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == sched.get_last_lr()
        distinct.add(tuple(lrs))
        if formula is not None:
            for gi, lr in enumerate(lrs):
                assert lr == pytest.approx(formula(BASE_LRS[gi], k, gi), rel=1e-12, abs=1e-15)
        before = host(groups)
        set_grads(groups, k)
        opt.step()
        want = [
            [(p + g * F32(-lr)).astype(F32) for p, g in zip(ps, gs, strict=True)]
            for ps, gs, lr in zip(before, GRADS[k], lrs, strict=True)
        ]
        assert_bitwise(host(groups), want, f"{name} step {k + 1}")
        sched.step()
    # the two groups really had different learning rates, changing over the run
    assert any(a != b for a, b in distinct)
    assert len(distinct) >= 3


def test_reduce_lr_on_plateau_reaches_every_param_group(cl_queue):
    groups = make_params()
    opt = stateful.SGD(two_groups(groups), lr=0.5, momentum=0.0)
    sched = stateful.ReduceLROnPlateau(opt, factor=0.5, patience=1, min_lr=[0.03, 0.0])
    metrics = [3.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    seen = []
    for k, m in enumerate(metrics):
        lrs = [g["lr"] for g in opt.param_groups]
        seen.append(lrs)
        before = host(groups)
        set_grads(groups, k)
        opt.step()
        want = [
            [(p + g * F32(-lr)).astype(F32) for p, g in zip(ps, gs, strict=True)]
            for ps, gs, lr in zip(before, GRADS[k], lrs, strict=True)
        ]
        assert_bitwise(host(groups), want, f"plateau step {k + 1}")
        sched.step(m)
    # torch: reduce when num_bad_epochs > patience (the 2nd bad epoch in a row)
    assert [s[1] for s in seen] == [0.02, 0.02, 0.02, 0.02, 0.01, 0.01, 0.01, 0.01, 0.005,
                                    0.005, 0.0025, 0.0025]  # fmt: skip
    assert [s[0] for s in seen] == [0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.03, 0.03,
                                    0.03, 0.03]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# stateful + scheduler == functional + schedule, bit for bit
# ---------------------------------------------------------------------------------------------


def _functional_run(factory, schedules, hyper, steps):
    """One functional optimizer per group, on the group's params packed as a list."""
    q = no.default_queue()
    runs = []
    for gi in range(len(SHAPES)):
        tx = factory(learning_rate=schedules[gi], **hyper[gi])
        params = no.pack([no.to_device(a, q) for a in PARAMS0[gi]])
        runs.append([tx, params, tx.init(params)])
    out = []
    for k in range(steps):
        step = []
        for gi, run in enumerate(runs):
            tx, params, state = run
            grads = no.pack([no.to_device(g, q) for g in GRADS[k][gi]])
            params, state = no.step(tx, params, grads, state)
            run[1], run[2] = params, state
            step.append([a.get() for a in params])
        out.append(step)
    return out


def test_cosine_annealing_adamw_equals_functional_adamw(cl_queue):
    """Past T_max too: CosineAnnealingLR rises again, and so does the closed form."""
    T_max, eta_min = 7, 1e-4
    wds = (0.05, 0.2)
    groups = make_params()
    opt = stateful.AdamW(two_groups(groups, weight_decay=wds), betas=(0.85, 0.99), eps=1e-7)
    sched = stateful.CosineAnnealingLR(opt, T_max=T_max, eta_min=eta_min)
    schedules = [cosine_annealing(b, T_max, eta_min) for b in BASE_LRS]
    want = _functional_run(
        no.adamw,
        schedules,
        [{"b1": 0.85, "b2": 0.99, "eps": 1e-7, "weight_decay": wd} for wd in wds],
        STEPS,
    )
    for k in range(STEPS):
        for gi, group in enumerate(opt.param_groups):
            assert group["lr"] == schedules[gi](k), (k, gi)
        set_grads(groups, k)
        opt.step()
        sched.step()
        assert_bitwise(host(groups), want[k], f"AdamW step {k + 1}")
    # the state matches torch's layout and count
    state = opt.state_dict()["state"]
    assert state[0]["step"] == STEPS


def test_warmup_cosine_adam_equals_functional_adam(cl_queue):
    """WarmupCosine is ``warmup_cosine_decay_schedule(0, base, w, total, eta_min)``; its first
    step has lr 0 (the state still advances)."""
    w, total, eta_min = 3, 9, 1e-3
    groups = make_params()
    opt = stateful.Adam(two_groups(groups, weight_decay=(0.0, 0.01)), betas=(0.9, 0.999))
    sched = stateful.WarmupCosine(opt, warmup_steps=w, total_steps=total, eta_min=eta_min)
    schedules = [S.warmup_cosine_decay_schedule(0.0, b, w, total, eta_min) for b in BASE_LRS]
    want = _functional_run(
        no.adam, schedules, [{"weight_decay": 0.0}, {"weight_decay": 0.01}], STEPS
    )
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    for k in range(STEPS):
        set_grads(groups, k)
        opt.step()
        sched.step()
        assert_bitwise(host(groups), want[k], f"Adam step {k + 1}")
    assert_bitwise(want[0], PARAMS0, "the lr-0 first step leaves the params")


def test_a_changing_lr_never_rebuilds_a_kernel(cl_queue):
    """Packed grads (``zero_grad(set_to_none=False)`` then written in place): one launch per
    group per step, and no kernel build once the first step ran."""
    groups = make_params()
    opt = stateful.AdamW(two_groups(groups, weight_decay=(0.01, 0.02)))
    sched = stateful.CosineAnnealingLR(opt, T_max=4)
    built = None
    lrs = set()
    for k in range(8):
        opt.zero_grad(set_to_none=False)
        for params, grads in zip(groups, GRADS[k], strict=True):
            for p, g in zip(params, grads, strict=True):
                p.grad.set(g)
        with no.count_launches() as c:
            opt.step()
        assert c.launches == len(SHAPES), c.kernels
        if built is None:
            built = programs.build_count
        assert programs.build_count == built, f"step {k + 1} built a kernel"
        lrs.add(opt.param_groups[0]["lr"])
        sched.step()
    assert len(lrs) >= 5


# ---------------------------------------------------------------------------------------------
# state_dict round trips resume identically
# ---------------------------------------------------------------------------------------------


def _pickled(x: Any) -> Any:
    return pickle.loads(pickle.dumps(x))


OPTIMIZERS = {
    "AdamW": lambda groups: stateful.AdamW(two_groups(groups, weight_decay=(0.05, 0.2))),
    "SGD-momentum": lambda groups: stateful.SGD(two_groups(groups), momentum=0.9),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("sched_name", ["CosineAnnealingLR", "WarmupCosine", "OneCycleLR-linear"])
def test_state_dict_round_trip_resumes_identically(cl_queue, opt_name, sched_name):
    make_opt = OPTIMIZERS[opt_name]
    make_sched, _ = SCHEDULERS[sched_name]
    split = 5
    groups = make_params()
    opt = make_opt(groups)
    sched = make_sched(opt)
    for k in range(split):
        set_grads(groups, k)
        opt.step()
        sched.step()
    saved_params = host(groups)
    saved_opt = _pickled(opt.state_dict())
    saved_sched = _pickled(sched.state_dict())

    reference, ref_lrs = [], []
    for k in range(split, STEPS):
        ref_lrs.append([g["lr"] for g in opt.param_groups])
        set_grads(groups, k)
        opt.step()
        sched.step()
        reference.append(host(groups))

    def resume(load_sched: bool):
        groups2 = make_params(saved_params)
        opt2 = make_opt(groups2)
        sched2 = make_sched(opt2)  # a fresh scheduler writes the epoch-0 lr ...
        opt2.load_state_dict(saved_opt)  # ... the optimizer's saved groups restore it
        if load_sched:
            sched2.load_state_dict(saved_sched)
        out, lrs = [], []
        for k in range(split, STEPS):
            lrs.append([g["lr"] for g in opt2.param_groups])
            set_grads(groups2, k)
            opt2.step()
            sched2.step()
            out.append(host(groups2))
        return out, lrs, sched2

    out, lrs, sched2 = resume(load_sched=True)
    assert lrs == ref_lrs
    for k, (a, b) in enumerate(zip(out, reference, strict=True)):
        assert_bitwise(a, b, f"{opt_name}/{sched_name} resumed step {split + k + 1}")
    assert sched2.last_epoch == sched.last_epoch == STEPS
    assert sched2.get_last_lr() == sched.get_last_lr()

    # without the scheduler's state the run differs: the round trip is what makes it equal
    _, lrs_fresh, _ = resume(load_sched=False)
    assert lrs_fresh != ref_lrs


def test_plateau_state_dict_round_trip_resumes_identically(cl_queue):
    metrics = [3.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    split = 3  # mid-plateau: one bad epoch counted

    def make(groups):
        opt = stateful.Adam(two_groups(groups))
        return opt, stateful.ReduceLROnPlateau(opt, factor=0.5, patience=1, cooldown=1)

    groups = make_params()
    opt, sched = make(groups)
    for k in range(split):
        set_grads(groups, k)
        opt.step()
        sched.step(metrics[k])
    assert sched.num_bad_epochs == 1
    saved = (host(groups), _pickled(opt.state_dict()), _pickled(sched.state_dict()))
    reference, ref_lrs = [], []
    for k in range(split, STEPS):
        ref_lrs.append([g["lr"] for g in opt.param_groups])
        set_grads(groups, k)
        opt.step()
        sched.step(metrics[k])
        reference.append(host(groups))
    assert ref_lrs[-1] != ref_lrs[0]  # some reductions happened after the split

    groups2 = make_params(saved[0])
    opt2, sched2 = make(groups2)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    for i, k in enumerate(range(split, STEPS)):
        assert [g["lr"] for g in opt2.param_groups] == ref_lrs[i]
        set_grads(groups2, k)
        opt2.step()
        sched2.step(metrics[k])
        assert_bitwise(host(groups2), reference[i], f"plateau resumed step {k + 1}")
    assert (sched2.best, sched2.num_bad_epochs, sched2.cooldown_counter) == (
        sched.best,
        sched.num_bad_epochs,
        sched.cooldown_counter,
    )


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_state_dict_alone_resumes_the_lr_sequence(cl_queue, name):
    make_sched, _ = SCHEDULERS[name]
    opt = stateful.SGD(two_groups(make_params()))
    sched = make_sched(opt)
    for _ in range(4):
        sched.step()
    saved = _pickled(sched.state_dict())
    assert "optimizer" not in saved
    want = []
    for _ in range(6):
        sched.step()
        want.append(sched.get_last_lr())
    opt2 = stateful.SGD(two_groups(make_params()))
    sched2 = make_sched(opt2)
    sched2.load_state_dict(saved)
    got = []
    for _ in range(6):
        sched2.step()
        got.append(sched2.get_last_lr())
        assert [g["lr"] for g in opt2.param_groups] == got[-1]
    assert got == want
