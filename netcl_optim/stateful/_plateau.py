"""ReduceLROnPlateau: the one scheduler driven by a metric rather than by a closed form."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .._validation import NON_NEGATIVE, UNIT, at_least, number, one_of, require
from ._lr_scheduler import LRScheduler, SupportsParamGroups, lr_groups, per_group

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
        groups = lr_groups(optimizer)
        self.optimizer = optimizer
        self.factor = require("factor", factor, UNIT)
        self.min_lrs = per_group("min_lr", min_lr, len(groups), NON_NEGATIVE)
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
        return [float(group["lr"]) for group in lr_groups(self.optimizer)]

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
        groups = lr_groups(self.optimizer)
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
