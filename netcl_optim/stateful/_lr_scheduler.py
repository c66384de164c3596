"""Stateful learning-rate schedulers with torch's names: the ``LRScheduler`` protocol and base.

The closed-form schedulers are in :mod:`._schedulers` (and :mod:`._lambda_lr`),
:class:`ReduceLROnPlateau` in :mod:`._plateau`.

A scheduler drives any optimizer that exposes ``param_groups``, a list of dicts each holding
``"lr"``. Construction records ``group["initial_lr"]`` (``setdefault``, so a second scheduler
keeps the first one's base), sets ``base_lrs`` and performs the initial step, which sets
``last_epoch`` to 0 and writes the epoch-0 learning rate. Call ``step()`` after
``optimizer.step()``: it increments ``last_epoch`` and writes each group's learning rate.

Every scheduler except :class:`ReduceLROnPlateau` computes a **closed form** of
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
from typing import Any, Protocol, cast

from .._validation import Rule, at_least, invalid, require


class SupportsParamGroups(Protocol):
    """Anything with torch-style ``param_groups``: a list of dicts, each with ``"lr"``."""

    param_groups: list[dict[str, Any]]


def lr_groups(optimizer: Any) -> list[dict[str, Any]]:
    """``optimizer.param_groups``, checked: TypeError without it, ValueError for a group
    without ``"lr"``."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise TypeError(f"{type(optimizer).__name__} has no param_groups: not an optimizer")
    for i, group in enumerate(groups):
        if "lr" not in group:
            raise ValueError(f"param_groups[{i}] has no 'lr'")
    return groups


def per_group(name: str, value: Any, n: int, rule: Rule) -> list[float]:
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
        groups = lr_groups(optimizer)
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
        groups = lr_groups(self.optimizer)
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
        cast("dict[str, Any]", self.__dict__).update(copy.deepcopy(state_dict))
