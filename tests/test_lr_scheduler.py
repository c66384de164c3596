"""Stateful LR schedulers: hand formulas, functional schedules, state_dict, plateau, torch parity.

Host only: the schedulers drive a fake optimizer (``param_groups``, a list of dicts), as they
drive any optimizer. The torch cross-checks drive ``torch.optim.SGD`` on a dummy tensor.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netcl_optim.schedules import _schedules as S
from netcl_optim.stateful import (
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    ReduceLROnPlateau,
    StepLR,
    WarmupCosine,
)

FAST = settings(max_examples=50, deadline=None)
BASES = (0.1, 0.03)  # two param groups with different base lrs


class FakeOptimizer:
    """The optimizer protocol the schedulers rely on, plus an ``lr`` property like ours."""

    def __init__(self, lrs: tuple[float, ...] = BASES) -> None:
        self.param_groups: list[dict[str, Any]] = [{"lr": lr, "params": []} for lr in lrs]

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.param_groups:
            group["lr"] = value


def lrs_of(sched: LRScheduler, steps: int) -> list[list[float]]:
    """Learning rates after construction and after each of ``steps`` steps, checking that
    ``get_last_lr`` agrees with what was written to the groups."""
    out = []
    for i in range(steps + 1):
        if i:
            sched.step()
        written = [g["lr"] for g in sched.optimizer.param_groups]
        assert sched.get_last_lr() == written
        out.append(written)
    return out


def assert_close(got: list[list[float]], want: list[list[float]], rel: float = 1e-13) -> None:
    assert len(got) == len(want)
    for e, (g, w) in enumerate(zip(got, want, strict=True)):
        for a, b in zip(g, w, strict=True):
            assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-300), (e, a, b)


def expected(formula, steps: int, bases: tuple[float, ...] = BASES) -> list[list[float]]:
    return [[formula(b, e) for b in bases] for e in range(steps + 1)]


# ---------------------------------------------------------------------------- protocol


def test_construction_records_initial_lr_and_performs_the_initial_step():
    opt = FakeOptimizer()
    sched = StepLR(opt, step_size=3, gamma=0.5)
    assert sched.last_epoch == 0
    assert sched.base_lrs == list(BASES)
    assert [g["initial_lr"] for g in opt.param_groups] == list(BASES)
    assert sched.get_last_lr() == list(BASES)


def test_initial_lr_is_setdefault_so_a_second_scheduler_keeps_the_base():
    opt = FakeOptimizer()
    first = ExponentialLR(opt, gamma=0.5)
    first.step()
    second = CosineAnnealingLR(opt, T_max=10)
    assert second.base_lrs == list(BASES)  # not the decayed lr


def test_resuming_with_last_epoch_needs_initial_lr():
    with pytest.raises(KeyError, match="initial_lr"):
        StepLR(FakeOptimizer(), step_size=2, last_epoch=4)
    opt = FakeOptimizer()
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    sched = StepLR(opt, step_size=2, gamma=0.5, last_epoch=4)
    assert sched.last_epoch == 5
    assert sched.get_last_lr() == [b * 0.5**2 for b in BASES]


def test_get_last_lr_is_a_copy():
    sched = ExponentialLR(FakeOptimizer(), gamma=0.9)
    sched.get_last_lr()[0] = 123.0
    assert sched.get_last_lr()[0] == BASES[0]


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="param_groups"):
        StepLR(object(), step_size=1)


def test_a_param_group_added_later_is_an_error_not_a_silent_skip():
    opt = FakeOptimizer()
    sched = StepLR(opt, step_size=1)
    opt.param_groups.append({"lr": 1.0})
    with pytest.raises(ValueError, match="param groups"):
        sched.step()
    assert sched.last_epoch == 0


class _NanAtTwo(LRScheduler):
    def get_lr(self) -> list[float]:
        return [
            math.nan if self.last_epoch == 2 else b / (self.last_epoch + 1) for b in self.base_lrs
        ]


def test_non_finite_computed_lr_raises_and_changes_nothing():
    opt = FakeOptimizer()
    sched = _NanAtTwo(opt)
    sched.step()
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="lr=nan"):
        sched.step()
    assert opt.param_groups == before and sched.last_epoch == 1


def test_closed_form_overrides_a_hand_set_lr_at_the_next_step():
    opt = FakeOptimizer()
    sched = CosineAnnealingLR(opt, T_max=10)
    sched.step()
    opt.lr = 5.0  # the optimizer's lr property sets every group
    assert [g["lr"] for g in opt.param_groups] == [5.0, 5.0]
    sched.step()  # no drift: the closed form of epoch 2, from the recorded bases
    assert_close([sched.get_last_lr()], [[b * (1 + math.cos(math.pi * 0.2)) / 2 for b in BASES]])


# ---------------------------------------------------------------------------- hand formulas


def test_step_lr():
    got = lrs_of(StepLR(FakeOptimizer(), step_size=3, gamma=0.5), 20)
    assert_close(got, expected(lambda b, e: b * 0.5 ** (e // 3), 20))


def test_multi_step_lr_with_repeated_milestone():
    got = lrs_of(MultiStepLR(FakeOptimizer(), milestones=[9, 3, 9], gamma=0.1), 12)
    n = lambda e: (e >= 3) + 2 * (e >= 9)  # noqa: E731
    assert_close(got, expected(lambda b, e: b * 0.1 ** n(e), 12))


def test_exponential_lr():
    got = lrs_of(ExponentialLR(FakeOptimizer(), gamma=0.9), 30)
    assert_close(got, expected(lambda b, e: b * 0.9**e, 30))


def test_linear_lr():
    got = lrs_of(LinearLR(FakeOptimizer(), start_factor=0.25, end_factor=0.75, total_iters=8), 12)
    assert_close(got, expected(lambda b, e: b * (0.25 + 0.5 * min(e, 8) / 8), 12))


def test_linear_lr_defaults():
    got = lrs_of(LinearLR(FakeOptimizer()), 7)
    assert_close(got, expected(lambda b, e: b * (1 / 3 + (2 / 3) * min(e, 5) / 5), 7))


def test_lambda_lr_single_and_per_group():
    got = lrs_of(LambdaLR(FakeOptimizer(), lr_lambda=lambda e: 0.5**e), 5)
    assert_close(got, expected(lambda b, e: b * 0.5**e, 5))
    fns = [lambda e: e + 1, lambda e: 1 / (e + 1)]
    got = lrs_of(LambdaLR(FakeOptimizer(), lr_lambda=fns), 5)
    assert_close(got, [[BASES[0] * (e + 1), BASES[1] / (e + 1)] for e in range(6)])


def test_cosine_annealing_is_the_reference_closed_form_and_periodic():
    got = lrs_of(CosineAnnealingLR(FakeOptimizer(), T_max=10, eta_min=0.001), 40)
    f = lambda b, e: 0.001 + (b - 0.001) * (1 + math.cos(math.pi * e / 10)) / 2  # noqa: E731
    assert_close(got, expected(f, 40))
    assert got[0] == list(BASES)
    assert_close([got[10]], [[0.001, 0.001]])  # minimum at T_max
    assert_close([got[20]], [list(BASES)])  # back to base after 2 T_max (torch's closed form)


def test_cosine_annealing_matches_cosine_decay_schedule_up_to_t_max():
    got = lrs_of(CosineAnnealingLR(FakeOptimizer(), T_max=25, eta_min=0.002), 25)
    want = [[S.cosine_decay_schedule(b, 25, alpha=0.002 / b)(e) for b in BASES] for e in range(26)]
    assert_close(got, want, rel=1e-12)


def test_warmup_cosine_definition():
    w, t, m = 5, 25, 0.001
    got = lrs_of(WarmupCosine(FakeOptimizer(), warmup_steps=w, total_steps=t, eta_min=m), 40)

    def f(b, s):  # semantics.md, verbatim
        if s < w:
            return b * s / w
        prog = min(s - w, t - w) / (t - w)
        return m + (b - m) * (1 + math.cos(math.pi * prog)) / 2

    assert_close(got, expected(f, 40), rel=1e-12)
    assert got[0] == [0.0, 0.0]  # the first optimizer step uses lr 0
    assert_close([got[w]], [list(BASES)])  # warmup end: the base lr
    assert_close([got[t], got[40]], [[m, m], [m, m]])  # decay end, then clamped


def test_warmup_cosine_is_the_functional_schedule():
    got = lrs_of(WarmupCosine(FakeOptimizer(), warmup_steps=7, total_steps=30, eta_min=0.01), 35)
    fns = [S.warmup_cosine_decay_schedule(0.0, b, 7, 30, end_value=0.01) for b in BASES]
    assert got == [[fn(e) for fn in fns] for e in range(36)]  # one copy of the maths


def test_warmup_cosine_without_warmup_is_pure_cosine_that_clamps():
    got = lrs_of(WarmupCosine(FakeOptimizer(), warmup_steps=0, total_steps=10), 30)
    f = lambda b, e: b * (1 + math.cos(math.pi * min(e, 10) / 10)) / 2  # noqa: E731
    assert_close(got, expected(f, 30), rel=1e-12)
    assert got[0] == list(BASES)


def test_one_cycle_lr_boundaries():
    sched = OneCycleLR(FakeOptimizer(), max_lr=[1.0, 0.5], total_steps=100)
    got = lrs_of(sched, 99)
    initial, peak_end, final = 1.0 / 25, 29, 1.0 / 25 / 1e4
    assert_close([got[0]], [[initial, initial / 2]])
    assert_close([got[peak_end]], [[1.0, 0.5]])
    assert_close([got[99]], [[final, final / 2]])
    half = (29 + 99) // 2  # phase 2 midpoint at 64: pct = 35/70
    assert_close([got[half]], [[final + (1.0 - final) / 2, (final + (1.0 - final) / 2) / 2]])
    sched.step()  # torch allows one more step; we hold the minimum instead of extrapolating
    assert_close([sched.get_last_lr()], [[final, final / 2]])
    with pytest.raises(ValueError, match="total steps"):
        sched.step()
    assert sched.last_epoch == 100  # unchanged by the failed step


def test_one_cycle_lr_linear_three_phase_and_epochs():
    opt = FakeOptimizer((1.0,))
    sched = OneCycleLR(
        opt, max_lr=2.0, epochs=4, steps_per_epoch=5, anneal_strategy="linear", three_phase=True
    )
    assert sched.total_steps == 20
    got = [lr for (lr,) in lrs_of(sched, 19)]
    init, final = 2.0 / 25, 2.0 / 25 / 1e4
    ends = [0.3 * 20 - 1, 2 * 0.3 * 20 - 2, 19]  # 5, 10, 19

    def f(e):
        if e <= ends[0]:
            return init + (2.0 - init) * e / ends[0]
        if e <= ends[1]:
            return 2.0 + (init - 2.0) * (e - ends[0]) / (ends[1] - ends[0])
        return init + (final - init) * (e - ends[1]) / (ends[2] - ends[1])

    assert_close([got], [[f(e) for e in range(20)]], rel=1e-12)
    assert opt.param_groups[0]["initial_lr"] == init  # overwritten, as torch


# ---------------------------------------------------------------------------- state_dict

FACTORIES = {
    "StepLR": lambda o: StepLR(o, step_size=4, gamma=0.5),
    "MultiStepLR": lambda o: MultiStepLR(o, milestones=[3, 8, 8], gamma=0.3),
    "ExponentialLR": lambda o: ExponentialLR(o, gamma=0.93),
    "LinearLR": lambda o: LinearLR(o, start_factor=0.2, total_iters=10),
    "CosineAnnealingLR": lambda o: CosineAnnealingLR(o, T_max=7, eta_min=1e-4),
    "WarmupCosine": lambda o: WarmupCosine(o, warmup_steps=4, total_steps=20, eta_min=1e-4),
    "OneCycleLR": lambda o: OneCycleLR(o, max_lr=[1.0, 0.3], total_steps=40),
    "LambdaLR": lambda o: LambdaLR(o, lr_lambda=lambda e: 1 / (1 + e)),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trip_resumes_identically(name):
    make = FACTORIES[name]
    straight = lrs_of(make(FakeOptimizer()), 30)

    opt = FakeOptimizer()
    sched = make(opt)
    first = lrs_of(sched, 12)
    state = sched.state_dict()
    assert "optimizer" not in state and state["last_epoch"] == 12
    sched.step()  # later changes do not leak into the saved dict
    assert state["last_epoch"] == 12

    opt2 = FakeOptimizer()  # a fresh process: new optimizer and scheduler, then load
    sched2 = make(opt2)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 12 and sched2.get_last_lr() == first[-1]
    assert [g["lr"] for g in opt2.param_groups] == straight[0]  # the optimizer is not touched
    for g, lr in zip(opt2.param_groups, first[-1], strict=True):  # the optimizer's own state
        g["lr"] = lr
    rest = lrs_of(sched2, 18)[1:]
    assert [*first, *rest] == straight


def test_lambda_lr_state_dict_saves_callable_objects_not_functions():
    class Factor:
        def __init__(self, k: float) -> None:
            self.k = k

        def __call__(self, e: int) -> float:
            return self.k**e

    sched = LambdaLR(FakeOptimizer(), lr_lambda=[Factor(0.5), lambda e: 1.0])
    state = sched.state_dict()
    assert state["lr_lambdas"] == [{"k": 0.5}, None]
    other = LambdaLR(FakeOptimizer(), lr_lambda=[Factor(0.9), lambda e: 1.0])
    other.load_state_dict(state)
    other.step()
    assert_close([other.get_last_lr()], [[BASES[0] * 0.5, BASES[1]]])


def test_plateau_state_dict_round_trip_with_the_optimizer_lr():
    metrics = [1.0, 1.0, 0.9, 0.9, 0.9, 0.9, 0.95, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6] * 2

    def make(o):
        return ReduceLROnPlateau(o, patience=1, cooldown=2, min_lr=[1e-3, 0.0])

    opt = FakeOptimizer()
    sched = make(opt)
    straight = []
    for m in metrics:
        sched.step(m)
        straight.append(sched.get_last_lr())

    opt = FakeOptimizer()
    sched = make(opt)
    for m in metrics[:9]:
        sched.step(m)
    state, lrs = sched.state_dict(), [g["lr"] for g in opt.param_groups]
    opt2 = FakeOptimizer()
    sched2 = make(opt2)
    sched2.load_state_dict(state)
    for g, lr in zip(opt2.param_groups, lrs, strict=True):  # the optimizer's own state
        g["lr"] = lr
    resumed = []
    for m in metrics[9:]:
        sched2.step(m)
        resumed.append(sched2.get_last_lr())
    assert resumed == straight[9:]


# ---------------------------------------------------------------------------- ReduceLROnPlateau


def plateau_run(metrics, lrs=(1.0,), **kwargs) -> list[list[float]]:
    sched = ReduceLROnPlateau(FakeOptimizer(lrs), **kwargs)
    out = []
    for m in metrics:
        sched.step(m)
        out.append(sched.get_last_lr())
    return out


def test_plateau_defaults():
    sched = ReduceLROnPlateau(FakeOptimizer())
    assert (sched.mode, sched.factor, sched.patience, sched.threshold) == ("min", 0.5, 5, 1e-4)
    assert (sched.threshold_mode, sched.cooldown, sched.min_lrs, sched.eps) == (
        "rel",
        0,
        [0.0, 0.0],
        1e-8,
    )
    assert sched.last_epoch == 0 and sched.get_last_lr() == list(BASES)


def test_plateau_patience_two_reduces_on_the_third_bad_epoch():
    got = plateau_run([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], patience=2, factor=0.5)
    # epoch 1 sets best; epochs 2, 3, 4 are bad: reduce at epoch 4, counter reset; again at 7.
    assert [lr for (lr,) in got] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_plateau_patience_zero_reduces_on_every_bad_epoch():
    got = plateau_run([1.0, 2.0, 2.0, 0.5, 0.5], patience=0, factor=0.1)
    assert_close(got, [[1.0], [0.1], [0.01], [0.01], [0.001]])


def test_plateau_improvement_resets_the_count():
    got = plateau_run([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5], patience=2)
    assert [lr for (lr,) in got] == [1.0] * 6 + [0.5]


def test_plateau_cooldown_ignores_bad_epochs():
    got = plateau_run([1.0] * 9, patience=1, cooldown=2, factor=0.5)
    # reduce at epoch 3; epochs 4-5 in cooldown; bad count restarts at epoch 6; reduce at 7.
    assert [lr for (lr,) in got] == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]


def test_plateau_min_lr_scalar_and_per_group():
    got = plateau_run([1.0] * 8, lrs=(1.0, 0.1), patience=0, factor=0.1, min_lr=[0.05, 0.0])
    assert_close([got[-1]], [[0.05, 0.1 * 0.1**7]])
    got = plateau_run([1.0] * 8, lrs=(1.0, 0.1), patience=0, factor=0.1, min_lr=0.02)
    assert_close([got[-1]], [[0.02, 0.02]])


def test_plateau_mode_max():
    got = plateau_run([0.1, 0.2, 0.2, 0.2, 0.3, 0.1], mode="max", patience=1, factor=0.5)
    assert [lr for (lr,) in got] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]


def test_plateau_abs_threshold():
    # best 1.0; 0.95 is not better by more than 0.1 (abs), 0.85 is.
    got = plateau_run([1.0, 0.95, 0.85, 0.8], threshold=0.1, threshold_mode="abs", patience=0)
    assert [lr for (lr,) in got] == [1.0, 0.5, 0.5, 0.25]
    got = plateau_run(
        [0.0, 0.05, 0.15], mode="max", threshold=0.1, threshold_mode="abs", patience=0
    )
    assert [lr for (lr,) in got] == [1.0, 0.5, 0.5]


def test_plateau_rel_threshold():
    # min/rel: better means m < best * (1 - 0.1)
    got = plateau_run([1.0, 0.91, 0.89], threshold=0.1, patience=0)
    assert [lr for (lr,) in got] == [1.0, 0.5, 0.5]


def test_plateau_eps_skips_tiny_reductions():
    got = plateau_run([1.0] * 4, lrs=(1e-8,), patience=0, factor=0.5, eps=1e-8)
    assert got == [[1e-8]] * 4  # 1e-8 - 5e-9 is not > eps
    got = plateau_run([1.0] * 2, lrs=(1e-8,), patience=0, factor=0.5, eps=0.0)
    assert got[-1] == [5e-9]
    # strictly greater: a reduction of exactly eps is skipped (2.0 - 1.0 == 1.0)
    assert plateau_run([1.0] * 2, lrs=(2.0,), patience=0, eps=1.0)[-1] == [2.0]
    assert plateau_run([1.0] * 2, lrs=(2.0,), patience=0, eps=0.999)[-1] == [1.0]


def test_plateau_negative_metric_rel_quirk_is_kept_for_torch_parity():
    # best * (1 - threshold) > best when best < 0: a constant negative metric "improves".
    got = plateau_run([-1.0] * 10, patience=0)
    assert got[-1] == [1.0]


def test_plateau_nan_metric_raises_and_changes_nothing():
    sched = ReduceLROnPlateau(FakeOptimizer(), patience=0)
    sched.step(1.0)
    before = sched.state_dict()
    with pytest.raises(ValueError, match="metrics"):
        sched.step(math.nan)
    assert sched.state_dict() == before
    assert sched.get_last_lr() == list(BASES)


def test_plateau_improving_infinity_raises_worsening_infinity_is_a_bad_epoch():
    with pytest.raises(ValueError, match="metrics"):
        plateau_run([1.0, -math.inf])
    with pytest.raises(ValueError, match="metrics"):
        plateau_run([1.0, math.inf], mode="max")
    assert [lr for (lr,) in plateau_run([1.0, math.inf, math.inf], patience=1)] == [1.0, 1.0, 0.5]
    got = plateau_run([1.0, -math.inf], mode="max", patience=0)
    assert [lr for (lr,) in got] == [1.0, 0.5]


def test_plateau_reduces_a_hand_set_lr():
    opt = FakeOptimizer()
    sched = ReduceLROnPlateau(opt, patience=0)
    sched.step(1.0)
    opt.lr = 0.2
    sched.step(1.0)
    assert sched.get_last_lr() == [0.1, 0.1]


def test_plateau_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    got = plateau_run([np.float32(1.0), np.array(1.0)], patience=0)
    assert got[-1] == [0.5]


# ---------------------------------------------------------------------------- errors

ERRORS = [
    (CosineAnnealingLR, dict(T_max=0), "T_max"),
    (CosineAnnealingLR, dict(T_max=-3), "T_max"),
    (CosineAnnealingLR, dict(T_max=10, eta_min=-1e-3), "eta_min"),
    (WarmupCosine, dict(warmup_steps=10, total_steps=10), "total_steps"),
    (WarmupCosine, dict(warmup_steps=10, total_steps=5), "total_steps"),
    (WarmupCosine, dict(warmup_steps=-1, total_steps=5), "warmup_steps"),
    (WarmupCosine, dict(warmup_steps=1, total_steps=5, eta_min=-1.0), "eta_min"),
    (StepLR, dict(step_size=0), "step_size"),
    (StepLR, dict(step_size=2.5), "step_size"),
    (StepLR, dict(step_size=2, gamma=0.0), "gamma"),
    (StepLR, dict(step_size=2, gamma=-0.5), "gamma"),
    (MultiStepLR, dict(milestones=[2, -1]), "milestones"),
    (MultiStepLR, dict(milestones=[2], gamma=0), "gamma"),
    (ExponentialLR, dict(gamma=0.0), "gamma"),
    (ExponentialLR, dict(gamma=math.inf), "gamma"),
    (LinearLR, dict(start_factor=0.0), "start_factor"),
    (LinearLR, dict(start_factor=1.5), "start_factor"),
    (LinearLR, dict(end_factor=1.5), "end_factor"),
    (LinearLR, dict(total_iters=0), "total_iters"),
    (OneCycleLR, dict(max_lr=1.0), "total_steps"),
    (OneCycleLR, dict(max_lr=1.0, total_steps=0), "total_steps"),
    (OneCycleLR, dict(max_lr=1.0, epochs=0, steps_per_epoch=3), "epochs"),
    (OneCycleLR, dict(max_lr=1.0, epochs=2, steps_per_epoch=0), "steps_per_epoch"),
    (OneCycleLR, dict(max_lr=1.0, total_steps=10, pct_start=1.2), "pct_start"),
    (OneCycleLR, dict(max_lr=1.0, total_steps=10, anneal_strategy="exp"), "anneal_strategy"),
    (OneCycleLR, dict(max_lr=1.0, total_steps=10, div_factor=0), "div_factor"),
    (OneCycleLR, dict(max_lr=1.0, total_steps=10, final_div_factor=-1), "final_div_factor"),
    (OneCycleLR, dict(max_lr=[1.0], total_steps=10), "max_lr"),
    (OneCycleLR, dict(max_lr=-1.0, total_steps=10), "max_lr"),
    (LambdaLR, dict(lr_lambda=[lambda e: 1.0]), "lr_lambda"),
    (ReduceLROnPlateau, dict(factor=1.0), "factor"),
    (ReduceLROnPlateau, dict(factor=1.5), "factor"),
    (ReduceLROnPlateau, dict(factor=-0.1), "factor"),
    (ReduceLROnPlateau, dict(mode="maximum"), "mode"),
    (ReduceLROnPlateau, dict(threshold_mode="relative"), "threshold_mode"),
    (ReduceLROnPlateau, dict(threshold=-1e-4), "threshold"),
    (ReduceLROnPlateau, dict(patience=-1), "patience"),
    (ReduceLROnPlateau, dict(cooldown=-1), "cooldown"),
    (ReduceLROnPlateau, dict(min_lr=-1.0), "min_lr"),
    (ReduceLROnPlateau, dict(min_lr=[0.0]), "min_lr"),
    (ReduceLROnPlateau, dict(eps=-1.0), "eps"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"), ERRORS, ids=[f"{c.__name__}-{n}" for c, _, n in ERRORS]
)
def test_invalid_arguments_raise_value_error_naming_them(cls, kwargs, name):
    opt = FakeOptimizer()
    with pytest.raises(ValueError, match=name):
        cls(opt, **kwargs)
    assert "initial_lr" not in opt.param_groups[0]  # validated before touching the groups


def test_non_callable_lr_lambda_is_a_type_error():
    with pytest.raises(TypeError, match="lr_lambda"):
        LambdaLR(FakeOptimizer(), lr_lambda=0.5)


@pytest.mark.parametrize(
    ("factor", "error"),
    [
        (-0.5, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        ("0.5", TypeError),
        (None, TypeError),
        (1j, TypeError),
        ([0.5], TypeError),
    ],
)
def test_lambda_lr_bad_factor_raises_at_the_scheduler_step_and_changes_nothing(factor, error):
    opt = FakeOptimizer()
    fns = [lambda e: 1.0, lambda e: factor if e == 2 else 1.0 / (e + 1)]
    sched = LambdaLR(opt, lr_lambda=fns)
    sched.step()
    groups, state = [dict(g) for g in opt.param_groups], sched.state_dict()
    with pytest.raises(error, match=r"^Invalid lr_lambda\(2\): .* in param_groups\[1\]$") as info:
        sched.step()
    assert repr(factor) in str(info.value) and "(must be a finite number >= 0" in str(info.value)
    assert opt.param_groups == groups and sched.state_dict() == state
    assert sched.get_last_lr() == [g["lr"] for g in groups]


def test_lambda_lr_bad_factor_at_construction_leaves_the_optimizer_unchanged():
    opt = FakeOptimizer()
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=r"Invalid lr_lambda\(0\): -1 .* in param_groups\[0\]"):
        LambdaLR(opt, lr_lambda=lambda e: -1)
    assert opt.param_groups == groups  # no initial_lr left behind


def test_lambda_lr_accepts_numeric_factors_of_any_real_type():
    np = pytest.importorskip("numpy")
    for factor in (True, 0, 2, np.float32(0.5), np.int64(3), np.array(0.25)):
        sched = LambdaLR(FakeOptimizer(), lr_lambda=lambda e, f=factor: f)
        assert sched.get_last_lr() == [b * float(factor) for b in BASES]


@pytest.mark.parametrize("metrics", ["x", None, [1.0, 2.0], 1j, object()])
def test_plateau_metric_that_is_not_a_number_raises_and_changes_nothing(metrics):
    sched = ReduceLROnPlateau(FakeOptimizer(), patience=0)
    sched.step(1.0)
    before = sched.state_dict()
    with pytest.raises(TypeError, match=r"Invalid metrics: .* \(must be a real number"):
        sched.step(metrics)
    assert sched.state_dict() == before
    assert sched.get_last_lr() == list(BASES)


# ---------------------------------------------------------------------------- properties


@FAST
@given(
    metrics=st.lists(
        st.sampled_from([1.0, 0.5, 2.0, 0.9999, 0.1, math.inf]) | st.floats(-10.0, 10.0),
        max_size=60,
    ),
    lr=st.floats(1e-6, 1.0),
    min_lr=st.floats(0.0, 0.1),
    factor=st.floats(0.0, 0.99),
    patience=st.integers(0, 4),
    cooldown=st.integers(0, 3),
    threshold_mode=st.sampled_from(["rel", "abs"]),
)
def test_plateau_lr_never_below_min_lr_and_never_increases(
    metrics, lr, min_lr, factor, patience, cooldown, threshold_mode
):
    opt = FakeOptimizer((lr,))
    sched = ReduceLROnPlateau(
        opt,
        factor=factor,
        patience=patience,
        cooldown=cooldown,
        min_lr=min_lr,
        threshold_mode=threshold_mode,
    )
    previous = lr
    for m in metrics:
        sched.step(m)
        (now,) = sched.get_last_lr()
        assert now <= previous
        assert now >= min(lr, min_lr)  # an lr that starts below min_lr is left alone
        assert math.isfinite(now)
        previous = now


@FAST
@given(
    base=st.floats(1e-6, 10.0),
    eta_frac=st.floats(0.0, 1.0),
    t_max=st.integers(1, 500),
    steps=st.integers(0, 1200),
)
def test_cosine_annealing_stays_in_eta_min_base(base, eta_frac, t_max, steps):
    eta_min = base * eta_frac
    sched = CosineAnnealingLR(FakeOptimizer((base,)), T_max=t_max, eta_min=eta_min)
    sched.last_epoch = steps - 1  # jump: the closed form depends on last_epoch alone
    sched.step()
    (lr,) = sched.get_last_lr()
    assert eta_min * (1 - 1e-12) <= lr <= base * (1 + 1e-12)


@FAST
@given(
    base=st.floats(1e-6, 10.0),
    eta_frac=st.floats(0.0, 1.0),
    warmup=st.integers(0, 50),
    decay=st.integers(1, 200),
    s=st.integers(0, 400),
)
def test_warmup_cosine_stays_in_range(base, eta_frac, warmup, decay, s):
    eta_min = base * eta_frac
    sched = WarmupCosine(FakeOptimizer((base,)), warmup, warmup + decay, eta_min=eta_min)
    sched.last_epoch = s - 1
    sched.step()
    (lr,) = sched.get_last_lr()
    low = 0.0 if s < warmup else eta_min * (1 - 1e-12)
    assert low <= lr <= base * (1 + 1e-12)


# ---------------------------------------------------------------------------- torch parity

TORCH_CASES = {
    "StepLR": (StepLR, dict(step_size=7, gamma=0.5)),
    "MultiStepLR": (MultiStepLR, dict(milestones=[10, 30, 30, 60], gamma=0.3)),
    "ExponentialLR": (ExponentialLR, dict(gamma=0.97)),
    "LinearLR": (LinearLR, dict(start_factor=0.1, end_factor=0.9, total_iters=40)),
    "LinearLR-defaults": (LinearLR, dict()),
    "CosineAnnealingLR": (CosineAnnealingLR, dict(T_max=30, eta_min=0.001)),
    "CosineAnnealingLR-eta0": (CosineAnnealingLR, dict(T_max=17)),
    "OneCycleLR-cos": (OneCycleLR, dict(max_lr=[1.0, 0.5], total_steps=120)),
    "OneCycleLR-linear-3phase": (
        OneCycleLR,
        dict(max_lr=0.8, total_steps=101, anneal_strategy="linear", three_phase=True),
    ),
    "LambdaLR": (LambdaLR, dict(lr_lambda=lambda e: 0.95**e * (1 + e % 3))),
}


def torch_sgd(torch):
    """torch.optim.SGD with one dummy parameter per group of BASES."""
    params = [torch.zeros(1, requires_grad=True) for _ in BASES]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(params, BASES, strict=True)]
    return torch.optim.SGD(groups), params


def torch_lrs(torch, cls_name, kwargs, steps):
    opt, params = torch_sgd(torch)
    if cls_name == "OneCycleLR":
        kwargs = dict(kwargs, cycle_momentum=False)  # ours never cycles momentum
    sched = getattr(torch.optim.lr_scheduler, cls_name)(opt, **kwargs)
    out = [[float(lr) for lr in sched.get_last_lr()]]
    for _ in range(steps):
        for p in params:
            p.grad = torch.zeros(1)
        opt.step()  # optimizer first, or torch warns
        sched.step()
        out.append([float(lr) for lr in sched.get_last_lr()])
    return out


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_matches_torch_over_100_steps(case):
    torch = pytest.importorskip("torch")
    cls, kwargs = TORCH_CASES[case]
    want = torch_lrs(torch, cls.__name__, kwargs, 100)
    got = lrs_of(cls(FakeOptimizer(), **kwargs), 100)
    # torch's step() multiplies the current lr (its chainable form); ours is the closed form.
    # MultiStepLR, LambdaLR and OneCycleLR compute the same expressions (bitwise equal);
    # ExponentialLR and LinearLR accumulate ~1 ulp per step (observed <= 1.1e-15 relative
    # after 100 steps) and CosineAnnealingLR's ratio recursion up to ~4e-14 relative near the
    # minimum. 1e-12 bounds all of them with margin while still catching any off-by-one
    # epoch (a whole step of the schedule is >= 1e-4 relative here).
    assert_close(got, want, rel=1e-12)


def test_one_cycle_matches_torch_over_its_whole_cycle():
    torch = pytest.importorskip("torch")
    kwargs = dict(max_lr=[1.0, 0.5], total_steps=100)
    want = torch_lrs(torch, "OneCycleLR", kwargs, 99)  # last_epoch 0..99: the whole cycle
    got = lrs_of(OneCycleLR(FakeOptimizer(), **kwargs), 99)
    assert got == want


PLATEAU_METRICS = ([1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, math.inf, 0.8, 0.7] * 8)[:100]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(patience=2, cooldown=1, min_lr=[1e-3, 0.0]),
        dict(mode="max", factor=0.3, patience=0, threshold=0.05, threshold_mode="abs", min_lr=1e-4),
        dict(factor=0.1, patience=3, threshold=0.2, eps=1e-3),
    ],
    ids=["min-rel-cooldown", "max-abs", "eps"],
)
def test_plateau_matches_torch_over_100_steps(kwargs):
    torch = pytest.importorskip("torch")
    kwargs = dict(mode="min", factor=0.5, threshold=1e-4, threshold_mode="rel") | kwargs
    sign = -1.0 if kwargs["mode"] == "max" else 1.0
    metrics = [sign * m for m in PLATEAU_METRICS]  # +inf in min / -inf in max: a bad epoch
    topt, _ = torch_sgd(torch)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kwargs)
    sched = ReduceLROnPlateau(FakeOptimizer(), **kwargs)
    want, got = [], []
    for m in metrics:
        tsched.step(m)
        sched.step(m)
        want.append(tsched.get_last_lr())
        got.append(sched.get_last_lr())
    assert got == want  # the same float operations in the same order: bitwise
    assert len({tuple(lrs) for lrs in got}) >= 3  # the sequence really reduces


def test_plateau_get_lr_is_the_current_lr_of_every_group():
    opt = FakeOptimizer((0.1, 0.02))
    sched = ReduceLROnPlateau(opt, factor=0.5, patience=0)
    sched.step(1.0)
    sched.step(2.0)  # bad epoch with patience 0: halve
    assert sched.get_lr() == [0.05, 0.01] == sched.get_last_lr()


def test_the_scheduler_base_class_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        LRScheduler(FakeOptimizer())
