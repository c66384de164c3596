"""Stateful learning-rate schedulers with torch's names and ``LRScheduler`` protocol.

A scheduler drives any optimizer that exposes ``param_groups``, a list of dicts each holding
``"lr"``. Construction records ``group["initial_lr"]`` (``setdefault``, so a second scheduler
keeps the first one's base), sets ``base_lrs`` and performs the initial step, which sets
``last_epoch`` to 0 and writes the epoch-0 learning rate. Call ``step()`` after
``optimizer.step()``: it increments ``last_epoch`` and writes each group's learning rate.

Every scheduler here except :class:`ReduceLROnPlateau` computes a **closed form** of
``last_epoch`` and the group's base learning rate, where torch multiplies the current
``group["lr"]`` (its chainable form). Consequences:

* no drift: after thousands of steps the value is the formula's, to rounding;
* an ``lr`` written by hand between steps (e.g. through an optimizer's ``lr`` property, which
  sets every group) lasts until the next ``step()``, which overwrites it with the closed form;
* two closed-form schedulers on one optimizer do not compose (the last ``step()`` wins);
  torch's chaining of recursive schedulers is not supported.

Closed forms agree with torch's recursive values to a few ulps (bitwise for
:class:`MultiStepLR`, :class:`LambdaLR`, :class:`OneCycleLR` and :class:`ReduceLROnPlateau`).
The maths lives in :mod:`netcl_optim.schedules._schedules` where a functional schedule has the
same formula. Schedulers never touch a device: the new value is a host float that the
optimizer passes to its kernel as a scalar argument, so no kernel is rebuilt.

``state_dict()`` holds the scheduler's own attributes (never the optimizer); restore the
optimizer's state too, as with torch. A computed learning rate that is not finite raises
``ValueError`` before any group is written.
"""

from __future__ import annotations

import abc
import copy
import math
import types
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from .._validation import (
    BOOL,
    CLOSED_UNIT,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Rule,
    at_least,
    interval,
    invalid,
    number,
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


class SupportsParamGroups(Protocol):
    """Anything with torch-style ``param_groups``: a list of dicts, each with ``"lr"``."""

    param_groups: list[dict[str, Any]]


def _groups(optimizer: Any) -> list[dict[str, Any]]:
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise TypeError(f"{type(optimizer).__name__} has no param_groups: not an optimizer")
    for i, group in enumerate(groups):
        if "lr" not in group:
            raise ValueError(f"param_groups[{i}] has no 'lr'")
    return groups


def _per_group(name: str, value: Any, n: int, rule: Rule) -> list[float]:
    """A scalar for every group, or a list/tuple with one value per group."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise invalid(name, value, f"a number or a list of {n} numbers, one per param group")
        return [require(name, v, rule, f"param_groups[{i}]") for i, v in enumerate(value)]
    return [require(name, value, rule)] * n


class LRScheduler(abc.ABC):
    """Base class: closed-form learning rate per param group as a function of ``last_epoch``.

    Subclasses implement :meth:`get_lr`, which returns the learning rates at ``last_epoch``
    from ``base_lrs`` alone.

    Args:
      optimizer: any object with ``param_groups`` (list of dicts with ``"lr"``).
      last_epoch: index of the last epoch; -1 (default) starts afresh and records
        ``group["initial_lr"] = group["lr"]`` where absent. A resumed scheduler
        (``last_epoch >= 0``) needs ``initial_lr`` in every group and moves to
        ``last_epoch + 1``.

    Raises:
      ValueError: ``last_epoch < -1``.
      KeyError: resuming without ``initial_lr`` in a group.

    If the initial step fails, the ``initial_lr`` entries it added are removed again.
    """

    def __init__(self, optimizer: SupportsParamGroups, last_epoch: int = -1) -> None:
        groups = _groups(optimizer)
        last_epoch = require("last_epoch", last_epoch, at_least(-1))
        self.optimizer = optimizer
        added: list[dict[str, Any]] = []
        if last_epoch == -1:
            added = [group for group in groups if "initial_lr" not in group]
            for group in added:
                group["initial_lr"] = group["lr"]
        else:
            for i, group in enumerate(groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param 'initial_lr' is not specified in param_groups[{i}] when "
                        f"resuming a scheduler with last_epoch={last_epoch}"
                    )
        self.base_lrs: list[float] = [float(group["initial_lr"]) for group in groups]
        self.last_epoch = last_epoch
        self._last_lr: list[float] = [float(group["lr"]) for group in groups]
        try:
            self.step()  # the initial step: last_epoch -1 -> 0
        except BaseException:
            for group in added:  # a failed construction leaves the optimizer as it was
                del group["initial_lr"]
            raise

    @abc.abstractmethod
    def get_lr(self) -> list[float]:
        """The learning rate of every param group at ``last_epoch`` (closed form)."""

    def get_last_lr(self) -> list[float]:
        """The learning rates written by the latest step, one per param group (a copy)."""
        return list(self._last_lr)

    def step(self) -> None:
        """Advance ``last_epoch`` by one and write every group's ``lr``.

        Nothing changes if the new values cannot be computed (an error, a non-finite value).
        """
        groups = _groups(self.optimizer)
        previous = self.last_epoch
        self.last_epoch = previous + 1
        try:
            values = [float(v) for v in self.get_lr()]
            if len(values) != len(groups):
                raise ValueError(
                    f"{type(self).__name__} was built for {len(values)} param groups; "
                    f"the optimizer now has {len(groups)}"
                )
            for i, v in enumerate(values):
                if not math.isfinite(v):
                    raise ValueError(
                        f"{type(self).__name__} computed lr={v!r} for param_groups[{i}] at "
                        f"epoch {self.last_epoch}"
                    )
        except BaseException:
            self.last_epoch = previous
            raise
        for group, v in zip(groups, values, strict=True):
            group["lr"] = v
        self._last_lr = values

    def state_dict(self) -> dict[str, Any]:
        """A deep copy of the scheduler's attributes, without the optimizer."""
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore attributes saved by :meth:`state_dict` (the optimizer's lr is not written).

        Closed-form schedulers write the restored schedule at the next :meth:`step`; restore
        the optimizer's own state for the current ``lr``.
        """
        self.__dict__.update(copy.deepcopy(state_dict))


def _factor(value: Any) -> float | None:
    as_bool = BOOL.convert(value)  # a bool counts as 0 or 1
    return NON_NEGATIVE.convert(value if as_bool is None else float(as_bool))


_FACTOR = Rule("a finite number >= 0, the factor of the base lr", _factor)


def _lambda_factor(value: Any, epoch: int, group: int) -> float:
    """``value``, returned by ``lr_lambda(epoch)`` for param group ``group``, as a factor."""
    return require(f"lr_lambda({epoch})", value, _FACTOR, f"param_groups[{group}]")


class LambdaLR(LRScheduler):
    """``lr = base_lr * lr_lambda(last_epoch)``.

    Args:
      optimizer: the optimizer.
      lr_lambda: a function of the epoch returning a factor, or a list of such functions,
        one per param group.
      last_epoch: see :class:`LRScheduler` (default -1).

    Raises:
      ValueError: a list of the wrong length. TypeError: a non-callable ``lr_lambda``.

    Every factor must be a finite real number >= 0 (a Python or numpy number, or a 0-d
    array; not a string): otherwise :meth:`step` (and construction, which performs the
    initial step) raises ``ValueError`` (negative, nan, inf) or ``TypeError`` (not a real
    number) naming the epoch, the param group and the value, and changes nothing.

    ``state_dict()`` saves the ``__dict__`` of callable objects, not plain functions or
    lambdas (as torch).
    """

    def __init__(
        self,
        optimizer: SupportsParamGroups,
        lr_lambda: Callable[[int], float] | Sequence[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        n = len(_groups(optimizer))
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise invalid("lr_lambda", lr_lambda, f"a function or a list of {n} functions")
            fns = list(lr_lambda)
        else:
            fns = [lr_lambda] * n
        for fn in fns:
            if not callable(fn):
                raise invalid("lr_lambda", fn, "callable", error=TypeError)
        self.lr_lambdas: list[Callable[[int], float]] = fns
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        epoch = self.last_epoch
        return [
            base * _lambda_factor(fn(epoch), epoch, i)
            for i, (fn, base) in enumerate(zip(self.lr_lambdas, self.base_lrs, strict=True))
        ]

    def state_dict(self) -> dict[str, Any]:
        state = {
            k: copy.deepcopy(v)
            for k, v in self.__dict__.items()
            if k not in ("optimizer", "lr_lambdas")
        }
        state["lr_lambdas"] = [
            None if isinstance(fn, types.FunctionType) else copy.deepcopy(fn.__dict__)
            for fn in self.lr_lambdas
        ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved = state.pop("lr_lambdas", [None] * len(self.lr_lambdas))
        super().load_state_dict(state)
        for fn, attrs in zip(self.lr_lambdas, saved, strict=True):
            if attrs is not None:
                fn.__dict__.update(copy.deepcopy(attrs))


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
        groups = _groups(optimizer)
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
        self.max_lrs = _per_group("max_lr", max_lr, len(groups), POSITIVE)
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


_COMPARISON = ("mode", "threshold", "threshold_mode")


def _comparison(
    mode: Any, threshold: Any, threshold_mode: Any, where: str = ""
) -> tuple[str, float, str]:
    """``mode``, ``threshold`` and ``threshold_mode`` of a plateau scheduler, checked."""
    return (
        require("mode", mode, one_of("min", "max"), where),
        require("threshold", threshold, NON_NEGATIVE, where),
        require("threshold_mode", threshold_mode, one_of("rel", "abs"), where),
    )


class ReduceLROnPlateau(LRScheduler):
    """Multiply the lr by ``factor`` once a metric has stopped improving (torch's algorithm).

    ``step(metrics)``: the metric improves when (mode/threshold_mode) min/rel:
    ``m < best * (1 - threshold)``; min/abs: ``m < best - threshold``; max/rel:
    ``m > best * (1 + threshold)``; max/abs: ``m > best + threshold``. An improvement sets
    ``best = m`` and ``num_bad_epochs = 0``, otherwise ``num_bad_epochs += 1``. During cooldown
    (``cooldown_counter > 0``) the counter decrements and bad epochs are ignored. When
    ``num_bad_epochs > patience`` (so ``patience=2`` reduces on the 3rd bad epoch), each group
    gets ``new = max(lr * factor, min_lr[i])``, applied only if ``lr - new > eps``; then
    ``cooldown_counter = cooldown`` and ``num_bad_epochs = 0``. It multiplies the current lr, so
    an lr set by hand (e.g. ``optimizer.lr = ...``) is the one reduced next.

    Non-finite metrics: ``nan`` raises ValueError, and so does the infinity that would become
    the best value for ever (``-inf`` in mode min, ``+inf`` in mode max); the scheduler is
    left unchanged. The other infinity (``+inf`` in min, a diverged loss) is an ordinary bad
    epoch, as in torch. As in torch (kept for parity), in rel mode a negative ``best`` makes
    ``best * (1 - threshold)`` larger than ``best``, so a constant negative metric keeps
    "improving"; use ``threshold_mode="abs"`` for metrics that can be negative.

    Args:
      optimizer: the optimizer.
      mode: ``"min"`` (default) or ``"max"``.
      factor: ``new_lr = lr * factor``, in [0, 1) (default 0.5).
      patience: bad epochs tolerated before a reduction, an integer >= 0 (default 5).
      threshold: minimal significant change, >= 0 (default 1e-4).
      threshold_mode: ``"rel"`` (default) or ``"abs"``.
      cooldown: epochs to wait after a reduction, an integer >= 0 (default 0).
      min_lr: lower bound on the lr, >= 0, or a list with one per group (default 0).
      eps: reductions smaller than ``eps`` are skipped, >= 0 (default 1e-8).

    Raises:
      ValueError: any argument out of range or unknown.
    """

    def __init__(
        self,
        optimizer: SupportsParamGroups,
        mode: str = "min",
        factor: float = 0.5,
        patience: int = 5,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
    ) -> None:
        groups = _groups(optimizer)
        self.optimizer = optimizer
        self.factor = require("factor", factor, UNIT)
        self.min_lrs = _per_group("min_lr", min_lr, len(groups), NON_NEGATIVE)
        self.default_min_lr = None if isinstance(min_lr, (list, tuple)) else self.min_lrs[0]
        self.patience = require("patience", patience, at_least(0))
        self.cooldown = require("cooldown", cooldown, at_least(0))
        self.eps = require("eps", eps, NON_NEGATIVE)
        self.last_epoch = 0
        self._last_lr = [float(group["lr"]) for group in groups]
        self._set_comparison(*_comparison(mode, threshold, threshold_mode))
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def _set_comparison(self, mode: str, threshold: float, threshold_mode: str) -> None:
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.mode_worse = math.inf if mode == "min" else -math.inf

    def is_better(self, a: float, best: float) -> bool:
        """Whether metric ``a`` improves on ``best`` by more than the threshold."""
        t = self.threshold
        if self.mode == "min":
            return a < (best * (1.0 - t) if self.threshold_mode == "rel" else best - t)
        return a > (best * (t + 1.0) if self.threshold_mode == "rel" else best + t)

    @property
    def in_cooldown(self) -> bool:
        """Whether bad epochs are currently ignored after a reduction."""
        return self.cooldown_counter > 0

    def get_lr(self) -> list[float]:
        """The current learning rate of every param group (a plateau has no closed form)."""
        return [float(group["lr"]) for group in _groups(self.optimizer)]

    def step(self, metrics: Any) -> None:  # type: ignore[override]
        """Record one epoch's metric and reduce the lr after more than ``patience`` bad epochs.

        Args:
          metrics: the monitored value (anything ``float()`` accepts, e.g. a 0-d array).

        Raises:
          TypeError: ``float(metrics)`` fails (not a real number).
          ValueError: ``metrics`` is nan, or the infinity that would be best for ever.

        The scheduler and the optimizer are unchanged when it raises.
        """
        best_for_ever = -self.mode_worse
        metric = number(
            f"a real number, not nan nor {best_for_ever} in mode {self.mode!r}",
            lambda f: f != best_for_ever,
        )
        current = require("metrics", metrics, metric)
        groups = _groups(self.optimizer)
        self.last_epoch += 1
        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs are ignored during cooldown
        if self.num_bad_epochs > self.patience:
            self._reduce_lr(groups)
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = [float(group["lr"]) for group in groups]

    def _reduce_lr(self, groups: list[dict[str, Any]]) -> None:
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"The optimizer has {len(groups)} param groups but min_lr has "
                    f"{len(self.min_lrs)} values; set min_lrs to one value per group"
                )
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs, strict=True):
            old = float(group["lr"])
            new = max(old * self.factor, min_lr)
            if old - new > self.eps:
                group["lr"] = new

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore attributes saved by :meth:`state_dict`, checking mode and threshold first
        (nothing changes if they are invalid)."""
        saved = {k: state_dict.get(k, getattr(self, k)) for k in _COMPARISON}
        comparison = _comparison(**saved, where="the loaded state_dict")
        super().load_state_dict(state_dict)
        self._set_comparison(*comparison)
