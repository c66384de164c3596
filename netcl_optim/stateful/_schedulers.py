"""Closed-form learning-rate schedulers: torch's StepLR, MultiStepLR, ExponentialLR, LinearLR,
CosineAnnealingLR and OneCycleLR, and WarmupCosine.

Each computes the learning rate from ``last_epoch`` and the group's base learning rate with
the formula of a functional schedule in :mod:`netcl_optim.schedules._schedules` (see
:mod:`._lr_scheduler` for the protocol and how closed forms differ from torch's chaining).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from .._validation import (
    CLOSED_UNIT,
    NON_NEGATIVE,
    POSITIVE,
    Rule,
    at_least,
    interval,
    one_of,
    require,
)
from ..schedules._schedules import (
    _cosine_interpolate,
    _linear_interpolate,
    exponential_decay,
    linear_schedule,
    piecewise_constant_schedule,
    warmup_cosine_decay_schedule,
)
from ._lr_scheduler import LRScheduler, SupportsParamGroups, lr_groups, per_group


class StepLR(LRScheduler):
    """``lr = base_lr * gamma ** (last_epoch // step_size)``.

    Args:
      optimizer: the optimizer.
      step_size: period of the decay in epochs, an integer >= 1.
      gamma: factor per period, > 0 (default 0.1).
      last_epoch: see :class:`LRScheduler` (default -1).

    Raises:
      ValueError: ``step_size < 1`` or ``gamma <= 0``.
    """

    def __init__(
        self,
        optimizer: SupportsParamGroups,
        step_size: int,
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        self.step_size = require("step_size", step_size, at_least(1))
        self.gamma = require("gamma", gamma, POSITIVE)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            exponential_decay(base, self.step_size, self.gamma, staircase=True)(self.last_epoch)
            for base in self.base_lrs
        ]


class MultiStepLR(LRScheduler):
    """``lr = base_lr * gamma ** (number of milestones <= last_epoch)``.

    A milestone listed twice counts twice (as torch).

    Args:
      optimizer: the optimizer.
      milestones: epoch indices, integers >= 0.
      gamma: factor per milestone, > 0 (default 0.1).
      last_epoch: see :class:`LRScheduler` (default -1).

    Raises:
      ValueError: a negative or non-integer milestone, or ``gamma <= 0``.
    """

    def __init__(
        self,
        optimizer: SupportsParamGroups,
        milestones: Iterable[int],
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        milestones = list(milestones)
        self.milestones = sorted(
            require(f"milestones[{i}]", m, at_least(0)) for i, m in enumerate(milestones)
        )
        self.gamma = require("gamma", gamma, POSITIVE)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        scales = {m: self.gamma**c for m, c in Counter(self.milestones).items()}
        return [piecewise_constant_schedule(b, scales)(self.last_epoch) for b in self.base_lrs]


class ExponentialLR(LRScheduler):
    """``lr = base_lr * gamma ** last_epoch``.

    Args:
      optimizer: the optimizer.
      gamma: factor per epoch, > 0.
      last_epoch: see :class:`LRScheduler` (default -1).

    Raises:
      ValueError: ``gamma <= 0``.
    """

    def __init__(self, optimizer: SupportsParamGroups, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = require("gamma", gamma, POSITIVE)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [exponential_decay(b, 1, self.gamma)(self.last_epoch) for b in self.base_lrs]


class LinearLR(LRScheduler):
    """``lr = base_lr * (start + (end - start) * min(last_epoch, total_iters) / total_iters)``.

    Args:
      optimizer: the optimizer.
      start_factor: factor at epoch 0, in (0, 1] (default 1/3).
      end_factor: factor from ``total_iters`` on, in [0, 1] (default 1).
      total_iters: length of the ramp, an integer >= 1 (default 5).
      last_epoch: see :class:`LRScheduler` (default -1).

    Raises:
      ValueError: a factor out of range or ``total_iters < 1``.
    """

    def __init__(
        self,
        optimizer: SupportsParamGroups,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        self.start_factor = require("start_factor", start_factor, interval(0, 1, "(]"))
        self.end_factor = require("end_factor", end_factor, CLOSED_UNIT)
        self.total_iters = require("total_iters", total_iters, at_least(1))
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            linear_schedule(b * self.start_factor, b * self.end_factor, self.total_iters)(
                self.last_epoch
            )
            for b in self.base_lrs
        ]


class CosineAnnealingLR(LRScheduler):
    """``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * last_epoch / T_max)) / 2``.

    The closed form of torch's CosineAnnealingLR: periodic, so the value rises again after
    ``T_max`` (period ``2 * T_max``). Use :class:`WarmupCosine` (or
    :func:`~netcl_optim.schedules.cosine_decay_schedule`) for a schedule that stays at
    ``eta_min``.

    Args:
      optimizer: the optimizer.
      T_max: half period in epochs, > 0.
      eta_min: minimum learning rate, >= 0 (default 0).
      last_epoch: see :class:`LRScheduler` (default -1).

    Raises:
      ValueError: ``T_max <= 0`` or ``eta_min < 0``.
    """

    def __init__(
        self,
        optimizer: SupportsParamGroups,
        T_max: float,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.T_max = require("T_max", T_max, POSITIVE)
        self.eta_min = require("eta_min", eta_min, NON_NEGATIVE)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        pct = self.last_epoch / self.T_max
        return [_cosine_interpolate(b, self.eta_min, pct) for b in self.base_lrs]


class WarmupCosine(LRScheduler):
    """Linear warmup from 0 to the base lr, then cosine decay to ``eta_min``, then constant.

    With ``s = last_epoch`` (the number of ``step()`` calls since construction):

    * ``s < warmup_steps``: ``lr = base_lr * s / warmup_steps``;
    * else, with ``prog = min(s - warmup_steps, D) / D`` and ``D = total_steps - warmup_steps``:
      ``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * prog)) / 2``.

    This is ``warmup_cosine_decay_schedule(0, base_lr, warmup_steps, total_steps,
    eta_min)(s)``. With ``warmup_steps > 0`` the first optimizer step (before any
    ``sched.step()``) uses lr 0. ``warmup_steps=0`` is a pure cosine decay that, unlike
    :class:`CosineAnnealingLR`, stays at ``eta_min`` after ``total_steps``. A group whose base
    lr is 0 stays at 0.

    Args:
      optimizer: the optimizer.
      warmup_steps: warmup length in scheduler steps, an integer >= 0.
      total_steps: warmup plus decay length, an integer > ``warmup_steps``.
      eta_min: final learning rate, >= 0 (default 0).
      last_epoch: see :class:`LRScheduler` (default -1).

    Raises:
      ValueError: ``warmup_steps < 0``, ``total_steps <= warmup_steps`` or ``eta_min < 0``.
    """

    def __init__(
        self,
        optimizer: SupportsParamGroups,
        warmup_steps: int,
        total_steps: int,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        w = require("warmup_steps", warmup_steps, at_least(0))
        after_warmup = Rule(f"an int > warmup_steps = {w}", at_least(w + 1).convert)
        self.warmup_steps = w
        self.total_steps = require("total_steps", total_steps, after_warmup)
        self.eta_min = require("eta_min", eta_min, NON_NEGATIVE)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        w, t, m = self.warmup_steps, self.total_steps, self.eta_min
        return [
            warmup_cosine_decay_schedule(0.0, b, w, t, m)(self.last_epoch) for b in self.base_lrs
        ]


class OneCycleLR(LRScheduler):
    """torch's 1cycle policy, learning rate only (momentum is not cycled).

    With ``initial = max_lr / div_factor`` and ``min = initial / final_div_factor``, the
    phases end at steps ``pct_start * T - 1`` and ``T - 1`` (``T = total_steps``); three-phase
    adds ``2 * pct_start * T - 2``, symmetric about the peak. In each phase
    ``lr = anneal(start, end, (step - phase_start) / (phase_end - phase_start))`` with
    ``anneal`` cosine (``end + (start - end) * (1 + cos(pi * pct)) / 2``) or linear. Two phases:
    initial -> max_lr -> min; three phases: initial -> max_lr -> initial -> min.

    Unlike torch, momentum/betas are never touched (no ``cycle_momentum``), and the one step
    past the end that torch allows (``last_epoch == total_steps``) holds ``min`` instead of
    extrapolating (torch's linear anneal goes negative there). More steps raise ValueError,
    leaving the scheduler unchanged. Construction overwrites ``group["initial_lr"]``.

    Args:
      optimizer: the optimizer.
      max_lr: peak learning rate, > 0, or a list with one per param group.
      total_steps: steps in the cycle, an integer >= 1; else ``epochs * steps_per_epoch``.
      epochs: number of epochs, an integer >= 1 (with ``steps_per_epoch``).
      steps_per_epoch: steps per epoch, an integer >= 1 (with ``epochs``).
      pct_start: fraction of the cycle spent increasing the lr, in [0, 1] (default 0.3).
      anneal_strategy: ``"cos"`` (default) or ``"linear"``.
      div_factor: ``initial = max_lr / div_factor``, > 0 (default 25).
      final_div_factor: ``min = initial / final_div_factor``, > 0 (default 1e4).
      three_phase: use the three-phase schedule (default False).
      last_epoch: see :class:`LRScheduler` (default -1).

    Raises:
      ValueError: any argument out of range, or neither ``total_steps`` nor both ``epochs``
        and ``steps_per_epoch``.
    """

    def __init__(
        self,
        optimizer: SupportsParamGroups,
        max_lr: float | Sequence[float],
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        groups = lr_groups(optimizer)
        if total_steps is not None:
            self.total_steps = require("total_steps", total_steps, at_least(1))
        elif epochs is not None and steps_per_epoch is not None:
            e = require("epochs", epochs, at_least(1))
            self.total_steps = e * require("steps_per_epoch", steps_per_epoch, at_least(1))
        else:
            raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")
        pct = require("pct_start", pct_start, CLOSED_UNIT)
        require("anneal_strategy", anneal_strategy, one_of("cos", "linear"))
        div = require("div_factor", div_factor, POSITIVE)
        final_div = require("final_div_factor", final_div_factor, POSITIVE)
        self.pct_start = pct
        self.anneal_strategy = anneal_strategy
        self.div_factor = div
        self.final_div_factor = final_div
        self.three_phase = bool(three_phase)
        self.max_lrs = per_group("max_lr", max_lr, len(groups), POSITIVE)
        self.initial_lrs = [m / div for m in self.max_lrs]
        self.min_lrs = [i / final_div for i in self.initial_lrs]
        total = self.total_steps
        if self.three_phase:
            ends = [pct * total - 1, 2 * pct * total - 2, total - 1]
            self._phases = [(ends[0], 0, 1), (ends[1], 1, 0), (ends[2], 0, 2)]
        else:
            self._phases = [(pct * total - 1, 0, 1), (total - 1, 1, 2)]
        if last_epoch == -1:
            for group, initial in zip(groups, self.initial_lrs, strict=True):
                group["initial_lr"] = initial
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(
                f"Tried to step {step} times. The specified number of total steps is "
                f"{self.total_steps}"
            )
        anneal = _cosine_interpolate if self.anneal_strategy == "cos" else _linear_interpolate
        lrs = []
        for lr_points in zip(self.initial_lrs, self.max_lrs, self.min_lrs, strict=True):
            start_step = 0.0
            for i, (end_step, a, b) in enumerate(self._phases):
                if step <= end_step or i == len(self._phases) - 1:
                    span = end_step - start_step
                    pct = 1.0 if span == 0 else min((step - start_step) / span, 1.0)
                    lrs.append(anneal(lr_points[a], lr_points[b], pct))
                    break
                start_step = end_step
        return lrs
